"""The publish-on-miss reporter against small loopback HTTP servers, the snapshot core's miss callback, and the
configuration keys. The end-to-end test with the real publisher daemon and containerd is test_missreport_e2e.py."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cvmfs_snap.errors import AlreadyExistsError, InvalidInputError, NotFoundError, UnavailableError
from cvmfs_snap.labelnames import CRI_IMAGE_REF, CRI_LAYER_DIGEST, SNAPSHOT_REF
from cvmfs_snap.snapshotter.config import Config, parse_config
from cvmfs_snap.snapshotter.core import Snapshotter
from cvmfs_snap.snapshotter.daemon import build_reporter
from cvmfs_snap.snapshotter.metrics import Metrics
from cvmfs_snap.snapshotter.missreport import MissReporter, safe_url
from cvmfs_snap_devenv.registry import free_port
from tests.support.http_servers import LoopbackHandler, running
from tests.support.layersource import FakeSource

pytestmark = [pytest.mark.timeout(120)]

SECRET = "node-secret-1234"
IMAGE = "registry.example.org/atlas/athena:22.0"
D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


@dataclass
class Got:
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class Publisher:
    url: str
    got: list[Got] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def bodies(self) -> list[Any]:
        with self.lock:
            return [g.body for g in self.got]


Reply = tuple[int, dict[str, str], dict[str, Any]]


@contextmanager
def publisher(answer: Callable[[Got], Reply] = lambda g: (202, {}, {"status": "queued"})) -> Iterator[Publisher]:
    """A stand-in for the publisher's POST /publish-on-miss on 127.0.0.1:<free port> that records every request."""
    pub = Publisher("")

    class H(LoopbackHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            g = Got(self.path, {k.lower(): v for k, v in self.headers.items()}, json.loads(raw))
            with pub.lock:
                pub.got.append(g)
            code, headers, payload = answer(g)
            self.send_json(code, payload, headers)

    with running(H) as server:
        pub.url = f"{server.url}/publish-on-miss"
        yield pub


def dead_url() -> str:
    """A loopback URL nobody listens on (the port was free a moment ago): connection refused."""
    return f"http://127.0.0.1:{free_port()}/publish-on-miss"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def labels(image: str = IMAGE, digest: str = D1, chain: str = "sha256:" + "c" * 64) -> dict[str, str]:
    return {SNAPSHOT_REF: chain, CRI_IMAGE_REF: image, CRI_LAYER_DIGEST: digest}


def count(rep: MissReporter, outcome: str) -> float:
    return rep.counter.labels(outcome=outcome)._value.get()


@contextmanager
def reporter(url: str, **kw: Any) -> Iterator[MissReporter]:
    rep = MissReporter(url, **kw)
    try:
        yield rep
    finally:
        rep.close()


# -- the reporter ---------------------------------------------------------------------------------------------------
def test_one_report_per_image_with_layer_and_secret() -> None:
    clock = Clock()
    with publisher() as pub, reporter(pub.url, secret=SECRET, clock=clock, dedupe_seconds=600) as rep:
        rep.start()
        rep.miss(labels(digest=D1))
        rep.miss(labels(digest=D2))  # the same image's next layer: no second report
        rep.miss(labels(image="registry.example.org/cms/cmssw:12"))
        assert rep.wait_idle(30)
        assert sorted(pub.bodies(), key=str) == sorted(
            [{"image": IMAGE, "layer": D1}, {"image": "registry.example.org/cms/cmssw:12", "layer": D1}], key=str)
        assert {g.path for g in pub.got} == {"/publish-on-miss"}
        assert {g.headers.get("authorization") for g in pub.got} == {f"Bearer {SECRET}"}
        assert count(rep, "sent") == 2
        clock.now += 601  # the dedupe window is over: a new miss is reported again
        rep.miss(labels(digest=D2))
        assert rep.wait_idle(30)
        assert pub.bodies()[-1] == {"image": IMAGE, "layer": D2}
        assert count(rep, "sent") == 3


def test_no_secret_no_authorization_header_and_no_image_label_no_report() -> None:
    with publisher() as pub, reporter(pub.url) as rep:
        rep.start()
        rep.miss({SNAPSHOT_REF: "sha256:" + "c" * 64, CRI_LAYER_DIGEST: D1})  # ctr pull: no image label
        rep.miss(labels())
        assert rep.wait_idle(30)
        assert pub.bodies() == [{"image": IMAGE, "layer": D1}]
        assert "authorization" not in pub.got[0].headers


def test_full_queue_drops_with_one_warning_and_recovers(caplog: pytest.LogCaptureFixture) -> None:
    with publisher() as pub, reporter(pub.url, queue_size=2) as rep:
        caplog.set_level(logging.WARNING, logger="cvmfs_snap.snapshotter.missreport")
        for i in range(6):  # not started yet: nothing drains the queue
            rep.miss(labels(image=f"registry.example.org/a/img{i}:1"))
        assert count(rep, "dropped") == 4
        full = [r for r in caplog.records if "queue is full" in r.getMessage()]
        assert len(full) == 1
        rep.start()
        assert rep.wait_idle(30)
        assert [b["image"] for b in pub.bodies()] == ["registry.example.org/a/img0:1", "registry.example.org/a/img1:1"]
        rep.miss(labels(image="registry.example.org/a/img5:1"))  # a dropped image is not deduped: reported later
        assert rep.wait_idle(30)
        assert pub.bodies()[-1]["image"] == "registry.example.org/a/img5:1"


def test_publisher_down_is_counted_logged_once_and_retried_later(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="cvmfs_snap.snapshotter.missreport")
    clock = Clock()
    with reporter(dead_url(), secret=SECRET, clock=clock, retry_seconds=60, timeout=2) as rep:
        rep.start()
        for i in range(3):
            rep.miss(labels(image=f"registry.example.org/a/down{i}:1"))
        assert rep.wait_idle(30)
        assert count(rep, "failed") == 3
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert "cannot report missing image" in warnings[0].getMessage()
        assert SECRET not in caplog.text
        rep.miss(labels(image="registry.example.org/a/down0:1"))  # within the retry delay: deduped
        assert rep.wait_idle(30)
        assert count(rep, "failed") == 3
        clock.now += 61
        rep.miss(labels(image="registry.example.org/a/down0:1"))
        assert rep.wait_idle(30)
        assert count(rep, "failed") == 4


def test_cvmfs_unavailable_skips_and_reports_once_it_is_back() -> None:
    healthy = threading.Event()
    with publisher() as pub, reporter(pub.url, available=healthy.is_set) as rep:
        rep.start()
        rep.miss(labels())
        assert rep.wait_idle(30)
        assert pub.bodies() == []
        assert count(rep, "skipped") == 1
        healthy.set()
        rep.miss(labels())  # a skipped image is not deduped
        assert rep.wait_idle(30)
        assert pub.bodies() == [{"image": IMAGE, "layer": D1}]


def test_health_check_that_raises_counts_as_unavailable() -> None:
    def broken() -> bool:
        raise UnavailableError("probe hung")

    with publisher() as pub, reporter(pub.url, available=broken) as rep:
        rep.start()
        rep.miss(labels())
        assert rep.wait_idle(30)
        assert pub.bodies() == [] and count(rep, "skipped") == 1


def test_rate_limit_honours_retry_after_and_refusals_are_counted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="cvmfs_snap.snapshotter.missreport")
    clock = Clock()

    def answer(g: Got) -> Reply:
        if "forbidden" in g.body["image"]:
            return 403, {}, {"error": "not in the publish-on-miss allow-list"}
        return 429, {"Retry-After": "30"}, {"error": "tried 5s ago", "retry_after": 30}

    with publisher(answer) as pub, reporter(pub.url, clock=clock, dedupe_seconds=600) as rep:
        rep.start()
        rep.miss(labels())
        rep.miss(labels(image="registry.example.org/forbidden/x:1"))
        assert rep.wait_idle(30)
        assert count(rep, "rate-limited") == 1 and count(rep, "rejected") == 1
        assert any("allow" in r.getMessage() for r in caplog.records)
        clock.now += 31  # Retry-After is over (dedupe would still hold for 600 s)
        rep.miss(labels())
        rep.miss(labels(image="registry.example.org/forbidden/x:1"))  # refused: deduped for the whole window
        assert rep.wait_idle(30)
        assert [b["image"] for b in pub.bodies()].count(IMAGE) == 2
        assert count(rep, "rejected") == 1


