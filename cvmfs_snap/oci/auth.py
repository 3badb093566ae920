"""Registry credentials and the token cache.

Credentials come from a docker ``config.json`` (what ``docker login`` / ``skopeo login`` write), so admins can reuse
what they already have. The secrets live only inside :class:`Credentials`, whose repr hides them; nothing in this
package formats a password or token into a log line or an exception message.

Bearer tokens are cached per (registry host, scope) until shortly before they expire, so that a pool of worker
threads pulling many blobs of the same repository asks the token server once, not once per blob.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cvmfs_snap.errors import InvalidInputError
from cvmfs_snap.oci.reference import DOCKER_HUB_ALIASES

log = logging.getLogger(__name__)

#: token lifetime when the token server does not say (distribution token spec)
DEFAULT_TOKEN_LIFETIME = 60.0
#: renew a token this many seconds before it expires (clock skew, request latency), at most half its lifetime
EXPIRY_MARGIN = 10.0


@dataclass(frozen=True)
class Credentials:
    """A username and a secret (password or identity token). repr/str never show the secret."""

    username: str
    password: str = field(repr=False)

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    def __str__(self) -> str:
        return f"Credentials(username={self.username!r}, password=***)"

    __repr__ = __str__


def _host_of_key(key: str) -> str:
    """``https://host/v1/`` / ``http://host`` / ``host/path`` -> ``host`` (config.json keys come in all these)."""
    k = key.strip()
    for scheme in ("https://", "http://"):
        if k.lower().startswith(scheme):
            k = k[len(scheme):]
            break
    return k.split("/", 1)[0].lower()


def _aliases(host: str) -> list[str]:
    h = host.lower()
    if h in DOCKER_HUB_ALIASES:
        # docker login writes Docker Hub credentials under https://index.docker.io/v1/
        return [h, *sorted(DOCKER_HUB_ALIASES - {h})]
    return [h]


class CredentialStore:
    """Credentials per registry host. Empty store = anonymous access everywhere."""

    def __init__(self, credentials: Mapping[str, Credentials] | None = None) -> None:
        self._by_host: dict[str, Credentials] = {}
        for key, cred in (credentials or {}).items():
            self._by_host[_host_of_key(key)] = cred

    @classmethod
    def from_docker_config(cls, path: str | os.PathLike[str] | None = None) -> CredentialStore:
        """Read ``auths`` of a docker config.json.

        ``path=None`` means ``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``; a missing default file
        gives an empty store, a missing explicit file is an error. Credential helpers (``credsStore``,
        ``credHelpers``) are not run; use ``docker login --password-stdin`` style plain entries instead.
        """
        explicit = path is not None
        if path is None:
            base = os.environ.get("DOCKER_CONFIG") or str(Path.home() / ".docker")
            p = Path(base) / "config.json"
        else:
            p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            if explicit:
                raise InvalidInputError(f"registry credentials file {p} does not exist; create it with "
                                        "`docker login` or give another path") from None
            return cls()
        except OSError as e:
            raise InvalidInputError(f"cannot read registry credentials file {p}: {e.strerror}") from None
        try:
            obj = json.loads(text)
        except ValueError:
            raise InvalidInputError(f"registry credentials file {p} is not valid JSON") from None
        if not isinstance(obj, dict):
            raise InvalidInputError(f"registry credentials file {p} is not a JSON object")
        auths = obj.get("auths") or {}
        if not isinstance(auths, dict):
            raise InvalidInputError(f"'auths' in registry credentials file {p} is not an object")
        creds: dict[str, Credentials] = {}
        for key, entry in auths.items():
            cred = cls._parse_entry(entry)
            if cred is None:
                log.warning("registry credentials file %s: entry %r has no usable username/password, ignored",
                            p, key)
                continue
            creds[key] = cred
        if obj.get("credsStore") or obj.get("credHelpers"):
            log.warning("registry credentials file %s uses credential helpers, which cvmfs-snap does not run; "
                        "only plain 'auths' entries are used", p)
        return cls(creds)

    @staticmethod
    def _parse_entry(entry: object) -> Credentials | None:
        if not isinstance(entry, dict):
            return None
        auth = entry.get("auth")
        if isinstance(auth, str) and auth:
            try:
                decoded = base64.b64decode(auth, validate=False).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                return None
            user, sep, pw = decoded.partition(":")
            if sep and user:
                return Credentials(user, pw)
            return None
        uname, pword = entry.get("username"), entry.get("password")
        if isinstance(uname, str) and uname and isinstance(pword, str):
            return Credentials(uname, pword)
        token = entry.get("identitytoken")
        if isinstance(token, str) and token:
            # docker uses the magic user name "<token>" with identity tokens for basic auth at the token server
            return Credentials("<token>", token)
        return None

    def get(self, host: str) -> Credentials | None:
        """Credentials for ``host`` (``host:port`` as in the reference), trying Docker Hub's aliases."""
        for h in _aliases(host):
            if h in self._by_host:
                return self._by_host[h]
        return None

    def hosts(self) -> list[str]:
        return sorted(self._by_host)

    def __repr__(self) -> str:
        return f"CredentialStore(hosts={self.hosts()!r})"


@dataclass(frozen=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: scheme (lower case) and its parameters."""

    scheme: str
    params: dict[str, str]


_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')
_SCHEME = re.compile(r"\s*,?\s*([A-Za-z][A-Za-z0-9_.-]*)(?:\s+|$)")


def parse_www_authenticate(headers: Iterable[str]) -> list[Challenge]:
    """Parse ``WWW-Authenticate`` header values (RFC 7235) into challenges; unparsable parts are skipped."""
    out: list[Challenge] = []
    for value in headers:
        pos = 0
        while pos < len(value):
            m = _SCHEME.match(value, pos)
            if not m:
                break
            scheme = m.group(1).lower()
            pos = m.end()
            params: dict[str, str] = {}
            while pos < len(value):
                pm = _PARAM.match(value, pos)
                if not pm:
                    break
                # a bare word followed by space is the next challenge's scheme, not a parameter
                params[pm.group(1).lower()] = (pm.group(2).replace('\\"', '"') if pm.group(2) is not None
                                               else pm.group(3) or "")
                pos = pm.end()
            out.append(Challenge(scheme, params))
    return out


@dataclass
class _Token:
    value: str = field(repr=False)
    expires_at: float


class TokenCache:
    """Bearer tokens per (host, scope), shared by threads; guarded by a lock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens: dict[tuple[str, str], _Token] = {}

    def get(self, host: str, scope: str) -> str | None:
        with self._lock:
            t = self._tokens.get((host, scope))
            if t is None:
                return None
            if self._clock() >= t.expires_at:
                del self._tokens[(host, scope)]
                return None
            return t.value

    def put(self, host: str, scope: str, token: str, expires_in: float) -> None:
        lifetime = expires_in if expires_in > 0 else DEFAULT_TOKEN_LIFETIME
        margin = min(EXPIRY_MARGIN, lifetime / 2)
        with self._lock:
            self._tokens[(host, scope)] = _Token(token, self._clock() + lifetime - margin)

    def invalidate(self, host: str, scope: str, token: str | None = None) -> None:
        """Forget the token (only if it is still ``token``, so a fresher one from another thread survives)."""
        with self._lock:
            t = self._tokens.get((host, scope))
            if t is not None and (token is None or t.value == token):
                del self._tokens[(host, scope)]
