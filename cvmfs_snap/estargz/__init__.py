"""eStargz as a standalone format library (the counterpart of Go's ``stargz-snapshotter/estargz`` package).

It depends on ``cvmfs_snap.layer`` (tar parsing, path rules, gzip members) and on nothing of the snapshotter, FUSE,
containerd or registries. Readers take bytes or a range-reader callback; the writer takes and gives streams.
See docs/estargz.md.
"""

from cvmfs_snap.estargz.footer import FOOTER_READ_SIZE, Footer, gzip_footer, parse_footer, zstd_footer
from cvmfs_snap.estargz.reader import ChunkRef, EStargz, RangeReader, file_reader, open_bytes
from cvmfs_snap.estargz.toc import (
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TOC_DIGEST_ANNOTATION,
    TOC_TAR_NAME,
    UNCOMPRESSED_SIZE_ANNOTATION,
    Toc,
    TocEntry,
    parse_toc,
)
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
    "TOC_DIGEST_ANNOTATION",
    "TOC_TAR_NAME",
    "UNCOMPRESSED_SIZE_ANNOTATION",
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
