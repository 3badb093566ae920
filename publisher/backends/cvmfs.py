"""The two backends that drive a real stratum-0 through ``cvmfs_server`` (facts: /work/shared/CVMFS-FACTS.md).

Layers, both backends
    Never through a transaction: a transaction takes every ``.wh.*`` name as a whiteout and deletes instead of
    storing it, and layers must keep their ``.wh.*`` files (the layout contract; flats are built from them). Each
    layer's tar is validated and spooled (``publisher.backends.ingest_tar``), its members moved under
    ``<xx>/<d>/layerfs/`` (``publisher.backends.tar_rebase``: data, sparse maps and owners untouched), and queued.
    ``flush_layers`` -- called by the pipeline once an image's layers are done, by every ``transaction()`` first,
    when the queue is full, and by ``close`` -- publishes the whole queue with ONE
    ``cvmfs_server ingest -k -t - -b .layers <repo>``: per layer root-owned entries for ``<xx>/<d>/``,
    ``layerfs/`` and the directories the layer implies without listing them (ingest would record them with owner
    4294967295, which no transaction can change), a ``layerfs/.cvmfscatalog`` (its nested catalog), the members,
    and ``.metadata/layers.json``, ``origin.json`` and ``layer.json`` (last). Content and metadata of all layers of
    an image thus appear in one atomic publish. Removals inside layer directories (GC) are
    ``cvmfs_server ingest -d`` calls, all paths in one publish (one each through a gateway, which refuses several);
    other writes there (``origin.json`` of a reused layer) go in one ``ingest -b .layers`` too. Per image with N
    new layers: 1 publish for the layers (was 3 N), plus the flat's and the image metadata's transactions.

Transactions, both backends
    ``transaction()`` buffers changes; on success it publishes the ``.layers/<xx>/<d>/`` part with ``ingest`` (see
    above), applies the rest inside ``cvmfs_server transaction <repo>[/<lease path>]`` … ``publish`` (``abort -f``
    when anything fails) and then runs the ``ingest -d`` removals. A block that raises changes nothing. OS errors
    inside a transaction (``Permission denied`` on a tree an older ingest recorded with owner 4294967295) become a
    :class:`CommandError` saying how to remove that tree.

``cvmfs-ingest`` and ``cvmfs-transaction`` differ only in the transaction's path: the latter takes a sub-path
lease (``--lease-path``, a gateway lease). Every ``cvmfs_server`` call of a repository is serialised by an
``fcntl`` lock in the state directory and has a timeout (``publisher.backends.cvmfs_server``); a marker file records
an open transaction or ingest, so that a run killed inside one is aborted by the next run's ``recover``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cvmfs_snap.errors import CommandError, CvmfsSnapError, InvalidInputError
from cvmfs_snap.fsutil import remove_tree, remove_tree_quietly, walk
from cvmfs_snap.layer.paths import CAPABILITY_XATTR
from cvmfs_snap.layer.whiteout import OPAQUE_MARKER, WHITEOUT_PREFIX
from cvmfs_snap.layout import (
    CATALOG_MARKER,
    FLAT_DIR,
    LAYER_JSON,
    LAYERFS,
    LAYERS_DIR,
    LAYERS_JSON,
    METADATA_DIR,
    ORIGIN_JSON,
    LayerRecord,
    RepositoryLayout,
    digest_hex,
)

from ..crashpoints import crash_point
from .base import (
    Backend,
    BufferedTxn,
    FlatOpener,
    LayerInfo,
    RepoLock,
    TarStream,
    TxnOp,
    check_relpath,
    layers_json,
    merge_origin,
    symlink_atomic,
    write_atomic,
)
from .cvmfs_server import DEFAULT_MIN_RATE, DEFAULT_TIMEOUT, CvmfsServer, StdinPart
from .flatdir import build_flat_dir
from .ingest_tar import END_OF_ARCHIVE, QUEUE_ITEM, REBASED_TAR, entries_tar, files_tar, prepare_layer
from .local import DISK_FULL, Staging, disk_error

log = logging.getLogger(__name__)

__all__ = ["CvmfsBackend", "CvmfsIngestBackend", "CvmfsServer", "CvmfsTransactionBackend", "CvmfsTxn"]


@dataclass
class _Queued:
    """One layer waiting in ``<state>/queue/<d>/``: ``rebased.tar`` (its members under ``<xx>/<d>/layerfs/``) and
    ``item.json`` (written before the directory is renamed into the queue). On disk, so any process sharing the
    state directory (or the next run, after a kill) publishes it."""

    digest: str
    record: LayerRecord
    origin: list[str]
    stage: Path
    implied_dirs: list[str]
    size: int

    @classmethod
    def load(cls, stage: Path) -> _Queued:
        data = json.loads((stage / QUEUE_ITEM).read_bytes())
        rec = LayerRecord.from_json(json.dumps(data["record"]))
        if digest_hex(rec.digest) != stage.name:
            raise InvalidInputError(f"{stage}: holds {rec.digest}")
        return cls(rec.digest, rec, [str(o) for o in data["origin"]], stage,
                   [str(d) for d in data["implied_dirs"]], (stage / REBASED_TAR).stat().st_size)


def _in_layer_dir(relpath: str) -> bool:
    """``.layers/<xx>/<d>[/...]``: written by ``ingest`` only (buckets and ``.layers`` itself are not)."""
    parts = relpath.split("/")
    return len(parts) >= 3 and parts[0] == LAYERS_DIR


@dataclass
class CvmfsTxn(BufferedTxn):
    """Buffered changes of one ``transaction()`` block (applied by the backend when the block ends normally)."""

    root: Path
    ops: list[TxnOp] = field(default_factory=list)

    def ensure_catalog(self, relpath: str) -> None:
        self.ops.append(TxnOp("catalog", check_relpath(relpath)))

    def install_tree(self, src: Path, relpath: str) -> None:
        """Move a staged tree into place (replacing what is there)."""
        self.ops.append(TxnOp("install", check_relpath(relpath), src=src))

    def read_file(self, relpath: str) -> bytes | None:
        """What the file holds once this transaction is applied so far (buffered writes first)."""
        rel = check_relpath(relpath)
        for op in reversed(self.ops):
            if op.relpath == rel or rel.startswith(op.relpath + "/"):
                if op.kind == "write" and op.relpath == rel:
                    return op.data
                if op.kind in ("remove", "install"):
                    return None
        return super().read_file(rel)


class CvmfsBackend(Backend):
    """What both ``cvmfs_server`` backends share: layers by ingest, batched metadata, transactions, recovery."""

    reads_through_cvmfs = True
    variant_symlinks = True

    def __init__(self, root: str | os.PathLike[str], repo: str, *, cvmfs_server: str = "cvmfs_server",
                 state_dir: str | os.PathLike[str], lease_path: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, min_rate: float = DEFAULT_MIN_RATE,
                 server_conf: str | os.PathLike[str] | None = None, batch_bytes: int = 4 << 30,
                 batch_layers: int = 256) -> None:
        self.root = Path(root)
        self.layout = RepositoryLayout(self.root)
        self.repo = repo
        self.server = CvmfsServer(cvmfs_server, repo, timeout=timeout, min_rate=min_rate, server_conf=server_conf)
        self.lease_path = lease_path
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.staging = Staging(self.state_dir / "staging")
        self.lock = RepoLock(self.state_dir / "cvmfs_server.lock")
        self.server.lock_fd = self.lock.held_fd
        self._marker = self.state_dir / "transaction-open"
        #: layers validated and spooled, waiting for one batched ingest (``flush_layers``)
        self._queue = self.state_dir / "queue"
        self._flushing = threading.local()
        self.batch_bytes = batch_bytes
        self.batch_layers = batch_layers

    # -- layers ------------------------------------------------------------------------------------------------------
    def publish_layer(self, info: LayerInfo, tar_stream: TarStream) -> LayerRecord:
        """Validate and spool the layer, rebased under ``<xx>/<d>/layerfs/``, and queue it; the queue goes into
        the repository with one ingest at ``flush_layers`` (the pipeline calls it before an image's flats),
        at the next transaction, when it holds ``batch_bytes``/``batch_layers``, or at ``close``."""
        hexd = digest_hex(info.digest)
        stage = self.staging.new()
        try:
            try:
                rec = prepare_layer(info, tar_stream, stage, self.limits)
            except OSError as exc:
                raise CommandError(
                    f"layer {info.digest}: cannot spool the layer in {self.state_dir}: {exc.strerror or exc}; the "
                    "state directory needs free space for one uncompressed layer per worker and batch"
                ) from exc
        except BaseException:
            remove_tree_quietly(stage)
            raise
        self._queue.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(stage, self._queue / hexd)
        except OSError as exc:
            remove_tree_quietly(stage)
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            return rec  # queued meanwhile by another worker or process
        crash_point("layer-spooled")
        queued = self._read_queue()
        if sum(q.size for q in queued) >= self.batch_bytes or len(queued) >= self.batch_layers:
            self.flush_layers()
        return rec

    def has_layer(self, digest: str) -> bool:
        if (self._queue / digest_hex(digest) / QUEUE_ITEM).is_file():
            return True  # flush_layers makes it visible (or fails the image) before anything uses it
        return super().has_layer(digest)

    def _read_queue(self) -> list[_Queued]:
        out: list[_Queued] = []
        try:
            names = sorted(os.listdir(self._queue))
        except FileNotFoundError:
            return out
        for name in names:
            try:
                out.append(_Queued.load(self._queue / name))
            except FileNotFoundError:
                continue  # flushed meanwhile
            except (OSError, ValueError, KeyError, TypeError, CvmfsSnapError) as exc:
                log.warning("dropping unreadable queued layer %s: %s", self._queue / name, exc)
                remove_tree_quietly(self._queue / name)
        return out

    def flush_layers(self, digests: Sequence[str] = ()) -> None:
        """Publish every queued layer, with its metadata, in one ``ingest -b .layers``; then check that all of
        ``digests`` are complete (a layer queued by another image whose batch failed fails this image too)."""
        with self.lock():
            if getattr(self._flushing, "on", False):
                return  # the bucket transaction inside a flush
            self._flushing.on = True
            batch = self._read_queue()
            try:
                todo = [q for q in batch if not self.layout.is_layer_complete(q.digest)]
                if todo:
                    self._ingest_batch(todo)
            finally:
                self._flushing.on = False
                for q in batch:
                    remove_tree_quietly(q.stage)
        missing = [d for d in digests if not self.layout.is_layer_complete(d)]
        if missing:
            raise CommandError(
                f"layer(s) {', '.join(missing)} did not reach {self.repo}: the ingest of their batch failed (see "
                "the log); the next run publishes them"
            )

    def _ingest_batch(self, batch: Sequence[_Queued]) -> None:
        layout = self.layout
        self._ensure_buckets(batch[0].digest)
        leftovers = [self._rel(layout.layer_dir(q.digest)) for q in batch
                     if os.path.lexists(layout.layer_dir(q.digest))]  # incomplete: start clean
        if leftovers and self.lease_path:  # a gateway refuses deleting and adding in one ingest
            self._delete_paths(leftovers)
            leftovers = []
        parts: list[StdinPart] = []
        for q in batch:
            hexd = digest_hex(q.digest)
            base = f"{hexd[:2]}/{hexd}"
            parts.append(entries_tar([(f"{base}/{LAYERFS}/{CATALOG_MARKER}", b"")],
                                     dirs=[base, f"{base}/{LAYERFS}",
                                           *(f"{base}/{LAYERFS}/{d}" for d in q.implied_dirs)]))
            parts.append(q.stage / REBASED_TAR)
            origin = merge_origin(None, q.origin) or b""
            parts.append(entries_tar([(f"{base}/{METADATA_DIR}/{LAYERS_JSON}", layers_json(q.record)),
                                      (f"{base}/{METADATA_DIR}/{ORIGIN_JSON}", origin),
                                      (f"{base}/{METADATA_DIR}/{LAYER_JSON}", q.record.to_json().encode())],
                                     dirs=[f"{base}/{METADATA_DIR}"]))
        parts.append(END_OF_ARCHIVE)
        try:
            with self._marked():
                self.server.ingest(self._rel(layout.layers_root), parts, catalog=False, delete=leftovers)
        except CvmfsSnapError as exc:
            log.error("publishing %d layer(s) (%s) in one ingest failed: %s", len(batch),
                      ", ".join(q.digest for q in batch), exc)
            # the failed ingest aborted its transaction; whatever of the batch is visible anyway goes
            self._delete_quietly([self._rel(layout.layer_dir(q.digest)) for q in batch
                                  if os.path.lexists(layout.layer_dir(q.digest))
                                  and not layout.is_layer_complete(q.digest)])
            raise CommandError(f"layer(s) {', '.join(q.digest for q in batch)}: {exc}") from exc
        crash_point("ingest-done")
        log.info("published %d layer(s) in one ingest of %s", len(batch), self.repo)

    def layer_tree(self, digest: str) -> Path | None:
        """Not when the flat tree needs what ingest dropped: xattrs of the layer that this repository's publish
        keeps (``CVMFS_INCLUDE_XATTRS=true``); the flat then gets that layer from the registry."""
        path = super().layer_tree(digest)
        if path is None:
            return None
        rec = self._record(digest)
        if rec is None:
            return path
        if not _keeps_whiteouts(path, rec):
            log.warning("layer %s: its layerfs lacks .wh.* files its layer.json lists (published through a "
                        "transaction by an older cvmfs-snap, which the server turned into deletions); its flat "
                        "trees take it from the registry", digest)
            return None
        # flats never carry file capabilities (privilege); the other xattrs are worth a download where kept
        kept = {p: names for p, names in rec.xattrs.items() if set(names) - {CAPABILITY_XATTR}}
        if not kept:
            return path
        if self.server.includes_xattrs():
            return None
        example = next(iter(kept.items()))
        log.warning(
            "layer %s: %d entries have extended attributes (e.g. %s: %s) that neither its layerfs (ingest drops "
            "them; layer.json records them) nor flat trees keep, because CVMFS_INCLUDE_XATTRS is not true in %s; "
            "set it there to keep them in flats (file capabilities, user.*)",
            digest, len(kept), example[0], ", ".join(sorted(example[1])), self.server.server_conf,
        )
        return path

    def _record(self, digest: str) -> LayerRecord | None:
        try:
            return self.layout.read_layer_record(digest)
        except InvalidInputError:
            return None

    def _ensure_buckets(self, digest: str) -> None:
        """``.layers`` and its 256 buckets ``.layers/<xx>`` (nested catalogs, root-owned; an ingest would record
        them with owner 4294967295): all missing ones in one transaction, so that it happens once per repository
        instead of once per new bucket."""
        root = self.layout.layers_root
        if (self.layout.layer_bucket(digest) / CATALOG_MARKER).is_file() and (root / CATALOG_MARKER).is_file():
            return
        with self.transaction() as txn:
            txn.ensure_catalog(self._rel(root))
            for i in range(256):
                if not (root / f"{i:02x}" / CATALOG_MARKER).is_file():
                    txn.ensure_catalog(f"{LAYERS_DIR}/{i:02x}")

    # -- files inside layer directories ------------------------------------------------------------------------------
    def _ingest_files(self, files: dict[str, bytes]) -> None:
        """Write files inside layer directories with one ``ingest -k -t - -b .layers`` (no catalog)."""
        base = self.layout.layers_root
        new_dirs: set[str] = set()
        for rel in files:
            parent = os.path.dirname(rel)
            while parent and _in_layer_dir(parent) and not (self.root / parent).is_dir():
                new_dirs.add(parent)
                parent = os.path.dirname(parent)
        strip = len(LAYERS_DIR) + 1
        tar = files_tar(
            sorted(((rel[strip:], data) for rel, data in files.items()), key=_metadata_order),
            dirs=sorted(d[strip:] for d in new_dirs),
        )
        with self._marked():
            self.server.ingest(self._rel(base), [tar], catalog=False)

    # -- removals inside layer directories --------------------------------------------------------------------------
    def _delete_paths(self, paths: Sequence[str]) -> None:
        present = [p for p in dict.fromkeys(paths) if os.path.lexists(self.root / p)]
        if not present:
            return
        with self._marked():
            if self.lease_path:
                for p in present:
                    self.server.ingest_delete([p])
            else:
                self.server.ingest_delete(present)

    def _delete_quietly(self, paths: Sequence[str]) -> None:
        try:
            self._delete_paths(paths)
        except CvmfsSnapError as exc:
            log.error("could not delete %s after a failure: %s; delete it with `cvmfs_server ingest -d %s %s`",
                      ", ".join(paths), exc, " -d ".join(paths), self.repo)

    # -- transactions ------------------------------------------------------------------------------------------------
    @contextmanager
    def _marked(self) -> Iterator[None]:
        """The marker says a transaction (ours or an ingest's) may be open, for ``recover`` after a kill."""
        self._marker.write_text(f"{os.getpid()}\n")
        try:
            yield
        finally:  # a failed ingest aborted its own transaction (and a timed-out one was aborted for it)
            self._marker.unlink(missing_ok=True)

    @contextmanager
    def transaction(self) -> Iterator[CvmfsTxn]:
        with self.lock():
            self.flush_layers()
            txn = CvmfsTxn(self.root)
            yield txn
            crash_point("txn-before-publish")
            self._commit(txn)

    def _commit(self, txn: CvmfsTxn) -> None:
        layer_writes: dict[str, bytes] = {}
        layer_removes: list[str] = []
        others: list[TxnOp] = []
        for op in txn.ops:
            if not _in_layer_dir(op.relpath):
                others.append(op)
            elif op.kind == "write":
                layer_writes[op.relpath] = op.data
                layer_removes = [r for r in layer_removes if r != op.relpath]
            elif op.kind == "remove":
                layer_removes.append(op.relpath)
                layer_writes = {k: v for k, v in layer_writes.items()
                                if k != op.relpath and not k.startswith(op.relpath + "/")}
            else:
                raise InvalidInputError(
                    f"refusing to {op.kind} {op.relpath} in a transaction: inside layer directories only files "
                    "are written and trees removed (through cvmfs_server ingest)"
                )
        if layer_writes:
            self._ingest_files(layer_writes)
        if others:
            self._apply_in_transaction(others)
        if layer_removes:
            self._delete_paths(layer_removes)

    def _apply_in_transaction(self, ops: Sequence[TxnOp]) -> None:
        self.server.transaction(self.lease_path)
        self._marker.write_text(f"{os.getpid()}\n")
        try:
            for op in ops:
                try:
                    self._apply(op)
                except OSError as exc:
                    if exc.errno in DISK_FULL:  # disk full in the transaction's scratch area: say so, name it
                        raise disk_error(exc, self.root / op.relpath, "writing") from exc
                    raise CommandError(
                        f"cannot {op.kind} {op.relpath} in the transaction of {self.repo}: "
                        f"{exc.strerror or exc}; a directory that an earlier `cvmfs_server ingest -k` recorded "
                        "with owner 4294967295 (older cvmfs-snap and DUCC layers) cannot be changed by any "
                        f"transaction: remove that tree with `cvmfs_server ingest -d <path> {self.repo}`"
                    ) from exc
            crash_point("txn-applied")
        except BaseException:
            self._abort()
            raise
        try:
            self.server.publish()
        except CvmfsSnapError:
            self._abort()
            raise
        self._marker.unlink(missing_ok=True)

    def _apply(self, op: TxnOp) -> None:
        path = self.root / op.relpath
        if op.kind == "write":
            write_atomic(path, op.data)
        elif op.kind == "symlink":
            symlink_atomic(path, op.target)
        elif op.kind == "mkdir":
            path.mkdir(parents=True, exist_ok=True)
        elif op.kind == "catalog":
            path.mkdir(parents=True, exist_ok=True)
            if not (path / CATALOG_MARKER).exists():
                (path / CATALOG_MARKER).touch()
        elif op.kind == "remove":
            if path.is_dir() and not path.is_symlink():
                remove_tree(path)
            elif os.path.lexists(path):
                path.unlink()
        elif op.kind == "install":
            assert op.src is not None
            _install_tree(op.src, path)

    def _abort(self) -> None:
        try:
            self.server.abort()
        except CvmfsSnapError as exc:
            log.error("could not abort the transaction of %s: %s; run `cvmfs_server abort -f %s` by hand",
                      self.repo, exc, self.repo)
            return
        self._marker.unlink(missing_ok=True)

    def recover(self) -> None:
        with self.lock():
            if self._marker.exists():
                log.warning("a previous run was killed inside a transaction of %s; aborting it", self.repo)
                try:
                    self.server.abort()
                except CvmfsSnapError as exc:
                    log.info("nothing to abort (%s)", exc)  # its last command ended the transaction itself
                self._marker.unlink(missing_ok=True)
            self.staging.clean_abandoned()
            try:
                self.flush_layers()  # validated layers a killed run left queued
            except CvmfsSnapError as exc:
                log.error("%s", exc)

    def close(self) -> None:
        """Queued layers of images that failed otherwise are still valid layers: publish them."""
        try:
            self.flush_layers()
        except CvmfsSnapError as exc:
            log.error("%s", exc)

    # -- flat tree -----------------------------------------------------------------------------------------------------
    def publish_flat(self, config_digest: str, layers: Sequence[FlatOpener]) -> None:
        with self.staging.dir() as stage:
            flat = stage / "flat"
            build_flat_dir(flat, layers, self.limits)
            self._warn_dropped_xattrs(flat, config_digest)
            rel = self._rel(self.layout.flat_dir(config_digest))
            with self.transaction() as txn:
                if self.layout.flat_dir(config_digest).is_dir():
                    return
                txn.ensure_catalog(FLAT_DIR)
                txn.install_tree(flat, rel)

    def _warn_dropped_xattrs(self, flat: Path, config_digest: str) -> None:
        """``publish`` drops xattrs unless ``CVMFS_INCLUDE_XATTRS=true``: say so when the flat has any."""
        if self.server.includes_xattrs():
            return
        count, example = 0, ""
        for dirpath, dirs, files in walk(flat):
            for name in dirs + files:
                p = os.path.join(dirpath, name)
                try:
                    names = os.listxattr(p, follow_symlinks=False)
                except OSError:
                    continue
                if names:
                    count += 1
                    example = example or f"{os.path.relpath(p, flat)} ({', '.join(sorted(names)[:3])})"
        if count:
            log.warning(
                "flat %s: %d entries carry extended attributes (e.g. %s) that %s drops when publishing, because "
                "CVMFS_INCLUDE_XATTRS is not true in %s; set it there to keep them (file capabilities, user.*)",
                config_digest, count, example, self.repo, self.server.server_conf,
            )

    def _rel(self, p: Path) -> str:
        return str(p.relative_to(self.root))


class CvmfsIngestBackend(CvmfsBackend):
    name = "cvmfs-ingest"


class CvmfsTransactionBackend(CvmfsBackend):
    """Flats and image metadata in (sub-path lease) transactions; layers still by ``ingest`` (see the module)."""

    name = "cvmfs-transaction"


def _keeps_whiteouts(layerfs: Path, rec: LayerRecord) -> bool:
    """The tree still has the ``.wh.*`` files of every whiteout and opaque directory its record lists."""
    for p in rec.whiteouts:
        head, _, name = p.rpartition("/")
        if not os.path.lexists(layerfs / head / (WHITEOUT_PREFIX + name)):
            return False
    return all(os.path.lexists(layerfs / d / OPAQUE_MARKER) for d in rec.opaque_dirs)


def _metadata_order(item: tuple[str, bytes]) -> tuple[str, bool, str]:
    """Grouped by layer directory (``<xx>/<d>``), its layer.json last (its presence marks the layer complete)."""
    name = item[0]
    return ("/".join(name.split("/")[:2]), name.rsplit("/", 1)[-1] == LAYER_JSON, name)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _install_tree(src: Path, dst: Path) -> None:
    """Rename a staged tree into place (``cp -a`` across filesystems: keeps owners, modes, times, xattrs, links)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_dir() and not dst.is_symlink():
        remove_tree(dst)
    elif os.path.lexists(dst):
        dst.unlink()
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        proc = subprocess.run(["cp", "-a", "--", str(src), str(dst)], capture_output=True, check=False)
        if proc.returncode != 0:
            raise CommandError(
                f"copying {src} into {dst} failed: {proc.stderr.decode(errors='replace')[-500:]}"
            ) from None
