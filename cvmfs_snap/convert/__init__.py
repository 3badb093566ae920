"""``cvmfs-snap convert``: copy an image from registry to registry with its layers as eStargz.

``image.py`` does the work (registry reads with ``cvmfs_snap.oci``, the format with ``cvmfs_snap.estargz``, pushes
with ``cvmfs_snap.oci.push``); ``progress.py`` reports it; ``command.py`` is the CLI.
"""

from cvmfs_snap.convert.image import ConvertOptions, ConvertResult, LayerResult, convert_image

__all__ = ["ConvertOptions", "ConvertResult", "LayerResult", "convert_image"]
