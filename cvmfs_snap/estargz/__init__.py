"""eStargz as a standalone format library (the counterpart of Go's ``stargz-snapshotter/estargz`` package).

It depends on ``cvmfs_snap.layer`` (tar parsing, path rules, gzip members) and on nothing of the snapshotter, FUSE,
containerd or registries. Readers take bytes or a range-reader callback; the writer takes and gives streams.
See docs/estargz.md.

The format's constants, the footer and the TOC are imported with the package; the reader and the writer on first
use of one of their names (PEP 562): the node's snapshotter daemon needs only the constants, and its resident memory
is issue 9's RSS goal (bench/README.md "Resident memory"); ``from cvmfs_snap.estargz import build`` works as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cvmfs_snap.estargz.footer import FOOTER_READ_SIZE, Footer, gzip_footer, parse_footer, zstd_footer
from cvmfs_snap.estargz.toc import (
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC_TAR_NAME,
    Toc,
    TocEntry,
    parse_toc,
)

if TYPE_CHECKING:
    from cvmfs_snap.estargz.reader import ChunkRef, EStargz, RangeReader, file_reader, open_bytes
    from cvmfs_snap.estargz.writer import (
        DEFAULT_CHUNK_SIZE,
        DEFAULT_COMPRESSION_LEVEL,
        BuildOptions,
        BuildResult,
        build,
    )

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_COMPRESSION_LEVEL",
    "FOOTER_READ_SIZE",
    "NO_PREFETCH_LANDMARK",
    "PREFETCH_LANDMARK",
    "TOC_TAR_NAME",
    "BuildOptions",
    "BuildResult",
    "ChunkRef",
    "EStargz",
    "Footer",
    "RangeReader",
    "Toc",
    "TocEntry",
    "build",
    "file_reader",
    "gzip_footer",
    "open_bytes",
    "parse_footer",
    "parse_toc",
    "zstd_footer",
]


_READER = ("ChunkRef", "EStargz", "RangeReader", "file_reader", "open_bytes")
_WRITER = ("DEFAULT_CHUNK_SIZE", "DEFAULT_COMPRESSION_LEVEL", "BuildOptions", "BuildResult", "build")


def __getattr__(name: str) -> object:
    """The reader's and the writer's names, imported when first asked for (plain imports: cycles stay visible)."""
    if name in _READER:
        from cvmfs_snap.estargz import reader as module
    elif name in _WRITER:
        from cvmfs_snap.estargz import writer as module  # type: ignore[no-redef]
    else:  # a submodule (``from cvmfs_snap.estargz import writer``): the import system loads it
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value
    return value
