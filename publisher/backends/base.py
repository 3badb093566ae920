"""The one backend interface: how the repository tree gets written.

The pipeline decides *what* to write and in which order (layers first, image metadata and public links last); a
backend decides *how*: a plain directory with renames (``local``), ``cvmfs_server ingest`` (``cvmfs-ingest``) or
``cvmfs_server transaction``/``publish`` (``cvmfs-transaction``). Every backend gives the same guarantees:

- ``publish_layer`` makes a layer visible only together with its complete content and its ``layer.json``,
  at once or (cvmfs backends: one ingest for a batch of layers) at the latest when ``flush_layers`` returns;
  a failure leaves nothing of the layer visible.
- ``transaction()`` groups metadata changes (files, symlinks, removals): applied on success, discarded when the
  block raises.
- All ``cvmfs_server`` calls for one repository are serialised with an ``fcntl`` lock on a file in the state
  directory, so the daemon, a cron ``convert`` and ``gc`` can run side by side; downloads and decompression overlap.

Paths given to a :class:`Txn` are relative to the repository root (``.metadata/...``); absolute paths and ``..``
are refused, so a bug (or a hostile manifest) cannot write outside the repository.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from cvmfs_snap import __version__
from cvmfs_snap.errors import IntegrityError, InvalidInputError
from cvmfs_snap.layer.limits import Limits
from cvmfs_snap.layout import LayerRecord, RepositoryLayout

from ..crashpoints import crash_point
from ..layertree import LayerTreeEntries

log = logging.getLogger(__name__)


class TarStream(Protocol):
    """A readable, decompressed layer tar (what ``cvmfs_snap.layer.open_layer`` yields)."""

    def read(self, n: int = -1, /) -> bytes: ...


#: opens one layer's decompressed tar
LayerOpener = Callable[[], AbstractContextManager[TarStream]]
#: one layer as a flat tree reads it: its decompressed tar, or the entries of its published tree
FlatLayer = TarStream | LayerTreeEntries
#: opens one layer for the flat tree, which is built layer by layer (bottom first)
FlatOpener = Callable[[], AbstractContextManager[FlatLayer]]


@dataclass
class LayerInfo:
    """What the pipeline knows about a layer before publishing it (from the manifest and the image config)."""

    digest: str
    media_type: str
    compressed_size: int
    #: the diffID the image config announces for this layer; checked against the tar we unpacked (None: unchecked)
    expected_diff_id: str | None = None
    #: config digests of the images that use this layer (origin.json)
    origin: list[str] = field(default_factory=list)


class Txn(ABC):
    """Metadata changes of one transaction. Paths are relative to the repository root."""

    @abstractmethod
    def write_file(self, relpath: str, data: bytes) -> None:
        """Create or replace a file (atomically replaced: readers see the old or the new content)."""

    @abstractmethod
    def symlink(self, relpath: str, target: str) -> None:
        """Create or replace a symlink (``target`` is stored as given: use relative targets)."""

    @abstractmethod
    def remove(self, relpath: str) -> None:
        """Remove a file, symlink or whole directory; absent paths are fine."""

    @abstractmethod
    def makedirs(self, relpath: str) -> None:
        """Create a directory and its parents (with ``.cvmfscatalog`` markers where the layout wants them)."""

    def read_file(self, relpath: str) -> bytes | None:
        """Current content of a repository file (as published before this transaction), None when absent."""
        try:
            return (self.root / check_relpath(relpath)).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    root: Path


@dataclass
class TxnOp:
    """One buffered change of a :class:`BufferedTxn`."""

    kind: str  # write, symlink, remove, mkdir (and the cvmfs backends' catalog, install)
    relpath: str
    data: bytes = b""
    target: str = ""
    src: Path | None = None


class BufferedTxn(Txn):
    """A transaction that records its changes in ``ops`` (paths checked now), for its backend to apply at the end."""

    ops: list[TxnOp]

    def write_file(self, relpath: str, data: bytes) -> None:
        self.ops.append(TxnOp("write", check_relpath(relpath), data=bytes(data)))

    def symlink(self, relpath: str, target: str) -> None:
        self.ops.append(TxnOp("symlink", check_relpath(relpath), target=target))

    def remove(self, relpath: str) -> None:
        self.ops.append(TxnOp("remove", check_relpath(relpath)))

    def makedirs(self, relpath: str) -> None:
        self.ops.append(TxnOp("mkdir", check_relpath(relpath)))


class Backend(ABC):
    """Writes the repository tree. Thread-safe: the pipeline calls ``publish_layer`` from several threads."""

    name: ClassVar[str]
    layout: RepositoryLayout
    #: what one layer may ask of the unpacker (the publisher's configured ``limits``; set by ``make_backend``)
    limits: Limits = Limits()

    def has_layer(self, digest: str) -> bool:
        """True when the layer is complete per the layout contract (our layer.json, or DUCC's layerfs)."""
        return self.layout.is_layer_complete(digest)

    def has_flat(self, config_digest: str) -> bool:
        return self.layout.flat_dir(config_digest).is_dir()

    #: the repository is read through a CVMFS client mount, which lists magic ``user.*`` xattrs on every file
    reads_through_cvmfs: ClassVar[bool] = False
    #: the public name of a multi-arch image is a CVMFS variant symlink on ``$(CVMFS_ARCH)`` (DUCC's layout since
    #: 2025); False where variant symlinks do not resolve (a plain directory): it then points at the default flat
    variant_symlinks: ClassVar[bool] = False

    def layer_tree(self, digest: str) -> Path | None:
        """The published ``layerfs`` of a complete layer when this host can read it, else None.

        Flat trees are built from these trees instead of downloading the layers a second time; a layer whose tree
        is not readable here (a publisher node without the repository mounted) is fetched from the registry.
        """
        path = self.layout.layerfs(digest)
        if self.has_layer(digest) and os.access(path, os.R_OK | os.X_OK):
            return path
        return None

    @abstractmethod
    def publish_layer(self, info: LayerInfo, tar_stream: TarStream) -> LayerRecord:
        """Unpack (or ingest) one layer's decompressed tar with its metadata; visible only when complete.

        Raises ``UnsafeLayerError`` for hostile tars, ``IntegrityError`` when the tar's digest is not the
        expected diffID, ``CommandError`` when ``cvmfs_server`` fails; nothing of the layer is visible then.
        """

    def flush_layers(self, digests: Sequence[str] = ()) -> None:  # noqa: B027 - optional hook
        """Make every layer ``publish_layer`` accepted visible (a backend may batch them), and fail unless all of
        ``digests`` are complete. The pipeline calls it once an image's layers are done, before its flat trees."""

    @abstractmethod
    def publish_flat(self, config_digest: str, layers: Sequence[FlatOpener]) -> None:
        """Build ``.flat/<cfg[0:2]>/<cfg>`` by applying the layers (bottom first) in merged mode; atomic."""

    @abstractmethod
    def transaction(self) -> AbstractContextManager[Txn]:
        """Metadata changes: committed when the block ends normally, thrown away when it raises."""

    def recover(self) -> None:  # noqa: B027 - optional hook
        """Clean up what a killed earlier run left behind (staging directories, open transactions)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""


# -- helpers shared by the backends ------------------------------------------------------------------------------


def check_relpath(relpath: str) -> str:
    """Refuse repository-relative paths that could leave the repository."""
    p = str(relpath)
    if not p or p.startswith("/") or any(part in ("..", "") for part in p.rstrip("/").split("/")):
        raise InvalidInputError(f"refusing repository path {relpath!r}: must be relative, without '..'")
    return p.rstrip("/")


def check_diff_id(info: LayerInfo, actual: str | None) -> None:
    """The unpacked tar must be the one the image config announces (else the image is corrupt or tampered)."""
    if info.expected_diff_id and info.expected_diff_id != actual:
        raise IntegrityError(
            f"layer {info.digest}: uncompressed content has digest {actual}, but the image config announces "
            f"diffID {info.expected_diff_id}; the image is corrupt or was tampered with; not published"
        )


#: containers/storage compression codes used in podman's layers.json
_COMPRESSION_CODES = {"gzip": 2, "zstd": 4}


def compression_code(media_type: str) -> int:
    for key, code in _COMPRESSION_CODES.items():
        if media_type.endswith(key) or media_type.endswith("tar." + key):
            return code
    return 0


def layers_json(record: LayerRecord) -> bytes:
    """DUCC's podman-style ``layers.json`` for one layer: a list with one containers/storage layer entry
    (``id`` = diffID hex, compressed/uncompressed digests and sizes)."""
    entry: dict[str, Any] = {
        "id": record.diff_id.partition(":")[2],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created or time.time())),
        "compressed-diff-digest": record.digest,
        "compressed-size": record.compressed_size,
        "diff-digest": record.diff_id,
        "diff-size": record.uncompressed_size,
        "compression": compression_code(record.media_type),
    }
    return (json.dumps([entry], indent=1) + "\n").encode()


def merge_origin(existing: bytes | None, config_digests: Sequence[str]) -> bytes | None:
    """``origin.json`` with ``config_digests`` added (DUCC: ``{"origin": [...]}``); None when nothing changes."""
    origin: list[str] = []
    if existing:
        try:
            data = json.loads(existing)
            if isinstance(data, dict) and isinstance(data.get("origin"), list):
                origin = [str(o) for o in data["origin"]]
        except ValueError:
            log.warning("replacing malformed origin.json")
    added = [c for c in config_digests if c not in origin]
    if not added and existing:
        return None
    return (json.dumps({"origin": origin + added}) + "\n").encode()


def new_record(info: LayerInfo, diff_id: str, size: int, entries: int, whiteouts: Sequence[str],
               opaque_dirs: Sequence[str], hidden: Sequence[str] = ()) -> LayerRecord:
    return LayerRecord(
        digest=info.digest,
        diff_id=diff_id,
        media_type=info.media_type,
        compressed_size=info.compressed_size,
        uncompressed_size=size,
        entries=entries,
        whiteouts=sorted(whiteouts),
        opaque_dirs=sorted(opaque_dirs),
        hidden=sorted(set(hidden)),
        publisher_version=f"cvmfs-snap {__version__}",
        created=time.time(),
    )


class RepoLock:
    """Serialises work on one repository across threads and processes (``flock`` on a file in the state dir).

    ``flock`` locks belong to an open file description, so each acquisition opens the file anew: two threads of one
    process exclude each other as two processes do. Re-entrant per thread (a transaction may call helpers that
    lock again).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()

    @contextmanager
    def __call__(self) -> Iterator[None]:
        depth = getattr(self._local, "depth", 0)
        if depth:
            self._local.depth = depth + 1
            try:
                yield
            finally:
                self._local.depth -= 1
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._local.depth = 1
            self._local.fd = fd
            try:
                yield
            finally:
                self._local.depth = 0
                self._local.fd = None
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def held_fd(self) -> int | None:
        """The descriptor holding the lock in this thread (None when not held). Commands started under the lock
        inherit it, so a ``cvmfs_server`` left running by a killed publisher keeps the repository locked until it
        ends: the next run's recovery then never aborts a publish that is still going on."""
        fd: int | None = getattr(self._local, "fd", None)
        return fd


def write_atomic(path: Path, data: bytes, mode: int = 0o644, tmp_dir: Path | None = None) -> None:
    """Write a file next to its final name (or in ``tmp_dir``, a scratch directory on the same filesystem that
    recovery cleans, so a run killed mid-write leaves no stray file in the tree), fsync, rename: readers never
    see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = (tmp_dir or path.parent) / f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    crash_point("atomic-write")
    os.replace(tmp, path)


def symlink_atomic(path: Path, target: str, tmp_dir: Path | None = None) -> None:
    """Replace ``path`` with a symlink to ``target`` in one rename (no moment without the link); ``tmp_dir`` as
    for :func:`write_atomic`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir() and not path.is_symlink():
        raise InvalidInputError(
            f"{path} is a directory, not a symlink; refusing to replace it with a link (remove it by hand if stale)"
        )
    tmp = (tmp_dir or path.parent) / f".{path.name}.lnk-{os.getpid()}-{threading.get_ident()}"
    with suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, path)
