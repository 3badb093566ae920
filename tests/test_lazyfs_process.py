"""``cvmfs-snap lazyfs`` as a real process: a real docker-registry (behind a counting proxy), the real FUSE mount,
the control socket; attach/check/list/detach, the unpacked copy of a complete layer, SIGKILL (running readers get
ENOTCONN; a new process re-attaches from state.json) and SIGTERM (clean unmount)."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cvmfs_snap.labelnames import TOC_DIGEST
from cvmfs_snap.lazyfs import control
from cvmfs_snap.lazyfs.fs import READ_AHEAD_KB
from cvmfs_snap_devenv.images import estargz_layer, image, push_image
from cvmfs_snap_devenv.registry import Registry, blob_gets, free_port, log_mark
from tests.support.layertrees import MTIMES
from tests.support.range_proxies import Behaviour, PushedLayer, RangeProxy, push_estargz, range_proxy
from tests.support.trees import listing
from tests.support.waiting import wait_for

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0, reason="needs /dev/fuse, root")

SECRET = "very-secret-password-1234"


def content() -> dict[str, bytes]:
    files = {f"data/blob{i}": os.urandom(400_000) for i in range(10)}
    files["etc/small.conf"] = b"answer = 42\n"
    files["bin/tool"] = b"#!/bin/sh\necho tool\n"
    return files


@pytest.fixture(scope="module")
def layer(registry: Registry) -> PushedLayer:
    return push_estargz(registry.host, "lazy/proc", content(), chunk_size=64 * 1024,
                        prioritized=("bin/tool",))


@pytest.fixture
def proxy(registry: Registry) -> Iterator[RangeProxy]:
    with range_proxy(registry.url) as p:
        yield p


class Proc:
    def __init__(self, root: Path, *extra: str) -> None:
        self.root = root
        self.log = root.parent / "lazyfs.log"
        root.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as logf:
            self.p = subprocess.Popen([sys.executable, "-m", "cvmfs_snap.cli", "lazyfs", "--root", str(root),
                                       "--timeout", "10", "--log-level", "debug", *extra],
                                      stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.call({"op": "health"})
                break
            except control.ControlError:
                raise
            except Exception:
                if self.p.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("lazyfs did not start:\n" + self.log.read_text()) from None
                time.sleep(0.05)

    def call(self, req: dict[str, object]) -> dict[str, object]:
        return control.call(self.root / "control.sock", req, timeout=30)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.p.poll() is None:
            self.p.send_signal(sig)
        return self.p.wait(30)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop(signal.SIGKILL)
    subprocess.run(["umount", "-l", str(tmp_path / "lazy" / "mnt")], capture_output=True, check=False)


def attach_req(layer: PushedLayer, host: str, **kw: object) -> dict[str, object]:
    req: dict[str, object] = {"op": "attach", "id": layer.digest[7:], "digest": layer.digest, "size": layer.size,
                              "toc_digest": layer.toc_digest, "image_ref": f"{host}/lazy/proc:lazy",
                              "hosts_dir": None, "credentials": None}
    req.update(kw)
    return req


def test_attach_read_detach_and_small_reads_fetch_little(tmp_path: Path, layer: PushedLayer, proxy: RangeProxy,
                                                         procs: list[Proc]) -> None:
    root = tmp_path / "lazy"
    port = free_port()
    p = Proc(root, "--no-background-fetch", "--metrics-address", f"127.0.0.1:{port}")
    procs.append(p)
    assert oct(os.stat(root / "control.sock").st_mode & 0o777) == "0o600"
    ans = p.call(attach_req(layer, proxy.host))
    path = Path(str(ans["path"]))
    assert path == root / "mnt" / layer.digest[7:]
    assert p.call(attach_req(layer, proxy.host))["path"] == str(path)  # idempotent
    assert (path / "etc/small.conf").read_bytes() == b"answer = 42\n"
    assert proxy.bytes_sent < 0.1 * layer.size  # footer + TOC + the prefetched tool + one chunk
    assert (path / "data/blob7").read_bytes() == layer.files["data/blob7"]
    assert sorted(os.listdir(path)) == ["bin", "data", "etc"]
    lst = p.call({"op": "list"})["layers"][0]  # type: ignore[index]
    assert lst["digest"] == layer.digest and 0 < lst["fetched_fraction"] < 1 and not lst["complete"]
    assert p.call({"op": "check", "id": layer.digest[7:]})["path"] == str(path)
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert f'cvmfs_snap_lazy_fetched_bytes_total{{layer="{layer.digest}"}}' in metrics
    assert "cvmfs_snap_lazy_cache_misses_total" in metrics and proxy.host not in metrics
    with pytest.raises(control.ControlError) as e:
        p.call({"op": "check", "id": "0" * 64})
    assert e.value.kind == "notfound"
    p.call({"op": "detach", "id": layer.digest[7:]})
    assert not path.exists()
    assert p.call({"op": "list"})["layers"] == []
    assert p.stop() == 0
    assert not os.path.ismount(root / "mnt")


def test_the_mount_reads_ahead_in_large_requests(tmp_path: Path, layer: PushedLayer, proxy: RangeProxy,
                                                procs: list[Proc]) -> None:
    p = Proc(tmp_path / "lazy", "--no-background-fetch")
    procs.append(p)
    mnt = tmp_path / "lazy" / "mnt"
    st = os.stat(mnt)
    knob = Path(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb")
    assert int(knob.read_text()) == READ_AHEAD_KB  # not the kernel's 128 KiB: fewer trips through the process
    path = Path(str(p.call(attach_req(layer, proxy.host))["path"]))
    assert (path / "data/blob3").read_bytes() == layer.files["data/blob3"]


def test_bad_attaches_and_credentials_stay_secret(tmp_path: Path, layer: PushedLayer, proxy: RangeProxy,
                                                  procs: list[Proc]) -> None:
    root = tmp_path / "lazy"
    p = Proc(root)
    procs.append(p)
    with pytest.raises(control.ControlError) as e:
        p.call(attach_req(layer, proxy.host, toc_digest="sha256:" + "1" * 64))
    assert e.value.kind == "integrity"
    with pytest.raises(control.ControlError) as e:
        p.call(attach_req(layer, proxy.host, id="../etc"))
    assert e.value.kind == "invalid"
    with pytest.raises(control.ControlError) as e:
        p.call(attach_req(layer, "127.0.0.1:9", credentials={"127.0.0.1:9": {"username": "u", "secret": SECRET}}))
    assert e.value.kind == "unavailable" and SECRET not in str(e.value)
    p.call(attach_req(layer, proxy.host, credentials={proxy.host: {"username": "u", "secret": SECRET}}))
    state = (root / "state.json").read_text()
    assert layer.digest in state and SECRET not in state and '"auth": true' in state
    p.stop()
    assert SECRET not in p.log.read_text()
    # a new process cannot re-attach it without the credentials: it waits for the snapshotter's attach
    q = Proc(root)
    procs.append(q)
    with pytest.raises(control.ControlError) as e:
        q.call({"op": "check", "id": layer.digest[7:]})
    assert e.value.kind == "notfound"
    # restore rewrites state.json when it is done, which may be after the control socket first answers
    wait_for(lambda: layer.digest not in (root / "state.json").read_text(), "restore to drop the layer from state.json")
    with pytest.raises(control.ControlError) as e:
        q.call({"op": "detach", "id": layer.digest[7:]})
    assert e.value.kind == "notfound"


def test_resolve_answers_the_manifests_layers_for_the_daemon(tmp_path: Path, registry: Registry,
                                                             procs: list[Proc]) -> None:
    """``resolve``: the snapshotter daemon has no HTTP client, so the process reads the image manifest (by digest)
    and answers each layer's size and TOC annotation; bad requests are refused, credentials never echoed."""
    lay = estargz_layer(["etc/", ("etc/motd", b"resolved\n")])
    img = image([lay])
    push_image(registry.url, "lazy/resolve", "1", img)
    p = Proc(tmp_path / "lazy")
    procs.append(p)
    req: dict[str, object] = {"op": "resolve", "image_ref": f"{registry.host}/lazy/resolve@{img.manifest_digest}",
                              "hosts_dir": None, "credentials": None}
    assert p.call(req)["layers"] == {lay.digest: [len(lay.blob), lay.annotations[TOC_DIGEST]]}
    unreachable = {"image_ref": "127.0.0.1:9/lazy/resolve:1",
                   "credentials": {"127.0.0.1:9": {"username": "u", "secret": SECRET}}}
    for bad, kind in (({"image_ref": "../x"}, "invalid"), ({"hosts_dir": "certs.d"}, "invalid"),
                      (unreachable, "unavailable")):
        with pytest.raises(control.ControlError) as e:
            p.call({**req, **bad})
        assert e.value.kind == kind and SECRET not in str(e.value)
    p.stop()
    assert SECRET not in p.log.read_text()


