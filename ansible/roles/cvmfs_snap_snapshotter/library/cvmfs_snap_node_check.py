#!/usr/bin/python
"""Ansible module: is this node's cvmfs-snap snapshotter healthy? Its socket answers a List call, and the CVMFS
repository it serves is mounted and readable. Runs with the cvmfs-snap virtualenv's interpreter (grpc, stubs)."""

from __future__ import annotations

import os
from typing import Any

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

try:  # the cvmfs-snap virtualenv has both
    import grpc

    from cvmfs_snap.api.gen.containerd.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc
except ImportError:
    IMPORT_ERROR = True
else:
    IMPORT_ERROR = False

DOCUMENTATION = r"""
---
module: cvmfs_snap_node_check
short_description: Check that the cvmfs-snap snapshotter answers and its CVMFS repository is mounted
description:
  - Lists the repository's mount point (which makes autofs mount it), requires a mount there unless
    I(require_mount) is false, and calls the snapshotter's Snapshots List over its socket.
  - Runs with the interpreter of the cvmfs-snap virtualenv (it imports grpc and cvmfs_snap's stubs).
options:
  address:
    description: The snapshotter's unix socket.
    type: str
    required: true
  mountpoint:
    description: Where the CVMFS repository is mounted.
    type: path
    required: true
  require_mount:
    description: Fail when I(mountpoint) is not a mount point (false for a plain directory).
    type: bool
    default: true
  timeout:
    description: Seconds to wait for the socket to answer.
    type: float
    default: 30
"""


def check(module: AnsibleModule) -> dict[str, Any]:
    mountpoint: str = module.params["mountpoint"]
    try:
        entries = os.listdir(mountpoint)  # an autofs mount point mounts on first access
    except OSError as exc:
        module.fail_json(msg=f"CVMFS repository at {mountpoint} is not readable ({exc.strerror}): check the CVMFS "
                             "client (cvmfs_config probe)")
    if module.params["require_mount"] and not os.path.ismount(mountpoint):
        module.fail_json(msg=f"{mountpoint} is not a mount point: the CVMFS repository is not mounted (check "
                             "cvmfs_config probe and /etc/cvmfs/default.local)")
    address: str = module.params["address"]
    channel = grpc.insecure_channel(f"unix:{address}")
    try:
        grpc.channel_ready_future(channel).result(timeout=module.params["timeout"])
        stub = snapshots_pb2_grpc.SnapshotsStub(channel)
        count = 0
        for reply in stub.List(snapshots_pb2.ListSnapshotsRequest(), timeout=module.params["timeout"]):
            count += len(reply.info)
    except grpc.FutureTimeoutError:
        module.fail_json(msg=f"the snapshotter's socket {address} does not answer: check "
                             "`systemctl status` of its unit and its log")
    except grpc.RpcError as exc:
        module.fail_json(msg=f"the snapshotter at {address} failed a List call: {exc.code().name} {exc.details()}")
    finally:
        channel.close()
    return {"changed": False, "snapshots": count, "mountpoint_entries": len(entries)}


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "address": {"type": "str", "required": True},
            "mountpoint": {"type": "path", "required": True},
            "require_mount": {"type": "bool", "default": True},
            "timeout": {"type": "float", "default": 30},
        },
        supports_check_mode=True,
    )
    if IMPORT_ERROR:
        module.fail_json(msg=missing_required_lib("cvmfs-snap (grpc and its stubs): run this module with the "
                                                  "cvmfs-snap virtualenv's python"))
    module.exit_json(**check(module))


if __name__ == "__main__":
    main()
