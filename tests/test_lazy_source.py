"""The lazy LayerSource (sources/lazy.py) under the snapshot core: which Prepares it takes, what it asks the lazyfs
process over the control socket, restart/re-attach, release, credentials, status.

The registry is real (loopback docker-registry with eStargz images built by our writer) and so is the lazyfs process
(``cvmfs-snap lazyfs``, started by the source itself, FUSE); containerd is left out here (tests/test_lazy_e2e.py).
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cvmfs_snap.errors import AlreadyExistsError, InvalidInputError
from cvmfs_snap.labelnames import (
    CRI_IMAGE_LAYERS,
    CRI_IMAGE_REF,
    CRI_LAYER_DIGEST,
    CRI_MANIFEST_DIGEST,
    SNAPSHOT_REF,
    SNAPSHOT_SOURCE,
    TOC_DIGEST,
)
from cvmfs_snap.snapshotter import status
from cvmfs_snap.snapshotter.config import parse_config
from cvmfs_snap.snapshotter.core import Snapshotter
from cvmfs_snap.snapshotter.sources.cvmfs import CvmfsSource
from cvmfs_snap.snapshotter.sources.lazy import LazySettings, LazySource
from cvmfs_snap_devenv.images import BuiltImage, Pusher, estargz_layer, image, push_image
from cvmfs_snap_devenv.procs import stop_lazyfs
from cvmfs_snap_devenv.registry import Registry, blob_gets, free_port, htpasswd_auth, log_mark, start_registry
from tests.support.layersource import lookup
from tests.support.waiting import wait_for

CHAIN = "sha256:" + "c" * 64
PASSWORD = "lazy-s3cret-pw"


@pytest.fixture
def lazy_image(registry: Registry) -> tuple[BuiltImage, str]:
    lay = estargz_layer(["etc/", ("etc/os-release", b"ID=test\n"), ("big", os.urandom(200_000))])
    img = image([lay])
    push_image(registry.url, "lazysrc/app", "1", img)
    return img, registry.ref("lazysrc/app", "1")


def labels_for(img: BuiltImage, ref: str, chain: str = CHAIN, toc: bool = True) -> dict[str, str]:
    lay = img.layers[0]
    out = {SNAPSHOT_REF: chain, CRI_LAYER_DIGEST: lay.digest, CRI_IMAGE_REF: ref,
           CRI_MANIFEST_DIGEST: img.manifest_digest}
    if toc:
        out[TOC_DIGEST] = lay.annotations[TOC_DIGEST]
    return out


def attached(src: LazySource) -> dict[str, dict[str, object]]:
    """The process's ``list``, by digest."""
    return {str(x["digest"]): x for x in src.layers()}


def make_source(root: Path, tmp_path: Path, docker_config: Path | None = None, enabled: bool = True,
                metrics_address: str = "") -> LazySource:
    if docker_config is None:
        docker_config = tmp_path / "none.json"
        docker_config.write_text("{}")
    settings = LazySettings(enabled=enabled, hosts_dir=str(tmp_path / "certs.d"), docker_config=str(docker_config),
                            start_timeout=20.0, timeout=10.0, metrics_address=metrics_address,
                            prefetch=False, background_fetch=False)  # fetched = what the test reads
    return LazySource(root, settings)


def stop(src: LazySource) -> None:
    stop_lazyfs(src.root)
    if src.process.started is not None:
        src.process.started.wait(10)


def test_only_prepares_with_toc_digest_and_image_ref_are_taken(lazy_image: tuple[BuiltImage, str], tmp_path: Path,
                                                                 short_tmp: Path) -> None:
    img, ref = lazy_image
    src = make_source(short_tmp / "lazy", tmp_path)
    sn = Snapshotter(tmp_path / "root", sources=[src])
    try:
        # no TOC digest label (a plain gzip layer, or `ctr images pull`): a normal pull, no process started
        assert sn.prepare("k1", "", labels_for(img, ref, toc=False))
        no_ref = labels_for(img, ref, chain="sha256:" + "d" * 64)
        del no_ref[CRI_IMAGE_REF]
        assert sn.prepare("k2", "", no_ref)
        assert src.process.started is None and not (short_tmp / "lazy" / "control.sock").exists()
        disabled = make_source(short_tmp / "lazy2", tmp_path, enabled=False)
        assert lookup(disabled, labels_for(img, ref)) is None
    finally:
        sn.close()
        stop(src)