def test_close_with_a_hung_publisher_returns() -> None:
    release = threading.Event()

    def answer(g: Got) -> Reply:
        release.wait(30)
        return 202, {}, {"status": "queued"}

    with publisher(answer) as pub:
        rep = MissReporter(pub.url, timeout=1.0)
        rep.start()
        rep.miss(labels())
        rep.miss(labels(image="registry.example.org/a/b:1"))
        assert rep.wait_idle(30)  # both timed out after 1 s each
        assert count(rep, "failed") == 2
        rep.close(timeout=10)
        release.set()
        rep.miss(labels(image="registry.example.org/a/after-close:1"))  # after close: ignored, no exception
        assert rep.wait_idle(5)


def test_safe_url_drops_credentials_and_query() -> None:
    assert safe_url("https://u:p@stratum0.example.org:8443/publish-on-miss?token=x") == \
        "https://stratum0.example.org:8443/publish-on-miss"
    assert safe_url("http://[::1]:8080/publish-on-miss") == "http://[::1]:8080/publish-on-miss"


# -- the snapshot core's miss callback ------------------------------------------------------------------------------
def test_core_reports_only_real_misses_and_prepare_is_unaffected(tmp_path: Path) -> None:
    served = tmp_path / "served"
    served.mkdir()
    src = FakeSource(layers={D2: [served]})
    got: list[dict[str, str]] = []
    sn = Snapshotter(tmp_path / "root", sources=[src], on_miss=lambda lab: got.append(dict(lab)))
    try:
        m = sn.prepare("k1", "", labels(digest=D1, chain="sha256:" + "a" * 64))
        assert m and m[0].type == "bind"
        assert [g[CRI_LAYER_DIGEST] for g in got] == [D1]
        # served remotely: AlreadyExists as usual, no miss
        with pytest.raises(AlreadyExistsError, match="served remotely"):
            sn.prepare("k2", "", labels(digest=D2, chain="sha256:" + "b" * 64))
        # a source that fails says nothing about what is published: no miss
        src.fail_with = OSError("boom")
        sn.prepare("k3", "", labels(digest=D1, chain="sha256:" + "d" * 64))
        src.fail_with = None
        # a Prepare without a target (a container's rw layer) is not a layer unpack
        sn.prepare("k4", "", {})
        assert len(got) == 1
    finally:
        sn.close()
    # no sources at all: nothing can be missing from them
    got.clear()
    sn = Snapshotter(tmp_path / "root2", sources=[], on_miss=lambda lab: got.append(dict(lab)))
    try:
        sn.prepare("k1", "", labels())
        assert got == []
    finally:
        sn.close()


