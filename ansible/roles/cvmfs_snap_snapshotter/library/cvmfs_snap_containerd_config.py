#!/usr/bin/python
"""Ansible module: merge the cvmfs-snap proxy plugin (and CRI settings) into containerd's config.toml (version 2).

The site's file is read with tomllib, our keys are set in the parsed data, and the file is rewritten (tomli-w)
only when the data changed, so every other setting of the site (registry mirrors, runtimes, paths) stays as it was.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
from typing import Any

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
---
module: cvmfs_snap_containerd_config
short_description: Merge the cvmfs-snap snapshotter into containerd's config.toml
description:
  - Adds C([proxy_plugins.NAME]) (type snapshot, the snapshotter's socket) and, for Kubernetes nodes, CRI's
    C(snapshotter = NAME) and C(disable_snapshot_annotations = false) to a containerd config of version 2.
  - Everything else in the file is kept. The file is rewritten only when a setting changes; comments of a
    rewritten file are lost (keep I(backup) on to have the original).
  - Needs tomllib (Python 3.11) or tomli to read and tomli-w to write, on the target's interpreter.
options:
  path:
    description: containerd's config file; a missing or empty file becomes a version 2 config.
    type: path
    required: true
  plugin_name:
    description: Name of the proxy plugin.
    type: str
    required: true
  address:
    description: The snapshotter's unix socket.
    type: str
    required: true
  cri:
    description: Also set CRI's snapshotter and disable_snapshot_annotations = false (Kubernetes nodes).
    type: bool
    default: false
  registry_mirrors:
    description:
      - CRI registry mirrors to set, host to endpoint list
        (C(plugins."io.containerd.grpc.v1.cri".registry.mirrors."HOST".endpoint)); other hosts' mirrors are kept.
    type: dict
    default: {}
  backup:
    description: Keep a timestamped copy of the file before changing it.
    type: bool
    default: false
"""

CRI_PLUGIN = "io.containerd.grpc.v1.cri"


class MergeError(Exception):
    """The existing file cannot be merged into; the message says what to fix."""


def _table(parent: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = parent.setdefault(key, {})
    if not isinstance(value, dict):
        raise MergeError(f"{where} is a {type(value).__name__}, not a table: fix it by hand")
    return value


def merge(existing: dict[str, Any], plugin_name: str, address: str, cri: bool, path: str,
          mirrors: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """``existing`` with our settings in it (a new dict; ``existing`` is left alone)."""
    if not existing:
        data: dict[str, Any] = {"version": 2}
    else:
        version = existing.get("version")
        if version is None:
            raise MergeError(
                f"{path} has no 'version' key, so containerd reads it as a version 1 config; this role edits "
                "version 2 configs only: add 'version = 2' at the top (and rename version 1 plugin tables such as "
                f'[plugins.cri] to [plugins."{CRI_PLUGIN}"]), then run again')
        if version != 2:
            raise MergeError(f"{path} is a containerd config of version {version!r}; this role edits version 2 "
                             "configs (containerd 1.x) only")
        data = copy.deepcopy(existing)
    plugin = _table(_table(data, "proxy_plugins", "proxy_plugins"), plugin_name, f"proxy_plugins.{plugin_name}")
    plugin["type"] = "snapshot"
    plugin["address"] = address
    if cri:
        plugins = _table(data, "plugins", "plugins")
        cri_table = _table(plugins, CRI_PLUGIN, f'plugins."{CRI_PLUGIN}"')
        containerd = _table(cri_table, "containerd", f'plugins."{CRI_PLUGIN}".containerd')
        containerd["snapshotter"] = plugin_name
        containerd["disable_snapshot_annotations"] = False
    for host, endpoints in sorted((mirrors or {}).items()):
        if not isinstance(endpoints, list) or not endpoints or not all(isinstance(e, str) for e in endpoints):
            raise MergeError(f"registry mirror {host!r}: give a non-empty list of endpoint URLs")
        where = f'plugins."{CRI_PLUGIN}".registry.mirrors."{host}"'
        cri_table = _table(_table(data, "plugins", "plugins"), CRI_PLUGIN, f'plugins."{CRI_PLUGIN}"')
        registry = _table(cri_table, "registry", f'plugins."{CRI_PLUGIN}".registry')
        if registry.get("config_path"):
            raise MergeError(f'{path} sets plugins."{CRI_PLUGIN}".registry.config_path, and containerd refuses '
                             f"mirrors beside it: put the mirror of {host} in a hosts.toml under that directory "
                             "instead, and leave cvmfs_snap_snapshotter_registry_mirrors empty")
        mirror = _table(_table(registry, "mirrors", f'plugins."{CRI_PLUGIN}".registry.mirrors'), host, where)
        mirror["endpoint"] = list(endpoints)
    return data


def _loads(text: str) -> dict[str, Any]:
    try:
        import tomllib as toml_reader
    except ImportError:  # Python < 3.11
        import tomli as toml_reader
    return toml_reader.loads(text)


def _dumps(data: dict[str, Any]) -> str | None:
    """TOML text of ``data``, or None when tomli-w is not installed for this interpreter."""
    try:
        import tomli_w
    except ImportError:
        return None
    return tomli_w.dumps(data)


def run(module: AnsibleModule) -> dict[str, Any]:
    path: str = module.params["path"]
    try:
        with open(path, encoding="utf-8") as f:
            before = f.read()
    except FileNotFoundError:
        before = ""
    except (OSError, UnicodeDecodeError) as exc:
        module.fail_json(msg=f"cannot read containerd config {path}: {exc}")
    try:
        existing = _loads(before)
    except Exception as exc:  # tomllib.TOMLDecodeError or tomli's
        module.fail_json(msg=f"containerd config {path} is not valid TOML ({exc}); fix it, then run again")
    try:
        data = merge(existing, module.params["plugin_name"], module.params["address"], module.params["cri"], path,
                     module.params["registry_mirrors"])
    except MergeError as exc:
        module.fail_json(msg=str(exc))
    result: dict[str, Any] = {"changed": data != existing, "path": path}
    if not result["changed"]:
        return result
    after = _dumps(data)
    if after is None:
        if not module.check_mode:
            module.fail_json(msg=f"the Python module tomli_w is not installed for {sys.executable}: install tomli-w "
                                 "(the cvmfs_snap_snapshotter role puts it into the cvmfs-snap virtualenv)")
        after = "# merged settings (tomli-w is not installed yet, shown as JSON):\n" + json.dumps(data, indent=2)
    header = "(absent)" if not os.path.exists(path) else path
    result["diff"] = {"before": before, "after": after, "before_header": header, "after_header": path}
    if module.check_mode:
        return result
    if module.params["backup"] and os.path.exists(path):
        result["backup_file"] = module.backup_local(path)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".config.toml.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(after)
        if not os.path.exists(path):
            os.chmod(tmp, 0o644)
        module.atomic_move(tmp, path)  # keeps the mode and owner of an existing file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return result


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "required": True},
            "plugin_name": {"type": "str", "required": True},
            "address": {"type": "str", "required": True},
            "cri": {"type": "bool", "default": False},
            "registry_mirrors": {"type": "dict", "default": {}},
            "backup": {"type": "bool", "default": False},
        },
        supports_check_mode=True,
    )
    module.exit_json(**run(module))


if __name__ == "__main__":
    main()
