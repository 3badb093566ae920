"""Limits that bound what one layer may ask of the unpacker.

A layer comes from a registry we do not control. These limits turn "a tar that never ends" or "a 2 GiB PAX header"
into a clear :class:`~cvmfs_snap.errors.UnsafeLayerError` instead of an exhausted disk or memory. The defaults are
far above anything a real image needs (the largest public images have a few hundred thousand entries).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Bounds enforced while reading and applying one layer."""

    #: tar entries per layer (metadata headers such as PAX or GNU long names are not counted)
    max_entries: int = 2_000_000
    #: bytes in a member path after normalisation (Linux PATH_MAX is 4096)
    max_path_len: int = 4096
    #: bytes in one path component (Linux NAME_MAX)
    max_name_len: int = 255
    #: bytes in one PAX extended header record block (per entry or global)
    max_pax_header_size: int = 1 << 20
    #: bytes in one extended attribute value (Linux allows at most 64 KiB)
    max_xattr_size: int = 64 * 1024
    #: create character and block devices; we run as root and images such as busybox ship /dev nodes,
    #: but a site may prefer to refuse them
    allow_devices: bool = True
    #: total bytes of regular file content in one layer (None: unbounded)
    max_total_size: int | None = None
