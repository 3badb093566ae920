"""The server half of the lazyfs control protocol (:mod:`cvmfs_snap.lazyfs.control` has the messages, the limits
and the blocking client): a trio task serving the 0600 unix socket of the lazyfs process."""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

import trio  # type: ignore[import-untyped]

from cvmfs_snap.errors import CvmfsSnapError
from cvmfs_snap.lazyfs.control import MAX_REQUEST, OPS, REQUEST_TIMEOUT, Handler, error_kind

log = logging.getLogger(__name__)


async def serve(path: Path, handler: Handler, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the protocol on ``path`` until cancelled: each connection in its own task, so a slow attach never
    holds up a ``health`` or ``check``."""
    path.unlink(missing_ok=True)
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        await listener.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    listener.listen(64)
    task_status.started()
    async with trio.open_nursery() as nursery:
        try:
            while True:
                conn, _ = await listener.accept()
                nursery.start_soon(_connection, trio.SocketStream(conn), handler)
        finally:
            listener.close()


async def _connection(stream: trio.SocketStream, handler: Handler) -> None:
    async with stream:
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                line = await _read_line(stream)
        except (trio.TooSlowError, trio.BrokenResourceError, OSError):
            return
        answer = await handle_line(line, handler)
        try:
            await stream.send_all(json.dumps(answer).encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            log.debug("control client went away before its answer")


async def _read_line(stream: trio.SocketStream) -> bytes:
    buf = bytearray()
    while b"\n" not in buf:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_REQUEST:
            break
    return bytes(buf)


async def handle_line(line: bytes, handler: Handler) -> dict[str, Any]:
    """The answer to one request line (the handler's, or an error answer); never raises a CvmfsSnapError."""
    if len(line) > MAX_REQUEST:
        return {"ok": False, "kind": "invalid", "error": f"request longer than {MAX_REQUEST} bytes"}
    try:
        request = json.loads(line)
    except ValueError:
        return {"ok": False, "kind": "invalid", "error": "request is not one line of JSON"}
    if not isinstance(request, dict):
        return {"ok": False, "kind": "invalid", "error": "request is not a JSON object"}
    op = request.get("op")
    if op not in OPS:
        return {"ok": False, "kind": "invalid", "error": f"unknown op {str(op)[:40]!r}; known: {', '.join(OPS)}"}
    log.debug("control %s %s", op, str(request.get("id", ""))[:80])
    try:
        answer = await handler(request)
    except CvmfsSnapError as exc:
        kind = error_kind(exc)
        log.info("control %s %s: %s (%s)", op, str(request.get("id", ""))[:80], exc, kind)
        return {"ok": False, "kind": kind, "error": str(exc)}
    return {"ok": True, **answer}
