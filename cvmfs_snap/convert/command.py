"""``cvmfs-snap convert SRC DST``: registry-to-registry conversion of an image to eStargz."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from cvmfs_snap.convert.image import ConvertOptions, convert_image
from cvmfs_snap.convert.progress import LogProgress, RichProgress, summary
from cvmfs_snap.errors import InvalidInputError
from cvmfs_snap.estargz import DEFAULT_CHUNK_SIZE, DEFAULT_COMPRESSION_LEVEL
from cvmfs_snap.oci import CredentialStore, ImageReference, Platform, RegistryClient
from cvmfs_snap.procmem import limit_malloc_arenas


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="source image, e.g. registry.example.org/app:1.0")
    parser.add_argument("dst", metavar="DST", help="destination image (tag or digest), e.g. registry/app:1.0-esgz")
    plat = parser.add_mutually_exclusive_group()
    plat.add_argument("--platform", metavar="P", help="convert only this platform of an index (os/arch[/variant]); "
                      "the destination is then a single-platform image")
    plat.add_argument("--all-platforms", action="store_true", help="keep every platform of an index (the default)")
    parser.add_argument("--prioritize", metavar="FILE", type=Path,
                        help="file listing paths (one a line) to place first, before .prefetch.landmark")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, metavar="N",
                        help=f"bytes per chunk (default {DEFAULT_CHUNK_SIZE})")
    parser.add_argument("--compression-level", type=int, default=DEFAULT_COMPRESSION_LEVEL, metavar="N",
                        help=f"gzip level 0-9 (default {DEFAULT_COMPRESSION_LEVEL}; the Go tools use 9)")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="compression threads (default: all cores); the output is the same for any value")
    parser.add_argument("--insecure-registry", action="append", default=[], metavar="HOST[:PORT]",
                        help="talk plain HTTP to this registry (repeatable); loopback hosts always may")
    parser.add_argument("--docker-config", type=Path, default=None, metavar="PATH",
                        help="docker config.json with credentials (default: $DOCKER_CONFIG or ~/.docker)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    parser.add_argument("--progress", choices=("auto", "bars", "plain"), default="auto",
                        help="progress bars on a terminal (auto), always, or plain log lines")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def main(args: argparse.Namespace) -> int:
    # the threads (decoding, compressing, landing; two layers at a time) would each keep a malloc arena of freed
    # megabyte buffers: 346 MiB peak for a 4 GiB layer instead of ~250
    limit_malloc_arenas(2, mmap_threshold=None)
    src = ImageReference.parse(args.src)
    dst = ImageReference.parse(args.dst)
    prioritized: list[str] = []
    if args.prioritize is not None:
        try:
            text = args.prioritize.read_text()
        except OSError as e:
            raise InvalidInputError(f"--prioritize {args.prioritize}: cannot read it ({e.strerror})") from None
        prioritized = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    opts = ConvertOptions(
        chunk_size=args.chunk_size, compression_level=args.compression_level, workers=args.workers,
        prioritized=prioritized, platform=Platform.parse(args.platform) if args.platform else None,
    )
    if args.workers is not None and args.workers < 1:
        raise InvalidInputError(f"--workers must be at least 1, got {args.workers}")
    bars = args.progress == "bars" or (args.progress == "auto" and sys.stderr.isatty())
    creds = CredentialStore.from_docker_config(str(args.docker_config) if args.docker_config else None)
    reporter: RichProgress | contextlib.nullcontext[LogProgress] = (
        RichProgress() if bars else contextlib.nullcontext(LogProgress()))
    with RegistryClient(credentials=creds, insecure_registries=args.insecure_registry) as client, \
            reporter as progress:
        result = convert_image(client, src, dst, opts, progress)
    if args.json:
        print(json.dumps({
            "destination": result.destination, "digest": result.digest, "mediaType": result.media_type,
            "seconds": round(result.seconds, 3),
            "layers": [{"source": r.source, "digest": r.digest, "size": r.size, "kept": r.kept,
                        "uncompressedSize": r.uncompressed_size, "seconds": round(r.seconds, 3)}
                       for r in result.layers],
        }, indent=2))
    else:
        print(summary(result))
    return 0
