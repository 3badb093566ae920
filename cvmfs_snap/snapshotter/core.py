"""containerd snapshot semantics in plain Python, on the sqlite store and a directory tree.

Why a separate core: the semantics (kinds, parents, commit, remove rules, label updates, mounts) are what containerd
and its conformance suite check, and they are easiest to test without gRPC. The servicer (``service.py``) only
converts messages; this module raises :mod:`cvmfs_snap.errors` kinds that it maps to gRPC codes.

Layout under the snapshotter root (like containerd's overlayfs snapshotter, plus podman-style short links; the
directories are :mod:`.snapdirs`' job)::

    <root>/metadata.db             the store (store.py)
    <root>/snapshots/<id>/fs       a local snapshot's files (upperdir of active snapshots), mode 0755
    <root>/snapshots/<id>/work     overlay workdir of an active snapshot
    <root>/l/<b36 id>[-<n>]        short symlinks to every lowerdir we hand out (local fs dirs and remote dirs)
    <root>/<source name>/          each layer source's own node-local state

Why the ``l/`` links: containerd's ``mount.All`` fits a long ``lowerdir=`` into the one page the kernel accepts by
making the lowerdirs relative to their longest common parent directory. Remote layers live under ~100-character
CVMFS paths with no useful common parent, so we give every lowerdir a short name under one directory: 128 layers of
3 dirs each then take ~2 KiB after compaction.

Remote layers: a Prepare carrying ``containerd.io/snapshot.ref`` (the chain ID containerd unpacks into) is parsed
once into a :class:`~cvmfs_snap.snapshotter.sources.base.LayerRequest` and each
:class:`~cvmfs_snap.snapshotter.sources.base.LayerSource` is asked in order. When one serves the layer we record a
*committed* snapshot named after the chain ID, with the request and no directory of its own, and answer
AlreadyExists: containerd then skips the download and uses our snapshot. Its lowerdirs are asked from the same source
at Mounts time. Removing the last snapshot of a layer releases it in its source (node-local state only; CVMFS is
never touched); Cleanup releases every layer a source holds that no snapshot uses. Only
:class:`~cvmfs_snap.snapshotter.sources.base.HostileLabelsError` of a source fails a Prepare: any other failure
means a normal pull.

Directories and rows (as containerd's overlayfs snapshotter): a new snapshot's directory is made under a temporary
name, then renamed to ``snapshots/<id>`` inside the transaction that inserts its row, so a crash leaves at most an
unknown directory (Cleanup removes it), never a row without a directory. Ids skip every id whose directory or link
exists, and nothing the metadata does not know is deleted while a mount uses it (:mod:`.mountinfo`): after a lost
``metadata.db`` the running containers keep their files.

Misses: when such a Prepare finds no source serving the layer and every source *answered* (none failed), the layer is
simply not published; the optional ``on_miss`` callback is then told the Prepare's labels after the local snapshot
exists (the daemon wires the publish-on-miss reporter there). The same holds for a layer a later source serves (the
lazy one) after every earlier source (CVMFS) answered that it does not have it: the callback is told after the
remote snapshot is recorded, before AlreadyExists is answered. A source that failed is not a miss: it says nothing
about what is published. The callback must not block; its exceptions are logged and never fail the Prepare.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cvmfs_snap.labelnames import MAX_LABEL, SNAPSHOT_LAYER_DIGEST, SNAPSHOT_REF, SNAPSHOT_REMOTE, SNAPSHOT_SOURCE

from ..errors import (
    AlreadyExistsError,
    CvmfsSnapError,
    FailedPreconditionError,
    InvalidInputError,
    UnavailableError,
)
from ..fsutil import Usage, disk_usage, remove_tree
from . import filters as flt
from .mountinfo import is_pinned
from .snapdirs import LINKS_DIR, SNAPSHOTS_DIR, SnapshotDirs, b36
from .sources.base import HostileLabelsError, LayerRequest, LayerSource, RemoteLayer
from .store import DB_NAME, KIND_ACTIVE, KIND_COMMITTED, KIND_VIEW, SnapshotRecord, Store

log = logging.getLogger(__name__)

__all__ = ["LINKS_DIR", "SNAPSHOTS_DIR", "Info", "Mount", "Snapshotter", "Usage", "b36", "disk_usage"]

#: outcome name of a Prepare served by a normal local snapshot (for metrics)
OUTCOME_LOCAL = "local"


@dataclass(frozen=True)
class Mount:
    """One mount(2) call for containerd (``containerd.types.Mount``)."""

    type: str
    source: str
    options: tuple[str, ...] = ()


@dataclass
class Info:
    """containerd's ``snapshots.Info``: what Stat/List/Update answer."""

    name: str
    parent: str
    kind: str  # active, view, committed
    created: int  # nanoseconds since the epoch
    updated: int
    labels: dict[str, str] = field(default_factory=dict)