def test_lazy_layer_is_attached_and_mounted(lazy_image: tuple[BuiltImage, str], tmp_path: Path,
                                            short_tmp: Path) -> None:
    img, ref = lazy_image
    lay = img.layers[0]
    root = short_tmp / "lazy"
    cvmfs = CvmfsSource(tmp_path / "repo", tmp_path / "cvmfs-state")  # an empty repository: CVMFS lacks the layer
    (tmp_path / "repo").mkdir()
    src = make_source(root, tmp_path)
    missed: list[dict[str, str]] = []
    sn = Snapshotter(tmp_path / "root", sources=[cvmfs, src], on_miss=lambda lab: missed.append(dict(lab)))
    try:
        with pytest.raises(AlreadyExistsError, match="served remotely by lazy"):
            sn.prepare("extract-1", "", labels_for(img, ref))
        assert src.process.started is not None and src.process.started.poll() is None
        assert (root / "lazyfs.pid").read_text().strip() == str(src.process.started.pid)
        assert list(attached(src)) == [lay.digest]
        rec = sn.store.find(CHAIN)
        assert rec is not None and rec.source == "lazy" and rec.labels[SNAPSHOT_SOURCE] == "lazy"
        assert rec.labels[TOC_DIGEST] == lay.annotations[TOC_DIGEST]
        assert [m[CRI_LAYER_DIGEST] for m in missed] == [lay.digest]  # reported for publish-on-miss
        [m] = sn.view("v", CHAIN)
        assert m.type == "bind"
        assert (Path(m.source) / "etc" / "os-release").read_bytes() == b"ID=test\n"  # through the FUSE mount
        assert os.path.realpath(m.source) == str(root / "mnt" / lay.digest[7:])
        assert src.held() == [lay.digest]
        rec_file = json.loads((root / "layers" / f"{lay.digest[7:]}.json").read_text())
        assert rec_file == {"digest": lay.digest, "size": len(lay.blob),
                            "toc_digest": lay.annotations[TOC_DIGEST], "image_ref": ref}
        # the last snapshot goes: detached, nothing held
        sn.remove("v")
        sn.remove(CHAIN)
        assert src.held() == [] and attached(src) == {}
        assert not (root / "mnt" / lay.digest[7:]).exists()
    finally:
        sn.close()
        stop(src)


def test_dead_process_is_restarted_and_layers_reattached(lazy_image: tuple[BuiltImage, str], tmp_path: Path,
                                                        short_tmp: Path) -> None:
    img, ref = lazy_image
    lay = img.layers[0]
    root = short_tmp / "lazy"
    src = make_source(root, tmp_path)
    sn = Snapshotter(tmp_path / "root", sources=[src])
    try:
        with pytest.raises(AlreadyExistsError):
            sn.prepare("extract-1", "", labels_for(img, ref))
        first = src.process.started
        assert first is not None
        first.kill()
        first.wait(10)
        (root / "state.json").unlink()  # even a process that lost its own state gets the layer again
        [m] = sn.view("v", CHAIN)  # Mounts: the process is started again, the layer attached from our record
        assert src.process.started is not first and src.process.started is not None
        assert (Path(m.source) / "etc" / "os-release").read_bytes() == b"ID=test\n"
        assert list(attached(src)) == [lay.digest]
    finally:
        sn.close()
    # a new snapshotter (restart) after the process died too: restore starts it, the layer is served again
    src.process.started.kill()
    src.process.started.wait(10)
    src2 = make_source(root, tmp_path)
    sn2 = Snapshotter(tmp_path / "root", sources=[src2])
    try:
        sn2.restore_sources()
        assert src2.process.started is not None and src2.process.started.poll() is None
        assert (root / "mnt" / lay.digest[7:] / "etc" / "os-release").read_bytes() == b"ID=test\n"
    finally:
        sn2.close()
        stop(src2)


