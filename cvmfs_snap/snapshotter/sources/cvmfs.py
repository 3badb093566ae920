"""The CVMFS layer source: serve a layer straight from the repository when it is published there.

``lookup`` answers at ``Prepare`` time whether the layer a request names is complete in the repository (then the
snapshot core commits a remote snapshot and containerd never downloads the blob). ``mount_dirs`` answers at
``Mounts`` time with the directories to stack for the layer: the CVMFS ``layerfs`` between two node-local
directories that translate the tree's plain ``.wh.*`` files into overlay whiteouts (see :mod:`.overlaydirs`);
``release`` drops those node-local directories when no snapshot uses the layer any more.

A client mounted with ``CVMFS_CLAIM_OWNERSHIP=yes`` (the CVMFS default) shows every file as owned by the ``cvmfs``
user, so containers would see wrong owners. The first lookups sample the owners of the layer asked for (its root and
first entries): when every one is the ``cvmfs`` user's uid and gid, the client claims ownership, one error says so,
and the source serves nothing (layers are pulled normally) until a later sample (every minute) finds real owners.

Every file-system call on the repository goes through a worker thread with a timeout (:mod:`.health`): a hung or
broken CVMFS client must turn into "pull normally" at ``Prepare`` and a clear ``UnavailableError`` at ``Mounts``,
never into a hung containerd.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from cvmfs_snap.errors import IntegrityError, InvalidInputError, NotFoundError, UnavailableError
from cvmfs_snap.labelnames import SNAPSHOT_LAYER_DIGEST, SNAPSHOT_SOURCE
from cvmfs_snap.layer import scan_tree_whiteouts
from cvmfs_snap.layout import RepositoryLayout, digest_hex

from .base import LayerRequest, RemoteLayer, SourceHealth
from .health import CallBudget, HealthStatus, RepositoryHealth, call_with_timeout
from .overlaydirs import LayerIndex, OverlayDirCache, OverlayDirs, root_markers

log = logging.getLogger(__name__)

T = TypeVar("T")

#: errors that mean the whole CVMFS mount is broken (not just one path in it)
_MOUNT_BROKEN_ERRNOS = frozenset({errno.ENOTCONN, errno.ESHUTDOWN, errno.ECONNABORTED})
#: the user a CVMFS client runs as, whose uid/gid a claiming client shows on every entry
CVMFS_USER = "cvmfs"
#: entries of a layer sampled for the ownership check, and how long a verdict is trusted
OWNER_SAMPLE = 16
OWNER_TTL = 60.0


def cvmfs_user_ids(user: str = CVMFS_USER) -> tuple[int, int] | None:
    """(uid, gid) of the node's CVMFS client user, None if it has none (then the ownership check is off)."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return None
    return pw.pw_uid, pw.pw_gid


def sample_owners(layerfs: Path, limit: int = OWNER_SAMPLE) -> list[tuple[int, int]]:
    """(uid, gid) of a layer's root and of its first entries, one level down too (a handful of lstat calls)."""
    owners: list[tuple[int, int]] = []
    todo = [layerfs]
    while todo and len(owners) < limit:
        d = todo.pop(0)
        st = os.lstat(d)
        owners.append((st.st_uid, st.st_gid))
        if d != layerfs:
            continue
        with os.scandir(d) as it:
            for e in it:
                if len(owners) + len(todo) >= limit:
                    break
                if e.is_dir(follow_symlinks=False):
                    todo.append(Path(e.path))
                else:
                    est = e.stat(follow_symlinks=False)
                    owners.append((est.st_uid, est.st_gid))
    return owners


