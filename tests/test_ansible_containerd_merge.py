"""The role's containerd config merge (ansible/roles/cvmfs_snap_snapshotter/library/cvmfs_snap_containerd_config.py):
the merge itself on parsed configs, and the module through ansible for the cases that must not write."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.support.playbooks import ANSIBLE_DIR, ansible_env

LIBRARY = ANSIBLE_DIR / "roles" / "cvmfs_snap_snapshotter" / "library"
SOCK = "/run/containerd-cvmfs-grpc/containerd-cvmfs-grpc.sock"
CRI = "io.containerd.grpc.v1.cri"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cvmfs_snap_containerd_config", LIBRARY /
                                                  "cvmfs_snap_containerd_config.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


merge_module = _load()


def merge(data: dict[str, Any], cri: bool = True, mirrors: dict[str, Any] | None = None) -> dict[str, Any]:
    result: dict[str, Any] = merge_module.merge(data, "cvmfs-snapshotter", SOCK, cri, "config.toml", mirrors)
    return result


SITE = tomllib.loads(f"""
version = 2
root = "/var/lib/containerd"
[proxy_plugins.stargz]
  type = "snapshot"
  address = "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock"
[plugins."{CRI}".containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[plugins."{CRI}".containerd.runtimes.runc.options]
  SystemdCgroup = true
[plugins."{CRI}".registry.mirrors."docker.io"]
  endpoint = ["https://mirror.example.org"]
""")


def test_empty_config_becomes_version_2_with_the_plugin() -> None:
    assert merge({}, cri=False) == {"version": 2, "proxy_plugins": {
        "cvmfs-snapshotter": {"type": "snapshot", "address": SOCK}}}


def test_site_settings_are_kept_and_ours_are_set() -> None:
    original = copy.deepcopy(SITE)
    merged = merge(SITE)
    assert original == SITE, "the input is not modified"
    assert merged["proxy_plugins"]["stargz"] == SITE["proxy_plugins"]["stargz"]
    assert merged["proxy_plugins"]["cvmfs-snapshotter"] == {"type": "snapshot", "address": SOCK}
    ctd = merged["plugins"][CRI]["containerd"]
    assert ctd["snapshotter"] == "cvmfs-snapshotter" and ctd["disable_snapshot_annotations"] is False
    assert ctd["default_runtime_name"] == "runc"
    assert ctd["runtimes"] == SITE["plugins"][CRI]["containerd"]["runtimes"]
    assert merged["plugins"][CRI]["registry"] == SITE["plugins"][CRI]["registry"]
    assert merged["root"] == "/var/lib/containerd"


def test_merge_is_idempotent() -> None:
    once = merge(SITE)
    assert merge(once) == once


def test_without_kubernetes_cri_is_not_touched() -> None:
    merged = merge(SITE, cri=False)
    assert merged["plugins"] == SITE["plugins"]


def test_registry_mirrors_are_set_and_other_hosts_kept() -> None:
    merged = merge(SITE, mirrors={"registry.cern.ch": ["https://m1.example.org", "https://m2.example.org"]})
    mirrors = merged["plugins"][CRI]["registry"]["mirrors"]
    assert mirrors == {"docker.io": {"endpoint": ["https://mirror.example.org"]},
                       "registry.cern.ch": {"endpoint": ["https://m1.example.org", "https://m2.example.org"]}}
    replaced = merge(SITE, mirrors={"docker.io": ["https://new.example.org"]})
    assert replaced["plugins"][CRI]["registry"]["mirrors"] == {"docker.io": {"endpoint": ["https://new.example.org"]}}


@pytest.mark.parametrize(("config", "mirrors", "message"), [
    ({"version": 2}, {"docker.io": []}, "give a non-empty list of endpoint URLs"),
    ({"version": 2}, {"docker.io": "https://m.example.org"}, "give a non-empty list of endpoint URLs"),
    ({"version": 2, "plugins": {CRI: {"registry": {"config_path": "/etc/containerd/certs.d"}}}},
     {"docker.io": ["https://m.example.org"]}, "refuses mirrors beside it"),
])
def test_unusable_mirrors_are_refused(config: dict[str, Any], mirrors: dict[str, Any], message: str) -> None:
    with pytest.raises(merge_module.MergeError, match=re.escape(message)):
        merge(config, mirrors=mirrors)


@pytest.mark.parametrize(("config", "message"), [
    ({"root": "/var/lib/containerd"}, "no 'version' key"),
    ({"version": 1, "root": "/x"}, "version 1"),
    ({"version": 3}, "version 3"),
    ({"version": 2, "proxy_plugins": "nope"}, "proxy_plugins is a str, not a table"),
    ({"version": 2, "plugins": {CRI: {"containerd": []}}}, f'plugins."{CRI}".containerd is a list'),
])
def test_configs_it_cannot_merge_are_refused_with_what_to_fix(config: dict[str, Any], message: str) -> None:
    with pytest.raises(merge_module.MergeError, match=re.escape(message)):
        merge(config)


def _adhoc(tmp: Path, path: Path, *extra: str) -> dict[str, Any]:
    """The module through ``ansible localhost -m`` (this Python; tomli-w is not needed for these cases)."""
    args = json.dumps({"path": str(path), "plugin_name": "cvmfs-snapshotter", "address": SOCK, "cri": True})
    env = ansible_env(tmp / "record.jsonl")
    env.update({"ANSIBLE_LIBRARY": str(LIBRARY), "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1",
                "ANSIBLE_STDOUT_CALLBACK": "oneline", "ANSIBLE_PYTHON_INTERPRETER": sys.executable})
    r = subprocess.run(["ansible", "localhost", "-c", "local", "-i", "localhost,", "-m",
                        "cvmfs_snap_containerd_config", "-a", args, *extra],
                       cwd=tmp, env=env, capture_output=True, text=True, timeout=120)
    out = r.stdout
    assert "=>" in out, out + r.stderr
    result: dict[str, Any] = json.loads(out.split("=>", 1)[1])
    result["rc"] = r.returncode
    return result


def test_module_refuses_a_version_1_file_and_leaves_it_alone(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    text = "# old\n[plugins.cri]\n  sandbox_image = \"pause:3.2\"\n"
    path.write_text(text)
    res = _adhoc(tmp_path, path)
    assert res["rc"] != 0 and "no 'version' key" in res["msg"]
    assert path.read_text() == text


def test_module_leaves_a_merged_file_byte_for_byte(tmp_path: Path) -> None:
    """A file that has our settings already is not rewritten: the site's comments and layout stay."""
    path = tmp_path / "config.toml"
    text = (f'version = 2\n# keep me\n[proxy_plugins."cvmfs-snapshotter"]\n  type = "snapshot"\n  address = "{SOCK}"\n'
            f'[plugins."{CRI}".containerd]\n  snapshotter = "cvmfs-snapshotter"  # ours\n'
            "  disable_snapshot_annotations = false\n")
    path.write_text(text)
    res = _adhoc(tmp_path, path)
    assert res["rc"] == 0 and res["changed"] is False
    assert path.read_text() == text


def test_module_in_check_mode_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "config.toml"
    res = _adhoc(tmp_path, path, "--check", "--diff")
    assert res["rc"] == 0 and res["changed"] is True
    assert not path.parent.exists()


def test_module_refuses_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("version = 2\n[proxy_plugins\n")
    res = _adhoc(tmp_path, path)
    assert res["rc"] != 0 and "is not valid TOML" in res["msg"]
