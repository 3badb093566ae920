"""The daemon's HTTP endpoint under load: a flood of idle and half-sent connections under a low file descriptor
limit (``prlimit``) while a real registry's webhook must still get through, and more requests than handler threads."""

from __future__ import annotations

import resource
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from cvmfs_snap_devenv import images as im
from cvmfs_snap_devenv.registry import free_port, start_registry, webhook_notifications
from publisher import metrics
from publisher.config import DaemonConfig, PublisherConfig
from publisher.factory import make_backend
from publisher.httpapp import QUEUE_PER_WORKER, Endpoint
from publisher.httpserver import FD_RESERVE, HttpServer
from publisher.intake import Intake
from publisher.workqueue import WorkQueue
from tests.test_publisher_daemon import SECRET, start_daemon, stop_daemon, wait_for

IDLE = 800
HALF_SENT = 100
FD_LIMIT = 256

pytestmark = pytest.mark.skipif(shutil.which("prlimit") is None, reason="prlimit (util-linux) is not installed")


def _open_flood(port: int) -> tuple[list[socket.socket], list[socket.socket]]:
    """HALF_SENT connections that stop in the middle of their headers, then IDLE that never send a byte; each one
    established (retried while the daemon's listen queue is full) within a time budget."""
    idle: list[socket.socket] = []
    half: list[socket.socket] = []
    deadline = time.monotonic() + 30
    while len(idle) < IDLE and time.monotonic() < deadline:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(0.2)
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            s.close()
            continue
        if len(half) < HALF_SENT:
            s.sendall(b"POST /webhooks/registry HTTP/1.1\r\nHost: x\r\nAuthorization: Bear")
            half.append(s)
        else:
            idle.append(s)
        s.setblocking(False)
    return idle, half


def _closed_by_server(s: socket.socket) -> bool:
    try:
        data = s.recv(65536)
    except BlockingIOError:
        return False
    except OSError:
        return True  # reset
    return data == b"" or data.startswith(b"HTTP/1.1 4")


def test_a_webhook_gets_through_idle_and_half_sent_connections_under_a_low_fd_limit(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = IDLE + HALF_SENT + 200
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"the test process needs {need} file descriptors, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    port = free_port()
    notifications = webhook_notifications(f"http://127.0.0.1:{port}/webhooks/registry", SECRET)
    idle: list[socket.socket] = []
    half: list[socket.socket] = []
    with start_registry(tmp_path / "reg", extra_config=notifications) as reg:
        d = start_daemon(
            tmp_path, [f"{reg.host}/flood/app:*"],
            {"listen": f"127.0.0.1:{port}", "poll_interval": 3600, "debounce": 0.2, "keep_alive_timeout": 2,
             "request_timeout": 2},
            env={"CVMFS_SNAP_WEBHOOK_SECRET": SECRET}, prefix=("prlimit", f"--nofile={FD_LIMIT}:{FD_LIMIT}", "--"),
        )
        try:
            idle, half = _open_flood(port)
            # the flood holds as many descriptors as the daemon may have before the registry pushes
            fds = Path(f"/proc/{d.proc.pid}/fd")  # prlimit execs the daemon: same pid
            wait_for("the flood to fill the daemon's file descriptors up to its reserve",
                     lambda: len(list(fds.iterdir())) >= FD_LIMIT - FD_RESERVE, d)
            # a real registry pushes while the flood holds more connections than the daemon has descriptors
            img = im.image([im.layer([("etc/flood", b"got through\n")])])
            digest = im.push_image(reg.url, "flood/app", "v1", img)
            rec = d.wait_published(reg.host, "flood/app", "v1", digest)
            assert rec.layers == [lay.digest for lay in img.layers]
            log = d.log.read_text()
            assert "HTTP endpoint at its connection limit" in log  # the flood did reach the limit
            assert "Too many open files" not in log  # and the daemon kept descriptors for its own work
            assert "Traceback" not in log, log[-4000:]
            # idle and half-sent connections are closed by the daemon, not kept forever
            assert len(idle) == IDLE and len(half) == HALF_SENT
            wait_for("the half-sent requests to be closed", lambda: all(_closed_by_server(s) for s in half), d)
            wait_for("the idle connections to be closed", lambda: all(_closed_by_server(s) for s in idle), d)
            assert httpx.get(f"{d.url}/healthz", timeout=10).status_code == 200
            text = httpx.get(f"{d.url}/metrics", timeout=10).text
            assert any(ln.startswith("cvmfs_snap_publisher_http_connection_limit_total ") and float(ln.split()[1]) >= 1
                       for ln in text.splitlines()), text
        finally:
            for s in idle + half:
                s.close()
            rc = stop_daemon(d)
    assert rc == 0, d.log.read_text()[-4000:]


def test_requests_beyond_the_handler_threads_queue_get_503(tmp_path: Path) -> None:
    """With every handler thread busy and the wait list full, a request is answered 503 at once, not piled up."""
    release = threading.Event()
    entered = threading.Semaphore(0)

    def slow_health() -> dict[str, object]:
        entered.release()
        release.wait(30)
        return {"status": "ok"}

    settings = DaemonConfig(listen="127.0.0.1:0", http_workers=1)
    backend = make_backend(PublisherConfig(backend="local", root=str(tmp_path / "repo")))
    endpoint = Endpoint(Intake(settings, WorkQueue(), backend), settings, health=slow_health,
                        status=lambda: {"images": []})
    server = HttpServer(endpoint, settings)
    _host, port = server.start()
    url = f"http://127.0.0.1:{port}"
    try:
        with ThreadPoolExecutor(QUEUE_PER_WORKER) as pool:
            waiting = [pool.submit(httpx.get, f"{url}/healthz", timeout=30) for _ in range(QUEUE_PER_WORKER)]
            assert entered.acquire(timeout=30)  # one runs, the others wait for the one thread
            wait_for("the wait list to fill", lambda: endpoint.pending >= QUEUE_PER_WORKER)
            # the next request is refused at once instead of waiting
            r = httpx.get(f"{url}/status", timeout=10)
            assert r.status_code == 503 and r.headers["Retry-After"] == "1", r.text
            refused = metrics.REGISTRY.get_sample_value("cvmfs_snap_publisher_http_refused_total", {"reason": "busy"})
            assert refused is not None and refused >= 1
            release.set()
            assert [f.result().status_code for f in waiting] == [200] * QUEUE_PER_WORKER
        assert httpx.get(f"{url}/status", timeout=10).status_code == 200
    finally:
        release.set()
        server.stop()
        backend.close()
