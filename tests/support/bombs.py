"""Cheap inputs that expand a lot: a layer holding a huge sparse file, a zstd blob of many GiB of zeros.

Built here (never downloaded), used by tests/test_publisher_limits.py and bench/cheap_inputs.py.
"""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

import zstandard

from cvmfs_snap.fsutil import remove_tree
from cvmfs_snap_devenv.images import OCI_LAYER_GZIP, OCI_LAYER_ZSTD, BuiltLayer, compress

#: the sparse file of :func:`sparse_layer`: 100 GiB, 101 bytes of data in the middle
SPARSE_SIZE = 100 << 30
SPARSE_DATA_AT = SPARSE_SIZE // 2
SPARSE_DATA = b"x" * 101


def sparse_layer(tmp: Path, size: int = SPARSE_SIZE) -> BuiltLayer:
    """A gzip layer whose tar (GNU tar, PAX sparse 1.0) holds ``data/huge.img``: ``size`` bytes, 101 of them data."""
    src = tmp / "sparse-src"
    (src / "data").mkdir(parents=True)
    try:
        with open(src / "data/huge.img", "wb") as f:
            f.truncate(size)
            f.seek(size // 2)
            f.write(SPARSE_DATA)
        tar = subprocess.run(["tar", "--create", "--file=-", "--format=pax", "--sparse", "--sparse-version=1.0",
                              "--numeric-owner", f"--directory={src}", "data"], capture_output=True,
                             check=True).stdout
    finally:
        remove_tree(src)
    return BuiltLayer(tar=tar, blob=compress(tar, "gzip"), media_type=OCI_LAYER_GZIP)


def zstd_bomb(expanded: int = 20 << 30) -> BuiltLayer:
    """A zstd layer whose tar is one file of ``expanded`` zero bytes (a multiple of 128 MiB): 128 MiB frames
    compressed once and repeated, so building it costs one frame. ``tar`` is not kept (it would be ``expanded``
    bytes): its diffID is not this layer's."""
    chunk = 128 << 20
    if expanded % chunk:
        raise ValueError("expanded must be a multiple of 128 MiB")
    info = tarfile.TarInfo("zeros")
    info.size = expanded
    c = zstandard.ZstdCompressor(level=3)
    zeros = c.compress(bytes(chunk))
    blob = c.compress(info.tobuf(format=tarfile.PAX_FORMAT)) + zeros * (expanded // chunk) + c.compress(bytes(1024))
    return BuiltLayer(tar=b"(not kept)", blob=blob, media_type=OCI_LAYER_ZSTD)
