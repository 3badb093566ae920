"""gRPC APIs we speak: containerd's snapshots (served) and its images/content/leases/diff and CRI (called).

The ``.proto`` files under ``proto/`` are written for this project from containerd's published API (same packages,
services and field numbers, without gogoproto options). ``gen/`` holds the Python stubs generated from them by
``python -m cvmfs_snap.api.generate``; a test checks that they are current.
"""