def test_concurrent_attaches_of_one_layer_make_one(tmp_path: Path, layer: PushedLayer, proxy: RangeProxy,
                                                   procs: list[Proc]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path / "lazy"
    p = Proc(root, "--no-background-fetch", "--prefetch-bound", "0")
    procs.append(p)
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: p.call(attach_req(layer, proxy.host))["path"], range(4)))
    assert len(set(paths)) == 1
    assert len(p.call({"op": "list"})["layers"]) == 1  # type: ignore[arg-type]
    footer_and_toc = [g for g in proxy.blob_gets if g[1] == 206]
    assert len(footer_and_toc) == 1  # one open of the layer (footer and TOC in one range), not four


def test_complete_layer_gets_an_unpacked_copy(tmp_path: Path, layer: PushedLayer, proxy: RangeProxy,
                                              procs: list[Proc]) -> None:
    root = tmp_path / "lazy"
    p = Proc(root)
    procs.append(p)
    path = Path(str(p.call(attach_req(layer, proxy.host))["path"]))
    lid = layer.digest[7:]
    wait_for(lambda: bool(p.call({"op": "check", "id": lid}).get("unpacked")), "the layer to be unpacked")
    ans = p.call({"op": "check", "id": lid})
    assert ans["path"] == str(root / "unpacked" / lid) and ans["complete"]
    assert listing(root / "unpacked" / lid, mtimes=MTIMES) == listing(path, mtimes=MTIMES)
    cache = p.call({"op": "health"})["cache"]
    assert isinstance(cache, dict)  # the copy counts in the cache bound next to the chunks
    assert cache["reserved_bytes"] >= sum(map(len, layer.files.values()))
    assert cache["chunk_bytes"] + cache["reserved_bytes"] <= cache["bound"]
    p.call({"op": "detach", "id": lid})
    assert not (root / "unpacked" / lid).exists()
    assert p.call({"op": "health"})["cache"] == {"chunk_bytes": 0, "reserved_bytes": 0, "bound": cache["bound"]}


