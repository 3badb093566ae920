"""The ansible/ tree passes ansible-playbook --syntax-check and ansible-lint's production profile, and every role
variable has a documented default and an argument_specs entry that agree."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.playbooks import ANSIBLE_DIR, ANSIBLE_LINT, ANSIBLE_PLAYBOOK, ansible_env

ROLES = sorted(p.name for p in (ANSIBLE_DIR / "roles").iterdir() if p.is_dir())
PLAYBOOKS = ["site.yml", "verify.yml"]


def test_the_roles_are_there() -> None:
    assert ROLES == ["cvmfs_snap_install", "cvmfs_snap_publisher", "cvmfs_snap_snapshotter"]


@pytest.mark.parametrize("playbook", PLAYBOOKS)
def test_syntax_check(playbook: str, tmp_path: Path) -> None:
    r = subprocess.run([ANSIBLE_PLAYBOOK, "--syntax-check", playbook], cwd=ANSIBLE_DIR,
                       env=ansible_env(tmp_path / "record.jsonl"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.slow
def test_ansible_lint_production_profile(tmp_path: Path) -> None:
    """ansible-lint (settings in ansible/.ansible-lint: production profile, offline) on every playbook and role."""
    env = ansible_env(tmp_path / "record.jsonl")
    env["HOME"] = str(tmp_path)  # its caches, not the user's
    r = subprocess.run([ANSIBLE_LINT, "--profile", "production", "--offline", "--nocolor"], cwd=ANSIBLE_DIR, env=env,
                       capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert "Profile 'production' was required, and it passed" in out, out[-3000:]


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("role", ROLES)
def test_every_variable_has_a_default_and_an_argument_spec(role: str) -> None:
    root = ANSIBLE_DIR / "roles" / role
    defaults: dict[str, Any] = _yaml(root / "defaults" / "main.yml")
    options: dict[str, Any] = _yaml(root / "meta" / "argument_specs.yml")["argument_specs"]["main"]["options"]
    assert sorted(defaults) == sorted(options)
    for name, spec in options.items():
        assert name.startswith(f"{role}_"), name
        assert spec.get("description"), f"{name} has no description"
        assert spec.get("default") == defaults[name], f"{name}: argument_specs default differs from defaults/main.yml"
        assert not spec.get("required"), f"{name}: required options have no default"
    # every default is explained by a comment line just above it in defaults/main.yml
    lines = (root / "defaults" / "main.yml").read_text().splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith((" ", "#", "-")) and line.split(":")[0] in defaults:
            above = lines[i - 1]
            assert above.startswith("#") or lines[i - 2].startswith("#"), f"{line}: no comment above it"


def _host_vars(host: str, tmp: Path) -> dict[str, Any]:
    r = subprocess.run(["ansible-inventory", "-i", "inventories/example/hosts.yml", "--host", host], cwd=ANSIBLE_DIR,
                       env=ansible_env(tmp / "record.jsonl"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    result: dict[str, Any] = yaml.safe_load(r.stdout)
    return result


def test_example_inventory_gives_each_site_its_settings(tmp_path: Path) -> None:
    """The README's claims about the example inventory: site groups win over publishers/nodes, host_vars over
    both."""
    desy = _host_vars("stratum0.desy.example.org", tmp_path)
    assert desy["cvmfs_snap_publisher_backend"] == "cvmfs-transaction"
    assert desy["cvmfs_snap_publisher_lease_path"] == "images"
    assert desy["cvmfs_snap_publisher_repo"] == "unpacked.desy.example.org"
    cern = _host_vars("cvmfs-stratum0.cern.example.org", tmp_path)
    assert cern["cvmfs_snap_publisher_backend"] == "cvmfs-ingest"
    assert cern["cvmfs_snap_publisher_listen"] == "0.0.0.0:8080"
    assert _host_vars("wn002.cern.example.org", tmp_path)["cvmfs_snap_snapshotter_kubernetes"] is True
    wn001 = _host_vars("wn001.cern.example.org", tmp_path)
    assert wn001["cvmfs_snap_snapshotter_kubernetes"] is False
    assert wn001["cvmfs_snap_snapshotter_repository"] == "unpacked.cern.ch"
    assert "registry.cern.ch/atlas/*" in wn001["cvmfs_snap_publisher_publish_on_miss_allow"]
