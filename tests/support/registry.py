"""Test-side name for cvmfs_snap.devenv.registry (a real docker-registry on loopback)."""

from cvmfs_snap.devenv.registry import (
    REGISTRY_BIN,
    BlobGet,
    Registry,
    blob_gets,
    free_port,
    log_mark,
    registry_config,
    start_registry,
)

__all__ = [
    "REGISTRY_BIN",
    "BlobGet",
    "Registry",
    "blob_gets",
    "free_port",
    "log_mark",
    "registry_config",
    "start_registry",
]
