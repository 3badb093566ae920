"""Running the ansible/ playbooks from the tests: real ansible-playbook against localhost (local connection), with
a recording callback so that a test can see which tasks changed, their diffs and the recap."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support.paths import REPO_ROOT

ANSIBLE_DIR = REPO_ROOT / "ansible"
CALLBACK_DIR = Path(__file__).with_name("ansible_callback")
ANSIBLE_PLAYBOOK = shutil.which("ansible-playbook") or "ansible-playbook"
ANSIBLE_LINT = shutil.which("ansible-lint") or "ansible-lint"

_RECAP = re.compile(r"^(?P<host>\S+)\s+:\s+(?P<counts>(?:\w+=\d+\s*)+)$", re.M)


@dataclass
class PlaybookRun:
    rc: int
    output: str
    results: list[dict[str, Any]]

    def recap(self, host: str = "localhost") -> dict[str, int]:
        """The PLAY RECAP counters of ``host`` (ok, changed, failed, ...)."""
        for m in _RECAP.finditer(self.output):
            if m.group("host") == host:
                return {k: int(v) for k, v in (kv.split("=") for kv in m.group("counts").split())}
        raise AssertionError(f"no recap for {host} in:\n{self.output[-3000:]}")

    def changed(self) -> list[str]:
        """``role : task`` of every task that changed something."""
        return [f"{r['role']} : {r['task']}" for r in self.results if r["changed"]]

    def handlers(self) -> list[str]:
        """``role : handler`` of every handler that was notified (it runs, or is skipped without systemd)."""
        return [f"{r['role']} : {r['task']}" for r in self.results if r.get("handler")]

    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.results if r["status"] in ("failed", "unreachable")]


def ansible_env(record: Path) -> dict[str, str]:
    """The environment of a run: the tree's ansible.cfg, the recording callback, and no PYTHONPATH, so that the
    programs the roles install run from their virtualenv and not from this checkout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({
        "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
        "ANSIBLE_CALLBACK_PLUGINS": str(CALLBACK_DIR),
        "ANSIBLE_CALLBACKS_ENABLED": "cvmfs_snap_record",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "CVMFS_SNAP_ANSIBLE_RECORD": str(record),
    })
    return env


def run_playbook(playbook: str, inventory: Path, *args: str, timeout: float = 900) -> PlaybookRun:
    """ansible-playbook ``ansible/<playbook>`` with ``inventory``; never raises on a failed run."""
    record = inventory.parent / f"record-{os.getpid()}-{len(list(inventory.parent.glob('record-*')))}.jsonl"
    r = subprocess.run([ANSIBLE_PLAYBOOK, "-i", str(inventory), str(ANSIBLE_DIR / playbook), *args],
                       cwd=ANSIBLE_DIR, env=ansible_env(record), capture_output=True, text=True, timeout=timeout)
    results = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    return PlaybookRun(r.returncode, r.stdout + r.stderr, results)


def localhost_inventory(path: Path, groups: list[str], variables: dict[str, Any]) -> Path:
    """An inventory with localhost (local connection, this Python) in ``groups``."""
    host = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    inv = {"all": {"hosts": {"localhost": host}, "vars": variables,
                   "children": {g: {"hosts": {"localhost": None}} for g in groups}}}
    path.write_text(yaml.safe_dump(inv, sort_keys=False))
    return path


@dataclass
class Unit:
    """The parts of a rendered systemd unit a test needs to start its program the way systemd would."""

    exec_start: list[str]
    environment: dict[str, str]
    environment_files: list[Path]
    settings: dict[str, list[str]]

    def env(self) -> dict[str, str]:
        """Environment of the service: the given variables, then each EnvironmentFile's (as systemd reads them)."""
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(self.environment)
        for f in self.environment_files:
            for line in f.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#") and "=" in line:
                    k, v = line.split("=", 1)
                    env[k.strip()] = v.strip()
        return env


def read_unit(path: Path) -> Unit:
    settings: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")) or "=" not in line:
            continue
        k, v = line.split("=", 1)
        settings.setdefault(k, []).append(v)
    environment: dict[str, str] = {}
    for assignment in settings.get("Environment", []):
        for word in shlex.split(assignment):
            k, v = word.split("=", 1)
            environment[k] = v
    files = [Path(f.lstrip("-")) for f in settings.get("EnvironmentFile", [])]
    (exec_start,) = settings["ExecStart"]
    return Unit(shlex.split(exec_start), environment, files, settings)
