"""``cvmfs-snap-publisher``: DUCC's verbs on the stratum-0.

    cvmfs-snap-publisher convert RECIPE              publish every image of a DUCC recipe once
    cvmfs-snap-publisher loop RECIPE                 the daemon: keep the recipe published (publisher.daemon)
    cvmfs-snap-publisher convert-single-image IMAGE [REPO]
    cvmfs-snap-publisher gc [--recipe RECIPE] [--grace-period DAYS] [--dry-run]      (publisher.gccommand)
    cvmfs-snap-publisher check-image-syntax IMAGE

Common options: ``--backend {local,cvmfs-ingest,cvmfs-transaction}`` (default local), ``--root DIR``,
``--repo NAME``, ``--concurrency N``, ``--skip-flat``, ``--config FILE`` (YAML, see publisher.config). The exit status
is 0 when every image was published (or already was), 1 when any failed, 2 for unusable input (bad recipe,
configuration or image name).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

from cvmfs_snap import __version__
from cvmfs_snap.errors import CvmfsSnapError, InvalidInputError
from cvmfs_snap.procexit import fast_exit
from cvmfs_snap.progressbars import BarDisplay
from cvmfs_snap.unusedimports import UNUSED_BY_HTTP_CLIENTS, skip_unused_imports

from .config import BACKENDS, PublisherConfig

if TYPE_CHECKING:
    from .pipeline import ImageResult
    from .recipe import RecipeError

# The modules of each verb (the pipeline and its registry client, the daemon with its HTTP server, GC) are imported
# in the verb's function, after ``main`` has parsed the command line: a ``convert`` does not pay for the daemon's
# imports (hypercorn, watchdog), and the libraries' unused halves are kept out first (``UNUSED_BY_COMMANDS``). The
# CLI is the top of the module graph, so these function-level imports hide no cycle.

#: modules that libraries import eagerly although no verb but ``loop`` uses them (:mod:`cvmfs_snap.unusedimports`):
#: 0.2-0.3 s of CPU of each command's start-up. Never for ``loop``, whose HTTP server (hypercorn) serves HTTP/2 with
#: h2. zstandard is not in the list: zstd layers need it.
UNUSED_BY_COMMANDS = UNUSED_BY_HTTP_CLIENTS


log = logging.getLogger("publisher")


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("repository and backend")
    g.add_argument("--config", metavar="FILE", help="YAML settings file (flags override it)")
    g.add_argument("--backend", choices=BACKENDS, default=None, help="how the tree is written (default: local)")
    g.add_argument("--root", metavar="DIR", default=None, help="repository root (default /cvmfs/<repo>)")
    g.add_argument("--repo", metavar="NAME", default=None, help="CVMFS repository name, e.g. unpacked.cern.ch")
    g.add_argument("--cvmfs-server", dest="cvmfs_server", metavar="PATH", default=None,
                   help="cvmfs_server command (cvmfs backends; default cvmfs_server)")
    g.add_argument("--lease-path", dest="lease_path", metavar="SUBPATH", default=None,
                   help="cvmfs-transaction: open transactions on <repo>/<SUBPATH> (gateway lease)")
    g.add_argument("--state-dir", dest="state_dir", metavar="DIR", default=None,
                   help="local state: lock file, staging (default depends on the backend)")
    w = p.add_argument_group("publishing")
    w.add_argument("--concurrency", type=int, default=None, metavar="N", help="layers processed at once (default 2)")
    w.add_argument("--skip-flat", action="store_true", help="do not build flat root filesystems / public links")
    w.add_argument("--platform", action="append", metavar="OS/ARCH",
                   help="publish only these platforms of multi-arch images (repeatable; default all)")
    w.add_argument("--insecure-registry", dest="insecure_registry", action="append", metavar="HOST:PORT",
                   help="registry reached over plain HTTP (repeatable)")
    w.add_argument("--docker-config", dest="docker_config", metavar="FILE", default=None,
                   help="Docker config.json with registry credentials")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--no-progress", action="store_true", help="plain log lines even on a terminal")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cvmfs-snap-publisher",
        description="Publish container images into a CVMFS repository (DUCC-compatible layout and verbs).",
    )
    parser.add_argument("--version", action="version", version=f"cvmfs-snap-publisher {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="publish all images of a DUCC recipe")
    p.add_argument("recipe", metavar="RECIPE")
    _common(p)

    p = sub.add_parser("loop", help="keep a recipe published: poll, webhooks, /metrics (daemon)")
    p.add_argument("recipe", metavar="RECIPE")
    _common(p)

    p = sub.add_parser("convert-single-image", help="publish one image")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("repo_positional", metavar="REPO", nargs="?", help="CVMFS repository (as DUCC's argument)")
    _common(p)

    p = sub.add_parser("gc", help="remove images scheduled for removal and layers no image uses")
    p.add_argument("--grace-period", dest="grace_period", type=float, default=None, metavar="DAYS",
                   help="keep scheduled images at least DAYS days (default 7)")
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    p.add_argument("--recipe", metavar="RECIPE", default=None,
                   help="also schedule images this DUCC recipe no longer names for removal (removed by a later gc "
                        "after the grace period); images named again are unscheduled")
    _common(p)

    p = sub.add_parser("check-image-syntax", help="parse an image reference and show its parts")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    return parser


def load_config(args: argparse.Namespace) -> PublisherConfig:
    config = PublisherConfig.load(getattr(args, "config", None))
    return config.apply_args(args)


# -- progress ----------------------------------------------------------------------------------------------------
class RichProgress(BarDisplay):
    """Progress bars for layers on a terminal (``ProgressSink``)."""

    def __init__(self) -> None:
        super().__init__(transient=True, eta=True)

    def layer_started(self, digest: str, size: int) -> None:
        self._bars.add(digest, f"layer {digest[7:19]}", size or None)

    def layer_advanced(self, digest: str, nbytes: int) -> None:
        self._bars.advance(digest, nbytes)

    def layer_finished(self, digest: str, ok: bool) -> None:
        self._bars.remove(digest)

    def image_finished(self, result: ImageResult) -> None:
        status = "[green]ok" if result.ok else "[red]FAILED"
        self.console.print(f"{status}[/] {result.ref}")


#: libraries whose INFO/DEBUG lines carry full request URLs: redirects to blob storage are pre-signed URLs whose
#: query string is a credential, and such lines end up in journald and shared log collectors
QUIET_LOGGERS = ("httpx", "httpcore")


def _setup_logging(level: str, progress: RichProgress | None) -> None:
    for name in QUIET_LOGGERS:  # even at --log-level debug: our own lines say which blob is being fetched
        logging.getLogger(name).setLevel(logging.WARNING)
    root = logging.getLogger()
    if root.handlers:
        root.setLevel(getattr(logging, level.upper(), logging.INFO))
        return
    handler: logging.Handler
    if progress is not None:
        from rich.logging import RichHandler

        handler = RichHandler(console=progress.console, show_path=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))


# -- verbs ---------------------------------------------------------------------------------------------------------
def _summary(results: list[ImageResult], recipe_errors: list[RecipeError]) -> int:
    failed = [r for r in results if not r.ok]
    published = sum(1 for r in results if r.ok and not r.unchanged)
    unchanged = sum(1 for r in results if r.ok and r.unchanged)
    for e in recipe_errors:
        print(f"FAILED {e.input}: {e.message}", file=sys.stderr)
    for r in failed:
        print(f"FAILED {r.ref}: {r.error}", file=sys.stderr)
    print(
        f"{published} image(s) published, {unchanged} unchanged, {len(failed) + len(recipe_errors)} failed",
        file=sys.stderr,
    )
    return 1 if failed or recipe_errors else 0


def _start_forkserver() -> None:
    """The layer workers' forkserver, started before the pipeline's and the registry client's imports: its own
    imports then run on another core meanwhile, not after them on the first layer's path."""
    from .backends import cvmfs, local  # noqa: F401 - their offloadable steps, which the forkserver preloads
    from .workers import start_forkserver

    start_forkserver()


