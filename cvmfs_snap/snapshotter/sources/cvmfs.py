"""The CVMFS layer source: serve a layer straight from the repository when it is published there.

``lookup`` answers at ``Prepare`` time whether the layer named by containerd's labels is complete in the repository
(then the snapshot core commits a remote snapshot and containerd never downloads the blob). ``lowerdirs`` answers at
``Mounts`` time with the directories to stack for the layer: the CVMFS ``layerfs`` between two node-local
directories that translate the tree's plain ``.wh.*`` files into overlay whiteouts (see :mod:`.overlaydirs`).

Every file-system call on the repository goes through a worker thread with a timeout (:mod:`.health`): a hung or
broken CVMFS client must turn into "pull normally" at ``Prepare`` and a clear ``UnavailableError`` at ``Mounts``,
never into a hung containerd.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path

from cvmfs_snap.errors import IntegrityError, InvalidInputError, NotFoundError, UnavailableError
from cvmfs_snap.layer import scan_tree_whiteouts
from cvmfs_snap.layout import RepositoryLayout, digest_hex

from .base import LABEL_CRI_LAYER_DIGEST, LABEL_LAYER_DIGEST, LABEL_SOURCE, LABEL_TARGET_REF, RemoteLayer
from .health import HealthStatus, RepositoryHealth, call_with_timeout
from .overlaydirs import LayerIndex, OverlayDirCache, OverlayDirs, root_markers

log = logging.getLogger(__name__)

#: errors that mean the whole CVMFS mount is broken (not just one path in it)
_MOUNT_BROKEN_ERRNOS = frozenset({errno.ENOTCONN, errno.ESHUTDOWN, errno.ECONNABORTED})


class CvmfsSource:
    """A :class:`~.base.LayerSource` for layers published under ``repository_root`` (``/cvmfs/<repo>``).

    ``state_dir`` is node-local (not on CVMFS): the per-layer whiteout directories and cached indexes live there.
    ``fs_timeout`` bounds each quick file-system call on the repository (stat, layer.json), ``build_timeout`` the
    first-use build of a layer's directories (a DUCC layer without layer.json is scanned once, which can take a while
    on a cold cache); ``health_ttl`` is how long a health probe is trusted.
    """

    def __init__(self, repository_root: Path, state_dir: Path, *, name: str = "cvmfs", health_ttl: float = 5.0,
                 fs_timeout: float = 10.0, build_timeout: float = 300.0) -> None:
        self.name = name
        self.root = Path(repository_root)
        self.layout = RepositoryLayout(self.root)
        self.fs_timeout = fs_timeout
        self.build_timeout = build_timeout
        self.health_monitor = RepositoryHealth(self.root, ttl=health_ttl, timeout=fs_timeout, name=name)
        self.dirs = OverlayDirCache(Path(os.path.realpath(state_dir)))
        self.dirs.cleanup_temporaries()
        self._warned: set[str] = set()
        self._warned_lock = threading.Lock()

    # -- LayerSource ----------------------------------------------------------------------------------------------
    def lookup(self, labels: Mapping[str, str]) -> RemoteLayer | None:
        """A RemoteLayer if the layer the labels name is complete in the repository, else None (pull normally).

        Raises InvalidInputError only for hostile or contradictory digest labels; CVMFS trouble is logged (once
        per outage) and answered with None.
        """
        digest = self._digest_from_labels(labels)
        if digest is None or not labels.get(LABEL_TARGET_REF):
            return None
        status = self.health_monitor.status()
        if not status.available:
            log.debug("layer %s: not served from %s, the repository is unavailable", digest, self.root)
            return None
        try:
            complete = call_with_timeout(lambda: self._is_complete(digest), self.fs_timeout,
                                         f"looking up layer {digest} in {self.root}")
        except UnavailableError as exc:
            self.health_monitor.mark_unavailable(str(exc))
            return None
        except OSError as exc:
            self._fs_error(digest, exc)
            return None
        if not complete:
            log.debug("layer %s is not published in %s: normal pull", digest, self.root)
            return None
        log.debug("layer %s is served from %s", digest, self.root)
        return RemoteLayer(source=self.name, digest=digest,
                           labels={LABEL_SOURCE: self.name, LABEL_LAYER_DIGEST: digest})

    def lowerdirs(self, digest: str) -> list[Path]:
        """The overlay lowerdirs for the layer, top-most first: [mask, layerfs, lower] without the empty ones.

        Raises InvalidInputError (bad digest), UnavailableError (CVMFS down or hung, node-local state not writable),
        NotFoundError (the layer is no longer in the repository), IntegrityError (its whiteout index is corrupt).
        """
        hexd = digest_hex(digest)
        what = f"mounting layer {digest} from {self.root}"
        self.health_monitor.require(what)
        try:
            layerfs = call_with_timeout(lambda: self._layerfs_if_complete(digest), self.fs_timeout, what)
        except UnavailableError as exc:
            self.health_monitor.mark_unavailable(str(exc))
            raise
        except OSError as exc:
            raise self._fs_error(digest, exc) from exc
        if layerfs is None:
            # The layer itself, or the whole repository? Only the first means "pull again"; during a CVMFS outage
            # that advice would be wrong, so ask the repository afresh.
            self.health_monitor.status(force=True)
            self.health_monitor.require(what)
            raise NotFoundError(
                f"layer {digest} is no longer published in the CVMFS repository {self.root} (no complete "
                f"{self.layout.layerfs(digest)}); remove the image from containerd and pull it again"
            )
        try:
            dirs = call_with_timeout(lambda: self._overlay_dirs(digest, hexd, layerfs), self.build_timeout,
                                     f"building the whiteout directories of layer {digest}")
        except OSError as exc:
            raise self._fs_error(digest, exc) from exc
        return [p for p in (dirs.upper, layerfs, dirs.lower) if p is not None]

    # -- extras ---------------------------------------------------------------------------------------------------
    def health(self, *, force: bool = False) -> HealthStatus:
        """The repository's health (cached for ``health_ttl`` s): availability, CVMFS revision and name."""
        return self.health_monitor.status(force=force)

    def forget(self, digest: str) -> None:
        """Drop the node-local directories of a layer (when no snapshot uses it); they are rebuilt on next use."""
        self.dirs.remove(digest_hex(digest))

    # -- internals ------------------------------------------------------------------------------------------------
    @staticmethod
    def _digest_from_labels(labels: Mapping[str, str]) -> str | None:
        cri = labels.get(LABEL_CRI_LAYER_DIGEST)
        ours = labels.get(LABEL_LAYER_DIGEST)
        if cri is not None:
            digest_hex(cri)
        if ours is not None:
            digest_hex(ours)
        if cri is not None and ours is not None and cri != ours:
            raise InvalidInputError(
                f"contradictory layer digest labels: {LABEL_CRI_LAYER_DIGEST}={cri} but {LABEL_LAYER_DIGEST}={ours}"
            )
        return cri if cri is not None else ours

    def _is_complete(self, digest: str) -> bool:
        if self.layout.is_layer_complete(digest):
            return True
        if self.layout.layer_json(digest).is_file():
            self._warn_once(digest, "layer %s: %s exists but is malformed or its layerfs is missing; the layer is "
                            "pulled normally. Republish it.", digest, self.layout.layer_json(digest))
        return False

    def _layerfs_if_complete(self, digest: str) -> Path | None:
        if not self._is_complete(digest):
            return None
        real_root = Path(os.path.realpath(self.root))
        return RepositoryLayout(real_root).layerfs(digest)

    def _overlay_dirs(self, digest: str, hexd: str, layerfs: Path) -> OverlayDirs:
        return self.dirs.get(digest, hexd, layerfs, lambda: self._index(digest, layerfs))

    def _index(self, digest: str, layerfs: Path) -> LayerIndex:
        """The whiteout index: from our layer.json when there is one, else (DUCC layers) by scanning the layerfs."""
        try:
            rec = self.layout.read_layer_record(digest)
        except InvalidInputError as exc:
            raise IntegrityError(f"layer {digest}: {exc}; republish the layer") from exc
        if rec is not None:
            return LayerIndex.from_record(rec.whiteouts, rec.opaque_dirs, root_markers(layerfs), aufs_meta=rec.hidden)
        log.info("layer %s has no %s (published by DUCC?): scanning %s once for whiteouts", digest,
                 self.layout.layer_json(digest).name, layerfs)
        idx = scan_tree_whiteouts(layerfs)
        return LayerIndex.from_record(idx.whiteouts, idx.opaque_dirs, root_markers(layerfs), origin="scan",
                                      aufs_meta=idx.hidden)

    def _fs_error(self, digest: str, exc: OSError) -> UnavailableError:
        """Log an OSError met on the repository and turn it into the UnavailableError to raise at Mounts."""
        reason = f"{errno.errorcode.get(exc.errno or 0, str(exc.errno))}: {exc.strerror or exc}"
        if exc.errno in _MOUNT_BROKEN_ERRNOS:
            self.health_monitor.mark_unavailable(reason)
        else:
            self._warn_once(digest, "layer %s: error reading it from CVMFS repository %s (%s); it is pulled "
                            "normally. Check the CVMFS client log.", digest, self.root, reason)
        return UnavailableError(f"layer {digest}: error reading it from the CVMFS repository {self.root} ({reason}); "
                                "check the CVMFS client on this node (`cvmfs_config probe`) and retry")

    def _warn_once(self, key: str, msg: str, *args: object) -> None:
        with self._warned_lock:
            if key in self._warned:
                return
            self._warned.add(key)
        log.warning(msg, *args)
