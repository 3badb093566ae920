"""Which platforms of an image are published: the manifest(s) of a tag, each with its config and diffIDs.

A single-arch manifest is one platform (key ``""``); a multi-arch index is resolved to the platforms the
configuration selects (``platforms:``), each checked against the limits and its config's ``rootfs.diff_ids``.
Also the naming of a platform in the repository (``arch_key``, DUCC's spelling)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from cvmfs_snap.errors import CvmfsSnapError, InvalidInputError
from cvmfs_snap.layer.limits import Limits
from cvmfs_snap.layout import digest_hex
from cvmfs_snap.oci import ImageReference, Index, Manifest, Platform, RegistryClient

log = logging.getLogger(__name__)

#: the platform a multi-arch image's public name points to when it has it
DEFAULT_ARCH = "amd64"


@dataclass
class ImagePlatform:
    """One platform of an image as it is published: its manifest, config blob and diffIDs."""

    key: str  # "amd64", "arm64:v8"; "" for a single-arch image
    platform: Platform | None
    manifest: Manifest
    config: bytes
    config_digest: str
    diff_ids: list[str]


def arch_key(p: Platform) -> str:
    """Directory name of one platform under ``.multiarch`` and the per-arch metadata: ``amd64``, ``arm64:v8``.

    DUCC's spelling (``GetNameWithArch``: ``<arch>`` or ``<arch>:<variant>``), so the ``.multiarch/<arch>`` paths
    users and DUCC-era scripts know keep working. DUCC ignores the OS; non-Linux platforms get it in front here
    (``windows-amd64``) so that they cannot take the place of the Linux image of the same architecture."""
    key = p.architecture + (f":{p.variant}" if p.variant else "")
    return key if p.os == "linux" else f"{p.os}-{key}"


def platform_matches(p: Platform, wanted: Sequence[str]) -> bool:
    """True when ``wanted`` is empty or one of its ``os/arch[/variant]`` entries accepts ``p``."""
    return not wanted or any(Platform.parse(w).matches(p) for w in wanted)


def is_sha256(digest: str) -> bool:
    try:
        digest_hex(digest)
    except CvmfsSnapError:
        return False
    return True


def default_platform(plats: Sequence[ImagePlatform]) -> ImagePlatform:
    """The platform the public name of the image points to: linux/amd64 when there, else the first."""
    return next((p for p in plats if p.platform and p.platform.architecture == DEFAULT_ARCH
                 and p.platform.os == "linux"), plats[0])


def load_platforms(client: RegistryClient, limits: Limits, wanted: Sequence[str], ref: ImageReference,
                   obj: Manifest | Index) -> list[ImagePlatform]:
    """The platforms of ``obj`` (the manifest or index ``ref`` resolved to) that ``wanted`` selects."""
    if isinstance(obj, Manifest):
        return [load_platform(client, limits, ref, obj, "", None)]
    limit = limits.max_platforms_per_index
    if len(obj.manifests) > limit:
        raise InvalidInputError(
            f"{ref}: index {obj.digest} lists {len(obj.manifests)} manifests, more than "
            f"limits.max_platforms_per_index ({limit}); not published (raise the limit in the publisher "
            "configuration if this index is genuine)"
        )
    out: list[ImagePlatform] = []
    skipped: list[str] = []
    keys: set[str] = set()
    for desc in obj.manifests:
        p = desc.platform
        if p is None or p.os == "unknown" or p.architecture == "unknown":
            continue  # attestation manifests (buildx) and entries without a platform
        if not platform_matches(p, wanted):
            skipped.append(str(p))
            continue
        key = arch_key(p)
        if key in keys:
            log.warning("%s: index lists platform %s twice; publishing the first", ref, p)
            continue
        keys.add(key)
        m = client.get_manifest(ref.with_digest(desc.digest))
        if not isinstance(m, Manifest):
            raise InvalidInputError(f"{ref}: index entry {desc.digest} for {p} is not an image manifest")
        out.append(load_platform(client, limits, ref, m, key, p))
    if skipped:
        log.info("%s: not publishing platforms %s (restricted to %s)", ref, ", ".join(skipped), ", ".join(wanted))
    if not out:
        raise InvalidInputError(
            f"{ref}: no platform of the multi-arch index matches {', '.join(wanted) or 'any platform'}; "
            "check the recipe's 'platforms' list"
        )
    return out


def load_platform(client: RegistryClient, limits: Limits, ref: ImageReference, m: Manifest, key: str,
                  p: Platform | None) -> ImagePlatform:
    """One platform's manifest with its config blob, checked against the limits and the config's diffIDs."""
    limit = limits.max_layers_per_image
    if len(m.layers) > limit:
        raise InvalidInputError(
            f"{ref}: manifest {m.digest} lists {len(m.layers)} layers, more than limits.max_layers_per_image "
            f"({limit}); not published (raise the limit in the publisher configuration if the image is genuine)"
        )
    cfg_digest = m.config.digest
    config = client.get_blob(ref, cfg_digest, size=m.config.size)
    try:
        cfg = json.loads(config)
        diff_ids = list(cfg["rootfs"]["diff_ids"])
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidInputError(f"{ref}: image config {cfg_digest} has no rootfs.diff_ids: {exc}") from exc
    for d in diff_ids:
        if not isinstance(d, str) or not is_sha256(d):
            raise InvalidInputError(
                f"{ref}: image config {cfg_digest} lists diffID {d!r}, which is not a sha256 digest; the image "
                "is broken or hostile: rebuild it"
            )
    if len(diff_ids) != len(m.layers):
        raise InvalidInputError(
            f"{ref}: manifest {m.digest} lists {len(m.layers)} layers but its config {cfg_digest} "
            f"{len(diff_ids)} diffIDs; the image is broken, rebuild it"
        )
    return ImagePlatform(key, p, m, config, cfg_digest, diff_ids)