def cmd_convert(args: argparse.Namespace, config: PublisherConfig, progress: RichProgress | None) -> int:
    _start_forkserver()
    from .factory import make_publisher
    from .policy import recipe_into_config
    from .recipe import Recipe

    recipe = Recipe.load(args.recipe)
    recipe_into_config(recipe, config, args)
    with make_publisher(config, progress=progress) as pub:
        refs = recipe.expand(pub.client)
        results = pub.publish_images(refs)
    return _summary(results, recipe.errors)


def cmd_convert_single(args: argparse.Namespace, config: PublisherConfig, progress: RichProgress | None) -> int:
    _start_forkserver()
    from cvmfs_snap.oci import ImageReference

    from .factory import make_publisher

    if args.repo_positional and not config.repo:
        config.repo = args.repo_positional
        config.validate("command line")
    ref = ImageReference.parse(args.image)  # http:// to a host not configured insecure: refused by the client
    with make_publisher(config, progress=progress) as pub:
        result = pub.publish_image(ref)
    return _summary([result], [])


def cmd_check_image_syntax(args: argparse.Namespace) -> int:
    from .recipe import parse_line

    line = parse_line(args.image)
    if line.error or line.ref is None:
        print(f"invalid: {line.error}", file=sys.stderr)
        return 2
    ref = line.ref
    print(f"registry:   {ref.registry}")
    print(f"api host:   {ref.api_host}")
    print(f"repository: {ref.repository}")
    print(f"tag:        {line.tag_glob if line.tag_glob else (ref.tag or '')}" + (" (glob)" if line.tag_glob else ""))
    print(f"digest:     {ref.digest or ''}")
    print(f"scheme:     {'http' if ref.insecure else 'https'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None and args.command != "loop":
        skip_unused_imports(UNUSED_BY_COMMANDS)
    if args.command == "check-image-syntax":
        _setup_logging(args.log_level, None)
        try:
            return cmd_check_image_syntax(args)
        except CvmfsSnapError as exc:
            print(f"invalid: {exc}", file=sys.stderr)
            return 2
    use_rich = sys.stderr.isatty() and not args.no_progress and args.command in ("convert", "convert-single-image")
    progress = RichProgress() if use_rich else None
    _setup_logging(args.log_level, progress)
    try:
        config = load_config(args)
        if args.command == "loop":
            from .daemon import run_daemon

            return run_daemon(args, config)
        if args.command == "gc":
            from .gccommand import run_gc

            return run_gc(args, config)
        if progress is not None:
            with progress:
                rc = _dispatch(args, config, progress)
        else:
            rc = _dispatch(args, config, None)
    except InvalidInputError as exc:
        log.error("%s", exc)
        return exc.exit_code
    except CvmfsSnapError as exc:
        log.error("%s", exc)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    if argv is None:  # the process: its publisher (workers, client, backend) is closed and the summary printed
        fast_exit(rc)
    return rc


def _dispatch(args: argparse.Namespace, config: PublisherConfig, progress: RichProgress | None) -> int:
    if args.command == "convert":
        return cmd_convert(args, config, progress)
    return cmd_convert_single(args, config, progress)


if __name__ == "__main__":
    raise SystemExit(main())