def test_core_reports_layers_a_later_source_serves_because_the_first_lacks_them(tmp_path: Path) -> None:
    """A layer served lazily (a later source) because CVMFS (the first) has not got it is a miss too: reported
    once the remote snapshot exists; one the first source serves is not."""
    served = tmp_path / "served"
    served.mkdir()
    first = FakeSource(name="first", layers={D2: [served]})
    later = FakeSource(name="later", layers={D1: [served], D2: [served]})
    got: list[dict[str, str]] = []
    sn = Snapshotter(tmp_path / "root", sources=[first, later], on_miss=lambda lab: got.append(dict(lab)))
    try:
        with pytest.raises(Exception, match="served remotely by later"):
            sn.prepare("k1", "", labels(digest=D1, chain="sha256:" + "a" * 64))
        assert [g[CRI_LAYER_DIGEST] for g in got] == [D1]
        assert sn.store.find("sha256:" + "a" * 64) is not None
        with pytest.raises(Exception, match="served remotely by first"):
            sn.prepare("k2", "", labels(digest=D2, chain="sha256:" + "b" * 64))
        first.fail_with = OSError("boom")  # the first failed: says nothing about CVMFS, no report
        with pytest.raises(Exception, match="served remotely by later"):
            sn.prepare("k3", "", labels(digest=D1, chain="sha256:" + "c" * 64))
        assert len(got) == 1
    finally:
        sn.close()


