"""Layers unpacked in worker processes (publisher.workers) and each layer tar hashed once.

The worker path must give what the in-process path gives: the same tree and record, and for bad layers the same
error kind with the same message; a download that fails while the worker unpacks reports the download error, and the
call returns only once the worker stopped writing.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from cvmfs_snap.errors import CvmfsSnapError, FailedPreconditionError, IntegrityError, UnavailableError
from cvmfs_snap.layer import apply_layer, digesting, open_layer
from cvmfs_snap.layout import LayerRecord
from cvmfs_snap.oci import RegistryClient
from cvmfs_snap_devenv import images as im
from cvmfs_snap_devenv.registry import Registry
from publisher.backends.base import LayerInfo, TarStream
from publisher.backends.flatdir import build_flat_dir
from publisher.backends.ingest_tar import QUEUE_ITEM, prepare_layer
from publisher.backends.local import LocalBackend, unpack_layer_dir
from publisher.pipeline import Publisher
from publisher.workers import LayerWorkers, offloadable
from tests.support.trees import NON_DIRS, TYPES, Listing, listing


@pytest.fixture(scope="module")
def workers() -> Iterator[LayerWorkers]:
    w = LayerWorkers(2)
    yield w
    w.close()


def _info(lay: im.BuiltLayer, diff_id: str | None = None) -> LayerInfo:
    return LayerInfo(lay.digest, lay.media_type, len(lay.blob), expected_diff_id=diff_id or lay.diff_id,
                     origin=["sha256:" + "c" * 64])


def _sample() -> im.BuiltLayer:
    return im.layer([
        "etc/", ("etc/os-release", b"ID=test\n"), im.Entry("etc/passwd", data=b"root:x:0:0\n", mode=0o600),
        im.Entry("bin/sh", type="symlink", linkname="busybox"), ("bin/busybox", os.urandom(300_000)),
        im.Entry("bin/ls", type="hardlink", linkname="bin/busybox"), ("opt/.wh.gone", b""),
        ("var/lib/.wh..wh..opq", b""),
    ])


def _layerfs(layer_dir: Path) -> Listing:
    """Content, mode, owner, xattrs, hard links and mtime (of non-directories: the tar's; directories made on the
    way get the current time) of everything in a layer dir's layerfs."""
    out = listing(layer_dir / "layerfs", content="bytes", mtimes=NON_DIRS, include_root=True)
    for k, rec in out.items():
        if k.endswith(".cvmfscatalog"):
            rec.pop("mtime", None)
    return out


def _comparable(rec: LayerRecord) -> tuple[object, ...]:
    return (rec.digest, rec.diff_id, rec.uncompressed_size, rec.entries, rec.whiteouts, rec.opaque_dirs, rec.hidden)


