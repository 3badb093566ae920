"""Registry access for ``cvmfs-snap pull``: resolve an image for one platform and stream its blobs.

This is the one place the pull talks to registries, behind a two-method interface (:class:`RegistryAccess`),
implemented on the project's OCI client (:class:`OciRegistry`). It keeps the exact bytes of index, manifest and
config, because containerd's content store must hold them byte for byte (their digests are the image's identity).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from cvmfs_snap.errors import InvalidInputError
from cvmfs_snap.oci import CredentialStore, Descriptor, ImageReference, Platform, RegistryClient, validate_digest

log = logging.getLogger(__name__)

#: a config blob larger than this is refused (real ones are a few KiB)
MAX_CONFIG = 16 << 20
BLOB_CHUNK = 1 << 20


@dataclass(frozen=True)
class ResolvedImage:
    """Everything the pull needs before touching layers: the blobs above the layers, parsed and verified."""

    ref: ImageReference
    #: what the image record points to: the index when there is one, else the manifest
    target: Descriptor
    index_raw: bytes | None
    #: all manifests the index lists (containerd labels the index with GC references to every one)
    index_manifests: Sequence[Descriptor]
    manifest: Descriptor
    manifest_raw: bytes
    config: Descriptor
    config_raw: bytes
    layers: Sequence[Descriptor]
    diff_ids: Sequence[str]
    platform: Platform


class RegistryAccess(Protocol):
    def resolve(self, ref: ImageReference, platform: Platform) -> ResolvedImage: ...

    def open_blob(self, ref: ImageReference, desc: Descriptor) -> contextlib.AbstractContextManager[Iterator[bytes]]:
        """Chunks of the blob, verified against ``desc`` (IntegrityError at the end if they do not match)."""
        ...

    def close(self) -> None: ...


def parse_diff_ids(config_raw: bytes, config_digest: str, ref: ImageReference, nlayers: int) -> list[str]:
    """``rootfs.diff_ids`` of an image config, checked against the number of layers of the manifest."""
    try:
        cfg = json.loads(config_raw)
    except ValueError as exc:
        raise InvalidInputError(f"config {config_digest} of {ref} is not valid JSON: {exc}") from None
    rootfs = cfg.get("rootfs") if isinstance(cfg, dict) else None
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list):
        raise InvalidInputError(f"config {config_digest} of {ref} has no rootfs.diff_ids list")
    out = [validate_digest(str(x), f"diff_id in config {config_digest} of {ref}") for x in diff_ids]
    if len(out) != nlayers:
        raise InvalidInputError(f"image {ref}: its manifest lists {nlayers} layers but its config has {len(out)} "
                                "diff_ids; the image is broken, rebuild it")
    return out


class OciRegistry:
    """:class:`RegistryAccess` on the project's :class:`cvmfs_snap.oci.RegistryClient`."""

    def __init__(self, client: RegistryClient) -> None:
        self.client = client

    def resolve(self, ref: ImageReference, platform: Platform) -> ResolvedImage:
        manifest, index = self.client.resolve(ref, platform)
        mdesc = Descriptor(manifest.media_type, manifest.digest, len(manifest.raw))
        if index is not None:
            target = Descriptor(index.media_type, index.digest, len(index.raw))
            children = list(index.manifests)
            chosen = next((d for d in index.manifests if d.digest == manifest.digest), None)
            chosen_platform = chosen.platform if chosen is not None and chosen.platform else platform
        else:
            target, children, chosen_platform = mdesc, [], platform
        config = manifest.config
        if config.size > MAX_CONFIG:
            raise InvalidInputError(f"config {config.digest} of {ref} is {config.size} bytes: too large for an "
                                    "image config")
        config_raw = self.client.get_blob(ref, config.digest, size=config.size, max_size=MAX_CONFIG)
        layers = list(manifest.layers)
        return ResolvedImage(
            ref=ref, target=target, index_raw=bytes(index.raw) if index is not None else None,
            index_manifests=children, manifest=mdesc, manifest_raw=bytes(manifest.raw), config=config,
            config_raw=config_raw, layers=layers,
            diff_ids=parse_diff_ids(config_raw, config.digest, ref, len(layers)), platform=chosen_platform)

    @contextlib.contextmanager
    def open_blob(self, ref: ImageReference, desc: Descriptor) -> Iterator[Iterator[bytes]]:
        with self.client.open_blob(ref, desc.digest, size=desc.size) as stream:
            def chunks() -> Iterator[bytes]:
                while True:
                    b = stream.read(BLOB_CHUNK)
                    if not b:
                        return
                    yield bytes(b)
            yield chunks()  # the client checks size and digest at EOF; containerd checks them again at commit

    def close(self) -> None:
        self.client.close()


def make_registry(ref: ImageReference, plain_http: bool = False,
                  credentials: CredentialStore | None = None) -> OciRegistry:
    """The registry access for ``ref``: the project's OCI client, with ``credentials`` (default: those of the
    node's docker config). It uses
    plain HTTP for loopback registries by itself; ``plain_http`` (the admin's ``--plain-http``) adds the
    reference's registry to its insecure list. An ``http://`` reference alone does not: it is refused for any other
    host."""
    insecure = [ref.registry] if plain_http else []
    creds = credentials if credentials is not None else CredentialStore.from_docker_config(None)
    return OciRegistry(RegistryClient(credentials=creds, insecure_registries=insecure))
