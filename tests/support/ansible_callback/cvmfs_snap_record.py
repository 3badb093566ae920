"""An Ansible callback for the tests: one JSON line per task result (task, role, host, status, changed, diff) in
the file named by CVMFS_SNAP_ANSIBLE_RECORD, so that tests read what a run did instead of parsing its screen."""

from __future__ import annotations

import json
import os
from typing import Any

from ansible.playbook.handler import Handler
from ansible.plugins.callback import CallbackBase

DOCUMENTATION = r"""
name: cvmfs_snap_record
type: aggregate
short_description: records task results as JSON lines (cvmfs-snap tests)
description: Appends one JSON object per task result to the file named by CVMFS_SNAP_ANSIBLE_RECORD.
requirements: [enable it in callbacks_enabled]
"""


class CallbackModule(CallbackBase):  # type: ignore[misc]
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "cvmfs_snap_record"
    CALLBACK_NEEDS_ENABLED = True

    def _record(self, result: Any, status: str) -> None:
        path = os.environ.get("CVMFS_SNAP_ANSIBLE_RECORD")
        if not path:
            return
        res = result._result
        task = result._task
        role = task._role.get_name() if getattr(task, "_role", None) else ""
        changed = bool(res.get("changed"))
        entry = {
            "task": task.name,
            "role": role,
            "action": task.action,
            "handler": isinstance(task, Handler),
            "host": result._host.get_name(),
            "status": "changed" if status == "ok" and changed else status,
            "changed": changed,
            "diff": res.get("diff"),
            "msg": res.get("msg"),
            "stderr": res.get("stderr"),
        }
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, default=str) + "\n")

    def v2_runner_on_ok(self, result: Any) -> None:
        self._record(result, "ok")

    def v2_runner_on_failed(self, result: Any, ignore_errors: bool = False) -> None:
        self._record(result, "failed")

    def v2_runner_on_skipped(self, result: Any) -> None:
        self._record(result, "skipped")

    def v2_runner_on_unreachable(self, result: Any) -> None:
        self._record(result, "unreachable")
