"""Layer codecs and safe unpacking: decompress a layer blob, read its tar safely, apply it to a directory.

See docs/ARCHITECTURE.md ("Layers") for the contract other parts rely on.

The limits, the path rules and the whiteout scan are imported with the package; the codecs (decompression, tar
parsing, applying) on first use of one of their names (PEP 562): the node's snapshotter daemon only scans whiteouts
and reads eStargz constants, never decodes a layer, and its resident memory is issue 9's RSS goal (bench/README.md
"Resident memory"); ``from cvmfs_snap.layer import open_layer`` works as before everywhere else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cvmfs_snap.layer.limits import Limits
from cvmfs_snap.layer.whiteout import WhiteoutIndex, scan_tree_whiteouts, scan_whiteouts

if TYPE_CHECKING:
    from cvmfs_snap.layer.apply import ApplyResult, apply_layer
    from cvmfs_snap.layer.compression import MEDIA_TYPES, LayerStream, open_layer
    from cvmfs_snap.layer.digesting import HashingReader
    from cvmfs_snap.layer.structure import iter_layer
    from cvmfs_snap.layer.tarstream import TarEntry, TarReader

__all__ = [
    "MEDIA_TYPES",
    "ApplyResult",
    "HashingReader",
    "LayerStream",
    "Limits",
    "TarEntry",
    "TarReader",
    "WhiteoutIndex",
    "apply_layer",
    "iter_layer",
    "open_layer",
    "scan_tree_whiteouts",
    "scan_whiteouts",
]


def __getattr__(name: str) -> object:
    """The codecs' names, imported when first asked for (plain imports: cycles stay visible to the linters)."""
    if name in ("ApplyResult", "apply_layer"):
        from cvmfs_snap.layer import apply as module
    elif name in ("MEDIA_TYPES", "LayerStream", "open_layer"):
        from cvmfs_snap.layer import compression as module  # type: ignore[no-redef]
    elif name == "HashingReader":
        from cvmfs_snap.layer import digesting as module  # type: ignore[no-redef]
    elif name == "iter_layer":
        from cvmfs_snap.layer import structure as module  # type: ignore[no-redef]
    elif name in ("TarEntry", "TarReader"):
        from cvmfs_snap.layer import tarstream as module  # type: ignore[no-redef]
    else:  # a submodule (``from cvmfs_snap.layer import gzipmember``): the import system loads it
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value
    return value
