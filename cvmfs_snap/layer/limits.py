"""Limits that bound what one image and each of its layers may ask of the publisher and the unpacker.

A layer comes from a registry we do not control. These limits turn "a tar that never ends", "a 2 GiB PAX header",
"a 655 KB blob expanding to 20 GiB" or "a manifest of 10,000 layers" into a clear
:class:`~cvmfs_snap.errors.UnsafeLayerError` (or :class:`~cvmfs_snap.errors.InvalidInputError` for manifests)
instead of an exhausted disk, memory or day. The defaults are far above anything a real image needs (the largest
public images are tens of GB with a few hundred thousand entries, at most a few dozen directory levels, 127 layers
at most for Docker, a dozen platforms); a site sets its own in the publisher configuration (``limits:``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from cvmfs_snap.errors import InvalidInputError

GiB = 1 << 30
#: expanded bytes below which ``max_expansion_ratio`` is not applied (small layers of zeros are harmless)
RATIO_GRACE = GiB


@dataclass(frozen=True)
class Limits:
    """Bounds enforced while reading and applying one layer, and (the last two) per image by the publisher."""

    #: tar entries per layer (metadata headers such as PAX or GNU long names are not counted)
    max_entries: int = 2_000_000
    #: bytes in a member path after normalisation (Linux PATH_MAX is 4096)
    max_path_len: int = 4096
    #: bytes in one path component (Linux NAME_MAX)
    max_name_len: int = 255
    #: directory levels of a member path (``a/b/c`` is 3)
    max_depth: int = 512
    #: bytes in one PAX extended header record block (per entry or global)
    max_pax_header_size: int = 1 << 20
    #: bytes in one extended attribute value (Linux allows at most 64 KiB)
    max_xattr_size: int = 64 * 1024
    #: create character and block devices; we run as root and images such as busybox ship /dev nodes,
    #: but a site may prefer to refuse them
    allow_devices: bool = True
    #: total bytes of regular file content in one layer, holes of sparse files included (None: unbounded)
    max_total_size: int | None = None
    #: bytes of one layer's uncompressed tar (the expanded size: what decompression produces; None: unbounded)
    max_expanded_size: int | None = 256 * GiB
    #: uncompressed bytes per compressed byte once a layer has expanded past 1 GiB (None: unbounded). Real layers
    #: stay below 20; gzip cannot exceed about 1,030; a zstd blob of zeros reaches 30,000 (655 KB -> 20 GiB)
    max_expansion_ratio: int | None = 10_000
    #: layers in one image manifest
    max_layers_per_image: int = 1000
    #: entries (platforms, attestations) in one multi-arch index
    max_platforms_per_index: int = 256

    @classmethod
    def from_dict(cls, data: Any, source: str = "configuration") -> Limits:
        """Limits from a settings mapping (``limits:`` of the publisher configuration); unknown keys and values of
        the wrong type are refused."""
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise InvalidInputError(f"{source}: 'limits' must be a mapping of limit names to values")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise InvalidInputError(
                f"{source}: unknown limit(s) {', '.join(map(str, unknown))}; known: {', '.join(sorted(known))}"
            )
        for key, value in data.items():
            if key == "allow_devices":
                if not isinstance(value, bool):
                    raise InvalidInputError(f"{source}: limits.allow_devices must be true or false, got {value!r}")
                continue
            optional = key in ("max_total_size", "max_expanded_size", "max_expansion_ratio")
            if value is None and optional:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                what = "a positive integer" + (" or null (unbounded)" if optional else "")
                raise InvalidInputError(f"{source}: limits.{key} must be {what}, got {value!r}")
        return cls(**data)
