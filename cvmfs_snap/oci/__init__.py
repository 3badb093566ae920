"""OCI registry client: image references, manifests/indexes, auth, blob streams, range reads, tag lists.

Knows nothing of CVMFS or containerd. See docs/ARCHITECTURE.md "OCI client" for the interface.

References and credentials are imported with the package; the client and the manifest parser (httpx, ssl) on first
use of one of their names (PEP 562): the node's snapshotter daemon parses references and hands credentials to the
lazyfs process, which reads the registry, and its resident memory is issue 9's RSS goal (bench/README.md "Resident
memory"); ``from cvmfs_snap.oci import RegistryClient`` works as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cvmfs_snap.oci.auth import Credentials, CredentialStore
from cvmfs_snap.oci.reference import ImageReference, validate_digest

if TYPE_CHECKING:
    from cvmfs_snap.oci.client import BlobStream, RangeSupport, RegistryClient
    from cvmfs_snap.oci.manifest import (
        DOCKER_LIST,
        DOCKER_MANIFEST,
        OCI_INDEX,
        OCI_MANIFEST,
        Descriptor,
        Index,
        Manifest,
        Platform,
        compute_digest,
        parse_manifest,
    )

__all__ = [
    "DOCKER_LIST",
    "DOCKER_MANIFEST",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "BlobStream",
    "CredentialStore",
    "Credentials",
    "Descriptor",
    "ImageReference",
    "Index",
    "Manifest",
    "Platform",
    "RangeSupport",
    "RegistryClient",
    "compute_digest",
    "parse_manifest",
    "validate_digest",
]

_CLIENT = ("BlobStream", "RangeSupport", "RegistryClient")
_MANIFEST = ("DOCKER_LIST", "DOCKER_MANIFEST", "OCI_INDEX", "OCI_MANIFEST", "Descriptor", "Index", "Manifest",
             "Platform", "compute_digest", "parse_manifest")


def __getattr__(name: str) -> object:
    """The client's and the manifest parser's names, imported when first asked for (plain imports: cycles stay
    visible)."""
    if name in _CLIENT:
        from cvmfs_snap.oci import client as module
    elif name in _MANIFEST:
        from cvmfs_snap.oci import manifest as module  # type: ignore[no-redef]
    else:  # a submodule (``from cvmfs_snap.oci import hosts``): the import system loads it
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value
    return value
