"""``cvmfs-snap``: the node-side command.

Subcommands live in their own modules; each exposes ``add_arguments(parser)`` and ``main(args) -> int``:

- ``snapshotter``: the containerd proxy-plugin daemon (``cvmfs_snap.snapshotter.daemon``)
- ``status``: list snapshots and where each layer comes from (``cvmfs_snap.snapshotter.status``)
- ``pull``: pull an image through containerd with our snapshotter (``cvmfs_snap.containerd.pull``)
- ``demo``: the end-to-end main job on an embedded default (``cvmfs_snap_devenv.demo``, in the development
  harness: a distribution of its own that site installs do not carry)
- ``convert``: copy an image registry to registry with eStargz layers (``cvmfs_snap.convert.command``)
- ``lazyfs``: the lazy layers' FUSE process (``cvmfs_snap.lazyfs.command``)
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

from . import __version__
from .errors import CvmfsSnapError
from .procexit import fast_exit
from .unusedimports import UNUSED_BY_HTTP_CLIENTS, skip_unused_imports

SUBCOMMANDS: dict[str, str] = {
    "snapshotter": "run the containerd remote snapshotter (proxy plugin)",
    "status": "list snapshots and where each layer comes from",
    "pull": "pull an image through containerd, serving published layers from CVMFS",
    "demo": "run the whole data path end to end on a local embedded default",
    "convert": "copy an image registry to registry, with its layers as eStargz",
    "lazyfs": "serve lazy eStargz layers through one FUSE mount (started by the snapshotter)",
}

#: what to tell a user whose install lacks the package a subcommand lives in
MISSING_HINTS = {
    "cvmfs_snap_devenv": "needs cvmfs-snap's development harness (distribution cvmfs-snap-devenv, in devenv/ of the "
                         "source tree), which a site install does not carry: run scripts/demo in a clone of the "
                         "repository (it installs everything), or `pip install ./devenv` there",
}

log = logging.getLogger("cvmfs_snap")

#: modules that libraries import eagerly although ``cvmfs-snap pull`` never uses them (:mod:`cvmfs_snap.unusedimports`),
#: zstandard too (blobs are fetched as identity and applied by containerd). Together 0.1-0.4 s of a pull's start-up.
UNUSED_BY_PULL = (*UNUSED_BY_HTTP_CLIENTS, "zstandard")
#: the same for the two long-running processes of a node, for their resident memory (issue 9's RSS goal, bench/
#: README.md): httpx's command line alone is 4-5 MiB of RSS in each, trio (pulled in only by httpcore; the daemon's
#: own code never imports it) 5 MiB in the snapshotter daemon, h2 1 MiB. The lazyfs process runs on trio and
#: decodes zstd chunks, so it keeps both.
UNUSED_BY_DAEMON = UNUSED_BY_HTTP_CLIENTS
UNUSED_BY_LAZYFS = tuple(n for n in UNUSED_BY_HTTP_CLIENTS if n != "trio")
#: ``convert`` talks HTTP/1.1 from threads (no trio, anyio or h2) and fetches blobs as identity (no brotli); it keeps
#: zstandard (zstd layers and the zstd eStargz variant). 0.1-0.3 s of a serial start the second worker cannot share
#: (issue 8's speed-up goal).
UNUSED_BY_CONVERT = UNUSED_BY_HTTP_CLIENTS
#: modules that must not be imported *while* a command's module is imported, but may be later: grpc's Cython core
#: imports asyncio, which imports ssl eagerly (for asyncio's own TLS, which the daemon never uses: gRPC brings its
#: own TLS, and the socket is a unix one) -- ssl and its libcrypto are ~5 MiB of the daemon's RSS (bench/README.md
#: "Resident memory"). asyncio handles the ImportError (``ssl = None``); the block is lifted once the module is
#: imported, so a daemon that does talk HTTPS later (a publish-on-miss report) imports ssl then, as usual.
IMPORTED_WITHOUT: dict[str, tuple[str, ...]] = {"snapshotter": ("ssl",)}
UNUSED_IMPORTS: dict[str, tuple[str, ...]] = {"pull": UNUSED_BY_PULL, "snapshotter": UNUSED_BY_DAEMON,
                                              "lazyfs": UNUSED_BY_LAZYFS, "convert": UNUSED_BY_CONVERT}
#: commands that end through :func:`fast_exit` when they are the process: everything they opened is closed and
#: their output written by then; the interpreter's teardown (freeing a large image's TOC objects, module
#: finalisation) would only add serial time
FAST_EXIT = ("pull", "convert")


@contextmanager
def imported_without(names: tuple[str, ...]) -> Iterator[None]:
    """Make ``import X`` raise ImportError for each of ``names`` that is not imported yet, until the block ends."""
    blocked = [n for n in names if n not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        for name in blocked:
            if sys.modules.get(name, "") is None:
                del sys.modules[name]


def subcommand(name: str) -> ModuleType:
    """The module of subcommand ``name``, imported only now: a node's ``pull`` does not pay for the daemon's
    imports, nor ``status`` for the pull's. Plain imports (no importlib), so import cycles stay visible."""
    if name == "snapshotter":
        from cvmfs_snap.snapshotter import daemon

        return daemon
    if name == "status":
        from cvmfs_snap.snapshotter import status

        return status
    if name == "pull":
        from cvmfs_snap.containerd import pull

        return pull
    if name == "demo":
        from cvmfs_snap_devenv import demo

        return demo
    if name == "convert":
        from cvmfs_snap.convert import command

        return command
    if name == "lazyfs":
        from cvmfs_snap.lazyfs import command as lazyfs_command

        return lazyfs_command
    raise KeyError(name)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; with ``only``, just that subcommand's module is imported (a node's ``pull`` should not
    pay for importing the daemon's dependencies)."""
    parser = argparse.ArgumentParser(prog="cvmfs-snap",
                                     description="cvmfs-snap on a node: serve container layers from CVMFS")
    parser.add_argument("--version", action="version", version=f"cvmfs-snap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is not None and name != only:
            continue
        try:
            module = subcommand(name)
        except ModuleNotFoundError as exc:  # a part not built yet must not break the others
            if not (exc.name or "").startswith("cvmfs_snap"):
                raise
            p.set_defaults(_missing=(exc.name or "").partition(".")[0])
            continue
        module.add_arguments(p)
        p.set_defaults(_module=module)
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
    """The command line; ``argv`` None means this process is the command (the console script, ``python -m``)."""
    own_process = argv is None
    argv = sys.argv[1:] if argv is None else argv
    only = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    if own_process and only in UNUSED_IMPORTS:
        skip_unused_imports(UNUSED_IMPORTS[only])
    with imported_without(IMPORTED_WITHOUT.get(only or "", ()) if own_process else ()):
        parser = build_parser(only)
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        setup_logging(getattr(args, "log_level", "info") or "info")
    missing = getattr(args, "_missing", "")
    if missing:
        print(f"cvmfs-snap {args.command}: {MISSING_HINTS.get(missing, 'not available in this build')}",
              file=sys.stderr)
        return 2
    try:
        module: ModuleType = args._module
        rc = int(module.main(args) or 0)
    except CvmfsSnapError as exc:
        log.error("%s", exc)
        rc = exc.exit_code
    except KeyboardInterrupt:
        rc = 130
    if own_process and only in FAST_EXIT:
        fast_exit(rc)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
