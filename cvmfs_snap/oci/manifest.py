"""Manifests, indexes, descriptors and platforms: parsing and validation of what registries send.

Everything here is pure (no network). Manifests are untrusted input: they are checked strictly (schema version,
media types, digests, sizes) before anything downstream turns their digests into URLs or paths.
"""

from __future__ import annotations

import hashlib
import json
import platform as _platform
from dataclasses import dataclass, field
from typing import Any

from cvmfs_snap.errors import InvalidInputError, NotFoundError
from cvmfs_snap.mediatypes import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    DOCKER_SCHEMA1,
    DOCKER_SCHEMA1_SIGNED,
    OCI_INDEX,
    OCI_MANIFEST,
)
from cvmfs_snap.oci.reference import validate_digest

MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
SCHEMA1_TYPES = frozenset({DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED})
#: what we send in Accept: the four kinds we understand, plus schema 1 so that we can say clearly it is schema 1
ACCEPT_MANIFESTS = (OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST, DOCKER_SCHEMA1_SIGNED, DOCKER_SCHEMA1)

#: manifests larger than this are refused (containerd uses the same 4 MiB limit)
MAX_MANIFEST_SIZE = 4 * 1024 * 1024

_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "armhf": "arm", "armel": "arm",
                 "i386": "386", "i686": "386", "ppc64el": "ppc64le"}


def compute_digest(data: bytes, algorithm: str = "sha256") -> str:
    """``algorithm:hex`` of ``data``."""
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def _norm_arch_variant(arch: str, variant: str) -> tuple[str, str]:
    arch = _ARCH_ALIASES.get(arch.lower(), arch.lower())
    variant = variant.lower()
    # arm64 images are v8 whether or not they say so; 32-bit arm without a variant is v7 (as containerd assumes)
    if arch == "arm64" and variant in ("", "v8", "8"):
        variant = ""
    elif arch == "arm" and variant in ("", "7"):
        variant = "v7"
    elif arch == "amd64" and variant == "v1":
        variant = ""
    return arch, variant


@dataclass(frozen=True)
class Platform:
    """os/architecture/variant of an image. ``str(Platform("linux", "arm64", "v8")) == "linux/arm64/v8"``."""

    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        """Parse ``os/arch[/variant]``, e.g. ``linux/amd64`` or ``linux/arm/v7``."""
        parts = text.strip().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise InvalidInputError(f"invalid platform {text!r}: write os/architecture[/variant], e.g. linux/amd64")
        return cls(parts[0].lower(), parts[1].lower(), parts[2].lower() if len(parts) == 3 else "")

    @classmethod
    def host(cls) -> Platform:
        """The platform of this machine (linux/<arch>)."""
        arch, _ = _norm_arch_variant(_platform.machine() or "amd64", "")
        return cls("linux", arch, "v8" if arch == "arm64" else "")

    def matches(self, other: Platform) -> bool:
        """True if an image for ``other`` satisfies a request for ``self``.

        os and architecture must be equal (after aliases such as x86_64 -> amd64). An empty requested variant
        accepts any variant, except that arm64 with variant "v8" and without one are the same thing.
        """
        if self.os.lower() != other.os.lower():
            return False
        a1, v1 = _norm_arch_variant(self.architecture, self.variant)
        a2, v2 = _norm_arch_variant(other.architecture, other.variant)
        if a1 != a2:
            return False
        if not self.variant:
            return True
        return v1 == v2

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor: what a manifest says about a blob or a child manifest."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: Platform | None = None
    urls: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, obj: Any, where: str) -> Descriptor:
        """Validate and build a descriptor; ``where`` names it in error messages (image and field)."""
        if not isinstance(obj, dict):
            raise InvalidInputError(f"{where}: descriptor is not a JSON object")
        mt = obj.get("mediaType", "")
        if not isinstance(mt, str):
            raise InvalidInputError(f"{where}: mediaType is not a string")
        digest = obj.get("digest")
        if not isinstance(digest, str):
            raise InvalidInputError(f"{where}: descriptor has no digest")
        validate_digest(digest, f"digest in {where}")
        size = obj.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidInputError(f"{where}: descriptor {digest} has no valid size (got {size!r})")
        ann = obj.get("annotations") or {}
        if not isinstance(ann, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ann.items()):
            raise InvalidInputError(f"{where}: annotations of {digest} must map strings to strings")
        plat = None
        p = obj.get("platform")
        if p is not None:
            if not isinstance(p, dict) or not isinstance(p.get("os"), str) or not isinstance(
                    p.get("architecture"), str):
                raise InvalidInputError(f"{where}: platform of {digest} needs string 'os' and 'architecture'")
            variant = p.get("variant") or ""
            if not isinstance(variant, str):
                raise InvalidInputError(f"{where}: platform variant of {digest} is not a string")
            plat = Platform(p["os"], p["architecture"], variant)
        urls = obj.get("urls") or []
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise InvalidInputError(f"{where}: urls of {digest} must be a list of strings")
        return cls(media_type=mt, digest=digest, size=size, annotations=dict(ann), platform=plat, urls=tuple(urls))