def test_unpacked_copy_that_would_not_fit_the_cache_bound_is_skipped(tmp_path: Path, layer: PushedLayer,
                                                                     proxy: RangeProxy, procs: list[Proc]) -> None:
    root = tmp_path / "lazy"
    data = sum(map(len, layer.files.values()))
    p = Proc(root, "--cache-size", str(int(data * 1.5)))  # the chunks fit, chunks + copy do not
    procs.append(p)
    path = Path(str(p.call(attach_req(layer, proxy.host))["path"]))
    lid = layer.digest[7:]
    wait_for(lambda: "does not fit in the cache bound" in p.log.read_text(), "the skipped copy in the log")
    ans = p.call({"op": "check", "id": lid})
    assert ans["complete"] and not ans["unpacked"] and ans["path"] == str(path)
    assert not (root / "unpacked" / lid).exists()
    cache = p.call({"op": "health"})["cache"]
    assert isinstance(cache, dict) and cache["reserved_bytes"] == 0 and cache["chunk_bytes"] <= cache["bound"]
    assert (path / "data/blob3").read_bytes() == layer.files["data/blob3"]


def test_spool_of_a_registry_ignoring_range_counts_in_the_cache_bound(tmp_path: Path, layer: PushedLayer,
                                                                      registry: Registry,
                                                                      procs: list[Proc]) -> None:
    root = tmp_path / "lazy"
    lid = layer.digest[7:]
    spool = root / "spool" / f"{lid}.blob"
    with range_proxy(registry.url, Behaviour(ignore_range=True)) as proxy:
        small = Proc(root, "--no-background-fetch", "--cache-size", str(layer.size - 1))
        procs.append(small)
        with pytest.raises(control.ControlError) as e:  # the snapshotter then pulls the layer normally
            small.call(attach_req(layer, proxy.host))
        assert "does not fit whole in the lazy cache bound" in str(e.value) and not spool.exists()
        small.stop()
        p = Proc(root, "--no-background-fetch", "--cache-size", str(layer.size + (1 << 20)))
        procs.append(p)
        path = Path(str(p.call(attach_req(layer, proxy.host))["path"]))
        assert (path / "data/blob2").read_bytes() == layer.files["data/blob2"]
        assert spool.stat().st_size == layer.size
        cache = p.call({"op": "health"})["cache"]
        assert isinstance(cache, dict) and cache["reserved_bytes"] == layer.size
        assert cache["chunk_bytes"] + cache["reserved_bytes"] <= cache["bound"]
        p.stop(signal.SIGKILL)
        subprocess.run(["umount", "-l", str(root / "mnt")], capture_output=True, check=False)
    q = Proc(root, "--no-background-fetch")  # a spool file it would not count is not kept
    procs.append(q)
    assert not spool.exists()


