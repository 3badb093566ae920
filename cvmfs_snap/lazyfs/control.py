"""The lazyfs process's control protocol (lazy-design.md "Control protocol"): its messages and the blocking client.

A unix stream socket, mode 0600 (only root, i.e. the snapshotter, may talk to it). One connection carries one JSON
request line and gets one JSON answer line::

    {"op": "attach", "id": "<layer id>", "digest": "sha256:...", "size": N, "toc_digest": "sha256:...",
     "image_ref": "host/repo:tag", "hosts_dir": "/etc/containerd/certs.d" | null,
     "credentials": {"host": {"username": "...", "secret": "..."}} | null,
     "neighbours": [{"id": ..., "digest": ..., "size": N, "toc_digest": ...}, ...]  (optional)}
        -> {"ok": true, "path": "<mount>/<layer id>"}

(``neighbours``: the image's other layers, same image reference, hosts directory and credentials, resolved in the
background for their own attach: :mod:`cvmfs_snap.lazyfs.resolve`; a malformed entry is skipped.)
    {"op": "detach", "id": ...}  -> {"ok": true}
    {"op": "check", "id": ...}   -> {"ok": true, "path": ..., "complete": bool, "unpacked": bool}
    {"op": "list"}               -> {"ok": true, "layers": [{"id", "digest", "fetched_fraction", "bytes_fetched",
                                                             "complete", "unpacked"}, ...]}
    {"op": "health"}             -> {"ok": true, "layers": N, "mount": "<mount>", "resolved": N, "resolving": N
                                     (layers resolved ahead, not attached), "clients": N (registry clients),
                                     "cache": {"chunk_bytes": N, "reserved_bytes": N (spool files, unpacked
                                     copies), "bound": N}}
    {"op": "resolve", "image_ref": "host/repo@sha256:...", "hosts_dir": ..., "credentials": ...}
        -> {"ok": true, "layers": {"sha256:...": [size, "<TOC digest annotation or empty>"], ...}}
       (the image manifest's layers, read by the process: the snapshotter daemon loads no HTTP client)

A failure is ``{"ok": false, "kind": "unavailable"|"integrity"|"invalid"|"notfound", "error": "..."}``.
Credentials are never logged, echoed back or put into an error: the server logs the op and id only, and its errors
are built from :class:`~cvmfs_snap.errors.CvmfsSnapError` messages, which never carry credentials.

The server half (on trio) is :mod:`cvmfs_snap.lazyfs.controlserver`: the snapshotter daemon and ``cvmfs-snap
status`` import only this module, so they load neither trio nor the FUSE side (about 5 MiB of RSS).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from cvmfs_snap.errors import (
    CvmfsSnapError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    UnavailableError,
)
from cvmfs_snap.unixline import exchange

log = logging.getLogger(__name__)

#: names under the lazyfs process's directory (lazy-design.md "Paths"), which the snapshotter's lazy source owns:
#: the FUSE mount, this socket, the re-attach state, the chunk cache, the unpacked copies, spooled whole blobs
MNT, SOCKET, STATE, CACHE, UNPACKED, SPOOL = "mnt", "control.sock", "state.json", "cache", "unpacked", "spool"
#: and the lazy source's own there: its per-layer records, the process's output, the pid of the process it started
LAYERS, LOG, PID = "layers", "lazyfs.log", "lazyfs.pid"
OPS = ("attach", "detach", "check", "list", "health", "resolve")
KINDS = ("unavailable", "integrity", "invalid", "notfound")
#: a request line longer than this is refused (an attach with credentials is a few KiB)
MAX_REQUEST = 1 << 20
#: answers longer than this are refused by the client (a list of thousands of layers fits)
MAX_ANSWER = 16 << 20
#: a client that sends nothing for this long is disconnected
REQUEST_TIMEOUT = 10.0

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class NotRunningError(UnavailableError):
    """Nobody listens on the control socket (no socket file, or the connection is refused): the process is not
    running, and the request was not delivered."""


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
    try:
        buf = exchange(sock, json.dumps(dict(request)).encode() + b"\n", timeout=timeout, limit=MAX_ANSWER)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise NotRunningError(f"no lazyfs process listens on {sock} ({op}: {exc.strerror or exc})") from None
    except OSError as exc:
        raise UnavailableError(f"lazyfs process at {sock} does not answer ({op}: {exc.strerror or exc})") from None
    if buf is None:
        raise UnavailableError(f"lazyfs control {op}: answer longer than {MAX_ANSWER} bytes")
    try:
        answer = json.loads(buf)
    except ValueError:
        raise UnavailableError(f"lazyfs control {op}: the process at {sock} sent no valid JSON answer") from None
    if not isinstance(answer, dict):
        raise UnavailableError(f"lazyfs control {op}: answer is not a JSON object")
    if not answer.get("ok"):
        raise ControlError(str(answer.get("kind", "unavailable")), str(answer.get("error", f"{op} failed")))
    return answer
