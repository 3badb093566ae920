"""Resident memory of the node's two long-running processes (issue 9's RSS goal; the numbers live in
bench/README.md, measured by bench/lazy_pull.py and bench/lazy_fs.py): what they import, and what a lazy layer's
TOC costs once parsed."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PROBE = textwrap.dedent("""
    import atexit, json, sys
    def probe():
        heavy = sorted({k.split(".")[0] for k, m in sys.modules.items() if m is not None
                        and k.split(".")[0] in ("trio", "anyio", "rich", "click", "pygments", "h2", "hpack",
                                                "pyfuse3", "grpc", "httpx")})
        sys.stderr.write("PROBE " + json.dumps(heavy) + "\\n")
    atexit.register(probe)
    sys.argv = ["cvmfs-snap", *sys.argv[1:]]
    from cvmfs_snap.cli import main
    main()
""")


@pytest.mark.parametrize(("command", "expected"), [
    ("snapshotter", ["grpc", "httpx"]),  # no trio (the control client is blocking), no FUSE
    ("lazyfs", ["httpx", "pyfuse3", "trio"]),
])
def test_process_imports_only_what_it_uses(command: str, expected: list[str]) -> None:
    """The process as the console script starts it (``--help`` ends it once its subcommand module is imported):
    httpx's own command line (click, rich, pygments), HTTP/2 and anyio are not loaded, and the daemon has no trio."""
    r = subprocess.run([sys.executable, "-c", PROBE, command, "--help"], capture_output=True, text=True,
                       timeout=120, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next((ln for ln in r.stderr.splitlines() if ln.startswith("PROBE ")), None)
    assert line is not None, r.stderr[-3000:]
    assert json.loads(line[len("PROBE "):]) == expected
