"""The snapshotter's default paths, those of the official cvmfs containerd snapshotter (``containerd-cvmfs-grpc``).

Imports nothing: ``cvmfs-snap pull`` (the credentials socket next to the snapshot socket) and ``cvmfs-snap status``
need them without loading the config file's validation.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_CONFIG = Path("/etc/containerd-cvmfs-grpc/config.toml")
#: the snapshot API socket containerd's proxy plugin is pointed at
DEFAULT_ADDRESS = "/run/containerd-cvmfs-grpc/containerd-cvmfs-grpc.sock"
DEFAULT_ROOT = Path("/var/lib/containerd-cvmfs-grpc")
#: the name containerd knows the snapshotter by (``[proxy_plugins.cvmfs-snapshotter]``, ``--snapshotter``)
PROXY_PLUGIN = "cvmfs-snapshotter"
