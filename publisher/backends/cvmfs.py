"""The two backends that drive a real stratum-0 through ``cvmfs_server``.

``cvmfs-ingest``
    Each layer goes in with ``cvmfs_server ingest --catalog -k -t - -b .layers/<xx>/<d>/layerfs <repo>`` (its own
    atomic publish; ``-k`` keeps the tar's ownership, ``--catalog`` makes ``layerfs`` a nested catalog).
    Hostile tars must never reach ``cvmfs_server``, and ingest cannot be stopped half-way without publishing
    something, so we *spool*: the decompressed tar is validated entry by entry (``cvmfs_snap.layer.iter_layer``)
    while it is written to a temporary file in the state directory, the whiteout index is computed on the way, the
    diffID is checked, and only then is the spool streamed into ``ingest``. This costs local disk of one
    uncompressed layer per worker, never memory. Before the ingest, ``.layers/<xx>/<d>`` is created in a metadata
    transaction (else its parents would get uid/gid 4294967295, see CVMFS-FACTS); after it, ``layers.json``,
    ``origin.json`` and ``layer.json`` are published in one more transaction. If the ingest fails, its target is
    deleted with ``cvmfs_server ingest -d``; if the metadata publish fails, ``abort -f`` and the layer is deleted too.

``cvmfs-transaction``
    Layers are unpacked (layer mode) into a local staging directory concurrently, then moved into the repository
    inside ``cvmfs_server transaction <repo>[/<lease path>]`` … ``publish``: all layers staged at that moment go in
    one transaction (group commit), so busy periods need few publishes. A sub-path transaction is a gateway lease,
    letting several publisher nodes work on one repository.

Both: metadata changes go through ``transaction``/``publish`` (``abort -f`` when anything fails), every
``cvmfs_server`` call of a repository is serialised by an ``fcntl`` lock in the state directory, and a marker file
records an open transaction so that a run killed inside one is aborted by the next run's ``recover``. Exit
statuses decide success; stderr noise (dash's ``[[: not found``) is only logged.
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
from dataclasses import dataclass
from pathlib import Path

from cvmfs_snap.errors import CommandError, CvmfsSnapError
from cvmfs_snap.fsutil import remove_tree
from cvmfs_snap.layer.limits import Limits
from cvmfs_snap.layout import (
    CATALOG_MARKER,
    FLAT_DIR,
    LAYER_JSON,
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
    LayerInfo,
    LayerOpener,
    RepoLock,
    TarStream,
    Txn,
    check_diff_id,
    check_relpath,
    layers_json,
    merge_origin,
    new_record,
    symlink_atomic,
    write_atomic,
)
from .local import Staging, build_flat_dir, disk_error, unpack_layer_dir

log = logging.getLogger(__name__)

_STDERR_NOISE = ("[[: not found",)


class CvmfsServer:
    """Runs ``cvmfs_server`` for one repository and turns failures into :class:`CommandError`."""

    def __init__(self, exe: str, repo: str) -> None:
        self.exe = exe
        self.repo = repo

    def run(self, *args: str, stdin_path: Path | None = None) -> None:
        argv = [self.exe, *args]
        log.debug("running %s", " ".join(argv))
        try:
            if stdin_path is not None:
                with open(stdin_path, "rb") as f:
                    proc = subprocess.run(argv, stdin=f, capture_output=True, check=False)
            else:
                proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, check=False)
        except FileNotFoundError as exc:
            raise CommandError(
                f"cannot run {self.exe!r}: not found; install the CernVM-FS server tools or set cvmfs_server "
                "(--cvmfs-server) to its path"
            ) from exc
        except OSError as exc:
            raise CommandError(f"cannot run {self.exe!r}: {exc}") from exc
        err = proc.stderr.decode(errors="replace")
        noise = [ln for ln in err.splitlines() if ln.strip() and not any(n in ln for n in _STDERR_NOISE)]
        if proc.returncode != 0:
            tail = "\n".join(noise[-10:]) or err.strip()[-1000:]
            raise CommandError(
                f"`{' '.join(argv)}` failed with exit status {proc.returncode}: {tail or '(no output)'}; "
                f"check the repository with `cvmfs_server check {self.repo}` and the stratum-0 logs"
            )
        if noise:
            log.debug("%s: %s", " ".join(args[:1]), "; ".join(noise[-5:]))

    def transaction(self, lease_path: str | None = None) -> None:
        self.run("transaction", f"{self.repo}/{lease_path}" if lease_path else self.repo)

    def publish(self) -> None:
        self.run("publish", self.repo)

    def abort(self) -> None:
        self.run("abort", "-f", self.repo)

    def ingest(self, base_dir: str, tar_path: Path) -> None:
        self.run("ingest", "--catalog", "-k", "-t", "-", "-b", base_dir, self.repo, stdin_path=tar_path)

    def ingest_delete(self, path: str) -> None:
        self.run("ingest", "-d", path, self.repo)


@dataclass
class DirectTxn(Txn):
    """Changes applied straight into the repository mount, which is writable inside a transaction."""

    root: Path

    def write_file(self, relpath: str, data: bytes) -> None:
        path = self.root / check_relpath(relpath)
        try:
            write_atomic(path, data)
        except OSError as exc:  # disk full in the transaction's scratch area says so, naming the file
            raise disk_error(exc, path, "writing") from exc

    def symlink(self, relpath: str, target: str) -> None:
        path = self.root / check_relpath(relpath)
        try:
            symlink_atomic(path, target)
        except OSError as exc:
            raise disk_error(exc, path, "writing") from exc

    def remove(self, relpath: str) -> None:
        p = self.root / check_relpath(relpath)
        if p.is_dir() and not p.is_symlink():
            remove_tree(p)
        elif p.is_symlink() or p.exists():
            p.unlink()

    def makedirs(self, relpath: str) -> None:
        (self.root / check_relpath(relpath)).mkdir(parents=True, exist_ok=True)

    def ensure_catalog(self, relpath: str) -> None:
        d = self.root / check_relpath(relpath)
        d.mkdir(parents=True, exist_ok=True)
        if not (d / CATALOG_MARKER).exists():
            (d / CATALOG_MARKER).touch()

    def install_tree(self, src: Path, relpath: str) -> None:
        """Move a staged tree into place (rename when on the same filesystem, else ``cp -a``: keeps owners,
        modes, times, xattrs and hard links)."""
        dst = self.root / check_relpath(relpath)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists():
            self.remove(relpath)
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


class CvmfsBackend(Backend):
    """What both ``cvmfs_server`` backends share: the lock, transactions, the flat tree, recovery."""

    reads_through_cvmfs = True

    def __init__(self, root: str | os.PathLike[str], repo: str, *, cvmfs_server: str = "cvmfs_server",
                 state_dir: str | os.PathLike[str], lease_path: str | None = None) -> None:
        self.root = Path(root)
        self.layout = RepositoryLayout(self.root)
        self.repo = repo
        self.server = CvmfsServer(cvmfs_server, repo)
        self.lease_path = lease_path
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.staging = Staging(self.state_dir / "staging")
        self.lock = RepoLock(self.state_dir / "cvmfs_server.lock")
        self._marker = self.state_dir / "transaction-open"

    # -- transactions ------------------------------------------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[DirectTxn]:
        with self.lock():
            self.server.transaction(self.lease_path)
            self._marker.write_text(f"{os.getpid()}\n")
            try:
                yield DirectTxn(self.root)
                crash_point("txn-before-publish")
            except BaseException:
                self._abort()
                raise
            try:
                self.server.publish()
            except CvmfsSnapError:
                self._abort()
                raise
            self._marker.unlink(missing_ok=True)

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
                self._abort()
            self.staging.clean_abandoned()

    # -- flat tree -----------------------------------------------------------------------------------------------------
    def publish_flat(self, config_digest: str, layers: Sequence[LayerOpener]) -> None:
        with self.staging.dir() as stage:
            flat = stage / "flat"
            build_flat_dir(flat, layers, self.limits)
            rel = str(self.layout.flat_dir(config_digest).relative_to(self.root))
            with self.transaction() as txn:
                if self.layout.flat_dir(config_digest).is_dir():
                    return
                txn.ensure_catalog(FLAT_DIR)
                txn.install_tree(flat, rel)

    def _rel(self, p: Path) -> str:
        return str(p.relative_to(self.root))


class CvmfsIngestBackend(CvmfsBackend):
    name = "cvmfs-ingest"

    def publish_layer(self, info: LayerInfo, tar_stream: TarStream) -> LayerRecord:
        with self.staging.dir() as stage:
            spool = stage / "layer.tar"
            rec = spool_and_validate(info, tar_stream, spool, self.limits)
            layout = self.layout
            layer_rel = self._rel(layout.layer_dir(info.digest))
            layerfs_rel = self._rel(layout.layerfs(info.digest))
            md = layout.layer_metadata_dir(info.digest)
            crash_point("layer-spooled")
            with self.lock():
                if layout.is_layer_complete(info.digest):
                    return layout.read_layer_record(info.digest) or rec
                # parents first, in a transaction, so that they are owned by the repository owner
                with self.transaction() as txn:
                    txn.ensure_catalog(self._rel(layout.layers_root))
                    txn.ensure_catalog(self._rel(layout.layer_bucket(info.digest)))
                    if layout.layerfs(info.digest).exists():  # a failed earlier ingest: start clean
                        txn.remove(layerfs_rel)
                    txn.makedirs(layer_rel)
                try:
                    self.server.ingest(layerfs_rel, spool)
                except CvmfsSnapError:
                    self._delete_quietly(layerfs_rel)
                    raise
                crash_point("ingest-done")
                try:
                    with self.transaction() as txn:
                        existing = txn.read_file(self._rel(md / ORIGIN_JSON))
                        txn.write_file(self._rel(md / LAYERS_JSON), layers_json(rec))
                        txn.write_file(self._rel(md / ORIGIN_JSON),
                                       merge_origin(existing, info.origin) or existing or b"")
                        txn.write_file(self._rel(md / LAYER_JSON), rec.to_json().encode())
                except CvmfsSnapError:
                    self._delete_quietly(layerfs_rel)
                    raise
            return rec

    def _delete_quietly(self, relpath: str) -> None:
        try:
            self.server.ingest_delete(relpath)
        except CvmfsSnapError as exc:
            log.error("could not delete %s after a failure: %s; delete it with `cvmfs_server ingest -d %s %s`",
                      relpath, exc, relpath, self.repo)


class _Tee:
    def __init__(self, src: TarStream, sink: object) -> None:
        self._src, self._sink = src, sink

    def read(self, n: int = -1, /) -> bytes:
        data = self._src.read(n)
        if data:
            self._sink.write(data)  # type: ignore[attr-defined]
        return data

    @property
    def diff_id(self) -> str | None:
        """The source's digest: the tar reader on top need not hash the tar again (cvmfs_snap.layer.digesting)."""
        return getattr(self._src, "diff_id", None)


