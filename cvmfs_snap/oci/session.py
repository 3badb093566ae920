"""One logical registry request: policy, auth flow, redirects, retries, deadline and error mapping.

:meth:`Session.request` is what every manifest, blob, range and tag-list read goes through. It returns an *open*
(streaming) response whose status the caller accepts, or raises the project's error kinds: AuthError (401/403),
NotFoundError (404), InvalidInputError (other 4xx, plain HTTP refused), UnavailableError (retries exhausted, deadline
passed).
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable, Sequence

import httpx

from cvmfs_snap.errors import InvalidInputError, NotFoundError, UnavailableError
from cvmfs_snap.oci.authflow import RegistryAuth
from cvmfs_snap.oci.reference import ImageReference
from cvmfs_snap.oci.transport import (
    DEFAULT_BLOB_MIN_RATE,
    DEFAULT_TRANSFER_DEADLINE,
    Deadline,
    Retryable,
    RetryPolicy,
    Transport,
    drain,
    parse_retry_after,
    registry_error,
    safe_url,
)

log = logging.getLogger(__name__)


class Session:
    """Transport + auth + retry policy of one client (thread-safe; the parts are)."""

    def __init__(self, transport: Transport, auth: RegistryAuth, retry: RetryPolicy, *,
                 transfer_deadline: float = DEFAULT_TRANSFER_DEADLINE, blob_min_rate: float = DEFAULT_BLOB_MIN_RATE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if transfer_deadline <= 0 or blob_min_rate <= 0:
            raise InvalidInputError(f"transfer deadline ({transfer_deadline}) and minimum blob rate "
                                    f"({blob_min_rate}) must be positive")
        self.transport = transport
        self.auth = auth
        self.retry = retry
        self.transfer_deadline = transfer_deadline
        self.blob_min_rate = blob_min_rate
        self._clock = clock

    def base_url(self, ref: ImageReference) -> str:
        """``scheme://api_host`` of ``ref``'s registry (InvalidInputError for a refused ``http://`` reference)."""
        return self.transport.policy.base_url(ref)

    def url(self, ref: ImageReference, tail: str) -> str:
        return f"{self.base_url(ref)}/v2/{ref.repository}/{tail}"

    def deadline(self, ref: ImageReference, what: str, size: int | None = None) -> Deadline:
        """The overall deadline of one transfer: ``transfer_deadline``, plus ``size / blob_min_rate`` for blobs."""
        seconds = self.transfer_deadline + (max(0, size) / self.blob_min_rate if size else 0.0)
        return Deadline(seconds, what, ref.api_host, self._clock)

    def request(self, ref: ImageReference, method: str, url: str | httpx.URL, what: str,
                headers: dict[str, str] | None = None, ok: Sequence[int] = (200,),
                deadline: Deadline | None = None, *, content: bytes | None = None,
                actions: str = "pull") -> httpx.Response:
        """One logical request (see module docstring); the caller closes the returned response. ``content`` is a
        request body (pushes); ``actions`` the token scope's actions (``pull,push`` for pushes)."""
        target = httpx.URL(url)
        flow = self.auth.flow(ref, self.base_url(ref), actions)
        deadline = deadline or self.deadline(ref, what)
        hdrs = dict(headers or {})
        last = ""
        retries = self.retry.retries
        for attempt in range(retries + 1):
            retry_after: float | None = None
            try:
                resp = self.transport.send(method, target, hdrs, flow, deadline, content)
                if resp.status_code in ok:
                    return resp
                status = resp.status_code
                detail = registry_error(drain(resp))
                if status in (401, 403):
                    raise self.auth.error(ref, what, status, detail)
                if status == 429 or status >= 500:
                    retry_after = parse_retry_after(resp.headers.get("retry-after"))
                    raise Retryable(f"HTTP {status}" + (f" ({detail})" if detail else ""), retry_after)
                extra = f": {detail}" if detail else ""
                if status == 404:
                    raise NotFoundError(f"{what} not found on registry {ref.api_host} (HTTP 404{extra}); check "
                                        "the image name, tag and digest")
                raise InvalidInputError(f"registry {ref.api_host} rejected the request for {what} "
                                        f"(HTTP {status}{extra})")
            except Retryable as e:
                last, retry_after = str(e), e.retry_after
            except httpx.TransportError as e:
                tls = tls_failure(e)
                if tls is not None:  # a certificate does not become valid by retrying
                    raise UnavailableError(tls_message(ref.api_host, tls)) from None
                last = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            if deadline.expired():
                raise deadline.error(f"last error: {last}")
            if attempt < retries:
                delay = min(self.retry.delay(attempt, retry_after), max(0.0, deadline.remaining()))
                log.warning("%s %s for %s failed (%s); retry %d/%d in %.1fs", method, safe_url(target), what,
                            last, attempt + 1, retries, delay)
                self.retry.sleep(delay)
        raise UnavailableError(f"registry {ref.api_host} unavailable: {method} of {what} failed after "
                               f"{retries + 1} attempts, last error: {last}; check that the registry is up "
                               "and reachable from this host, then retry")


def tls_failure(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error behind a transport error (certificate verification, handshake refused), if that is what it
    is."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, ssl.SSLError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def tls_message(host: str, err: ssl.SSLError) -> str:
    """What an admin can act on when TLS with ``host`` fails (no retry helps)."""
    if isinstance(err, ssl.SSLCertVerificationError):
        return (f"the TLS certificate of registry {host} did not verify ({err.verify_message or err.reason}): if a "
                f"private CA signed it, name that CA in the host's hosts.toml (ca = \"ca.crt\" in "
                f"/etc/containerd/certs.d/{host}/, as containerd reads it) or add it to the system's trust store")
    return (f"TLS with registry {host} failed ({err.reason or err}): if it requires a client certificate, give one "
            f"in the host's hosts.toml (client = [[\"client.cert\", \"client.key\"]] in "
            f"/etc/containerd/certs.d/{host}/); check its CA there too")
