"""Registry auth as an ``httpx.Auth`` flow: the challenge / token / retry dance of the distribution spec.

:class:`RegistryAuth` is shared by all threads of a client and holds what was learnt: each host's challenge
(``WWW-Authenticate``), the Bearer tokens (:class:`cvmfs_snap.oci.auth.TokenCache`), one fetch lock per
(host, scope) so that a cold pool asks the token server once. :meth:`RegistryAuth.flow` gives the ``httpx.Auth``
for one repository: it adds ``Authorization`` only to requests for the registry's own origin (never to blob
storage a redirect leads to), up front when the host asked for auth before, and answers a 401 once with fresh
credentials (a new token, or Basic). Credentials travel only where the transport policy allows: HTTPS, or plain
HTTP to loopback and configured-insecure hosts; a token realm in plain HTTP elsewhere is refused.

The flow fetches tokens synchronously (through the client's own :class:`~cvmfs_snap.oci.transport.Transport`), so it
runs on httpx's sync client only; async callers (the FUSE process) go through :mod:`cvmfs_snap.oci.handoff`, which
runs the same client, flow and token cache in worker threads.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Generator
from datetime import datetime

import httpx

from cvmfs_snap.errors import AuthError
from cvmfs_snap.oci.auth import Challenge, Credentials, CredentialStore, TokenCache, parse_www_authenticate
from cvmfs_snap.oci.reference import ImageReference
from cvmfs_snap.oci.transport import (
    ERROR_BODY_LIMIT,
    Deadline,
    Retryable,
    Transport,
    drain,
    origin,
    parse_retry_after,
)

log = logging.getLogger(__name__)

#: a token server's answer is small JSON
TOKEN_BODY_LIMIT = 1024 * 1024


class _OriginHeader(httpx.Auth):
    """Adds a fixed ``Authorization`` value to requests for one origin only."""

    def __init__(self, value: str | None, at: tuple[str, str, int]) -> None:
        self._value = value
        self._at = at

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if self._value and origin(request.url) == self._at:
            request.headers["Authorization"] = self._value
        yield request


class RepositoryAuth(httpx.Auth):
    """The auth flow for one repository of one registry (see module docstring)."""

    def __init__(self, shared: RegistryAuth, ref: ImageReference, registry_origin: tuple[str, str, int],
                 actions: str = "pull") -> None:
        self._shared = shared
        self._ref = ref
        self._origin = registry_origin
        self._actions = actions

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if origin(request.url) != self._origin:
            yield request  # blob storage or another host: never our credentials
            return
        sent = self._shared.upfront(self._ref, self._actions)
        if sent:
            request.headers["Authorization"] = sent
        response = yield request
        if response.status_code != 401:
            return
        cl = response.headers.get("content-length", "")
        if cl.isdigit() and int(cl) > ERROR_BODY_LIMIT:
            return  # httpx would read this body into memory before the retry: no retry, the caller drains a bit
        new = self._shared.on_unauthorized(self._ref, response, sent, self._actions)
        if new is None:
            return
        request.headers["Authorization"] = new
        yield request


class RegistryAuth:
    """Auth state shared by the threads of one client; thread-safe."""

    def __init__(self, credentials: CredentialStore, transport: Transport, transfer_deadline: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.credentials = credentials
        self._transport = transport
        self._deadline = transfer_deadline
        self._clock = clock
        self.tokens = TokenCache(clock)
        self._lock = threading.Lock()
        self._challenges: dict[str, Challenge] = {}
        self._fetch_locks: dict[tuple[str, str], threading.Lock] = {}

    def flow(self, ref: ImageReference, base_url: str, actions: str = "pull") -> RepositoryAuth:
        """``actions``: the token scope's actions, ``pull`` or ``pull,push`` (``cvmfs_snap.oci.push``)."""
        return RepositoryAuth(self, ref, origin(httpx.URL(base_url)), actions)

    @staticmethod
    def scope(ref: ImageReference, actions: str = "pull") -> str:
        return f"repository:{ref.repository}:{actions}"

    def creds(self, ref: ImageReference) -> Credentials | None:
        return self.credentials.get(ref.registry) or self.credentials.get(ref.api_host)

    def upfront(self, ref: ImageReference, actions: str = "pull") -> str | None:
        """The Authorization value to send up front, from what this host asked for before."""
        host = ref.api_host
        with self._lock:
            ch = self._challenges.get(host)
        if ch is None:
            return None
        if ch.scheme == "bearer":
            scope = self.scope(ref, actions)
            tok = self.tokens.get(host, scope)
            return f"Bearer {tok if tok is not None else self._token(ref, scope, ch, None)}"
        if ch.scheme == "basic":
            cred = self.creds(ref)
            return cred.basic_header() if cred else None
        return None

    def on_unauthorized(self, ref: ImageReference, resp: httpx.Response, sent: str | None,
                        actions: str = "pull") -> str | None:
        """After a 401: remember the challenge and produce new Authorization (None if there is nothing to try)."""
        challenges = parse_www_authenticate(resp.headers.get_list("www-authenticate"))
        host = ref.api_host
        ch = next((c for c in challenges if c.scheme == "bearer"), None) or next(
            (c for c in challenges if c.scheme == "basic"), None)
        if ch is None:
            return None
        with self._lock:
            self._challenges[host] = ch
        if ch.scheme == "bearer":
            scope = self.scope(ref, actions)
            stale = sent[len("Bearer "):] if sent and sent.startswith("Bearer ") else None
            if stale:
                self.tokens.invalidate(host, scope, stale)
            return f"Bearer {self._token(ref, scope, ch, stale)}"
        cred = self.creds(ref)
        if cred is None:
            return None
        value = cred.basic_header()
        return None if value == sent else value

    def error(self, ref: ImageReference, what: str, status: int, detail: str) -> AuthError:
        """The AuthError for a final 401/403, with a hint that fits the credentials we have."""
        cred = self.creds(ref)
        if cred is None:
            hint = ("no credentials are configured for this registry: add them to the docker config.json used by "
                    "cvmfs-snap (docker login; `cvmfs-snap pull` also takes --user), or check that the image name is "
                    "right")
        else:
            hint = (f"the credentials of user {cred.username!r} were refused or lack pull access: check them in "
                    "the docker config.json used by cvmfs-snap")
        extra = f" ({detail})" if detail else ""
        return AuthError(f"registry {ref.api_host} denied access to {what} (HTTP {status}){extra}; {hint}")

    # ------------------------------------------------------------------ tokens

    def _token(self, ref: ImageReference, scope: str, ch: Challenge, stale: str | None) -> str:
        """A cached token other than ``stale``, or a new one. One thread fetches per (host, scope) while the
        others wait and reuse its token: a pool starting cold asks the token server once, not once per thread."""
        key = (ref.api_host, scope)
        with self._lock:
            fetch_lock = self._fetch_locks.setdefault(key, threading.Lock())
        with fetch_lock:
            tok = self.tokens.get(*key)
            if tok is not None and tok != stale:
                return tok
            return self._fetch_token(ref, scope, ch)

    def _fetch_token(self, ref: ImageReference, scope: str, ch: Challenge) -> str:
        """Get a Bearer token from the challenge's realm (Basic credentials there when we have them)."""
        host = ref.api_host
        realm = ch.params.get("realm", "")
        try:
            realm_url = httpx.URL(realm)
        except (httpx.InvalidURL, TypeError):
            realm_url = None
        if realm_url is None or realm_url.scheme not in ("http", "https") or not realm_url.host:
            raise AuthError(f"registry {host} asked for a Bearer token with an unusable realm {realm!r}; the "
                            "registry's auth configuration is broken")
        cred = self.creds(ref)
        if realm_url.scheme == "http" and not self._transport.policy.plain_allowed(realm_url.netloc.decode()):
            raise AuthError(f"token server {realm_url.host} of registry {host} uses plain HTTP and is neither "
                            "loopback nor configured insecure; refusing to talk to it. Fix the registry's token "
                            "realm or add the token server to the insecure registries")
        params = {}
        if ch.params.get("service"):
            params["service"] = ch.params["service"]
        params["scope"] = scope
        url = realm_url.copy_merge_params(params)
        who = f"user {cred.username!r}" if cred else "anonymous access"
        deadline = Deadline(self._deadline, f"the token request for {scope}", realm_url.host, self._clock)
        resp = self._transport.send("GET", url, {"Accept": "application/json"},
                                    _OriginHeader(cred.basic_header() if cred else None, origin(realm_url)),
                                    deadline)
        try:
            if resp.status_code in (401, 403):
                drain(resp)
                raise AuthError(
                    f"token server {realm_url.host} refused {who} for {scope} of registry {host} "
                    f"(HTTP {resp.status_code}); "
                    + ("check the username/password in the docker config.json used by cvmfs-snap"
                       if cred else "this image needs credentials: add them to the docker config.json "
                       "used by cvmfs-snap (docker login)"))
            if resp.status_code == 429 or resp.status_code >= 500:
                drain(resp)
                raise Retryable(f"token server {realm_url.host} answered HTTP {resp.status_code}",
                                parse_retry_after(resp.headers.get("retry-after")))
            if resp.status_code != 200:
                drain(resp)
                raise AuthError(f"token server {realm_url.host} of registry {host} answered HTTP "
                                f"{resp.status_code} for {scope}; check the registry's auth configuration")
            body = self._read_token_body(resp, deadline)
            try:
                obj = json.loads(body)
            except ValueError:
                obj = None
        finally:
            resp.close()
        token = (obj.get("token") or obj.get("access_token")) if isinstance(obj, dict) else None
        if not isinstance(token, str) or not token:
            raise AuthError(f"token server {realm_url.host} of registry {host} sent no token for {scope}")
        assert isinstance(obj, dict)
        self.tokens.put(host, scope, token, _lifetime(obj))
        log.debug("got a token for %s on %s (%s)", scope, host, who)
        return token

    @staticmethod
    def _read_token_body(resp: httpx.Response, deadline: Deadline) -> bytes:
        buf = bytearray()
        try:
            for chunk in resp.iter_bytes():
                buf += chunk
                if len(buf) > TOKEN_BODY_LIMIT:
                    raise AuthError(f"token server {resp.url.host} sent more than {TOKEN_BODY_LIMIT} bytes")
                deadline.check(f"{len(buf)} bytes received")
        except httpx.TransportError as e:
            raise Retryable(f"token server {resp.url.host}: {type(e).__name__}: {e}") from None
        return bytes(buf)


def _lifetime(obj: dict[str, object]) -> float:
    """Seconds the token is valid for, from ``expires_in`` and ``issued_at`` (0 = the spec's default)."""
    expires_in = obj.get("expires_in")
    lifetime = float(expires_in) if isinstance(expires_in, (int, float)) and expires_in > 0 else 0.0
    issued = obj.get("issued_at")
    if lifetime and isinstance(issued, str):
        try:
            age = time.time() - datetime.fromisoformat(issued.replace("Z", "+00:00")).timestamp()
            # honour issued_at, unless clocks are so skewed that the token would look dead on arrival
            if 0 < age < lifetime:
                lifetime -= age
        except ValueError:
            pass
    return lifetime
