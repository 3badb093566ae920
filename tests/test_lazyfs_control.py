"""The lazyfs control protocol (cvmfs_snap/lazyfs/control.py, controlserver.py): a real unix socket, the server on
trio in a thread, the blocking client."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
import trio

from cvmfs_snap.errors import IntegrityError, NotFoundError, UnavailableError
from cvmfs_snap.lazyfs import control, controlserver


async def handler(req: dict[str, Any]) -> dict[str, Any]:
    if req["op"] == "health":
        return {"layers": 0}
    if req["op"] == "check":
        raise NotFoundError(f"layer {req.get('id')} is not attached")
    if req["op"] == "attach":
        raise IntegrityError("TOC does not match its digest")
    return {}


@pytest.fixture
def server(tmp_path: Path):
    sock = tmp_path / "control.sock"
    started = threading.Event()
    stop: list[tuple[trio.CancelScope, Any]] = []

    async def main() -> None:
        with trio.CancelScope() as scope:
            stop.append((scope, trio.lowlevel.current_trio_token()))
            async with trio.open_nursery() as n:
                await n.start(controlserver.serve, sock, handler)
                started.set()

    t = threading.Thread(target=trio.run, args=(main,), daemon=True)
    t.start()
    assert started.wait(10)
    yield sock
    scope, token = stop[0]
    trio.from_thread.run_sync(scope.cancel, trio_token=token)
    t.join(10)


def test_protocol_round_trips_and_errors(server: Path) -> None:
    assert stat.S_IMODE(os.stat(server).st_mode) == 0o600
    assert control.call(server, {"op": "health"}) == {"ok": True, "layers": 0}
    with pytest.raises(control.ControlError) as e:
        control.call(server, {"op": "check", "id": "ab"})
    assert e.value.kind == "notfound"
    assert isinstance(control.as_error(e.value, "x"), NotFoundError)
    secret = "s3cr3t-token"
    with pytest.raises(control.ControlError) as e:
        control.call(server, {"op": "attach", "id": "ab", "credentials": {"h": {"username": "u", "secret": secret}}})
    assert e.value.kind == "integrity" and secret not in str(e.value)
    with pytest.raises(control.ControlError) as e:
        control.call(server, {"op": "format-disk"})
    assert e.value.kind == "invalid"


def test_garbage_and_no_server(server: Path, tmp_path: Path) -> None:
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(server))
        s.sendall(b"not json\n")
        assert b'"kind": "invalid"' in s.recv(4096)
    with pytest.raises(UnavailableError):
        control.call(tmp_path / "nobody.sock", {"op": "health"}, timeout=2)
