"""End to end, lazy eStargz layers: a real registry, our snapshotter daemon with the lazy source, the real
``cvmfs-snap lazyfs`` process (FUSE), a private containerd, CRI-style pulls with ``rpull`` and ``cvmfs-snap pull``.

* a container that reads one small file of a 64 MiB layer fetches under 2% of that blob (registry access log);
* the container view equals containerd's own overlayfs unpack entry by entry (deletions, opaque dirs, hardlinks,
  xattrs), apart from eStargz's own entries, which the lazy path hides;
* the snapshotter killed and restarted under a running lazy container: it keeps reading;
* ``ctr images pull`` (no CRI labels) still works, as a normal pull;
* images converted by the Go library (``esgz``) work as well as ours.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

import cvmfs_snap
from cvmfs_snap.containerd.labels import chain_ids
from cvmfs_snap_devenv.containerd import Containerd, start_containerd
from cvmfs_snap_devenv.images import (
    LAYER_MEDIA,
    BuiltImage,
    BuiltLayer,
    Entry,
    Pusher,
    busybox_entries,
    estargz_layer,
    image,
    make_tar,
)
from cvmfs_snap_devenv.procs import stop_lazyfs
from cvmfs_snap_devenv.registry import Registry, blob_gets, log_mark
from tests.support.e2e import (
    PLUGIN,
    REPO_NAME,
    cvmfs_snap_pull,
    mounted_view,
    publish,
    snapshotter_status,
)
from tests.support.runnable import busybox_layer, goref_bin, require_busybox
from tests.support.snapshotter_daemon import SnapshotterProcess, start_daemon, stop_daemon, wait_ready
from tests.support.trees import diff, view_listing

LAZYFS = Path(cvmfs_snap.__file__).parent / "lazyfs" / "process.py"
pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.skipif(not LAZYFS.exists(), reason="the lazyfs process (cvmfs_snap/lazyfs/process.py, branch "
                                                   "lazyfs) is not on this branch yet"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
]

#: eStargz's own entries: in the blob's tar (so in containerd's native unpack), hidden on the lazy path
ESTARGZ_OWN = {"stargz.index.json", ".prefetch.landmark", ".no.prefetch.landmark"}
MIB = 1 << 20


def busybox_estargz() -> BuiltLayer:
    return estargz_layer(busybox_entries())


def data_64mib() -> BuiltLayer:
    """/data/small.txt and 64 x 1 MiB of random data: 64 MiB compressed (random does not compress)."""
    entries: list[Entry | tuple[str, bytes] | str] = ["data/", ("data/small.txt", b"hello from a lazy layer\n")]
    entries += [(f"data/big{i:02d}", os.urandom(MIB)) for i in range(64)]
    return estargz_layer(entries)


def tricky_layer() -> BuiltLayer:
    """Deletions, an opaque dir, a hardlink and xattrs over the data layer."""
    return estargz_layer([
        "data/", Entry("data/.wh.big63"), "opaque/", Entry("opaque/.wh..wh..opq"), ("opaque/new", b"new"),
        ("etc/conf", b"c"), Entry("etc/conf-link", type="hardlink", linkname="etc/conf"),
        Entry("etc/xattr", data=b"x", pax={"SCHILY.xattr.user.colour": "blue"}),
    ])


@dataclass
class LazyImage:
    ref: str
    img: BuiltImage


def push(registry: Registry, repo: str, layers: list[BuiltLayer]) -> LazyImage:
    img = image(layers, cmd=("/bin/sh",))
    p = Pusher(registry.url)
    try:
        p.image(repo, "v1", img)
    finally:
        p.close()
    return LazyImage(registry.ref(repo, "v1"), img)


@pytest.fixture(scope="module")
def lazy_image(registry: Registry) -> LazyImage:
    require_busybox()
    base = estargz_layer(["opaque/", ("opaque/old", b"old")])
    return push(registry, "lazye2e/app", [busybox_estargz(), data_64mib(), base, tricky_layer()])


@dataclass
class LazyNode:
    snapshotter: SnapshotterProcess
    containerd: Containerd
    config: Path

    @property
    def lazy_root(self) -> Path:
        return self.snapshotter.root / "lazy"


def lazy_config(tmp: Path, extra: str = "") -> Path:
    repo = tmp / "cvmfs"  # an empty repository: CVMFS lacks every layer
    repo.mkdir(parents=True, exist_ok=True)
    cfg = tmp / "snap.toml"
    cfg.write_text(f'repository = "{REPO_NAME}"\nabsolute-mountpoint = "{repo}"\n[cvmfs-snap.lazy]\n'
                   f'hosts-dir = "{tmp / "certs.d"}"\nprefetch = false\nbackground-fetch = false\n{extra}')
    return cfg


@contextmanager
def lazy_node(tmp: Path, extra: str = "") -> Iterator[LazyNode]:
    cfg = lazy_config(tmp, extra)
    sp = start_daemon(tmp, "--config", str(cfg), "--log-level", "debug")
    try:
        wait_ready(sp)
        with start_containerd(tmp / "ctd", proxy_plugins={PLUGIN: str(sp.address)}) as cd:
            yield LazyNode(sp, cd, cfg)
    finally:
        if sp.proc.poll() is None:
            stop_daemon(sp)
        stop_lazyfs(sp.root / "lazy")


def rpull(cd: Containerd, ref: str) -> dict[str, object]:
    tool = goref_bin("rpull")
    if tool is None:
        pytest.skip("rpull (shared/tools/go-reference) is not built")
    r = subprocess.run([tool, "--address", cd.address, "--snapshotter", PLUGIN, "--plain-http", "--json", ref],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    out: dict[str, object] = json.loads(r.stdout)
    return out


def test_rpull_reads_one_small_file_of_a_64mib_layer(lazy_image: LazyImage, registry: Registry,
                                                     short_tmp: Path) -> None:
    data = lazy_image.img.layers[1]
    with lazy_node(short_tmp) as n:
        mark = log_mark(registry.log)
        out = rpull(n.containerd, lazy_image.ref)
        assert out["layersInContentStore"] == 0, out  # no blob went to containerd's content store
        r = n.containerd.ctr("run", "--rm", "--snapshotter", PLUGIN, lazy_image.ref, "lazy-small",
                             "/bin/cat", "/data/small.txt", check=False)
        assert r.returncode == 0 and r.stdout == "hello from a lazy layer\n", r.stderr + n.snapshotter.log.read_text()
        fetched = sum(g.size for g in blob_gets(registry.log, mark) if g.digest == data.digest)
        assert fetched < 0.02 * len(data.blob), f"fetched {fetched} of {len(data.blob)} bytes of the 64 MiB layer"
        st = snapshotter_status(n.snapshotter.root)
        lazy = [s for s in st["snapshots"] if s["source"] == "lazy"]
        assert len(lazy) == 4 and all(s["lazy"]["attached"] for s in lazy)
        assert "Traceback" not in n.snapshotter.log.read_text()


def test_view_equals_containerds_own_overlayfs_unpack(lazy_image: LazyImage, short_tmp: Path) -> None:
    img = lazy_image.img
    top = chain_ids([lay.diff_id for lay in img.layers])[-1]
    with lazy_node(short_tmp) as n:
        cd = n.containerd
        _, out = cvmfs_snap_pull(cd, lazy_image.ref)
        assert [lay["outcome"] for lay in out["layers"]] == ["remote"] * 4
        cd.ctr("images", "pull", "--plain-http", "--snapshotter", "overlayfs", lazy_image.ref)
        with mounted_view(cd, PLUGIN, top, "lazy-view") as ours, \
                mounted_view(cd, "overlayfs", top, "native-view") as native:
            a, b = view_listing(ours), view_listing(native)
        own = {k for k in b if k in ESTARGZ_OWN}
        assert own, "containerd's unpack shows eStargz's own entries"
        for k in own:
            del b[k]
        assert diff(a, b, "ours", "native") == []
        assert "data/big63" not in a and "opaque/old" not in a and a["etc/conf"]["nlink"] == 2
        assert a["etc/xattr"]["xattrs"] == {"user.colour": b"blue".hex()}  # listing shows values in hex


def test_snapshotter_killed_under_a_running_lazy_container(lazy_image: LazyImage, short_tmp: Path) -> None:
    with lazy_node(short_tmp) as n:
        cd = n.containerd
        cvmfs_snap_pull(cd, lazy_image.ref)
        cd.ctr("run", "-d", "--snapshotter", PLUGIN, lazy_image.ref, "lazy-long", "/bin/sleep", "600")
        try:
            os.kill(n.snapshotter.proc.pid, signal.SIGKILL)
            n.snapshotter.proc.wait(30)
            r = cd.ctr("task", "exec", "--exec-id", "during", "lazy-long", "/bin/sh", "-c",
                       "cat /data/small.txt; wc -c < /data/big10", check=False)
            assert r.returncode == 0 and r.stdout.split() == ["hello", "from", "a", "lazy", "layer", str(MIB)], \
                r.stderr
            second = start_daemon(short_tmp, "--config", str(n.config), root=n.snapshotter.root,
                                  address=n.snapshotter.address)
            try:
                wait_ready(second)
                r = cd.ctr("task", "exec", "--exec-id", "after", "lazy-long", "/bin/cat", "/data/small.txt",
                           check=False)
                assert r.returncode == 0 and r.stdout == "hello from a lazy layer\n", r.stderr
                r = cd.ctr("run", "--rm", "--snapshotter", PLUGIN, lazy_image.ref, "lazy-new", "/bin/cat",
                           "/opaque/new", check=False)
                assert r.returncode == 0 and r.stdout == "new", r.stderr + second.log.read_text()[-3000:]
            finally:
                cd.ctr("task", "kill", "-s", "SIGKILL", "lazy-long", check=False)
                cd.ctr("task", "rm", "-f", "lazy-long", check=False)
                cd.ctr("containers", "rm", "lazy-long", check=False)
                stop_daemon(second)
        finally:
            cd.ctr("task", "rm", "-f", "lazy-long", check=False)


def test_ctr_images_pull_without_cri_labels_is_a_normal_pull(lazy_image: LazyImage, registry: Registry,
                                                             short_tmp: Path) -> None:
    data = lazy_image.img.layers[1]
    with lazy_node(short_tmp) as n:
        mark = log_mark(registry.log)
        n.containerd.ctr("images", "pull", "--plain-http", "--snapshotter", PLUGIN, lazy_image.ref)
        assert any(g.digest == data.digest and g.size == len(data.blob) for g in blob_gets(registry.log, mark))
        st = snapshotter_status(n.snapshotter.root)
        assert {s["source"] for s in st["snapshots"]} == {"local"}
        r = n.containerd.ctr("run", "--rm", "--snapshotter", PLUGIN, lazy_image.ref, "native-small", "/bin/cat",
                             "/data/small.txt", check=False)
        assert r.returncode == 0 and r.stdout == "hello from a lazy layer\n", r.stderr


def go_estargz_layer(tmp: Path, entries: list[Entry | tuple[str, bytes] | str]) -> BuiltLayer:
    """The layer converted by Go's estargz library (``esgz build``)."""
    tool = goref_bin("esgz")
    if tool is None:
        pytest.skip("esgz (shared/tools/go-reference) is not built")
    src, dst = tmp / "in.tar", tmp / "out.esgz"
    src.write_bytes(make_tar(entries))
    r = subprocess.run([tool, "build", str(src), str(dst), "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    blob = dst.read_bytes()
    toc = info.get("toc-digest") or info.get("tocDigest")
    return BuiltLayer(tar=gzip.decompress(blob), blob=blob, media_type=LAYER_MEDIA["gzip"],
                      annotations={"containerd.io/snapshot/stargz/toc.digest": str(toc)})


def test_image_converted_by_go_estargz(registry: Registry, short_tmp: Path) -> None:
    require_busybox()
    layers = [go_estargz_layer(short_tmp, list(busybox_entries())),
              go_estargz_layer(short_tmp, ["data/", ("data/go.txt", b"converted by Go\n")])]
    pushed = push(registry, "lazye2e/go", layers)
    with lazy_node(short_tmp) as n:
        out = rpull(n.containerd, pushed.ref)
        assert out["layersInContentStore"] == 0, out
        r = n.containerd.ctr("run", "--rm", "--snapshotter", PLUGIN, pushed.ref, "go-small", "/bin/cat",
                             "/data/go.txt", check=False)
        assert r.returncode == 0 and r.stdout == "converted by Go\n", r.stderr


def test_cvmfs_snap_pull_plain_layer_then_lazy_layer(registry: Registry, short_tmp: Path) -> None:
    """A plain gzip layer is downloaded; the eStargz layer after it is not downloaded ahead (the pull's read-ahead
    skips layers a lazy snapshotter may serve) but served lazily."""
    require_busybox()
    data = data_64mib()
    pushed = push(registry, "lazye2e/mixed", [busybox_layer(), data])
    with lazy_node(short_tmp) as n:
        mark = log_mark(registry.log)
        _, out = cvmfs_snap_pull(n.containerd, pushed.ref)
        assert [lay["outcome"] for lay in out["layers"]] == ["pulled", "remote"], out
        fetched = sum(g.size for g in blob_gets(registry.log, mark) if g.digest == data.digest)
        assert fetched < 0.02 * len(data.blob), fetched
        r = n.containerd.ctr("run", "--rm", "--snapshotter", PLUGIN, pushed.ref, "mixed-small", "/bin/cat",
                             "/data/small.txt", check=False)
        assert r.returncode == 0 and r.stdout == "hello from a lazy layer\n", r.stderr


def test_layer_moving_from_lazy_to_cvmfs_looks_the_same(lazy_image: LazyImage, registry: Registry,
                                                        short_tmp: Path) -> None:
    """One image, one tree, whatever the path: the view served lazily equals the view served from CVMFS after the
    publisher published the same (eStargz) image -- eStargz's own entries hidden on both paths."""
    img = lazy_image.img
    top = chain_ids([lay.diff_id for lay in img.layers])[-1]
    with lazy_node(short_tmp / "a") as n:
        _, out = cvmfs_snap_pull(n.containerd, lazy_image.ref)
        assert [lay["outcome"] for lay in out["layers"]] == ["remote"] * 4
        assert {s["source"] for s in snapshotter_status(n.snapshotter.root)["snapshots"]} == {"lazy"}
        with mounted_view(n.containerd, PLUGIN, top, "lazy-view") as v:
            lazy_view = view_listing(v)
    publish(short_tmp / "b" / "cvmfs", lazy_image.ref, insecure_host=registry.host)
    with lazy_node(short_tmp / "b") as n:
        _, out = cvmfs_snap_pull(n.containerd, lazy_image.ref)
        assert [lay["outcome"] for lay in out["layers"]] == ["remote"] * 4
        assert {s["source"] for s in snapshotter_status(n.snapshotter.root)["snapshots"]} == {"cvmfs"}
        with mounted_view(n.containerd, PLUGIN, top, "cvmfs-view") as v:
            cvmfs_view = view_listing(v)
    assert not ESTARGZ_OWN & set(cvmfs_view)
    assert diff(lazy_view, cvmfs_view, "lazy", "cvmfs") == []