def test_sigkill_then_restart_reattaches_from_state(tmp_path: Path, layer: PushedLayer, proxy: RangeProxy,
                                                    procs: list[Proc]) -> None:
    root = tmp_path / "lazy"
    p = Proc(root, "--no-background-fetch")
    procs.append(p)
    path = Path(str(p.call(attach_req(layer, proxy.host))["path"]))
    with contextlib.ExitStack() as stack:
        f = stack.enter_context(open(path / "data/blob1", "rb"))  # a "running container" holding a file open
        assert f.read(10) == layer.files["data/blob1"][:10]
        p.stop(signal.SIGKILL)
        with pytest.raises(OSError) as e:
            f.seek(300_000)
            f.read(100)
        assert e.value.errno in (errno.ENOTCONN, errno.EIO)
        stack.pop_all()
        with contextlib.suppress(OSError):
            f.close()
    with pytest.raises(OSError) as e:
        os.listdir(path)
    assert e.value.errno == errno.ENOTCONN
    q = Proc(root, "--no-background-fetch")  # detaches the dead mount, mounts anew, re-attaches
    procs.append(q)
    lid = layer.digest[7:]
    assert q.call({"op": "check", "id": lid})["path"] == str(path)
    assert (path / "data/blob1").read_bytes() == layer.files["data/blob1"]
    assert q.stop() == 0