def test_core_prepare_survives_a_broken_callback_and_a_dead_or_hung_publisher(tmp_path: Path) -> None:
    def broken(_labels: object) -> None:
        raise RuntimeError("bug in the reporter")

    sn = Snapshotter(tmp_path / "root", sources=[FakeSource()], on_miss=broken)
    try:
        assert sn.prepare("k1", "", labels())
    finally:
        sn.close()

    release = threading.Event()

    def answer(g: Got) -> Reply:
        release.wait(30)
        return 202, {}, {"status": "queued"}

    with publisher(answer) as pub, reporter(pub.url, timeout=20) as rep, \
            reporter(dead_url(), timeout=2) as dead:
        rep.start()
        dead.start()
        for rp, root in ((rep, "hung"), (dead, "dead")):
            sn = Snapshotter(tmp_path / root, sources=[FakeSource()], on_miss=rp.miss)
            try:
                done: list[int] = []

                def pull(sn: Snapshotter = sn, root: str = root, done: list[int] = done) -> None:
                    for i in range(5):
                        sn.prepare(f"k{i}", "", labels(image=f"registry.example.org/{root}/img{i}:1",
                                                       chain=f"sha256:{i:064x}"))
                        done.append(i)

                t = threading.Thread(target=pull)
                t.start()
                t.join(20)  # a Prepare waiting for the publisher would hang until release (30 s)
                assert not t.is_alive() and done == [0, 1, 2, 3, 4], root
            finally:
                sn.close()
        deadline = time.monotonic() + 20
        while not pub.got and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pub.got  # the hung publisher does receive a report while the Prepares went on
        release.set()
        assert dead.wait_idle(30) and count(dead, "failed") == 5


# -- configuration and wiring ---------------------------------------------------------------------------------------
def test_config_keys(tmp_path: Path) -> None:
    url = "http://stratum0.example.org:8080/publish-on-miss"
    cfg = parse_config({"cvmfs-snap": {"publish-on-miss-url": url}})
    assert cfg.publish_on_miss_url == url and cfg.publish_on_miss_secret == ""
    assert Config().publish_on_miss_url == ""  # off by default
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    cfg = parse_config({"cvmfs-snap": {"publish-on-miss-url": url, "publish-on-miss-secret-file": str(secret_file)}})
    assert cfg.publish_on_miss_secret == SECRET
    assert SECRET not in repr(cfg)
    cfg = parse_config({"cvmfs-snap": {"publish-on-miss-url": url, "publish-on-miss-secret": SECRET}})
    assert cfg.publish_on_miss_secret == SECRET
    for bad in ("ftp://x/publish-on-miss", "stratum0:8080", "http://user:pw@stratum0/publish-on-miss",
                "http://stratum0:99999/publish-on-miss"):
        with pytest.raises(InvalidInputError, match="publish-on-miss-url") as exc:
            parse_config({"cvmfs-snap": {"publish-on-miss-url": bad}})
        assert "user:pw" not in str(exc.value)
    with pytest.raises(InvalidInputError, match="not both"):
        parse_config({"cvmfs-snap": {"publish-on-miss-secret": "a", "publish-on-miss-secret-file": str(secret_file)}})
    with pytest.raises(NotFoundError, match="does not exist"):
        parse_config({"cvmfs-snap": {"publish-on-miss-secret-file": str(tmp_path / "nope")}})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(InvalidInputError, match="is empty"):
        parse_config({"cvmfs-snap": {"publish-on-miss-secret-file": str(tmp_path / "empty")}})
    with pytest.raises(InvalidInputError, match=r"cvmfs-snap\.publish-on-miss-url: expected a string$"):
        parse_config({"cvmfs-snap": {"publish-on-miss-url": 5}})  # (a URL may carry credentials: never echoed)


@dataclass
class _Health:
    available: bool


@dataclass
class HealthySource(FakeSource):
    up: bool = True

    def health(self, *, force: bool = False) -> _Health:
        return _Health(self.up)


def test_build_reporter_wires_health_and_metrics() -> None:
    metrics = Metrics()
    url = "http://127.0.0.1:1/publish-on-miss"
    assert build_reporter(Config(), [HealthySource()], metrics) is None  # off by default
    cfg = Config(publish_on_miss_url=url)
    # only sources the registry says vouch for "not published" (cvmfs) count, whatever health() others have
    assert build_reporter(cfg, [FakeSource(), HealthySource()], metrics) is None
    src = HealthySource(name="cvmfs")
    rep = build_reporter(cfg, [FakeSource(), src], metrics)
    assert rep is not None and rep.available is not None
    assert rep.available() is True
    src.up = False
    assert rep.available() is False
    assert 'cvmfs_snap_snapshotter_miss_reports_total{outcome="sent"} 0.0' in metrics.text()