@offloadable  # runs in a layer worker process when the pipeline has them (publisher.workers)
def spool_and_validate(info: LayerInfo, tar: TarStream, spool: Path, limits: Limits | None = None) -> LayerRecord:
    """Copy the tar to ``spool`` while checking every entry (hostile tars raise UnsafeLayerError) and collecting
    whiteouts; check the diffID. Nothing reaches ``cvmfs_server`` before this returned."""
    from cvmfs_snap.layer import iter_layer
    from cvmfs_snap.layer.digesting import HashingReader
    from cvmfs_snap.layer.whiteout import classify

    found: dict[str, list[str]] = {"whiteout": [], "opaque": [], "hidden": []}
    entries = 0
    reader = HashingReader(tar)
    with open(spool, "wb") as f:
        tee = _Tee(reader, f)
        for entry in iter_layer(tee, limits, name=info.digest):
            entries += 1
            meaning = classify(entry.path)  # the same index apply_layer(mode="layer") returns
            if meaning is not None:
                found[meaning[0]].append(meaning[1])
            while entry.read(1 << 20):
                pass
        while tee.read(1 << 20):
            pass
    check_diff_id(info, reader.digest)
    return new_record(info, reader.digest or "", reader.size, entries, found["whiteout"], found["opaque"],
                      found["hidden"])


