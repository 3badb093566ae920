"""Limits that bound what one image and each of its layers may ask of the publisher and the unpacker.

A layer comes from a registry we do not control. These limits turn "a tar that never ends", "a 2 GiB PAX header",
"a 655 KB blob expanding to 20 GiB" or "a manifest of 10,000 layers" into a clear
:class:`~cvmfs_snap.errors.UnsafeLayerError` (or :class:`~cvmfs_snap.errors.InvalidInputError` for manifests)
instead of an exhausted disk, memory or day. The defaults are far above anything a real image needs (the largest
public images are tens of GB with a few hundred thousand entries, at most a few dozen directory levels, 127 layers
at most for Docker, a dozen platforms); a site sets its own in the publisher configuration (``limits:``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

import msgspec

GiB = 1 << 30
#: expanded bytes below which ``max_expansion_ratio`` is not applied (small layers of zeros are harmless)
RATIO_GRACE = GiB

#: a limit: a positive integer (``msgspec.Meta``: what ``cvmfs_snap.validation`` checks the publisher's ``limits:``
#: against; msgspec is small, about 1 MiB resident, where pydantic cost the lazyfs process 7 MiB: bench/README.md
#: "Resident memory")
Bound = Annotated[int, msgspec.Meta(ge=1)]


@dataclass(frozen=True)
class Limits:
    """Bounds enforced while reading and applying one layer, and (the last two) per image by the publisher."""

    #: ``limits:`` of the publisher configuration: a typo is an error (``cvmfs_snap.validation.FORBID``)
    forbid_unknown_fields: ClassVar[bool] = True

    #: tar entries per layer (metadata headers such as PAX or GNU long names are not counted)
    max_entries: Bound = 2_000_000
    #: bytes in a member path after normalisation (Linux PATH_MAX is 4096)
    max_path_len: Bound = 4096
    #: bytes in one path component (Linux NAME_MAX)
    max_name_len: Bound = 255
    #: directory levels of a member path (``a/b/c`` is 3)
    max_depth: Bound = 512
    #: bytes in one PAX extended header record block (per entry or global)
    max_pax_header_size: Bound = 1 << 20
    #: bytes in one extended attribute value (Linux allows at most 64 KiB)
    max_xattr_size: Bound = 64 * 1024
    #: create character and block devices; we run as root and images such as busybox ship /dev nodes,
    #: but a site may prefer to refuse them
    allow_devices: bool = True
    #: total bytes of regular file content in one layer, holes of sparse files included (None: unbounded)
    max_total_size: Bound | None = None
    #: bytes of one layer's uncompressed tar (the expanded size: what decompression produces; None: unbounded)
    max_expanded_size: Bound | None = 256 * GiB
    #: uncompressed bytes per compressed byte once a layer has expanded past 1 GiB (None: unbounded). Real layers
    #: stay below 20; gzip cannot exceed about 1,030; a zstd blob of zeros reaches 30,000 (655 KB -> 20 GiB)
    max_expansion_ratio: Bound | None = 10_000
    #: layers in one image manifest
    max_layers_per_image: Bound = 1000
    #: entries (platforms, attestations) in one multi-arch index
    max_platforms_per_index: Bound = 256
