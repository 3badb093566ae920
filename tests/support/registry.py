"""Test-side name for cvmfs_snap.devenv.registry (a real docker-registry on loopback)."""

from cvmfs_snap.devenv.registry import REGISTRY_BIN, Registry, free_port, registry_config, start_registry

__all__ = ["REGISTRY_BIN", "Registry", "free_port", "registry_config", "start_registry"]
