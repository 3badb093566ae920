"""Layer codecs and safe unpacking: decompress a layer blob, read its tar safely, apply it to a directory.

See docs/ARCHITECTURE.md ("Layers") for the contract other parts rely on.
"""

from cvmfs_snap.layer.apply import ApplyResult, apply_layer
from cvmfs_snap.layer.compression import MEDIA_TYPES, LayerStream, open_layer
from cvmfs_snap.layer.digesting import HashingReader
from cvmfs_snap.layer.limits import Limits
from cvmfs_snap.layer.structure import iter_layer
from cvmfs_snap.layer.tarstream import TarEntry, TarReader
from cvmfs_snap.layer.whiteout import WhiteoutIndex, scan_tree_whiteouts, scan_whiteouts

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
