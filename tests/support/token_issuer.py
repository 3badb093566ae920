"""A small Docker-distribution token server on loopback, for testing Bearer auth against the real docker-registry.

It implements the token protocol a registry configured with ``auth: token:`` relies on: the client is challenged
by the registry, comes here with ``?service=..&scope=repository:NAME:pull`` (and Basic credentials), and gets a
JWT signed with RS256. The registry trusts the token because the signing key's self-signed certificate is its
``rootcertbundle``, and finds the key through the JWT header's ``kid``, which distribution (libtrust) derives from
the public key: SHA-256 of the DER SubjectPublicKeyInfo, first 240 bits, base32 without padding, in 12 groups of 4
characters joined by ':'.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from tests.support.http_servers import LoopbackHandler, running

SERVICE = "cvmfs-snap-test-registry"
ISSUER = "cvmfs-snap-test-issuer"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def libtrust_kid(public_key: rsa.RSAPublicKey) -> str:
    """The key ID distribution's libtrust computes for a public key (see module docstring)."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode("ascii").rstrip("=")
    return ":".join(b32[i:i + 4] for i in range(0, len(b32), 4))


@dataclass
class TokenIssuer:
    """State of a running token server; tests read ``hits`` and tune ``expires_in`` / ``expired_next``."""

    url: str
    cert_path: Path
    users: dict[str, str]
    key: rsa.RSAPrivateKey = field(repr=False)
    allow_anonymous: bool = True
    #: what the token response says about the token's lifetime
    expires_in: int = 300
    #: the next N tokens are already expired (exp in the past), while still claiming ``expires_in``
    expired_next: int = 0
    hits: int = 0
    #: (user or "", scope) per request, in order
    requests: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def realm(self) -> str:
        return f"{self.url}/token"

    def registry_auth_config(self) -> dict[str, Any]:
        """The ``auth`` section for docker-registry's config.yml (pass as extra_config)."""
        return {"auth": {"token": {"realm": self.realm, "service": SERVICE, "issuer": ISSUER,
                                   "rootcertbundle": str(self.cert_path)}}}

    def make_token(self, subject: str, access: list[dict[str, Any]], expired: bool = False) -> str:
        now = int(time.time())
        exp = now - 600 if expired else now + self.expires_in
        header = {"typ": "JWT", "alg": "RS256", "kid": libtrust_kid(self.key.public_key())}
        claims = {"iss": ISSUER, "sub": subject, "aud": SERVICE, "exp": exp, "nbf": now - 700, "iat": now - 700,
                  "jti": secrets.token_hex(8), "access": access}
        signing_input = (_b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())).encode()
        sig = self.key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        return signing_input.decode() + "." + _b64url(sig)

    def handle(self, query: dict[str, list[str]], authorization: str | None) -> tuple[int, dict[str, Any]]:
        user = ""
        if authorization and authorization.lower().startswith("basic "):
            try:
                u, _, p = base64.b64decode(authorization[6:]).decode().partition(":")
            except ValueError:
                return 400, {"details": "bad basic auth"}
            if self.users.get(u) != p:
                with self.lock:
                    self.hits += 1
                    self.requests.append((u, ",".join(query.get("scope", []))))
                return 401, {"details": "invalid username or password"}
            user = u
        with self.lock:
            self.hits += 1
            self.requests.append((user, ",".join(query.get("scope", []))))
            expired = self.expired_next > 0
            if expired:
                self.expired_next -= 1
        if not user and not self.allow_anonymous:
            return 401, {"details": "authentication required"}
        access = []
        for scope in query.get("scope", []):
            typ, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if typ == "repository" and name and user:
                access.append({"type": typ, "name": name, "actions": [a for a in actions.split(",") if a]})
        token = self.make_token(user, access, expired=expired)
        issued = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return 200, {"token": token, "access_token": token, "expires_in": self.expires_in, "issued_at": issued}


def _self_signed(key: rsa.RSAPrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cvmfs-snap test token issuer")])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


@contextmanager
def start_token_issuer(workdir: Path, users: dict[str, str], allow_anonymous: bool = True) -> Iterator[TokenIssuer]:
    """Run a token server on 127.0.0.1 (free port) in a thread; its certificate is written under ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert_path = workdir / "token-issuer.pem"
    cert_path.write_bytes(_self_signed(key).public_bytes(serialization.Encoding.PEM))

    state: dict[str, TokenIssuer] = {}

    class Handler(LoopbackHandler):
        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            if parts.path != "/token":
                self.send_error(404)
                return
            status, body = state["issuer"].handle(parse_qs(parts.query), self.headers.get("Authorization"))
            self.send_json(status, body)

    with running(Handler) as server:
        issuer = TokenIssuer(url=server.url, cert_path=cert_path, users=users, key=key,
                             allow_anonymous=allow_anonymous)
        state["issuer"] = issuer
        yield issuer
