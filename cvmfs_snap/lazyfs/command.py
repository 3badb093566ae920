"""``cvmfs-snap lazyfs``: the command line of the lazy FUSE process (:mod:`cvmfs_snap.lazyfs.process`).

The snapshotter's lazy source starts it with its ``[cvmfs-snap.lazy]`` settings as flags; systemd may run it as a
unit of its own with the same flags (docs/lazy.md).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cvmfs_snap.errors import InvalidInputError
from cvmfs_snap.lazyfs.process import Options, run
from cvmfs_snap.procmem import limit_malloc_arenas

log = logging.getLogger(__name__)

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of bytes") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", type=Path, required=True,
                   help="the process's directory: mnt/, control.sock, state.json, unpacked/ (and cache/)")
    p.add_argument("--cache-dir", type=Path, default=None, help="chunk cache directory (default ROOT/cache)")
    p.add_argument("--cache-size", type=_positive_int, default=4 << 30,
                   help="bound in bytes of the chunk cache, spool files and unpacked copies together")
    p.add_argument("--prefetch-bound", type=_positive_int, default=64 << 20,
                   help="compressed bytes of landmark files fetched at attach (0 = no prefetch)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds for one registry call or attach")
    p.add_argument("--no-background-fetch", action="store_true", help="fetch only what containers read")
    p.add_argument("--force-single-range", action="store_true",
                   help="one range per request (registries that answer multi-range with the whole blob)")
    p.add_argument("--no-unpacked-copy", action="store_true",
                   help="never make node-local unpacked copies of completely fetched layers")
    p.add_argument("--metrics-address", default="", metavar="HOST:PORT",
                   help="serve Prometheus metrics on http://HOST:PORT/metrics (default: off)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def main(args: argparse.Namespace) -> int:
    if args.cache_size <= 0:
        raise InvalidInputError("--cache-size must be positive")
    if args.timeout <= 0:
        raise InvalidInputError("--timeout must be positive")
    opts = Options(root=args.root.absolute(), cache_dir=args.cache_dir, cache_size=args.cache_size,
                   prefetch_bound=args.prefetch_bound, timeout=args.timeout,
                   background=not args.no_background_fetch, force_single_range=args.force_single_range,
                   unpack=not args.no_unpacked_copy, metrics_address=args.metrics_address)
    limit_malloc_arenas()
    return run(opts)