@dataclass
class _Staged:
    digest: str
    layer_dir: Path
    done: bool = False
    error: BaseException | None = None


class CvmfsTransactionBackend(CvmfsBackend):
    name = "cvmfs-transaction"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._pending: list[_Staged] = []
        self._pending_lock = threading.Lock()
        self._commit_lock = threading.Lock()

    def publish_layer(self, info: LayerInfo, tar_stream: TarStream) -> LayerRecord:
        with self.staging.dir() as stage:
            layer_dir = stage / "layer"
            rec = unpack_layer_dir(info, tar_stream, layer_dir, self.limits)
            item = _Staged(info.digest, layer_dir)
            with self._pending_lock:
                self._pending.append(item)
            self._group_commit(item)
            return rec

    def _group_commit(self, item: _Staged) -> None:
        """The first waiter publishes every layer staged so far in one transaction; the others find theirs done."""
        with self._commit_lock:
            if not item.done:
                with self._pending_lock:
                    batch, self._pending = self._pending, []
                try:
                    with self.transaction() as txn:
                        txn.ensure_catalog(self._rel(self.layout.layers_root))
                        for it in batch:
                            if self.layout.is_layer_complete(it.digest):
                                continue
                            txn.ensure_catalog(self._rel(self.layout.layer_bucket(it.digest)))
                            old_origin = txn.read_file(self._rel(self.layout.origin_json(it.digest)))
                            if old_origin:
                                merged = merge_origin(
                                    old_origin, _origin_list(it.layer_dir / METADATA_DIR / ORIGIN_JSON)
                                )
                                write_atomic(it.layer_dir / METADATA_DIR / ORIGIN_JSON, merged or old_origin)
                            txn.install_tree(it.layer_dir, self._rel(self.layout.layer_dir(it.digest)))
                    log.info("published %d layer(s) in one transaction of %s", len(batch), self.repo)
                except BaseException as exc:
                    for it in batch:
                        it.error = exc
                    raise
                finally:
                    for it in batch:
                        it.done = True
            elif item.error is not None:
                raise item.error


def _origin_list(path: Path) -> list[str]:
    try:
        data = json.loads(path.read_bytes())
        return [str(x) for x in data.get("origin", [])]
    except (OSError, ValueError, AttributeError):
        return []
