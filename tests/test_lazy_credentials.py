"""Credentials of ``cvmfs-snap pull --user`` for the lazy path, end to end: a loopback docker-registry that requires
htpasswd auth, an eStargz image pushed there, real containerd + our snapshotter daemon (its node docker config
empty) + the real lazyfs process.

* with ``--user`` (password on stdin) the pull hands the credentials to the snapshotter over its credentials
  socket; the layers are served lazily (not downloaded), a container reads them, and the password appears in no
  log, metrics text, metadata db, record or lazyfs state;
* when the snapshotter cannot take them (no credentials socket) the layers fall back to a normal pull;
* without ``--user`` the pull fails with a clear 401 message naming no secret.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cvmfs_snap.errors import UnavailableError
from cvmfs_snap.fsutil import walk
from cvmfs_snap.oci.auth import Credentials
from cvmfs_snap.snapshotter.credentials import (
    DEFAULT_SOCKET,
    MAX_TTL,
    CredentialServer,
    PullCredentials,
    hand_over,
    handle_request,
    socket_for,
)
from cvmfs_snap.snapshotter.defaults import DEFAULT_ADDRESS
from cvmfs_snap_devenv.images import BuiltImage, Pusher, estargz_layer, image
from cvmfs_snap_devenv.registry import Registry, blob_gets, free_port, htpasswd_auth, log_mark, start_registry
from tests.support.e2e import PLUGIN
from tests.support.runnable import require_busybox
from tests.test_lazy_e2e import LAZYFS, busybox_estargz, lazy_node

pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.skipif(not LAZYFS.exists(), reason="no lazyfs process on this branch"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
]

PASSWORD = "s3cret-lazy-Pull-pw"


@pytest.fixture(scope="module")
def private_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    root = tmp_path_factory.mktemp("lazy-creds")
    with start_registry(root, htpasswd_auth(root, "alice", PASSWORD)) as reg:
        yield reg


def push_private(reg: Registry, repo: str) -> tuple[str, BuiltImage]:
    require_busybox()
    img = image([busybox_estargz(), estargz_layer(["data/", ("data/private.txt", b"private lazy bytes\n")])],
                cmd=("/bin/sh",))
    p = Pusher(reg.url, auth=("alice", PASSWORD))
    try:
        p.image(repo, "v1", img)
    finally:
        p.close()
    return reg.ref(repo, "v1"), img


def pull(address: str, ref: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cvmfs_snap.cli", "pull", "--address", address, "--snapshotter", PLUGIN,
         "--plain-http", "--json", *args, ref], input=stdin, capture_output=True, text=True, timeout=600)


def test_pull_user_credentials_serve_lazy_layers_and_leak_nowhere(private_registry: Registry,
                                                                   short_tmp: Path) -> None:
    reg = private_registry
    ref, img = push_private(reg, "creds/app")
    empty = short_tmp / "docker-empty.json"
    empty.write_text("{}")  # the node itself has no credentials for the registry
    lazy_port, snap_port = free_port(), free_port()
    extra = (f'docker-config = "{empty}"\nmetrics-address = "127.0.0.1:{lazy_port}"\n'
             f'[cvmfs-snap]\nmetrics-address = "127.0.0.1:{snap_port}"\n')
    with lazy_node(short_tmp, extra) as n:
        sock = socket_for(n.snapshotter.address)
        assert sock.exists() and (sock.stat().st_mode & 0o777) == 0o600
        mark = log_mark(reg.log)
        r = pull(n.containerd.address, ref, "--user", "alice", "--password-stdin", "--credentials-socket",
                 str(sock), stdin=PASSWORD + "\n")
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert [lay["outcome"] for lay in out["layers"]] == ["remote", "remote"], out
        sizes = {lay.digest: len(lay.blob) for lay in img.layers}
        whole = [g for g in blob_gets(reg.log, mark) if g.status == 200 and g.size == sizes.get(g.digest)]
        assert not whole, whole  # no layer blob downloaded whole: they are served lazily
        c = n.containerd.ctr("run", "--rm", "--snapshotter", PLUGIN, ref, "creds-read", "/bin/cat",
                             "/data/private.txt", check=False)
        assert c.returncode == 0 and c.stdout == "private lazy bytes\n", c.stderr
        metrics = httpx.get(f"http://127.0.0.1:{lazy_port}/metrics", timeout=10).text
        metrics += httpx.get(f"http://127.0.0.1:{snap_port}/metrics", timeout=10).text
        assert "cvmfs_snap_lazy_fetched_bytes_total" in metrics
        lazy_root = n.lazy_root
        texts = {"pull output": r.stdout + r.stderr, "metrics": metrics,
                 "daemon log": n.snapshotter.log.read_text(errors="replace")}
        bolt = [Path(d) / f for d, _, fs in walk(n.containerd.root) for f in fs if f == "meta.db"]
        assert bolt  # containerd's own metadata (its labels) holds no credential either
        for p in [*n.snapshotter.root.glob("metadata.db*"), lazy_root / "state.json", lazy_root / "lazyfs.log",
                  *(lazy_root / "layers").iterdir(), *bolt, n.containerd.log]:
            texts[str(p)] = p.read_bytes().decode("latin-1")
        assert any("handed over by a pull" in t for t in texts.values())
        for where, text in texts.items():
            assert PASSWORD not in text, where


def test_pull_credentials_not_taken_fall_back_to_a_normal_pull(private_registry: Registry,
                                                                short_tmp: Path) -> None:
    reg = private_registry
    ref, _ = push_private(reg, "creds/fallback")
    empty = short_tmp / "docker-empty.json"
    empty.write_text("{}")
    with lazy_node(short_tmp, f'docker-config = "{empty}"\n') as n:
        # the pull's own requests have the credentials, the snapshotter does not: lazy lookups get 401
        r = pull(n.containerd.address, ref, "--user", f"alice:{PASSWORD}", "--credentials-socket",
                 str(short_tmp / "nowhere.sock"))
        assert r.returncode == 0, r.stderr
        assert "cannot use its credentials" in r.stderr and PASSWORD not in r.stderr
        assert [lay["outcome"] for lay in json.loads(r.stdout)["layers"]] == ["pulled", "pulled"]
        log = n.snapshotter.log.read_text(errors="replace")
        assert "401" in log and PASSWORD not in log
        # and without --user at all the pull fails with a clear message
        r2 = pull(n.containerd.address, reg.ref("creds/fallback", "v1"))
        assert r2.returncode != 0
        assert "HTTP 401" in r2.stderr and "no credentials are configured" in r2.stderr, r2.stderr
        assert "--user" in r2.stderr


def test_handed_credentials_expire_and_are_keyed_by_repository() -> None:
    now = [100.0]
    store = PullCredentials(clock=lambda: now[0])
    assert store.put("127.0.0.1:5000/team/app:v1", Credentials("alice", PASSWORD), ttl=30) == 30
    assert store.get("127.0.0.1:5000/team/app@sha256:" + "a" * 64) == Credentials("alice", PASSWORD)
    assert store.get("127.0.0.1:5000/team/other:v1") is None  # another repository: not these credentials
    assert store.get("not a reference!") is None
    assert PASSWORD not in repr(store)
    now[0] += 31
    assert store.get("127.0.0.1:5000/team/app:v1") is None and len(store) == 0
    assert store.put("h.example/r", Credentials("a", "b"), ttl=10 * MAX_TTL) == MAX_TTL
    assert socket_for(DEFAULT_ADDRESS) == DEFAULT_SOCKET


def test_credentials_socket_refuses_bad_requests_without_echoing(short_tmp: Path) -> None:
    store = PullCredentials()
    server = CredentialServer(short_tmp / "c.sock", store)
    server.start()
    try:
        assert (short_tmp / "c.sock").stat().st_mode & 0o777 == 0o600
        assert hand_over(short_tmp / "c.sock", "h.example/team/app:v1", Credentials("bob", PASSWORD)) == MAX_TTL
        assert store.get("h.example/team/app") == Credentials("bob", PASSWORD)
        with pytest.raises(UnavailableError) as e:
            hand_over(short_tmp / "c.sock", "h.example/Bad Ref", Credentials("bob", PASSWORD))
        assert PASSWORD not in str(e.value) and "refused" in str(e.value)
        answer = handle_request(json.dumps({"op": "credentials", "image_ref": "h/r", "username": "u",
                                            "secret": PASSWORD, "ttl": -1}).encode(), store)
        assert answer["ok"] is False and PASSWORD not in json.dumps(answer)
    finally:
        server.close()
    assert not (short_tmp / "c.sock").exists()
    with pytest.raises(UnavailableError, match="does not answer"):
        hand_over(short_tmp / "c.sock", "h.example/team/app:v1", Credentials("bob", PASSWORD))


def test_user_option_password_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from cvmfs_snap.containerd.pull import user_credentials
    from cvmfs_snap.errors import InvalidInputError

    assert user_credentials("alice:pa:ss") == Credentials("alice", "pa:ss")  # the first ':' splits
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert user_credentials("alice", password_stdin=True) == Credentials("alice", PASSWORD)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # not a terminal, no --password-stdin: refused
    with pytest.raises(InvalidInputError, match="--password-stdin"):
        user_credentials("alice")
    with pytest.raises(InvalidInputError, match="user name"):
        user_credentials(":pw")
    with pytest.raises(InvalidInputError, match="one of them"):
        user_credentials("alice:pw", password_stdin=True)
