"""Auth against the real docker-registry: Basic (htpasswd) and Bearer tokens from our own token issuer.

Credentials must never show up in exception messages, reprs or log records: every failure test checks that.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cvmfs_snap.errors import AuthError, CvmfsSnapError, NotFoundError
from cvmfs_snap.oci import Credentials, CredentialStore, ImageReference, RegistryClient
from cvmfs_snap_devenv import images as im
from cvmfs_snap_devenv.registry import Registry, htpasswd_auth, start_registry
from tests.support.token_issuer import TokenIssuer, start_token_issuer

PASSWORD = "pa55-Very-Secret-word"
WRONG = "Wr0ng-Secret-guess"


def _assert_no_secret(text: str) -> None:
    for secret in (PASSWORD, WRONG):
        assert secret not in text
        import base64

        for u in ("alice", "bob"):
            assert base64.b64encode(f"{u}:{secret}".encode()).decode() not in text


@dataclass
class Seeded:
    img: im.BuiltImage
    big: im.BuiltLayer


def _seed(root: Path, repo: str = "private/img") -> Seeded:
    """Push an image into a registry storage with an anonymous registry, which is then stopped; the auth
    registry under test is started on the same storage."""
    big = im.layer([("data", b"d" * 200_000)], codec="plain")
    img = im.image([im.layer([("etc/motd", b"hello\n")]), big])
    with start_registry(root) as reg:
        im.push_image(reg.url, repo, "v1", img)
        im.push_image(reg.url, repo, "v2", img)
    return Seeded(img, big)


def _client(creds: CredentialStore | None, **kw: object) -> RegistryClient:
    return RegistryClient(credentials=creds, timeout=10, retries=1, backoff_base=0.01, **kw)  # type: ignore[arg-type]


def _config(tmp_path: Path, host: str, user: str, password: str) -> CredentialStore:
    import base64

    cfg = tmp_path / f"config-{user}-{len(password)}.json"
    cfg.write_text(json.dumps({"auths": {f"http://{host}": {
        "auth": base64.b64encode(f"{user}:{password}".encode()).decode()}}}))
    return CredentialStore.from_docker_config(cfg)


# ---------------------------------------------------------------- Basic (htpasswd)

@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, Seeded]]:
    root = tmp_path_factory.mktemp("basic-registry")
    seeded = _seed(root)
    with start_registry(root, htpasswd_auth(root, "alice", PASSWORD)) as reg:
        yield reg, seeded


def test_basic_auth_anonymous_is_refused(basic_registry: tuple[Registry, Seeded]) -> None:
    reg, _ = basic_registry
    with _client(None) as c, pytest.raises(AuthError, match="no credentials are configured") as ei:
        c.get_manifest(ImageReference.parse(reg.ref("private/img", "v1")))
    assert reg.host in str(ei.value)


def test_basic_auth_with_credentials(basic_registry: tuple[Registry, Seeded], tmp_path: Path,
                                     caplog: pytest.LogCaptureFixture) -> None:
    reg, seeded = basic_registry
    caplog.set_level(logging.DEBUG)
    ref = ImageReference.parse(reg.ref("private/img", "v1"))
    with _client(_config(tmp_path, reg.host, "alice", PASSWORD)) as c:
        m = c.get_manifest(ref)
        assert m.digest == seeded.img.manifest_digest
        assert c.get_blob(ref, seeded.big.digest, size=len(seeded.big.blob)) == seeded.big.blob
        assert c.read_range(ref, seeded.big.digest, 100, 5) == seeded.big.blob[100:105]
        assert sorted(c.list_tags(ref)) == ["v1", "v2"]
        _assert_no_secret(repr(c))
    _assert_no_secret(caplog.text)


def test_basic_auth_wrong_password(basic_registry: tuple[Registry, Seeded], tmp_path: Path,
                                   caplog: pytest.LogCaptureFixture) -> None:
    reg, _ = basic_registry
    caplog.set_level(logging.DEBUG)
    with _client(_config(tmp_path, reg.host, "alice", WRONG)) as c, pytest.raises(AuthError) as ei:
        c.get_manifest(ImageReference.parse(reg.ref("private/img", "v1")))
    msg = str(ei.value)
    assert "'alice'" in msg and reg.host in msg and "HTTP 401" in msg
    _assert_no_secret(msg)
    _assert_no_secret(repr(ei.value))
    _assert_no_secret(caplog.text)


# ---------------------------------------------------------------- Bearer tokens

@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, TokenIssuer, Seeded]]:
    root = tmp_path_factory.mktemp("token-registry")
    seeded = _seed(root)
    with start_token_issuer(root / "issuer", users={"alice": PASSWORD}) as issuer, \
            start_registry(root, issuer.registry_auth_config()) as reg:
        yield reg, issuer, seeded


@pytest.fixture
def tok(token_registry: tuple[Registry, TokenIssuer, Seeded]) -> tuple[Registry, TokenIssuer, Seeded]:
    reg, issuer, seeded = token_registry
    with issuer.lock:
        issuer.hits = 0
        issuer.requests.clear()
        issuer.expired_next = 0
        issuer.expires_in = 300
    return reg, issuer, seeded


def test_token_anonymous_pull_rejected(tok: tuple[Registry, TokenIssuer, Seeded]) -> None:
    reg, issuer, _ = tok
    with _client(None) as c, pytest.raises(AuthError, match="no credentials are configured") as ei:
        c.get_manifest(ImageReference.parse(reg.ref("private/img", "v1")))
    assert "private/img" in str(ei.value)
    # the client did get an (anonymous, access-less) token for the right scope and was still refused
    assert issuer.requests and issuer.requests[0] == ("", "repository:private/img:pull")


def test_token_pull_and_reuse(tok: tuple[Registry, TokenIssuer, Seeded], tmp_path: Path,
                              caplog: pytest.LogCaptureFixture) -> None:
    reg, issuer, seeded = tok
    caplog.set_level(logging.DEBUG)
    ref = ImageReference.parse(reg.ref("private/img", "v1"))
    with _client(_config(tmp_path, reg.host, "alice", PASSWORD)) as c:
        man, idx = c.resolve(ref)
        assert idx is None and man.digest == seeded.img.manifest_digest
        assert c.get_blob(ref, man.config.digest, size=man.config.size) == seeded.img.config
        assert c.get_blob(ref, seeded.big.digest, size=len(seeded.big.blob)) == seeded.big.blob
        assert c.read_ranges(ref, seeded.big.digest, [(0, 10), (1000, 10)]) == [
            seeded.big.blob[0:10], seeded.big.blob[1000:1010]]
        assert sorted(c.list_tags(ref)) == ["v1", "v2"]
        assert issuer.hits == 1, issuer.requests  # one token for everything above
        assert issuer.requests == [("alice", "repository:private/img:pull")]

    _assert_no_secret(caplog.text)


def _pool(c: RegistryClient, ref: ImageReference, layer: im.BuiltLayer, n: int = 6) -> None:
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def worker() -> None:
        try:
            start.wait(10)
            for _ in range(3):
                assert c.get_blob(ref, layer.digest, size=len(layer.blob)) == layer.blob
        except BaseException as e:  # collected, asserted empty below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


def test_token_shared_by_a_thread_pool(tok: tuple[Registry, TokenIssuer, Seeded], tmp_path: Path) -> None:
    """One client shared by worker threads: starting cold, they ask the token server once in total."""
    reg, issuer, seeded = tok
    ref = ImageReference.parse(reg.ref("private/img", "v1"))
    with _client(_config(tmp_path, reg.host, "alice", PASSWORD)) as c:
        _pool(c, ref, seeded.big)
        assert issuer.hits == 1, issuer.requests
        _pool(c, ref, seeded.big)
        assert issuer.hits == 1


def test_token_wrong_credentials(tok: tuple[Registry, TokenIssuer, Seeded], tmp_path: Path,
                                 caplog: pytest.LogCaptureFixture) -> None:
    reg, _, _ = tok
    caplog.set_level(logging.DEBUG)
    with _client(_config(tmp_path, reg.host, "alice", WRONG)) as c, pytest.raises(AuthError) as ei:
        c.get_manifest(ImageReference.parse(reg.ref("private/img", "v1")))
    msg = str(ei.value)
    assert "token server" in msg and "'alice'" in msg and "check the username/password" in msg
    _assert_no_secret(msg)
    _assert_no_secret(repr(ei.value))
    _assert_no_secret(caplog.text)
    # unknown user: same, and an AuthError is a CvmfsSnapError (CLIs map it)
    with _client(_config(tmp_path, reg.host, "bob", PASSWORD)) as c, pytest.raises(CvmfsSnapError) as ei2:
        c.get_manifest(ImageReference.parse(reg.ref("private/img", "v1")))
    assert isinstance(ei2.value, AuthError)
    _assert_no_secret(str(ei2.value))


def test_token_rejected_by_registry_is_renewed_once(tok: tuple[Registry, TokenIssuer, Seeded],
                                                    tmp_path: Path) -> None:
    """The token server hands out a token the registry considers expired: 401, fresh token, success."""
    reg, issuer, seeded = tok
    ref = ImageReference.parse(reg.ref("private/img", "v1"))
    with _client(_config(tmp_path, reg.host, "alice", PASSWORD)) as c:
        assert c.get_manifest(ref).digest == seeded.img.manifest_digest
        assert issuer.hits == 1
        issuer.expired_next = 1
        # force renewal: the cached token is still good, so drop it the way expiry would
        c._auth.tokens.invalidate(reg.host, "repository:private/img:pull")
        assert c.get_manifest(ref).digest == seeded.img.manifest_digest  # expired token -> 401 -> new token
        assert issuer.hits == 3
        # every token is bad: the single retry is not repeated forever
        issuer.expired_next = 100
        c._auth.tokens.invalidate(reg.host, "repository:private/img:pull")
        with pytest.raises(AuthError):
            c.get_manifest(ref)
        assert issuer.hits == 5


def test_token_expiry_by_client_clock(tok: tuple[Registry, TokenIssuer, Seeded], tmp_path: Path) -> None:
    reg, issuer, _ = tok
    issuer.expires_in = 120
    now = [0.0]
    ref = ImageReference.parse(reg.ref("private/img", "v1"))
    with _client(_config(tmp_path, reg.host, "alice", PASSWORD), clock=lambda: now[0]) as c:
        c.get_manifest(ref)
        now[0] += 100
        c.get_manifest(ref)
        assert issuer.hits == 1  # still valid
        now[0] += 15  # within the renewal margin of the 120 s lifetime
        c.get_manifest(ref)
        assert issuer.hits == 2
        # other repositories get tokens of their own scope
        with pytest.raises((NotFoundError, AuthError)):  # not pushed: the registry says NotFound or denied
            c.get_manifest(ImageReference.parse(reg.ref("private/other", "v1")))
        assert issuer.requests[-1] == ("alice", "repository:private/other:pull")


def test_credentials_repr_is_safe() -> None:
    cred = Credentials("alice", PASSWORD)
    store = CredentialStore({"registry.example.org": cred})
    for text in (repr(cred), str(cred), repr(store), repr(RegistryClient(credentials=store))):
        _assert_no_secret(text)