@dataclass(frozen=True)
class Manifest:
    """An image manifest (OCI or Docker schema 2)."""

    media_type: str
    digest: str
    config: Descriptor
    layers: list[Descriptor]
    raw: bytes
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Index:
    """A multi-platform image: OCI index or Docker manifest list."""

    media_type: str
    digest: str
    manifests: list[Descriptor]
    raw: bytes
    annotations: dict[str, str] = field(default_factory=dict)

    def platforms(self) -> list[Platform]:
        """Platforms of the child images, leaving out attestation entries (``unknown/unknown``)."""
        out: list[Platform] = []
        for d in self.manifests:
            if d.platform is not None and d.platform.os != "unknown" and d.platform not in out:
                out.append(d.platform)
        return out

    def select(self, wanted: Platform, image: str = "") -> Descriptor:
        """The child manifest for ``wanted``: an exact variant match first, else the first compatible one."""
        candidates = [d for d in self.manifests if d.platform is not None and wanted.matches(d.platform)]
        if not candidates:
            have = ", ".join(str(p) for p in self.platforms()) or "none"
            raise NotFoundError(f"image {image or self.digest} has no manifest for platform {wanted} "
                                f"(available: {have}); choose one of those platforms")
        for d in candidates:
            assert d.platform is not None
            if d.platform.variant == wanted.variant:
                return d
        return candidates[0]


def parse_manifest(raw: bytes, content_type: str, image: str, digest: str | None = None) -> Manifest | Index:
    """Parse and validate manifest bytes; ``image`` names the image in error messages.

    The media type comes from the body's ``mediaType`` when present (it is covered by the digest), else from the
    HTTP Content-Type. ``digest`` is the digest of ``raw``; it is computed when not given.
    """
    if len(raw) > MAX_MANIFEST_SIZE:
        raise InvalidInputError(f"manifest of {image} is {len(raw)} bytes, more than the {MAX_MANIFEST_SIZE} "
                                "allowed; this is not a normal image manifest")
    digest = digest or compute_digest(raw)
    ctype = content_type.split(";")[0].strip().lower()
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidInputError(f"manifest of {image} ({digest}) is not valid JSON; the registry sent something "
                                "else than an image manifest") from None
    if not isinstance(obj, dict):
        raise InvalidInputError(f"manifest of {image} ({digest}) is not a JSON object")
    sv = obj.get("schemaVersion")
    body_type = obj.get("mediaType")
    if sv == 1 or ctype in SCHEMA1_TYPES or body_type in SCHEMA1_TYPES:
        raise InvalidInputError(
            f"image {image} uses the deprecated Docker schema 1 manifest format, which is not supported: convert "
            "the image, e.g. `skopeo copy --format v2s2 docker://SRC docker://DST`, and publish the converted one")
    if sv != 2 or isinstance(sv, bool):
        raise InvalidInputError(f"manifest of {image} ({digest}) has schemaVersion {sv!r}, expected 2")
    if body_type is not None and not isinstance(body_type, str):
        raise InvalidInputError(f"manifest of {image} ({digest}) has a non-string mediaType")
    mt = body_type or ctype
    if not mt or mt in ("application/json", "application/octet-stream", "text/plain"):
        # OCI allows leaving mediaType out; tell the two kinds apart by their shape
        mt = OCI_INDEX if "manifests" in obj else OCI_MANIFEST
    annotations = obj.get("annotations") or {}
    if not isinstance(annotations, dict) or not all(isinstance(v, str) for v in annotations.values()):
        raise InvalidInputError(f"manifest of {image} ({digest}): annotations must map strings to strings")
    where = f"manifest {digest} of {image}"
    if mt in INDEX_TYPES:
        children = obj.get("manifests")
        if not isinstance(children, list):
            raise InvalidInputError(f"{where}: index has no 'manifests' list")
        descs = [Descriptor.from_json(c, f"{where}, manifests[{i}]") for i, c in enumerate(children)]
        return Index(media_type=mt, digest=digest, manifests=descs, raw=raw, annotations=dict(annotations))
    if mt in MANIFEST_TYPES:
        if "config" not in obj:
            raise InvalidInputError(f"{where}: image manifest has no 'config'")
        layers = obj.get("layers")
        if not isinstance(layers, list):
            raise InvalidInputError(f"{where}: image manifest has no 'layers' list")
        config = Descriptor.from_json(obj["config"], f"{where}, config")
        descs = [Descriptor.from_json(c, f"{where}, layers[{i}]") for i, c in enumerate(layers)]
        return Manifest(media_type=mt, digest=digest, config=config, layers=descs, raw=raw,
                        annotations=dict(annotations))
    raise InvalidInputError(f"{where}: unknown manifest media type {mt!r}; expected an OCI or Docker schema 2 "
                            "image manifest or index")
