"""Extras per role: the stratum-0 install (cvmfs-snap[publisher]) needs neither FUSE nor gRPC nor trio."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NODE_ONLY = ("pyfuse3", "trio", "grpc", "google.protobuf")

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
    for name in ("pyfuse3", "trio", "grpcio", "hypercorn", "watchdog"):
        assert name not in core, f"{name} is a role's dependency, not a core one"
    assert any(d.startswith("pyfuse3") for d in extras["node"]) and any(d.startswith("trio") for d in extras["node"])
    assert not any(d.startswith(("pyfuse3", "trio", "grpcio")) for d in extras["publisher"])
    assert "cvmfs-snap[node,publisher,devenv,test]" in extras["dev"]
    assert "'.[dev]'" in (ROOT / "scripts" / "install-deps").read_text()  # the tests get everything
