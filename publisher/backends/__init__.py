"""Publisher backends: ``local`` (a plain directory), ``cvmfs-ingest`` and ``cvmfs-transaction`` (``cvmfs_server``).

See :mod:`publisher.backends.base` for the interface every backend implements.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cvmfs_snap.errors import InvalidInputError

from .base import Backend, LayerInfo, Txn

if TYPE_CHECKING:
    from publisher.config import PublisherConfig

__all__ = ["Backend", "LayerInfo", "Txn", "make_backend"]


def make_backend(config: PublisherConfig) -> Backend:
    """The backend the configuration names, rooted at ``config.repository_root()``."""
    root = config.repository_root()
    if config.backend == "local":
        from .local import LocalBackend

        return LocalBackend(root, config.state_dir, limits=config.limits)
    if not config.repo:
        raise InvalidInputError(
            f"the {config.backend} backend needs the repository name: pass --repo NAME (or cvmfs_repo in the recipe)"
        )
    from .cvmfs import CvmfsIngestBackend, CvmfsTransactionBackend

    cls = CvmfsIngestBackend if config.backend == "cvmfs-ingest" else CvmfsTransactionBackend
    backend = cls(root, config.repo, cvmfs_server=config.cvmfs_server, state_dir=config.effective_state_dir(),
                  lease_path=config.lease_path, timeout=config.cvmfs_server_timeout,
                  min_rate=config.cvmfs_server_min_rate_mib * (1 << 20))
    backend.limits = config.limits
    return backend
