"""``cvmfs-snap``: the node-side command.

Subcommands live in their own modules; each exposes ``add_arguments(parser)`` and ``main(args) -> int``:

- ``snapshotter``: the containerd proxy-plugin daemon (``cvmfs_snap.snapshotter.daemon``)
- ``status``: list snapshots and where each layer comes from (``cvmfs_snap.snapshotter.status``)
- ``pull``: pull an image through containerd with our snapshotter (``cvmfs_snap.containerd.pull``)
- ``demo``: the end-to-end main job on an embedded default (``cvmfs_snap.demo``)
- ``convert``: copy an image registry to registry with eStargz layers (``cvmfs_snap.convert.command``)
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__
from .errors import CvmfsSnapError

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "snapshotter": ("cvmfs_snap.snapshotter.daemon", "run the containerd remote snapshotter (proxy plugin)"),
    "status": ("cvmfs_snap.snapshotter.status", "list snapshots and where each layer comes from"),
    "pull": ("cvmfs_snap.containerd.pull", "pull an image through containerd, serving published layers from CVMFS"),
    "demo": ("cvmfs_snap.demo", "run the whole data path end to end on a local embedded default"),
    "convert": ("cvmfs_snap.convert.command", "copy an image registry to registry, with its layers as eStargz"),
}

log = logging.getLogger("cvmfs_snap")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; with ``only``, just that subcommand's module is imported (a node's ``pull`` should not
    pay for importing the daemon's dependencies)."""
    parser = argparse.ArgumentParser(prog="cvmfs-snap",
                                     description="cvmfs-snap on a node: serve container layers from CVMFS")
    parser.add_argument("--version", action="version", version=f"cvmfs-snap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if only is not None and name != only:
            continue
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError as exc:  # a part not built yet must not break the others
            if exc.name != module:
                raise
            p.set_defaults(_missing=True)
    return parser


def setup_logging(level: str = "info") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # httpx logs every request URL at INFO; signed blob-storage URLs carry credentials in their query
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    only = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    args = build_parser(only).parse_args(argv)
    if not logging.getLogger().handlers:
        setup_logging(getattr(args, "log_level", "info") or "info")
    if getattr(args, "_missing", False):
        print(f"cvmfs-snap {args.command}: not available in this build", file=sys.stderr)
        return 2
    try:
        return int(importlib.import_module(args._module).main(args) or 0)
    except CvmfsSnapError as exc:
        log.error("%s", exc)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
