"""The one place that builds the publisher's parts from a :class:`~publisher.config.PublisherConfig`: the
backend, the registry client and the :class:`~publisher.pipeline.Publisher` that owns both.

``config`` stays data and validation only; the CLI, the daemon and ``gc`` call these."""

from __future__ import annotations

from cvmfs_snap.errors import InvalidInputError
from cvmfs_snap.oci import CredentialStore, RegistryClient
from publisher.backends.base import Backend
from publisher.backends.cvmfs import CvmfsIngestBackend, CvmfsTransactionBackend
from publisher.backends.local import LocalBackend
from publisher.config import PublisherConfig
from publisher.pipeline import ProgressSink, Publisher


def make_backend(config: PublisherConfig) -> Backend:
    """The backend the configuration names, rooted at ``config.repository_root()``."""
    root = config.repository_root()
    if config.backend == "local":
        return LocalBackend(root, config.state_dir, limits=config.limits)
    if not config.repo:
        raise InvalidInputError(
            f"the {config.backend} backend needs the repository name: pass --repo NAME (or cvmfs_repo in the recipe)"
        )
    cls = CvmfsIngestBackend if config.backend == "cvmfs-ingest" else CvmfsTransactionBackend
    backend = cls(root, config.repo, cvmfs_server=config.cvmfs_server, state_dir=config.effective_state_dir(),
                  lease_path=config.lease_path, timeout=config.cvmfs_server_timeout,
                  min_rate=config.cvmfs_server_min_rate_mib * (1 << 20))
    backend.limits = config.limits
    return backend


def make_client(config: PublisherConfig) -> RegistryClient:
    """A registry client with the configuration's credentials, insecure registries, timeouts and deadlines."""
    return RegistryClient(
        credentials=CredentialStore.from_docker_config(config.docker_config),
        insecure_registries=list(config.insecure_registries),
        timeout=config.registry_timeout,
        retries=config.registry_retries,
        transfer_deadline=float(config.registry_deadline),
        blob_min_rate=float(config.registry_min_rate),
    )


def make_publisher(config: PublisherConfig, progress: ProgressSink | None = None) -> Publisher:
    """A publisher owning a new backend (leftovers of killed runs cleaned first) and a new registry client."""
    backend = make_backend(config)
    backend.recover()
    return Publisher(
        backend, make_client(config), concurrency=config.concurrency, skip_flat=config.skip_flat,
        platforms=config.platforms, progress=progress, state_dir=config.effective_state_dir(),
        limits=config.limits, owns_client=True,
    )


__all__ = ["make_backend", "make_client", "make_publisher"]
