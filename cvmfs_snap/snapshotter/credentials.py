"""Registry credentials handed to the snapshotter by ``cvmfs-snap pull``, for the lazy layers of that pull.

The model is stargz-snapshotter's CRI keychain: the snapshotter learns the credentials of a pull from the puller,
keyed by the image's repository (``host/repository``), keeps them in memory only, and forgets them after a TTL. They
are never put into labels (containerd stores those), records, logs, metrics or errors.

The channel is a unix stream socket next to the snapshot socket (:func:`socket_for`), mode 0600, and the server
also refuses a peer whose uid is neither root's nor its own (``SO_PEERCRED``). One connection carries one JSON line
and gets one JSON line back::

    {"op": "credentials", "image_ref": "host/repo:tag", "username": "...", "secret": "...", "ttl": 600}
        -> {"ok": true, "expires_in": 600}

A failure is ``{"ok": false, "error": "..."}`` (never echoing the secret). ``ttl`` is optional (default and
maximum :data:`MAX_TTL`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cvmfs_snap.errors import InvalidInputError, UnavailableError
from cvmfs_snap.oci import ImageReference
from cvmfs_snap.oci.auth import Credentials
from cvmfs_snap.unixline import exchange

from .defaults import DEFAULT_ADDRESS

log = logging.getLogger(__name__)

#: seconds credentials handed over by a pull are kept (a pull's Prepares come within it; a lazy layer attached
#: again later, after a restart of the lazyfs process, uses them while they last, then the node's docker config)
MAX_TTL = 3600.0
#: requests longer than this are refused (a username and a token are a few KiB)
MAX_REQUEST = 64 << 10
#: a client that sends nothing for this long is disconnected
REQUEST_TIMEOUT = 10.0


def socket_for(address: str | os.PathLike[str]) -> Path:
    """The credentials socket of the snapshotter serving on ``address``: ``<dir>/<stem>-credentials.sock``."""
    p = Path(address)
    return p.with_name(p.stem + "-credentials.sock")


#: the credentials socket of the default snapshot socket
DEFAULT_SOCKET = socket_for(DEFAULT_ADDRESS)


def repository_key(image_ref: str) -> str:
    """``host/repository`` of an image reference (tag and digest dropped): what credentials are kept under."""
    ref = ImageReference.parse(image_ref)
    return f"{ref.registry.lower()}/{ref.repository}"


class PullCredentials:
    """The credentials pulls handed over, per ``host/repository``, each with its expiry (monotonic clock)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._by_repo: dict[str, tuple[Credentials, float]] = {}
        self._lock = threading.Lock()
        self._clock = clock

    def put(self, image_ref: str, creds: Credentials, ttl: float = MAX_TTL) -> float:
        """Keep ``creds`` for the repository of ``image_ref`` for ``ttl`` seconds (capped at :data:`MAX_TTL`);
        returns the TTL used."""
        ttl = max(0.0, min(float(ttl), MAX_TTL))
        key = repository_key(image_ref)
        with self._lock:
            self._expire()
            self._by_repo[key] = (creds, self._clock() + ttl)
        return ttl

    def get(self, image_ref: str) -> Credentials | None:
        """The credentials a pull handed over for the repository of ``image_ref``, unless expired."""
        try:
            key = repository_key(image_ref)
        except InvalidInputError:
            return None
        with self._lock:
            self._expire()
            entry = self._by_repo.get(key)
        return entry[0] if entry is not None else None

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._by_repo)

    def _expire(self) -> None:
        now = self._clock()
        for k in [k for k, (_, until) in self._by_repo.items() if until <= now]:
            del self._by_repo[k]

    def __repr__(self) -> str:
        return f"PullCredentials({len(self)} repositories)"


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def handle_request(line: bytes, store: PullCredentials) -> dict[str, object]:
    """The answer to one request line; never raises, never echoes a secret."""
    if len(line) > MAX_REQUEST:
        return {"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"}
    try:
        req = json.loads(line)
    except ValueError:
        return {"ok": False, "error": "request is not one line of JSON"}
    if not isinstance(req, dict) or req.get("op") != "credentials":
        return {"ok": False, "error": "unknown request; known op: credentials"}
    ref, user, secret, ttl = req.get("image_ref"), req.get("username"), req.get("secret"), req.get("ttl", MAX_TTL)
    if not (isinstance(ref, str) and isinstance(user, str) and user and isinstance(secret, str)):
        return {"ok": False, "error": "credentials need image_ref, username and secret strings"}
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl <= 0:
        return {"ok": False, "error": "ttl must be a positive number of seconds"}
    try:
        used = store.put(ref, Credentials(user, secret), float(ttl))
    except InvalidInputError as exc:
        return {"ok": False, "error": str(exc)}
    log.info("credentials for %s handed over by a pull (kept %.0f s in memory)", repository_key(ref), used)
    return {"ok": True, "expires_in": used}


class _Handler(socketserver.BaseRequestHandler):
    server: CredentialServer

    def handle(self) -> None:
        conn: socket.socket = self.request
        uid = _peer_uid(conn)
        if uid not in (0, os.geteuid()):
            log.warning("credentials socket: refused a client with uid %d", uid)
            answer: dict[str, object] = {"ok": False, "error": "only root may hand credentials over"}
        else:
            conn.settimeout(REQUEST_TIMEOUT)
            buf = bytearray()
            try:
                while b"\n" not in buf and len(buf) <= MAX_REQUEST:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
            except OSError:
                return
            answer = handle_request(bytes(buf), self.server.store)
        try:
            conn.sendall(json.dumps(answer).encode() + b"\n")
        except OSError:
            log.debug("credentials client went away before its answer")


class CredentialServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """Serves :func:`handle_request` on a 0600 unix socket in a thread: ``start()``, ``close()``."""

    daemon_threads = True

    def __init__(self, path: Path, store: PullCredentials) -> None:
        self.path = Path(path)
        self.store = store
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path.unlink(missing_ok=True)
        old = os.umask(0o177)  # born 0600
        try:
            super().__init__(str(self.path), _Handler)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        st = os.lstat(self.path)
        self._id = (st.st_dev, st.st_ino)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="credentials", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join(10)
            self._thread = None
        self.server_close()
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) == self._id:
            self.path.unlink()


def hand_over(sock: Path, image_ref: str, creds: Credentials, ttl: float = MAX_TTL, timeout: float = 10.0) -> float:
    """Client side (``cvmfs-snap pull``): hand ``creds`` for ``image_ref``'s repository to the snapshotter at
    ``sock``; returns the TTL it keeps them for. UnavailableError (without the secret) when it does not take them."""
    req = {"op": "credentials", "image_ref": image_ref, "username": creds.username, "secret": creds.password,
           "ttl": ttl}
    try:
        buf = exchange(sock, json.dumps(req).encode() + b"\n", timeout=timeout, limit=MAX_REQUEST)
    except OSError as exc:
        raise UnavailableError(f"the snapshotter's credentials socket {sock} does not answer "
                               f"({exc.strerror or exc})") from None
    invalid = UnavailableError(f"the snapshotter's credentials socket {sock} sent no valid answer")
    if buf is None:  # longer than any answer of ours
        raise invalid
    try:
        answer = json.loads(buf)
    except ValueError:
        raise invalid from None
    if not isinstance(answer, dict) or not answer.get("ok"):
        why = answer.get("error") if isinstance(answer, dict) else None
        raise UnavailableError(f"the snapshotter at {sock} refused the credentials: {why or 'no reason given'}")
    expires = answer.get("expires_in")
    return float(expires) if isinstance(expires, int | float) else ttl