class PrepareObserver(Protocol):
    """Told the outcome of every Prepare (a source name, or "local"): the daemon's metrics implement it."""

    def prepare_outcome(self, outcome: str) -> None: ...


#: told the labels of a Prepare whose layer no source serves although every source answered (see the module doc)
MissCallback = Callable[[Mapping[str, str]], None]


def validate_labels(labels: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in labels.items():
        if len(k.encode()) + len(v.encode()) > MAX_LABEL:
            raise InvalidInputError(
                f"label {k[:80]!r} is too long: key and value together may not exceed {MAX_LABEL} bytes"
            )
        out[str(k)] = str(v)
    return out


def _overlay_index_supported() -> bool:
    # like containerd: pass index=off only when the kernel knows the option
    return os.path.exists("/sys/module/overlay/parameters/index")


class Snapshotter:
    """containerd's Snapshotter interface over a :class:`Store` and ``root``."""

    def __init__(self, root: Path, store: Store | None = None, sources: Sequence[LayerSource] = (),
                 observer: PrepareObserver | None = None, on_miss: MissCallback | None = None) -> None:
        self.root = Path(root)
        self.dirs = SnapshotDirs(self.root)
        self.store = store if store is not None else Store(self.root / DB_NAME)
        self.sources = list(sources)
        self.observer = observer
        self.on_miss = on_miss
        self.index_off = _overlay_index_supported()
        #: per (source, digest): reference counting + release, and Mounts' building of a layer's dirs, exclude
        #: each other, so a layer is never released while a Mounts hands out its directories
        self._layer_locks: dict[tuple[str, str], threading.Lock] = {}
        self._layer_locks_lock = threading.Lock()

    def restore_sources(self) -> None:
        """Tell each source the requests of the snapshots it serves (at start; a source failing is only logged)."""
        by_source: dict[str, list[LayerRequest]] = {}
        for source, key, digest, request in self.store.remote_layers():
            by_source.setdefault(source, []).append(LayerRequest.from_json(request, digest, key))
        for s in self.sources:
            try:
                s.restore(by_source.get(s.name, []))
            except Exception as exc:  # a source that cannot restore serves nothing new; pulls still work
                log.warning("layer source %s: restoring %d layers failed: %s", s.name,
                            len(by_source.get(s.name, [])), exc, exc_info=not isinstance(exc, CvmfsSnapError))

    def _layer_lock(self, source: str, digest: str) -> threading.Lock:
        with self._layer_locks_lock:
            return self._layer_locks.setdefault((source, digest), threading.Lock())

    def close(self) -> None:
        self.store.close()

    # -- paths ----------------------------------------------------------------------------------------------------
    def snapshot_dir(self, rec: SnapshotRecord) -> Path:
        return self.dirs.snapshot_dir(rec.id)

    def fs_dir(self, rec: SnapshotRecord) -> Path:
        return self.snapshot_dir(rec) / "fs"

    def work_dir(self, rec: SnapshotRecord) -> Path:
        return self.snapshot_dir(rec) / "work"

    def _request(self, rec: SnapshotRecord) -> LayerRequest:
        return LayerRequest.from_json(rec.request, rec.digest, rec.key)

    def _source(self, rec: SnapshotRecord) -> LayerSource:
        for s in self.sources:
            if s.name == rec.source:
                return s
        raise UnavailableError(
            f"snapshot {rec.key!r} (layer {rec.digest}) is served by source {rec.source!r}, which is not configured "
            "in this snapshotter: restore its configuration, or remove the image and pull it again"
        )

    # -- create ---------------------------------------------------------------------------------------------------
    def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        labels = validate_labels(labels or {})
        target = labels.get(SNAPSHOT_REF, "")
        missed = False
        if target:
            request = LayerRequest.from_labels(labels)  # HostileLabelsError: InvalidArgument for containerd
            existing = self.store.find(target)
            if existing is not None:
                self._check_existing(existing)
                raise AlreadyExistsError(f"target snapshot {target!r} already exists")
            assert request is not None
            remote, answered, asked = self._lookup(request)
            missed = answered and asked > 0
            if remote is not None:
                self._create_remote(target, parent, labels, remote, request)
                if self.observer:
                    self.observer.prepare_outcome(remote.source)
                if missed:  # served by a later source (lazily) because the earlier ones (CVMFS) lack it
                    self._report_miss(target, labels)
                raise AlreadyExistsError(
                    f"target snapshot {target!r} already exists: served remotely by {remote.source} "
                    f"(layer {remote.digest})"
                )
        mounts = self._create(KIND_ACTIVE, key, parent, labels)
        if self.observer:
            self.observer.prepare_outcome(OUTCOME_LOCAL)
        if missed:
            self._report_miss(target, labels)
        return mounts

    def _report_miss(self, target: str, labels: Mapping[str, str]) -> None:
        if self.on_miss is None:
            return
        try:
            self.on_miss(labels)
        except Exception:  # reporting a miss is a courtesy: it must never fail the pull
            log.warning("reporting the miss of %s failed", target, exc_info=True)

    def view(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        return self._create(KIND_VIEW, key, parent, validate_labels(labels or {}))

    def _check_existing(self, rec: SnapshotRecord) -> None:
        """containerd Prepares a layer whose snapshot exists: if a source serves it, say when it cannot any more."""
        if not rec.remote:
            return
        try:
            self._source(rec).check(self._request(rec))
        except Exception as exc:  # the answer stays AlreadyExists; Mounts gives the actionable error
            log.warning("snapshot %s (layer %s) exists, but source %s cannot serve it now: %s", rec.key, rec.digest,
                        rec.source, exc, exc_info=not isinstance(exc, CvmfsSnapError))

    def _lookup(self, request: LayerRequest) -> tuple[RemoteLayer | None, bool, int]:
        """(the first source's RemoteLayer or None, whether every source asked before it answered without failing,
        how many sources answered None before it)."""
        answered = True
        asked = 0
        for source in self.sources:
            try:
                remote = source.lookup(request)
                if remote is not None and remote.source != source.name:
                    raise InvalidInputError(f"source {source.name} answered for another source {remote.source!r}")
            except HostileLabelsError:
                raise
            except Exception as exc:  # a broken source must never break pulls: fall back to a download
                log.warning("layer source %s failed on %s (%s); falling back to a normal download",
                            source.name, request.target, exc, exc_info=not isinstance(exc, CvmfsSnapError))
                answered = False
                continue
            if remote is not None:
                return remote, answered, asked
            asked += 1
        return None, answered, asked

    def _create_remote(self, target: str, parent: str, labels: Mapping[str, str], remote: RemoteLayer,
                       request: LayerRequest) -> None:
        merged = dict(labels)
        merged[SNAPSHOT_REMOTE] = "remote snapshot"
        merged.update(remote.labels)
        merged[SNAPSHOT_SOURCE] = remote.source
        merged[SNAPSHOT_LAYER_DIGEST] = remote.digest
        self.store.create(target, KIND_COMMITTED, parent, validate_labels(merged), source=remote.source,
                          digest=remote.digest, request=request.to_json(), taken=self.dirs.taken)
        log.info("snapshot %s: layer %s served by %s (parent %r)", target, remote.digest, remote.source,
                 parent or "-")

    def _create(self, kind: str, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        if not key:
            raise InvalidInputError("snapshot key must not be empty")
        p = self.store.find(parent) if parent else None
        tmp = self.dirs.make_tmp(key, work=kind == KIND_ACTIVE,
                                 owner_like=self.fs_dir(p) if p is not None and not p.remote else None)
        try:
            rec = self.store.create(key, kind, parent, labels, taken=self.dirs.taken,
                                    place=lambda rid: self.dirs.place(tmp, rid, key))
        except BaseException:
            remove_tree(tmp)  # ours alone: nothing else knows the temporary name
            raise
        try:
            return self._mounts(rec)
        except BaseException:
            self._discard(rec)
            raise

    def _discard(self, rec: SnapshotRecord) -> None:
        """Undo a create whose mounts failed: the row, then the directory we just made for it."""
        with contextlib.suppress(CvmfsSnapError):
            self.store.remove(rec.key)
        with contextlib.suppress(OSError, CvmfsSnapError):
            remove_tree(self.snapshot_dir(rec))

    # -- mounts ---------------------------------------------------------------------------------------------------
    def mounts(self, key: str) -> list[Mount]:
        rec = self.store.get(key)
        if rec.kind == KIND_COMMITTED:
            raise FailedPreconditionError(
                f"snapshot {key!r} is committed: only active snapshots and views have mounts (make a view of it)"
            )
        return self._mounts(rec)

    def _lowerdirs(self, rec: SnapshotRecord) -> list[tuple[str, Path]]:
        """(link name, real dir) of every layer dir of committed snapshot ``rec``, top-most first."""
        if not rec.remote:
            return [(b36(rec.id), self.fs_dir(rec))]
        source = self._source(rec)
        with self._layer_lock(rec.source, rec.digest):
            dirs = source.mount_dirs(self._request(rec))
        if not dirs:
            raise UnavailableError(f"source {rec.source} returned no directories for layer {rec.digest}")
        base = b36(rec.id)
        return [(base if i == 0 else f"{base}-{i}", Path(d)) for i, d in enumerate(dirs)]

    def _mounts(self, rec: SnapshotRecord) -> list[Mount]:
        parents = self.store.chain(rec)
        if not parents:
            return [Mount("bind", str(self.fs_dir(rec)), ("rw" if rec.kind == KIND_ACTIVE else "ro", "rbind"))]
        layers: list[tuple[str, Path]] = []
        for p in parents:
            layers.extend(self._lowerdirs(p))
        if rec.kind == KIND_VIEW and len(layers) == 1:
            return [Mount("bind", str(layers[0][1]), ("ro", "rbind"))]
        options: list[str] = []
        if self.index_off:
            options.append("index=off")
        if rec.kind == KIND_ACTIVE:
            options.append(f"workdir={self.work_dir(rec)}")
            options.append(f"upperdir={self.fs_dir(rec)}")
        lower = [self.dirs.link(name, target) for name, target in layers]
        options.append("lowerdir=" + ":".join(lower))
        return [Mount("overlay", "overlay", tuple(options))]

    # -- commit / remove ------------------------------------------------------------------------------------------
    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        labels = validate_labels(labels or {})
        rec = self.store.get(key)
        if not name:
            raise InvalidInputError(f"cannot commit {key!r}: the committed snapshot needs a name")
        usage = disk_usage(self.fs_dir(rec)) if rec.kind == KIND_ACTIVE else Usage(0, 0)
        self.store.commit(key, name, labels, usage.size, usage.inodes)

    def remove(self, key: str) -> None:
        rec = self.store.remove(key)
        self.dirs.drop_links(rec.id)
        if rec.remote:
            self._release_if_unused(rec.source, rec.digest)
        else:
            self.dirs.remove(rec.id, key)

    def _release_if_unused(self, source_name: str, digest: str) -> bool:
        """Release a layer in its source when no snapshot uses it any more (the reference count is the store's) and
        no mount uses its node-local state (after a lost metadata.db, running containers the store does not know
        may still have it as lowerdirs)."""
        source = next((s for s in self.sources if s.name == source_name), None)
        if source is None:
            return False
        with self._layer_lock(source_name, digest):
            if self.store.count_remote(source_name, digest):
                return False
            try:
                paths = source.state_paths(digest)
                if paths:
                    pinned = self.dirs.pinned()
                    if pinned is None or any(is_pinned(p, pinned) for p in paths):
                        log.warning("layer source %s: layer %s is used by no snapshot but %s; its node-local state "
                                    "is kept", source_name, digest,
                                    "mountinfo is unreadable" if pinned is None else "a mount still uses it")
                        return False
                source.release(digest)
            except Exception as exc:  # its state stays; the next Cleanup tries again
                log.warning("layer source %s: releasing layer %s failed: %s", source_name, digest, exc,
                            exc_info=not isinstance(exc, CvmfsSnapError))
                return False
        log.debug("layer source %s: released layer %s (no snapshot uses it)", source_name, digest)
        return True

    # -- info -----------------------------------------------------------------------------------------------------
    @staticmethod
    def info(rec: SnapshotRecord) -> Info:
        return Info(rec.key, rec.parent, rec.kind, rec.created, rec.updated, dict(rec.labels))

    def stat(self, key: str) -> Info:
        return self.info(self.store.get(key))

    def update(self, info: Info, fieldpaths: Iterable[str] = ()) -> Info:
        """Update mutable fields (labels) of snapshot ``info.name``.

        No paths: replace all labels. ``labels``: replace all labels. ``labels.K``: set (or delete, if ``info``
        lacks K) that one label. Any other path (name, parent, kind, created, ...) is immutable: InvalidInput.
        """
        rec = self.store.get(info.name)
        paths = list(fieldpaths)
        new = validate_labels(info.labels)
        if paths:
            labels = dict(rec.labels)
            for path in paths:
                if path == "labels":
                    labels = dict(new)
                elif path.startswith("labels."):
                    k = path[len("labels."):]
                    if k in new:
                        labels[k] = new[k]
                    else:
                        labels.pop(k, None)
                else:
                    raise InvalidInputError(
                        f"cannot update field {path!r} of snapshot {info.name!r}: only labels can change"
                    )
            new = labels
        return self.info(self.store.set_labels(info.name, new))

    def walk(self, filters: Sequence[str] = ()) -> list[Info]:
        parsed = flt.parse_all(filters)
        out = []
        for rec in self.store.all():
            if flt.match_any(parsed, flt.snapshot_adaptor(rec.key, rec.parent, rec.kind, rec.labels)):
                out.append(self.info(rec))
        return out

    def usage(self, key: str) -> Usage:
        rec = self.store.get(key)
        if rec.kind == KIND_ACTIVE:
            return disk_usage(self.fs_dir(rec))
        return Usage(rec.size, rec.inodes)

    def cleanup(self) -> list[str]:
        """Delete snapshot dirs and links the metadata does not know (left by failed removes or crashes), unless a
        mount uses them, and release the layers sources hold that no snapshot uses."""
        # list the directories BEFORE reading the ids: a Prepare renames its directory into place inside the
        # transaction that inserts its row, and the store's lock makes ids() wait for that transaction, so every
        # directory listed here that belongs to a live snapshot has its id in `ids`
        dir_names, link_names = self.dirs.list_names()
        removed = self.dirs.collect(dir_names, link_names, self.store.ids())
        for rec in self.store.all():  # the other way round: rows whose directory is gone (older releases' crashes)
            if not rec.remote and not os.path.isdir(self.fs_dir(rec)):
                log.warning("cleanup: snapshot %r has no directory %s (lost in a crash of an older release, or "
                            "deleted by hand): remove it (`ctr snapshots rm`) and pull its image again", rec.key,
                            self.fs_dir(rec))
        for source in self.sources:
            try:
                held = source.held()
            except Exception as exc:
                log.warning("cleanup: layer source %s cannot list its layers: %s", source.name, exc)
                continue
            for digest in held:
                if self._release_if_unused(source.name, digest):
                    removed.append(f"{source.name}:{digest}")
        if removed:
            log.info("cleanup removed %d unreferenced entries", len(removed))
        return removed