def test_second_process_on_the_same_root_is_refused(tmp_path: Path, procs: list[Proc]) -> None:
    root = tmp_path / "lazy"
    procs.append(Proc(root))
    r = subprocess.run([sys.executable, "-m", "cvmfs_snap.cli", "lazyfs", "--root", str(root)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "another lazyfs process" in r.stderr


def test_process_ends_when_its_mount_is_unmounted_from_outside(tmp_path: Path, procs: list[Proc]) -> None:
    root = tmp_path / "lazy"
    p = Proc(root)
    procs.append(p)
    subprocess.run(["umount", "-l", str(root / "mnt")], check=True)
    assert p.p.wait(30) == 0
    assert not (root / "control.sock").exists()


@pytest.fixture(scope="module")
def neighbour(registry: Registry) -> PushedLayer:
    return push_estargz(registry.host, "lazy/proc", {"etc/other.conf": b"other = 1\n",
                                                     "data/n": os.urandom(300_000)}, chunk_size=64 * 1024)


def neighbour_entry(layer: PushedLayer) -> dict[str, object]:
    return {"id": layer.digest[7:], "digest": layer.digest, "size": layer.size, "toc_digest": layer.toc_digest}


def registry_saw(registry: Registry, mark: int, *digests: str) -> None:
    """Wait until the registry's access log shows exactly these blob GETs (in any order) after ``mark``."""
    wait_for(lambda: sorted(g.digest for g in blob_gets(registry.log, mark)) == sorted(digests),
             f"the registry to log GETs of {digests}", timeout=5)
    time.sleep(0.2)  # and no more
    assert sorted(g.digest for g in blob_gets(registry.log, mark)) == sorted(digests)


def health(p: Proc) -> dict[str, object]:
    return p.call({"op": "health"})


def test_neighbours_are_resolved_ahead_and_their_attach_fetches_nothing(
        tmp_path: Path, layer: PushedLayer, neighbour: PushedLayer, proxy: RangeProxy, registry: Registry,
        procs: list[Proc]) -> None:
    p = Proc(tmp_path / "lazy", "--no-background-fetch", "--prefetch-bound", "0")
    procs.append(p)
    hostile: list[object] = [
        "not an object", {"id": "../../etc", "digest": neighbour.digest, "size": neighbour.size,
                          "toc_digest": neighbour.toc_digest},
        {"id": "x", "digest": "sha256:" + "z" * 64, "size": 1, "toc_digest": neighbour.toc_digest},
        {"id": "y", "digest": neighbour.digest, "size": -5, "toc_digest": neighbour.toc_digest},
        {"id": "z"}, {**neighbour_entry(layer), "size": True}]
    missing = "sha256:" + "0" * 64  # well-formed, but not in the registry: its pre-resolve fails, only logged
    hostile.append({"id": missing[7:], "digest": missing, "size": 1000, "toc_digest": neighbour.toc_digest})
    start = log_mark(registry.log)
    p.call(attach_req(layer, proxy.host, neighbours=[*hostile, neighbour_entry(neighbour)]))  # no failure
    wait_for(lambda: health(p)["resolved"] == 1 and health(p)["resolving"] == 0, "the neighbours to be resolved")
    # one tail read each, the malformed entries not tried (the access log line is written after the answer)
    registry_saw(registry, start, layer.digest, neighbour.digest, missing)
    assert "pre-resolving layer " + missing in p.log.read_text()
    mark = log_mark(registry.log)
    path = Path(str(p.call(attach_req(neighbour, proxy.host))["path"]))
    assert blob_gets(registry.log, mark) == []  # footer and TOC were there already
    assert (path / "etc/other.conf").read_bytes() == b"other = 1\n"  # the resolved reader serves reads
    registry_saw(registry, mark, neighbour.digest)  # that chunk only
    h = health(p)
    assert h["resolved"] == 0 and h["layers"] == 2
    assert h["clients"] == 1  # one registry host, no credentials: one client for both layers


def test_detach_drops_the_layers_resolved_for_it(tmp_path: Path, layer: PushedLayer, neighbour: PushedLayer,
                                                 proxy: RangeProxy, registry: Registry, procs: list[Proc]) -> None:
    p = Proc(tmp_path / "lazy", "--no-background-fetch", "--prefetch-bound", "0")
    procs.append(p)
    p.call(attach_req(layer, proxy.host, neighbours=[neighbour_entry(neighbour)]))
    wait_for(lambda: health(p)["resolved"] == 1, "the neighbour to be resolved ahead")
    assert health(p)["cache"]["chunk_bytes"] > 0  # type: ignore[index]
    p.call({"op": "detach", "id": layer.digest[7:]})
    h = health(p)
    assert h["resolved"] == 0 and h["resolving"] == 0 and h["layers"] == 0
    assert h["clients"] == 0  # the client went with the last layer using it
    assert h["cache"]["chunk_bytes"] == 0  # type: ignore[index]  # both TOCs left the cache
    mark = log_mark(registry.log)
    p.call(attach_req(neighbour, proxy.host))
    registry_saw(registry, mark, neighbour.digest)  # fetched again: it was dropped


def test_layers_share_a_registry_client_only_with_the_same_credentials(
        tmp_path: Path, layer: PushedLayer, neighbour: PushedLayer, proxy: RangeProxy, procs: list[Proc]) -> None:
    p = Proc(tmp_path / "lazy", "--no-background-fetch", "--prefetch-bound", "0")
    procs.append(p)
    creds = {proxy.host: {"username": "u", "secret": SECRET}}
    p.call(attach_req(layer, proxy.host))
    p.call(attach_req(neighbour, proxy.host, credentials=creds))
    assert health(p)["clients"] == 2  # one image's credentials never serve another's reads
    # a layer resolved ahead with other credentials than its attach brings is not taken: opened anew, on its own
    # credentials' client (its TOC from the cache)
    p.call({"op": "detach", "id": neighbour.digest[7:]})
    p.call(attach_req(layer, proxy.host, neighbours=[neighbour_entry(neighbour)]))  # attached: resolves only
    wait_for(lambda: health(p)["resolved"] == 1, "the neighbour to be resolved ahead")
    before = len(proxy.blob_gets)
    path = Path(str(p.call(attach_req(neighbour, proxy.host, credentials=creds))["path"]))
    assert len(proxy.blob_gets) == before  # its TOC came from the cache
    h = health(p)
    assert h["resolved"] == 0 and h["clients"] == 2
    assert (path / "etc/other.conf").read_bytes() == b"other = 1\n"
    p.stop()
    assert SECRET not in p.log.read_text()


def test_detach_does_not_wait_for_a_slow_pre_resolve(tmp_path: Path, layer: PushedLayer, neighbour: PushedLayer,
                                                     registry: Registry, procs: list[Proc]) -> None:
    """Remove during a neighbour's footer + TOC fetch: the detach answers at once (the fetch is cancelled, what it
    opened closed when it ends), and nothing of the neighbour is left behind."""
    with range_proxy(registry.url, Behaviour(hold=neighbour.digest)) as slow:
        p = Proc(tmp_path / "lazy", "--no-background-fetch", "--prefetch-bound", "0")
        procs.append(p)
        p.call(attach_req(layer, slow.host, neighbours=[neighbour_entry(neighbour)]))
        wait_for(lambda: slow.behaviour.holding == 1, "the neighbour's fetch to reach the registry")
        assert health(p)["resolving"] == 1
        t0 = time.monotonic()
        p.call({"op": "detach", "id": layer.digest[7:]})
        assert time.monotonic() - t0 < 5  # not the fetch's 10 s timeout
        h = health(p)
        assert h["resolving"] == 0 and h["resolved"] == 0 and h["layers"] == 0
        slow.behaviour.release.set()  # the fetch ends now; the process closes and releases what it opened
        wait_for(lambda: health(p)["clients"] == 0, "the cancelled resolve to close its client")
        assert health(p)["cache"]["chunk_bytes"] == 0  # type: ignore[index]  # its TOC was not kept
        assert p.call({"op": "list"})["layers"] == []