class CvmfsSource:
    """A :class:`~.base.LayerSource` for layers published under ``repository_root`` (``/cvmfs/<repo>``).

    ``state_dir`` is node-local (not on CVMFS): the per-layer whiteout directories and cached indexes live there.
    ``fs_timeout`` bounds each quick file-system call on the repository (stat, layer.json), ``build_timeout`` the
    first-use build of a layer's directories (a DUCC layer without layer.json is scanned once, which can take a while
    on a cold cache); ``health_ttl`` is how long a health probe is trusted; ``budget`` bounds the calls that may hang
    at once (the registry gives each source its own). ``claim_owner`` is the (uid, gid) a claiming client shows
    (default: the node's ``cvmfs`` user; None turns the ownership check off).
    """

    def __init__(self, repository_root: Path, state_dir: Path, *, name: str = "cvmfs", health_ttl: float = 5.0,
                 fs_timeout: float = 10.0, build_timeout: float = 300.0, budget: CallBudget | None = None,
                 claim_owner: tuple[int, int] | str | None = CVMFS_USER) -> None:
        self.name = name
        self.root = Path(repository_root)
        self.layout = RepositoryLayout(self.root)
        self.fs_timeout = fs_timeout
        self.build_timeout = build_timeout
        self.budget = budget if budget is not None else CallBudget(name)
        self.health_monitor = RepositoryHealth(self.root, ttl=health_ttl, timeout=fs_timeout, name=name,
                                               budget=self.budget)
        self.claim_owner = cvmfs_user_ids(claim_owner) if isinstance(claim_owner, str) else claim_owner
        self._claiming: tuple[bool, float] | None = None  # (verdict, when) of the last ownership sample
        self.dirs = OverlayDirCache(Path(os.path.realpath(state_dir)))
        self.dirs.cleanup_temporaries()
        self._warned: set[str] = set()
        self._warned_lock = threading.Lock()

    # -- LayerSource ----------------------------------------------------------------------------------------------
    def lookup(self, request: LayerRequest) -> RemoteLayer | None:
        """A RemoteLayer if the layer the request names is complete in the repository, else None (pull normally).

        CVMFS trouble is logged (once per outage) and answered with None."""
        digest = request.digest
        if not digest or not request.target:
            return None
        status = self.health_monitor.status()
        if not status.available:
            log.debug("layer %s: not served from %s, the repository is unavailable", digest, self.root)
            return None
        try:
            complete = self._call(lambda: self._is_complete(digest), self.fs_timeout,
                                  f"looking up layer {digest} in {self.root}")
            if complete and self._claims_ownership(digest):
                return None
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
                           labels={SNAPSHOT_SOURCE: self.name, SNAPSHOT_LAYER_DIGEST: digest})

    def mount_dirs(self, request: LayerRequest) -> list[Path]:
        return self.lowerdirs(request.digest)

    def check(self, request: LayerRequest) -> None:
        """Raise UnavailableError if the repository is known to be unavailable (the cached health only: containerd
        asks this for every layer of an image it has already, and that must stay fast during an outage)."""
        st = self.health_monitor.status()
        if not st.available:
            raise UnavailableError(f"layer {request.digest}: the CVMFS repository at {self.root} is not available "
                                   f"({st.reason})")

    def release(self, digest: str) -> None:
        """Drop the node-local directories of a layer (every format version). The core calls it only when no
        snapshot uses the layer; they are rebuilt on next use."""
        self.dirs.remove(digest_hex(digest))

    def held(self) -> list[str]:
        return ["sha256:" + h for h in self.dirs.held()]

    def state_paths(self, digest: str) -> list[Path]:
        return self.dirs.paths(digest_hex(digest))

    def restore(self, requests: Sequence[LayerRequest]) -> None:
        """Nothing to re-attach: the repository is mounted by the CVMFS client, our dirs are on disk."""
        log.debug("layer source %s: %d remote layers in the metadata", self.name, len(requests))

    def health(self, *, force: bool = False) -> SourceHealth:
        st = self.health_monitor.status(force=force)
        if st.available and self._claiming is not None and self._claiming[0]:
            return SourceHealth(False, "the CVMFS client claims ownership of every file (CVMFS_CLAIM_OWNERSHIP)")
        return SourceHealth(st.available, st.reason)

    def lowerdirs(self, digest: str) -> list[Path]:
        """The overlay lowerdirs for the layer, top-most first: [mask, layerfs, lower] without the empty ones.

        Raises InvalidInputError (bad digest), UnavailableError (CVMFS down or hung, node-local state not writable),
        NotFoundError (the layer is no longer in the repository), IntegrityError (its whiteout index is corrupt).
        """
        hexd = digest_hex(digest)
        what = f"mounting layer {digest} from {self.root}"
        self.health_monitor.require(what)
        try:
            layerfs = self._call(lambda: self._layerfs_if_complete(digest), self.fs_timeout, what)
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
            dirs = self._call(lambda: self._overlay_dirs(digest, hexd, layerfs), self.build_timeout,
                              f"building the whiteout directories of layer {digest}")
        except OSError as exc:
            raise self._fs_error(digest, exc) from exc
        return [p for p in (dirs.upper, layerfs, dirs.lower) if p is not None]

    # -- extras ---------------------------------------------------------------------------------------------------
    def repository_status(self, *, force: bool = False) -> HealthStatus:
        """The repository's health (cached for ``health_ttl`` s): availability, CVMFS revision and name."""
        return self.health_monitor.status(force=force)

    # -- internals ------------------------------------------------------------------------------------------------
    def _call(self, fn: Callable[[], T], timeout: float, what: str) -> T:
        return call_with_timeout(fn, timeout, what, self.budget)

    def _claims_ownership(self, digest: str) -> bool:
        """True (and one ERROR line on the change) when the client shows every sampled owner as the cvmfs user."""
        if self.claim_owner is None:
            return False
        prev = self._claiming
        if prev is not None and time.monotonic() - prev[1] < OWNER_TTL:
            return prev[0]
        layerfs = self.layout.layerfs(digest)
        owners = self._call(lambda: sample_owners(layerfs), self.fs_timeout, f"reading owners in {layerfs}")
        claiming = bool(owners) and all(o == self.claim_owner for o in owners)
        self._claiming = (claiming, time.monotonic())
        if claiming and (prev is None or not prev[0]):
            log.error("layer source %s: the CVMFS client of %s shows every file as owned by the cvmfs user "
                      "(uid %d, gid %d), as with CVMFS_CLAIM_OWNERSHIP=yes: containers would see wrong owners, so "
                      "layers are pulled normally. Set CVMFS_CLAIM_OWNERSHIP=no for this repository (e.g. in "
                      "/etc/cvmfs/config.d/<repository>.local) and remount it (`cvmfs_config reload`).",
                      self.name, self.root, *self.claim_owner)
        elif not claiming and prev is not None and prev[0]:
            log.warning("layer source %s: the CVMFS client of %s shows real owners again; layers are served from "
                        "CVMFS again", self.name, self.root)
        return claiming

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
            return LayerIndex.from_record(rec.whiteouts, rec.opaque_dirs, root_markers(layerfs), aufs_meta=rec.hidden,
                                          xattrs=rec.xattrs, hardlinks=rec.hardlinks)
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
