"""Extras per role: the stratum-0 install (cvmfs-snap[publisher]) needs neither FUSE nor gRPC nor trio; the
development harness (devenv/, package cvmfs_snap_devenv) is a distribution of its own that no site install carries."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from tests.support.wheel import build_wheel

ROOT = Path(__file__).resolve().parents[1]
NODE_ONLY = ("trio", "grpc", "google.protobuf")

_PROBE = """
import importlib, pkgutil, sys
for name in {blocked!r}:
    sys.modules[name] = None  # any import of it raises ImportError, as in an install without the node extra
import publisher
mods = [m.name for m in pkgutil.walk_packages(publisher.__path__, "publisher.")]
for m in mods:
    importlib.import_module(m)
print(len(mods))
"""


def test_publisher_imports_without_node_dependencies() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", _PROBE.format(blocked=NODE_ONLY)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) >= 20  # every publisher module was imported


def test_extras_per_role() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    extras = project["optional-dependencies"]
    for name in ("trio", "grpcio", "hypercorn", "watchdog"):
        assert name not in core, f"{name} is a role's dependency, not a core one"
    assert any(d.startswith("trio") for d in extras["node"]) and any(d.startswith("grpcio") for d in extras["node"])
    assert not any(d.startswith(("trio", "grpcio")) for d in extras["publisher"])
    # the lazy mount speaks the FUSE protocol itself: no libfuse binding (pyfuse3 builds from source only)
    assert not any(d.startswith("pyfuse3") for ds in extras.values() for d in ds)
    assert "cvmfs-snap[node,publisher,test]" in extras["dev"]
    assert "devenv" not in extras  # an extra cannot leave a package out: the harness is its own distribution
    harness = tomllib.loads((ROOT / "devenv" / "pyproject.toml").read_text())["project"]
    assert harness["name"] == "cvmfs-snap-devenv" and harness["dependencies"] == ["cvmfs-snap[node,publisher]"]
    # the tests, the demo and the benchmarks get everything
    assert "-e '.[dev]' -e ./devenv" in (ROOT / "scripts" / "install-deps").read_text()


def test_the_main_wheel_carries_no_harness(tmp_path: Path) -> None:
    """A site's wheel of cvmfs-snap has the node and publisher code and nothing of the demo's/tests' harness; the
    harness's own wheel has it."""
    with zipfile.ZipFile(build_wheel(tmp_path / "main")) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "cvmfs_snap/cli.py" in names and "publisher/cli.py" in names and "cvmfs_snap/layer/apply.py" in names
    assert [n for n in names if "devenv" in n or n.startswith("cvmfs_snap/demo")] == []
    assert "Provides-Extra: devenv" not in meta and "Provides-Extra: node" in meta
    with zipfile.ZipFile(build_wheel(tmp_path / "harness", "devenv")) as z:
        harness = z.namelist()
    assert {"cvmfs_snap_devenv/demo.py", "cvmfs_snap_devenv/registry.py", "cvmfs_snap_devenv/py.typed"} <= set(harness)
    assert not [n for n in harness if n.startswith(("cvmfs_snap/", "publisher/"))]


_NO_HARNESS = """
import sys
sys.modules["cvmfs_snap_devenv"] = None  # as in a site install: the harness's distribution is not there
from cvmfs_snap.cli import main
sys.exit(main({argv!r}))
"""


def test_demo_without_the_harness_says_what_to_install() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", _NO_HARNESS.format(argv=["demo"])], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "cvmfs-snap demo: needs cvmfs-snap's development harness" in r.stderr
    assert "pip install ./devenv" in r.stderr and "Traceback" not in r.stderr
    # the other subcommands are unaffected
    r = subprocess.run([sys.executable, "-c", _NO_HARNESS.format(argv=["status", "--help"])], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--root" in r.stdout, r.stderr
