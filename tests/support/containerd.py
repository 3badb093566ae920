"""Test-side name for cvmfs_snap.devenv.containerd (a private real containerd)."""

from cvmfs_snap.devenv.containerd import CONTAINERD_BIN, CTR_BIN, Containerd, containerd_config, start_containerd

__all__ = ["CONTAINERD_BIN", "CTR_BIN", "Containerd", "containerd_config", "start_containerd"]
