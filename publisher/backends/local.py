"""The ``local`` backend: the repository is a plain directory (the demo, the tests, or a tree exported otherwise).

Atomic visibility by staging and rename: a layer (``layerfs`` + ``.metadata``) and a flat tree are built under
``<root>/.cvmfs-snap-staging/<pid>-<random>/`` on the same filesystem and renamed into place in one ``rename(2)``;
metadata files are written to a temporary name and renamed; symlinks are replaced by renaming a new link over the
old one. A process killed at any moment leaves at most a staging directory, which ``recover`` removes once its
owner process is gone (however deep: ``cvmfs_snap.fsutil``).

Who can reach what (docs/publisher.md, "Special files"): staging and ``.layers`` are 0700, because layer trees keep
the image's device nodes and set-id files for containers, as containerd's snapshots do; flat trees, which every
user may run, carry no device node, setuid/setgid bit or file capability (:mod:`publisher.backends.flatdir`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cvmfs_snap.errors import CvmfsSnapError, FailedPreconditionError
from cvmfs_snap.fsutil import remove_tree
from cvmfs_snap.layer.apply import apply_layer
from cvmfs_snap.layer.limits import Limits
from cvmfs_snap.layout import (
    CATALOG_MARKER,
    FLAT_DIR,
    LAYER_JSON,
    LAYERFS,
    LAYERS_JSON,
    METADATA_DIR,
    ORIGIN_JSON,
    LayerRecord,
    RepositoryLayout,
)

from ..crashpoints import crash_point
from ..workers import offloadable
from .base import (
    Backend,
    BufferedTxn,
    FlatOpener,
    LayerInfo,
    RepoLock,
    TarStream,
    Txn,
    TxnOp,
    check_diff_id,
    layers_json,
    merge_origin,
    new_record,
    symlink_atomic,
    write_atomic,
)
from .flatdir import build_flat_dir

log = logging.getLogger(__name__)

STAGING_DIR = ".cvmfs-snap-staging"


#: errno values that mean "the filesystem is full" (blocks, inodes or quota)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_error(exc: OSError, path: str | os.PathLike[str] | None, what: str = "") -> CvmfsSnapError:
    """A clear error for an OS error on ``path`` (``exc.filename`` when the caller does not know it) while
    ``what`` ("writing", "removing"; "" when unknown): disk full says so and names the path; others name the path
    and the system's reason."""
    where = os.fspath(path) if path is not None else (exc.filename or "the repository")
    reason = exc.strerror or os.strerror(exc.errno or 0)
    if exc.errno in DISK_FULL:
        return FailedPreconditionError(
            f"disk full: no space left on the device {what or 'at'} {where} ({reason}); free space (or raise the "
            f"quota) on the filesystem of {where}, then publish again; nothing half-done was made visible"
        )
    return FailedPreconditionError(
        f"{what + ' ' if what else ''}{where}: {reason}; check permissions and free space on that filesystem"
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Staging:
    """Private scratch directories named ``<pid>-<random>`` so a later run can tell abandoned ones."""

    def __init__(self, base: Path) -> None:
        self.base = base

    def new(self) -> Path:
        """A new private directory. The staging base is 0700 (made so again if an older version left it open):
        layers are unpacked here with the image's device nodes and set-id files, which no other local user may
        reach, as containerd keeps its snapshots under a 0700 root."""
        self.base.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = self.base.lstat()
        if st.st_mode & 0o077:
            os.chmod(self.base, 0o700)
        d = self.base / f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        d.mkdir(mode=0o700)
        return d

    @contextmanager
    def dir(self) -> Iterator[Path]:
        d = self.new()
        try:
            yield d
        finally:
            remove_quietly(d)

    def clean_abandoned(self) -> int:
        """Remove directories of processes that no longer run; returns how many."""
        n = 0
        try:
            names = os.listdir(self.base)
        except FileNotFoundError:
            return 0
        for name in names:
            pid_s = name.split("-", 1)[0]
            if pid_s.isdigit() and int(pid_s) != os.getpid() and not _pid_alive(int(pid_s)):
                remove_quietly(self.base / name)
                n += 1
        if n:
            log.info("removed %d staging directories left by killed runs in %s", n, self.base)
        return n


def remove_quietly(path: Path) -> None:
    """Remove a scratch tree however deep (no recursion limit); a failure is logged, never raised: the next run's
    ``recover`` tries again."""
    try:
        remove_tree(path)
    except (OSError, CvmfsSnapError) as exc:
        log.warning("could not remove %s: %s; the next run removes it", path, exc)


@offloadable  # runs in a layer worker process when the pipeline has them (publisher.workers)
def unpack_layer_dir(info: LayerInfo, tar: TarStream, layer_dir: Path, limits: Limits | None = None) -> LayerRecord:
    """Build a complete layer directory (``layerfs`` with its catalog marker, ``.metadata``) from a tar.

    ``.wh.*`` stay plain files (layer mode), as ``cvmfs_server ingest`` stores them; ``layer.json`` is written last.
    """
    from cvmfs_snap.layer.digesting import HashingReader

    layerfs = layer_dir / LAYERFS
    layerfs.mkdir(parents=True)
    reader = HashingReader(tar)
    res = apply_layer(reader, layerfs, mode="layer", limits=limits, name=info.digest)
    reader.drain()
    check_diff_id(info, reader.digest)
    (layerfs / CATALOG_MARKER).touch()
    rec = new_record(info, reader.digest or "", reader.size, res.entries, res.whiteouts.whiteouts,
                     res.whiteouts.opaque_dirs, res.whiteouts.hidden)
    write_layer_metadata(layer_dir / METADATA_DIR, rec, info.origin, None)
    return rec


def write_layer_metadata(md: Path, rec: LayerRecord, origin: Sequence[str], existing_origin: bytes | None) -> None:
    path = md
    try:
        md.mkdir(parents=True, exist_ok=True)
        path = md / LAYERS_JSON
        write_atomic(path, layers_json(rec))
        path = md / ORIGIN_JSON
        write_atomic(path, merge_origin(existing_origin, origin) or existing_origin or b"")
        path = md / LAYER_JSON
        write_atomic(path, rec.to_json().encode())  # last: marks the layer complete
    except OSError as exc:
        raise disk_error(exc, path, "writing the layer metadata") from exc


@dataclass
class LocalTxn(BufferedTxn):
    """Buffers changes; ``commit`` applies them in order, each one atomically."""

    root: Path
    remove_into: Callable[[], Path]
    ops: list[TxnOp] = field(default_factory=list)

    def commit(self) -> None:
        # temporary files and links are made in a staging directory (same filesystem, removed by ``recover`` if
        # we are killed), never beside their final names where a kill would leave them in the published tree
        scratch = self.remove_into() if self.ops else None
        try:
            for op in self.ops:
                crash_point("txn-op")
                path = self.root / op.relpath
                try:
                    if op.kind == "write":
                        write_atomic(path, op.data, tmp_dir=scratch)
                    elif op.kind == "symlink":
                        symlink_atomic(path, op.target, tmp_dir=scratch)
                    elif op.kind == "mkdir":
                        path.mkdir(parents=True, exist_ok=True)
                    elif op.kind == "remove":
                        remove_atomic(path, self.remove_into)
                except OSError as exc:
                    raise disk_error(exc, path, "removing" if op.kind == "remove" else "writing") from exc
            self.ops.clear()
        finally:
            if scratch is not None:
                remove_quietly(scratch)


def remove_atomic(path: Path, scratch: Callable[[], Path]) -> None:
    """Make ``path`` disappear in one rename (into a scratch dir on the same filesystem), then delete it."""
    if not path.is_symlink() and not path.exists():
        return
    if path.is_dir() and not path.is_symlink():
        trash = scratch()
        os.rename(path, trash / "x")
        remove_quietly(trash)
    else:
        os.unlink(path)


class LocalBackend(Backend):
    name = "local"

    def __init__(self, root: str | os.PathLike[str], state_dir: str | os.PathLike[str] | None = None, *,
                 limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.layout = RepositoryLayout(self.root)
        self.staging = Staging(self.root / STAGING_DIR)
        self.state_dir = Path(state_dir) if state_dir else self.root / ".cvmfs-snap-state"
        self.lock = RepoLock(self.state_dir / "repository.lock")

    def recover(self) -> None:
        with self.lock():
            self.staging.clean_abandoned()
            self._private_layers()

    def _private_layers(self) -> None:
        """``.layers`` is 0700: layer trees keep the image's device nodes and set-id files (what containers must
        see, as in containerd's snapshots), so only root (the node's snapshotter) may reach them. Repositories
        made by older versions are tightened here."""
        with contextlib.suppress(FileNotFoundError):
            if stat.S_IMODE(self.layout.layers_root.stat().st_mode) != 0o700:
                os.chmod(self.layout.layers_root, 0o700)

    def _ensure_catalogs(self, *dirs: Path) -> None:
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
            if d == self.layout.layers_root:
                self._private_layers()
            marker = d / CATALOG_MARKER
            if not marker.exists():
                marker.touch()

    def publish_layer(self, info: LayerInfo, tar_stream: TarStream) -> LayerRecord:
        with self.staging.dir() as stage:
            layer_dir = stage / "layer"
            rec = unpack_layer_dir(info, tar_stream, layer_dir, self.limits)
            crash_point("layer-unpacked")
            final = self.layout.layer_dir(info.digest)
            with self.lock():
                if self.layout.is_layer_complete(info.digest):
                    log.info("layer %s was completed meanwhile by another publisher; keeping that one", info.digest)
                    return self.layout.read_layer_record(info.digest) or rec
                self._ensure_catalogs(self.layout.layers_root, self.layout.layer_bucket(info.digest))
                if final.exists():  # incomplete leftover (e.g. DUCC metadata without layerfs): replace it
                    old_md = final / METADATA_DIR / ORIGIN_JSON
                    if old_md.is_file():
                        write_layer_metadata(layer_dir / METADATA_DIR, rec, info.origin, old_md.read_bytes())
                    remove_atomic(final, self.staging.new)
                os.rename(layer_dir, final)
                fsync_dir(final.parent)
            crash_point("layer-visible")
            return rec

    def publish_flat(self, config_digest: str, layers: Sequence[FlatOpener]) -> None:
        with self.staging.dir() as stage:
            flat = stage / "flat"
            build_flat_dir(flat, layers, self.limits)
            crash_point("flat-built")
            final = self.layout.flat_dir(config_digest)
            with self.lock():
                if final.is_dir():
                    return
                self._ensure_catalogs(self.root / FLAT_DIR)
                final.parent.mkdir(parents=True, exist_ok=True)
                os.rename(flat, final)
                fsync_dir(final.parent)

    @contextmanager
    def transaction(self) -> Iterator[Txn]:
        with self.lock():
            txn = LocalTxn(self.root, self.staging.new)
            yield txn
            txn.commit()
