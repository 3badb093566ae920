"""The lazyfs process's control protocol (lazy-design.md "Control protocol"): server half and blocking client.

A unix stream socket, mode 0600 (only root, i.e. the snapshotter, may talk to it). One connection carries one JSON
request line and gets one JSON answer line::

    {"op": "attach", "id": "<layer id>", "digest": "sha256:...", "size": N, "toc_digest": "sha256:...",
     "image_ref": "host/repo:tag", "hosts_dir": "/etc/containerd/certs.d" | null,
     "credentials": {"host": {"username": "...", "secret": "..."}} | null}
        -> {"ok": true, "path": "<mount>/<layer id>"}
    {"op": "detach", "id": ...}  -> {"ok": true}
    {"op": "check", "id": ...}   -> {"ok": true, "path": ..., "complete": bool, "unpacked": bool}
    {"op": "list"}               -> {"ok": true, "layers": [{"id", "digest", "fetched_fraction", "bytes_fetched",
                                                             "complete", "unpacked"}, ...]}
    {"op": "health"}             -> {"ok": true, "layers": N, "mount": "<mount>", "cache": {"chunk_bytes": N,
                                     "reserved_bytes": N (spool files, unpacked copies), "bound": N}}

A failure is ``{"ok": false, "kind": "unavailable"|"integrity"|"invalid"|"notfound", "error": "..."}``.
Credentials are never logged, echoed back or put into an error: the server logs the op and id only, and its errors
are built from :class:`~cvmfs_snap.errors.CvmfsSnapError` messages, which never carry credentials.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import trio  # type: ignore[import-untyped]

from cvmfs_snap.errors import (
    CvmfsSnapError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    UnavailableError,
)

log = logging.getLogger(__name__)

OPS = ("attach", "detach", "check", "list", "health")
KINDS = ("unavailable", "integrity", "invalid", "notfound")
#: a request line longer than this is refused (an attach with credentials is a few KiB)
MAX_REQUEST = 1 << 20
#: answers longer than this are refused by the client (a list of thousands of layers fits)
MAX_ANSWER = 16 << 20
#: a client that sends nothing for this long is disconnected
REQUEST_TIMEOUT = 10.0

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ControlError(CvmfsSnapError):
    """The lazyfs process answered ``ok: false``; ``kind`` is the protocol's error kind."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def error_kind(exc: BaseException) -> str:
    """The protocol's ``kind`` for an exception raised by a handler."""
    if isinstance(exc, ControlError) and exc.kind in KINDS:
        return exc.kind
    if isinstance(exc, IntegrityError):
        return "integrity"
    if isinstance(exc, NotFoundError):
        return "notfound"
    if isinstance(exc, InvalidInputError):
        return "invalid"
    return "unavailable"


def as_error(exc: ControlError, what: str) -> CvmfsSnapError:
    """The cvmfs-snap error a client raises for a ``ok: false`` answer."""
    kinds: dict[str, type[CvmfsSnapError]] = {"integrity": IntegrityError, "invalid": InvalidInputError,
                                              "notfound": NotFoundError}
    return kinds.get(exc.kind, UnavailableError)(f"{what}: {exc}")


# ---------------------------------------------------------------------------------------------------- client
def call(sock: Path | str, request: Mapping[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """One request -> one answer (blocking). UnavailableError when nobody answers or the answer is not the
    protocol's; ControlError for ``ok: false``. The request may hold credentials: they never reach a log line or an
    error message here."""
    op = str(request.get("op", "?"))
    buf = bytearray()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(sock))
            s.sendall(json.dumps(dict(request)).encode() + b"\n")
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > MAX_ANSWER:
                    raise UnavailableError(f"lazyfs control {op}: answer longer than {MAX_ANSWER} bytes")
    except OSError as exc:
        raise UnavailableError(f"lazyfs process at {sock} does not answer ({op}: {exc.strerror or exc})") from None
    try:
        answer = json.loads(buf)
    except ValueError:
        raise UnavailableError(f"lazyfs control {op}: the process at {sock} sent no valid JSON answer") from None
    if not isinstance(answer, dict):
        raise UnavailableError(f"lazyfs control {op}: answer is not a JSON object")
    if not answer.get("ok"):
        raise ControlError(str(answer.get("kind", "unavailable")), str(answer.get("error", f"{op} failed")))
    return answer


# ---------------------------------------------------------------------------------------------------- server
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
