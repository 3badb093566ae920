"""``cvmfs-snap pull`` start-up (issue 7 item 18): what the process imports and sets up, not how long it takes (the
timing goal lives in bench/pull_startup.py).

The pull runs as its own process (the console script calls ``main()`` without argv). It must not import trio or
anyio (httpcore imports them for its async half), h2, rich (only a terminal progress display needs it; not
``--json``, not a non-tty), httpx's own command line or its zstd/brotli decoders; it must not load a CA bundle
for a plain-HTTP (loopback) registry; and it ends through the fast exit, with its output flushed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cvmfs_snap.oci import ImageReference, RegistryClient
from cvmfs_snap.oci import transport as oci_transport
from cvmfs_snap_devenv import images as im
from cvmfs_snap_devenv.registry import Registry
from tests.support.http_servers import Reply, serve

ROOT = Path(__file__).resolve().parent.parent

PROBE = textwrap.dedent("""
    import json, os, sys
    real_exit = os._exit
    def probe_exit(rc):
        heavy = sorted(k for k, m in sys.modules.items() if m is not None
                       and k.split(".")[0] in ("trio", "anyio", "rich", "click", "pygments", "httpcore", "h2",
                                               "zstandard", "brotli"))
        tls = sys.modules["cvmfs_snap.oci.transport"].tls_contexts_made()
        sys.stderr.write("PROBE " + json.dumps({"rc": rc, "modules": heavy, "tls": tls}) + "\\n")
        sys.stderr.flush()
        real_exit(rc)
    os._exit = probe_exit
    sys.argv = ["cvmfs-snap", *sys.argv[1:]]
    from cvmfs_snap.cli import main
    main()
    raise SystemExit("fast exit not taken")
""")


def _run_pull(*args: str, command: str = "pull") -> tuple[dict[str, object], str, str]:
    """Run ``cvmfs-snap pull ARGS`` (or another command) as its own process: (probe at exit, stderr, stdout)."""
    r = subprocess.run([sys.executable, "-c", PROBE, command, *args], capture_output=True, text=True, timeout=120,
                       cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL)
    line = next((ln for ln in r.stderr.splitlines() if ln.startswith("PROBE ")), None)
    assert line is not None, r.stderr[-3000:]
    return json.loads(line[len("PROBE "):]), r.stderr, r.stdout


@pytest.mark.parametrize("json_flag", [True, False])
def test_pull_process_imports_and_exit(json_flag: bool) -> None:
    """A pull that fails at containerd (no socket) after creating its registry client: httpcore is there (the
    client exists), trio/anyio/rich/click/pygments are not, no TLS context was made, and the error is clear."""
    with serve(lambda r: Reply(404)) as srv:
        probe, err, _ = _run_pull("--address", "/nonexistent/containerd.sock", *(["--json"] if json_flag else []),
                               f"{srv.host}/x/y:v1")
    assert probe["rc"] != 0 and "containerd is not running" in err
    assert probe["modules"] == ["httpcore"] or all(m.startswith("httpcore") for m in probe["modules"]), probe
    assert probe["tls"] == 0


def test_plain_http_registry_never_creates_a_tls_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CA bundle is loaded lazily: plain-HTTP (loopback) traffic works with TLS set-up broken."""
    def no_tls(_ca: str | None) -> object:
        raise AssertionError("a TLS context was created for a plain-HTTP registry")

    monkeypatch.setattr(oci_transport, "_ssl_context", no_tls)
    img = im.image([im.layer([("x", b"x")])])
    with serve(lambda r: Reply(200, {"Content-Type": im.OCI_MANIFEST}, img.manifest)) as srv, \
            RegistryClient(timeout=5, retries=0) as c:
        assert c.get_manifest(ImageReference.parse(f"{srv.host}/a/b:v1")).digest == img.manifest_digest


def test_whole_pull_as_its_own_process(registry: Registry) -> None:
    """The real command, as the console script runs it (skipped imports, fast exit), pulls an image into a real
    containerd and prints its JSON in full."""
    from tests.support.pullcheck import containerd_in_tmp
    from tests.support.runnable import push_runnable, require_busybox

    require_busybox()
    p = push_runnable(registry.url, registry.host, "startup/whole", extra=1)
    with containerd_in_tmp() as cd:
        probe, err, out = _run_pull("--address", cd.address, "--snapshotter", "overlayfs", "--json", p.ref)
        assert probe["rc"] == 0, err[-2000:]
        assert json.loads(out)["name"] == p.ref  # the whole JSON made it out before the fast exit
        assert probe["modules"] and all(m.startswith("httpcore") for m in probe["modules"]), probe
        r = cd.ctr("images", "ls", "-q", check=False)
        assert p.ref in r.stdout.split()


def test_convert_as_its_own_process_skips_trio_h2_and_exits_fast(registry: Registry) -> None:
    """``cvmfs-snap convert`` (issue 8: its start-up is serial time the second worker cannot share) converts an
    image without importing trio, anyio, h2, brotli or httpx's command line, and ends through the fast exit with its
    JSON written whole. zstandard stays allowed: zstd layers need it."""
    from cvmfs_snap.oci import Manifest
    from cvmfs_snap_devenv.images import Pusher

    img = im.image([im.layer([("a/x", b"x" * 5000), ("a/y", b"y")]), im.layer([("b", b"b" * 100_000)])])
    pusher = Pusher(registry.url)
    try:
        pusher.image("startup/conv", "v1", img)
    finally:
        pusher.close()
    dst = f"{registry.host}/startup/conv:esgz"
    probe, err, out = _run_pull("--json", "--workers", "2", f"{registry.host}/startup/conv:v1", dst,
                                command="convert")
    assert probe["rc"] == 0, err[-2000:]
    assert len(json.loads(out)["layers"]) == 2
    assert all(m.split(".")[0] in ("httpcore", "zstandard") for m in probe["modules"]), probe
    with RegistryClient(timeout=5, retries=0) as c:
        m = c.get_manifest(ImageReference.parse(dst))
    assert isinstance(m, Manifest) and len(m.layers) == 2
