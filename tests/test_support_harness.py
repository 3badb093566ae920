"""The test harness's own pieces do what the tests rely on: the loopback server base (bounded threads, timeouts,
request log, clean stop) and the one tree listing (every field it claims, no recursion)."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from cvmfs_snap.fsutil import make_deep_tree, remove_tree
from tests.support.http_servers import LoopbackHandler, Reply, running, serve
from tests.support.trees import NON_DIRS, TYPES, diff, listing, names


class _Slow(LoopbackHandler):
    """Holds each request until ``gate`` is set; counts how many are inside at once."""

    gate = threading.Event()
    inside = 0
    most = 0
    lock = threading.Lock()

    def do_GET(self) -> None:
        with _Slow.lock:
            _Slow.inside += 1
            _Slow.most = max(_Slow.most, _Slow.inside)
        _Slow.gate.wait(10)
        with _Slow.lock:
            _Slow.inside -= 1
        self.send_json(200, {"path": self.path})


def test_server_bounds_its_threads_and_logs_every_request() -> None:
    _Slow.gate.clear()
    with running(_Slow, max_threads=2) as srv:
        assert srv.host.startswith("127.0.0.1:") and srv.port > 0
        results: list[int] = []
        threads = [threading.Thread(target=lambda i=i: results.append(
            httpx.get(f"{srv.url}/r{i}", timeout=20).status_code)) for i in range(5)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 15
        while _Slow.most < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # time for a third to get in, were the threads not bounded
        assert _Slow.most == 2  # the other three wait in the backlog, not in threads
        _Slow.gate.set()
        for t in threads:
            t.join(20)
        assert results == [200] * 5 and _Slow.most == 2
        assert sorted(r.path for r in srv.requests) == [f"/r{i}" for i in range(5)] and srv.count("/r") == 5
        assert b"GET /r0 HTTP/1.1" in srv.raw


def test_stalled_client_times_out_and_stop_is_clean() -> None:
    class Quick(LoopbackHandler):
        timeout = 0.5

        def do_GET(self) -> None:
            self.send_json(200, {})

    with running(Quick) as srv:
        # the client waits 20 s, less than the base's 30 s default: an end of stream before that is Quick's timeout
        with socket.create_connection(("127.0.0.1", srv.port), timeout=20) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
            assert s.recv(100) == b""  # the server gave up on it
        idle = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        deadline = time.monotonic() + 5
        while not srv.open_connections and time.monotonic() < deadline:  # accepted: a thread waits for its request
            time.sleep(0.02)
        assert srv.open_connections == 1
    # stopped: nothing listens, and the idle connection was ended (not left to its timeout)
    assert srv.open_connections == 0
    with idle, contextlib.suppress(ConnectionResetError):
        assert idle.recv(100) == b""
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", srv.port), timeout=2).close()


def test_scripted_server_keeps_its_behaviour() -> None:
    with serve(lambda req: Reply(200, {"X-Path": req.path}, b"0123456789", content_length=20)) as srv, \
            httpx.Client() as c, pytest.raises(httpx.RemoteProtocolError):
        c.get(f"{srv.url}/cut")  # a body shorter than its Content-Length: the connection is closed early
    assert srv.requests[0].path == "/cut"


def test_listing_shows_every_field_and_needs_no_recursion(tmp_path: Path) -> None:
    root = tmp_path / "t"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_bytes(b"data")
    os.chmod(root / "d" / "f", 0o4750)
    os.link(root / "d" / "f", root / "d" / "g")
    os.symlink("f", root / "d" / "l")
    os.mkfifo(root / "p")
    os.setxattr(root / "d" / "f", "user.k", b"v")
    a = listing(root, mtimes=NON_DIRS)
    assert a["d/f"]["type"] == "file" and a["d/f"]["mode"] == "0o4750" and a["d/f"]["size"] == 4
    assert a["d/f"]["xattrs"] == {"user.k": b"v".hex()} and a["d/f"]["hardlinks"] == ["d/f", "d/g"]
    assert a["d/l"]["target"] == "f" and a["p"]["type"] == "fifo" and "mtime" not in a["d"]
    assert listing(root, content="bytes")["d/f"]["data"] == b"data"
    assert "." in listing(root, include_root=True) and names(root, skip=["d"]) == ["p"]
    os.chmod(root / "d" / "g", 0o644)  # the same inode: both names change
    b = listing(root, mtimes=NON_DIRS)
    assert diff(a, b) and all("mode" in line for line in diff(a, b))
    deep = make_deep_tree(tmp_path / "deep", 1500)
    deep_listing = listing(deep, mtimes=TYPES)
    assert "/".join(["d"] * 1500) in deep_listing  # 1,500 levels: past where recursion fails
    remove_tree(deep)  # (pytest's own clean-up of tmp_path recurses)