def test_manifest_disagreeing_with_labels_means_a_normal_pull(lazy_image: tuple[BuiltImage, str], tmp_path: Path,
                                                             short_tmp: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    img, ref = lazy_image
    src = make_source(short_tmp / "lazy", tmp_path)
    sn = Snapshotter(tmp_path / "root", sources=[src])
    try:
        bad = labels_for(img, ref)
        bad[TOC_DIGEST] = "sha256:" + "0" * 64
        mounts = sn.prepare("k1", "", bad)  # no exception: a local snapshot
        assert mounts and sn.store.find("k1") is not None and not sn.store.find("k1").remote  # type: ignore[union-attr]
        assert "TOC digest label differs" in caplog.text
        # nothing attached (the process, started to read the manifest, holds no layer; no record kept)
        assert src.layers() == [] and src.held() == []
    finally:
        sn.close()
        stop(src)


@pytest.fixture(scope="module")
def private_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    root = tmp_path_factory.mktemp("lazy-private")
    with start_registry(root, htpasswd_auth(root, "alice", PASSWORD)) as reg:
        yield reg


def test_credentials_reach_the_process_but_no_log_or_file(private_registry: Registry, tmp_path: Path,
                                                          short_tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    reg = private_registry
    caplog.set_level(logging.DEBUG)
    lay = estargz_layer([("f", b"private")])
    img = image([lay])
    p = Pusher(reg.url, auth=("alice", PASSWORD))
    try:
        p.image("private/app", "1", img)
    finally:
        p.close()
    cfg = tmp_path / "docker.json"
    cfg.write_text(json.dumps({"auths": {reg.host: {"auth": base64.b64encode(f"alice:{PASSWORD}".encode()).decode()}}}))
    root = short_tmp / "lazy"
    src = make_source(root, tmp_path, docker_config=cfg)
    sn = Snapshotter(tmp_path / "root", sources=[src])
    try:
        with pytest.raises(AlreadyExistsError):
            sn.prepare("extract-1", "", labels_for(img, reg.ref("private/app", "1")))
        # the process read the TOC and now the file with the credentials it got over the socket
        assert (root / "mnt" / lay.digest[7:] / "f").read_bytes() == b"private"
        assert PASSWORD not in caplog.text
        assert PASSWORD not in (root / "lazyfs.log").read_text()
        assert PASSWORD not in (root / "state.json").read_text()
        for f in (root / "layers").iterdir():
            assert PASSWORD not in f.read_text()
        assert PASSWORD not in sn.store.find(CHAIN).request  # type: ignore[union-attr]
    finally:
        sn.close()
        stop(src)
    # without credentials the manifest cannot be read: a normal pull, with an error naming no secret
    src2 = make_source(short_tmp / "lazy2", tmp_path)
    sn2 = Snapshotter(tmp_path / "root2", sources=[src2])
    try:
        assert sn2.prepare("k", "", labels_for(img, reg.ref("private/app", "1")))
        assert src2.layers() == [] and src2.held() == []  # the process could not read the manifest: no attach
        assert PASSWORD not in caplog.text
    finally:
        sn2.close()
        stop(src2)


def test_status_shows_percent_fetched(lazy_image: tuple[BuiltImage, str], tmp_path: Path, short_tmp: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    img, ref = lazy_image
    lay = img.layers[0]
    snap_root = short_tmp / "root"
    port = free_port()
    src = make_source(snap_root / "lazy", tmp_path, metrics_address=f"127.0.0.1:{port}")
    sn = Snapshotter(snap_root, sources=[src])
    try:
        with pytest.raises(AlreadyExistsError):
            sn.prepare("extract-1", "", labels_for(img, ref))
        [s] = [x for x in status.collect(snap_root)["snapshots"] if x["source"] == "lazy"]
        before = s["lazy"]
        assert before["attached"] and not before["complete"] and before["fetched_percent"] < 50
        data = (snap_root / "lazy" / "mnt" / lay.digest[7:] / "big").read_bytes()  # read the big file
        assert len(data) == 200_000
        [s] = [x for x in status.collect(snap_root)["snapshots"] if x["source"] == "lazy"]
        assert s["lazy"]["fetched_percent"] > 90 and s["lazy"]["bytes_fetched"] > before["bytes_fetched"]
        status.main(argparse.Namespace(root=snap_root, json=False))
        out = capsys.readouterr().out
        assert f"lazy {lay.digest} " in out and "% fetched" in out
        # the process's own metrics ([cvmfs-snap.lazy] metrics-address): bytes fetched for this layer
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        line = next(x for x in text.splitlines()
                    if x.startswith("cvmfs_snap_lazy_fetched_bytes_total") and lay.digest in x)
        assert float(line.split()[-1]) >= s["lazy"]["bytes_fetched"] * 0.5
    finally:
        sn.close()
        stop(src)
    data = status.collect(snap_root)  # the process is gone: progress unknown, said once
    assert "not running" in data["lazy_error"] or "does not answer" in data["lazy_error"]


def test_config_keys() -> None:
    cfg = parse_config({"cvmfs-snap": {"lazy": {
        "cache-size": "2GiB", "prefetch-bound": 1048576, "prefetch": False, "background-fetch": False,
        "timeout": 5, "hosts-dir": "/etc/hosts.d", "docker-config": "/root/c.json", "force-single-range": True,
        "cache-dir": "/var/cache/lazy", "metrics-address": "127.0.0.1:9103"}}})
    assert cfg.sources == ["cvmfs", "lazy"]
    lz = cfg.lazy
    assert (lz.cache_size, lz.prefetch_bound, lz.prefetch, lz.background_fetch, lz.timeout) == (
        2 << 30, 1 << 20, False, False, 5.0)
    assert (lz.hosts_dir, lz.docker_config, lz.force_single_range, lz.cache_dir) == (
        "/etc/hosts.d", "/root/c.json", True, "/var/cache/lazy")
    assert lz.metrics_address == "127.0.0.1:9103"
    assert parse_config({"cvmfs-snap": {"lazy": {"enabled": False}}}).sources == ["cvmfs"]
    for bad, msg in (({"cache-size": "lots"}, "cvmfs-snap.lazy.cache-size: expected a size: "),
                     ({"timeout": 0}, "cvmfs-snap.lazy.timeout: expected a number > 0, got 0"),
                     ({"hosts-dir": "rel/dir"}, "expected an absolute path"),
                     ({"prefetch": "yes"}, "cvmfs-snap.lazy.prefetch: expected true or false, got 'yes'"),
                     ({"cache-size": 0}, "cache-size: expected a size above 0"),
                     ({"metrics-address": "9103"}, "HOST:PORT")):
        with pytest.raises(InvalidInputError, match=re.escape(msg)):
            parse_config({"cvmfs-snap": {"lazy": bad}}, "cfg.toml")


def test_one_manifest_read_per_image(registry: Registry, tmp_path: Path, short_tmp: Path) -> None:
    layers = [estargz_layer([(f"f{i}", f"layer {i}".encode())]) for i in range(3)]
    img = image(layers)
    push_image(registry.url, "lazysrc/three", "1", img)
    ref = registry.ref("lazysrc/three", "1")
    src = make_source(short_tmp / "lazy", tmp_path)
    sn = Snapshotter(tmp_path / "root", sources=[src])
    mark = log_mark(registry.log)
    try:
        for i, lay in enumerate(layers):
            lab = {SNAPSHOT_REF: f"sha256:{i + 1:064x}", CRI_LAYER_DIGEST: lay.digest,
                   CRI_IMAGE_REF: ref, CRI_MANIFEST_DIGEST: img.manifest_digest,
                   TOC_DIGEST: lay.annotations[TOC_DIGEST]}
            with pytest.raises(AlreadyExistsError):
                sn.prepare(f"extract-{i}", "", lab)
        with open(registry.log, "rb") as f:
            f.seek(mark)
            text = f.read().decode(errors="replace")
        assert text.count(f"GET /v2/lazysrc/three/manifests/{img.manifest_digest}") == 1
        assert sorted(src.held()) == sorted(lay.digest for lay in layers)
    finally:
        sn.close()
        stop(src)


def test_process_that_cannot_start_means_normal_pulls_without_waiting(lazy_image: tuple[BuiltImage, str],
                                                                      tmp_path: Path, short_tmp: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A node where the lazyfs process cannot start (no /dev/fuse, broken install): the first lazy Prepare becomes a
    normal pull with one error logged, and the next ones do not start (and wait for) it again."""
    img, ref = lazy_image
    root = short_tmp / "lazy"
    (tmp_path / "none.json").write_text("{}")
    settings = LazySettings(hosts_dir=str(tmp_path / "certs.d"), docker_config=str(tmp_path / "none.json"),
                            start_timeout=20.0, timeout=10.0)
    src = LazySource(root, settings, command=[sys.executable, "-c", "import sys; sys.exit('no /dev/fuse here')"])
    sn = Snapshotter(tmp_path / "root", sources=[src])
    try:
        assert sn.prepare("k1", "", labels_for(img, ref))  # a local snapshot: normal pull
        first = src.process.started
        assert first is not None and first.returncode == 1
        assert "exited with status 1" in caplog.text and "no /dev/fuse here" in (root / "lazyfs.log").read_text()
        t0 = time.monotonic()
        assert sn.prepare("k2", "", labels_for(img, ref, chain="sha256:" + "e" * 64))
        assert time.monotonic() - t0 < 5 and src.process.started is first  # not started again
        assert "not retried" in caplog.text
    finally:
        sn.close()


def two_layer_labels(img: BuiltImage, ref: str, i: int, image_layers: str) -> dict[str, str]:
    lay = img.layers[i]
    return {SNAPSHOT_REF: f"sha256:{i + 0xab:064x}", CRI_LAYER_DIGEST: lay.digest,
            CRI_IMAGE_REF: ref, CRI_MANIFEST_DIGEST: img.manifest_digest,
            CRI_IMAGE_LAYERS: image_layers, TOC_DIGEST: lay.annotations[TOC_DIGEST]}


@pytest.fixture
def two_layers(registry: Registry) -> tuple[BuiltImage, str]:
    img = image([estargz_layer([("one", os.urandom(100_000))]), estargz_layer([("two", b"layer two\n")])])
    push_image(registry.url, "lazysrc/two", "1", img)
    return img, registry.ref("lazysrc/two", "1")


def test_the_images_other_layers_are_resolved_ahead(two_layers: tuple[BuiltImage, str], registry: Registry,
                                                    tmp_path: Path, short_tmp: Path) -> None:
    """The first lazy Prepare of an image has the process fetch the footer and TOC of its other layers in the
    background: the second Prepare makes no registry request at all. A hostile image-layers label changes
    nothing (only layers of the verified manifest are named)."""
    img, ref = two_layers
    src = make_source(short_tmp / "lazy", tmp_path)
    sn = Snapshotter(tmp_path / "root", sources=[src])
    listed = ",".join([img.layers[0].digest, "../../../etc/passwd", "sha256:" + "z" * 64, "x" * 500,
                       img.layers[1].digest, *(["sha256:" + "e" * 64] * 30)])  # under the 4 KiB label bound
    try:
        with pytest.raises(AlreadyExistsError, match="served remotely by lazy"):
            sn.prepare("extract-0", "", two_layer_labels(img, ref, 0, listed))
        wait_for(lambda: src.process.call({"op": "health"})["resolved"] == 1, "layer two to be resolved ahead")
        wait_for(lambda: img.layers[1].digest in {g.digest for g in blob_gets(registry.log)},
                 "the registry to log the GET of layer two")  # (its access log line is written after the answer)
        mark = log_mark(registry.log)
        with pytest.raises(AlreadyExistsError, match="served remotely by lazy"):
            sn.prepare("extract-1", f"sha256:{0xab:064x}", two_layer_labels(img, ref, 1, listed))
        assert blob_gets(registry.log, mark) == []  # neither footer, TOC nor manifest
        with open(registry.log, "rb") as f:
            f.seek(mark)
            assert "GET /v2/" not in f.read().decode(errors="replace")
        assert sorted(src.held()) == sorted(lay.digest for lay in img.layers)
    finally:
        sn.close()
        stop(src)


def test_remove_drops_what_was_resolved_ahead(two_layers: tuple[BuiltImage, str], tmp_path: Path,
                                              short_tmp: Path) -> None:
    img, ref = two_layers
    src = make_source(short_tmp / "lazy", tmp_path)
    sn = Snapshotter(tmp_path / "root", sources=[src])
    try:
        with pytest.raises(AlreadyExistsError):
            sn.prepare("extract-0", "", two_layer_labels(img, ref, 0, ""))  # no label: the manifest's layers
        wait_for(lambda: src.process.call({"op": "health"})["resolved"] == 1, "layer two to be resolved ahead")
        sn.remove(f"sha256:{0xab:064x}")  # containerd's unpack failed, or the image went away
        h = src.process.call({"op": "health"})
        assert h["resolved"] == 0 and h["resolving"] == 0 and h["layers"] == 0
        assert h["cache"]["chunk_bytes"] == 0  # layer two's TOC is not kept either
        assert src.held() == []
    finally:
        sn.close()
        stop(src)