# -- hashed once ---------------------------------------------------------------------------------------------------
class _Counting:
    """A sha256 that adds what it hashes to a shared total."""

    total = 0

    def __init__(self) -> None:
        import hashlib

        self._h = hashlib.sha256()

    def update(self, data: bytes, /) -> None:
        _Counting.total += len(data)
        self._h.update(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


@pytest.mark.parametrize("step", ["unpack_layer_dir", "prepare_layer"])
@pytest.mark.parametrize("codec", ["gzip", "zstd", "plain"])
def test_each_layer_byte_is_hashed_once(step: str, codec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    """The blob once (its digest) and the uncompressed tar once (its diffID): wrappers do not hash again."""
    lay = im.layer([("a/f", os.urandom(200_000)), ("a/g", b"x" * 100_000), "a/d/"], codec)
    monkeypatch.setattr(digesting, "hash_factory", _Counting)
    _Counting.total = 0
    with open_layer(io.BytesIO(lay.blob), lay.media_type, name="layer") as tar:
        if step == "unpack_layer_dir":
            rec = unpack_layer_dir(_info(lay), tar, tmp_path / "layer")
        else:
            rec = prepare_layer(_info(lay), tar, tmp_path / "stage")  # the cvmfs backends' step
            assert (tmp_path / "stage" / QUEUE_ITEM).is_file()
    assert rec.diff_id == lay.diff_id
    blob_bytes = len(lay.blob) if codec != "plain" else len(lay.tar)
    assert _Counting.total == blob_bytes + len(lay.tar)


def test_flat_trees_are_not_hashed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A flat tree is applied from tars made here of verified layer trees: nothing to hash (the default hashes)."""
    lay = im.layer([("a/f", os.urandom(100_000)), ("a/.wh.x", b"")], "plain")
    monkeypatch.setattr(digesting, "hash_factory", _Counting)
    _Counting.total = 0
    (tmp_path / "a").mkdir()
    res = apply_layer(io.BytesIO(lay.tar), tmp_path / "a", mode="merged", digest=False)
    assert res.diff_id is None and _Counting.total == 0
    (tmp_path / "b").mkdir()
    assert apply_layer(io.BytesIO(lay.tar), tmp_path / "b", mode="merged").diff_id == lay.diff_id
    assert _Counting.total == len(lay.tar)
    _Counting.total = 0
    build_flat_dir(tmp_path / "flat", [lambda: contextlib.nullcontext(io.BytesIO(lay.tar))])
    assert _Counting.total == 0
    assert (tmp_path / "flat/a/f").read_bytes() == (tmp_path / "a/a/f").read_bytes()


# -- worker processes ------------------------------------------------------------------------------------------------
@offloadable
def _where_am_i(info: LayerInfo, tar: TarStream, target: Path, note: str = "") -> LayerRecord:
    """A step that says which process ran it (module level: sent to the worker by name)."""
    while tar.read(1 << 20):
        pass
    target.write_text(str(os.getpid()))
    if note:
        target.with_suffix(".note").write_text(note)
    return LayerRecord(digest=info.digest, diff_id=str(getattr(tar, "diff_id", "")), media_type=info.media_type,
                       compressed_size=0, uncompressed_size=0, entries=0)


@offloadable
def _dies(info: LayerInfo, tar: TarStream, target: Path) -> LayerRecord:
    """A step whose worker process dies half-way (as under the OOM killer)."""
    tar.read(1000)
    os._exit(9)


def test_a_worker_that_dies_fails_its_layer_only(workers: LayerWorkers, tmp_path: Path) -> None:
    lay = _sample()
    with pytest.raises(FailedPreconditionError, match="worker process unpacking it died"):
        _dies(_info(lay), workers.layer(io.BytesIO(lay.blob), lay.media_type, "layer"), tmp_path / "x")
    rec = unpack_layer_dir(_info(lay), workers.layer(io.BytesIO(lay.blob), lay.media_type, "layer"),
                           tmp_path / "next")  # a new pool takes over
    assert rec.diff_id == lay.diff_id
    assert workers.usable


def test_offloaded_step_runs_in_a_worker_process(workers: LayerWorkers, tmp_path: Path) -> None:
    lay = _sample()
    rec = _where_am_i(_info(lay), workers.layer(io.BytesIO(lay.blob), lay.media_type, "layer"), tmp_path / "pid",
                      note="further arguments go along")
    pid = int((tmp_path / "pid").read_text())
    assert pid != os.getpid()
    assert (tmp_path / "pid.note").read_text() == "further arguments go along"
    assert rec.diff_id == lay.diff_id  # decoded and hashed in the worker


def test_worker_unpacks_what_the_thread_unpacks(workers: LayerWorkers, tmp_path: Path) -> None:
    lay = _sample()
    with open_layer(io.BytesIO(lay.blob), lay.media_type, name="layer") as tar:
        here = unpack_layer_dir(_info(lay), tar, tmp_path / "here")
    there = unpack_layer_dir(_info(lay), workers.layer(io.BytesIO(lay.blob), lay.media_type, "layer"),
                             tmp_path / "there")
    assert _comparable(there) == _comparable(here)
    assert _layerfs(tmp_path / "there") == _layerfs(tmp_path / "here")
    assert os.stat(tmp_path / "there/layerfs/bin/ls").st_ino == os.stat(tmp_path / "there/layerfs/bin/busybox").st_ino


def _bad_layers() -> list[tuple[str, im.BuiltLayer, str | None]]:
    good = im.layer([("f", b"data" * 1000)])
    cut = im.BuiltLayer(tar=good.tar, blob=good.blob[: len(good.blob) // 2], media_type=good.media_type)
    return [
        ("path traversal", im.layer([("../escape", b"x")]), None),
        ("write through own symlink", im.layer([im.Entry("l", type="symlink", linkname="/etc"), ("l/x", b"x")]), None),
        ("truncated gzip", cut, None),
        ("zstd labelled gzip", im.BuiltLayer(tar=good.tar, blob=im.compress(good.tar, "zstd"),
                                             media_type=im.OCI_LAYER_GZIP), None),
        ("wrong diffID", good, "sha256:" + "0" * 64),
    ]


@pytest.mark.parametrize("step", ["unpack_layer_dir", "prepare_layer"])
@pytest.mark.parametrize(("what", "lay", "diff_id"), _bad_layers(), ids=[b[0] for b in _bad_layers()])
def test_worker_errors_arrive_as_the_same_kind_and_message(
    workers: LayerWorkers, tmp_path: Path, step: str, what: str, lay: im.BuiltLayer, diff_id: str | None
) -> None:
    fn = unpack_layer_dir if step == "unpack_layer_dir" else prepare_layer
    info = _info(lay, diff_id)
    with pytest.raises(CvmfsSnapError) as here, \
            open_layer(io.BytesIO(lay.blob), lay.media_type, name=f"layer {lay.digest}") as tar:
        fn(info, tar, tmp_path / "here")
    with pytest.raises(CvmfsSnapError) as there:
        fn(info, workers.layer(io.BytesIO(lay.blob), lay.media_type, f"layer {lay.digest}"), tmp_path / "there")
    assert type(there.value) is type(here.value)
    assert str(there.value) == str(here.value)
    if diff_id is not None:
        assert isinstance(there.value, IntegrityError)


class _FailingDownload:
    """Serves the first bytes of a blob, then fails as a cut connection does."""

    def __init__(self, blob: bytes, after: int) -> None:
        self._data = io.BytesIO(blob[:after])

    def read(self, n: int = -1, /) -> bytes:
        data = self._data.read(min(n, 4096) if n > 0 else 4096)
        if not data:
            raise UnavailableError("download of blob X failed after some bytes: ConnectError; retry later")
        return data


def test_download_error_wins_and_worker_is_done(workers: LayerWorkers, tmp_path: Path) -> None:
    lay = im.layer([(f"d/f{i}", os.urandom(20_000)) for i in range(50)])
    with pytest.raises(UnavailableError, match="download of blob X failed"):
        unpack_layer_dir(_info(lay), workers.layer(_FailingDownload(lay.blob, len(lay.blob) // 2), lay.media_type,
                                                   "layer"), tmp_path / "layer")
    before = listing(tmp_path, content="bytes", mtimes=TYPES)
    time.sleep(0.3)  # the worker stopped writing before the call returned: the partial tree stays as it is
    assert listing(tmp_path, content="bytes", mtimes=TYPES) == before


def test_publisher_with_and_without_workers_publish_the_same(tmp_path: Path, registry: Registry) -> None:
    """End to end through the pipeline: same layer trees and the same error text for a hostile layer."""
    good = im.image([_sample(), im.layer([("app/run", b"#!/bin/sh\n")])])
    bad = im.image([_sample(), im.layer([("../../etc/evil", b"x")])])
    im.push_image(registry.url, "workers/good", "v1", good)
    im.push_image(registry.url, "workers/bad", "v1", bad)
    outcome = {}
    for procs in (False, True):
        root = tmp_path / f"repo-{procs}"
        with RegistryClient(insecure_registries=[registry.host], retries=0) as client, \
                Publisher(LocalBackend(root), client, concurrency=2, unpack_in_processes=procs) as pub:
            ok = pub.publish_image(registry.ref("workers/good", "v1"))
            failed = pub.publish_image(registry.ref("workers/bad", "v1"))
        assert ok.ok, ok.error
        assert not failed.ok
        layers = {k: v for k, v in listing(root, content="bytes").items()
                  if k.startswith(".layers/") and "layerfs" in k}
        outcome[procs] = (layers, failed.error)
    assert outcome[True][0] == outcome[False][0]
    assert outcome[True][1] == outcome[False][1]
    assert "'..' component" in outcome[True][1]


def test_without_worker_processes_layers_are_unpacked_in_the_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Worker processes that cannot start (here: each dies in its initializer) leave the publisher working."""
    broken = LayerWorkers(1)
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("forkserver"), initializer=os._exit,
                               initargs=(3,))
    fifo_dir = tmp_path / "fifos"
    fifo_dir.mkdir()
    monkeypatch.setattr(broken, "_get_pool", lambda: (pool, fifo_dir))
    lay = _sample()
    try:
        rec = unpack_layer_dir(_info(lay), broken.layer(io.BytesIO(lay.blob), lay.media_type, "layer"),
                               tmp_path / "layer")
    finally:
        pool.shutdown(wait=True)
    assert rec.diff_id == lay.diff_id
    assert (tmp_path / "layer/layerfs/etc/os-release").read_bytes() == b"ID=test\n"
    assert not broken.usable
    assert "cannot start layer worker processes" in caplog.text
    rec2 = unpack_layer_dir(_info(lay), broken.layer(io.BytesIO(lay.blob), lay.media_type, "layer"),
                            tmp_path / "again")  # no second attempt: straight in the caller
    assert rec2.diff_id == lay.diff_id


def test_a_layer_read_here_is_unpacked_here(workers: LayerWorkers, tmp_path: Path) -> None:
    """Once something read an OffloadedLayer in the publisher, a step on it runs there too (the bytes are gone)."""
    lay = _sample()
    layer = workers.layer(io.BytesIO(lay.blob), lay.media_type, "layer")
    assert layer.read(0) == b""
    rec = _where_am_i(_info(lay), layer, tmp_path / "pid")
    assert int((tmp_path / "pid").read_text()) == os.getpid()
    assert rec.diff_id == lay.diff_id


def test_fifo_dirs_of_killed_publishers_are_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = tmp_path / f"cvmfs-snap-workers-{dead.pid}-abc"
    left.mkdir()
    os.mkfifo(left / "x.fifo")
    alive = tmp_path / f"cvmfs-snap-workers-{os.getppid()}-abc"  # a live process (pytest's parent)
    alive.mkdir()
    w = LayerWorkers(1)
    try:
        lay = _sample()
        _where_am_i(_info(lay), w.layer(io.BytesIO(lay.blob), lay.media_type, "layer"), tmp_path / "pid")
        assert not left.exists()
        assert alive.is_dir()
        mine = [n for n in os.listdir(tmp_path) if n.startswith(f"cvmfs-snap-workers-{os.getpid()}-")]
        assert len(mine) == 1 and os.listdir(tmp_path / mine[0]) == []  # FIFOs are unlinked once connected
    finally:
        w.close()
    assert not (tmp_path / mine[0]).exists()
