"""The one registry of layer sources: which names exist (config validates ``sources`` against it) and how the
daemon builds each one, with its own state directory ``<root>/<name>/`` and its own stuck-call budget.

Adding a source means one :class:`SourceKind` entry here; neither the config parser nor the daemon changes. The
default order is CVMFS first (a published layer is never fetched lazily), then lazy eStargz.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cvmfs_snap.errors import InvalidInputError

from ..credentials import PullCredentials
from .base import LayerSource, SourceContext
from .cvmfs import CvmfsSource
from .health import MAX_STUCK_CALLS, CallBudget
from .lazy import LazySettings, LazySource

log = logging.getLogger(__name__)


#: a source's options (``[cvmfs-snap.source-options.<name>]`` in the config file), checked against its defaults
Options = Mapping[str, float]
#: every source has a stuck-call budget: how many of its calls may hang at once before it refuses new ones
MAX_HANGING = "max-hanging-calls"


@dataclass(frozen=True)
class SourceSettings:
    """The node settings sources may use (filled from the snapshotter's config by the daemon)."""

    repository_root: Path  # the CVMFS repository's mount point
    #: per source name: its options, already checked by :func:`check_options`
    options: Mapping[str, Options] = field(default_factory=dict)
    #: ``[cvmfs-snap.lazy]``: the lazy source's and its lazyfs process's settings
    lazy: LazySettings = field(default_factory=LazySettings)
    #: credentials ``cvmfs-snap pull`` handed to the daemon (in memory only), for the lazy source
    pull_credentials: PullCredentials = field(default_factory=PullCredentials)


@dataclass(frozen=True)
class SourceKind:
    name: str
    build: Callable[[SourceSettings, SourceContext, Options], LayerSource]
    #: option name -> default (seconds, counts); the config may set these and nothing else
    defaults: Options = field(default_factory=dict)
    #: misses are reported to the publisher only while every such source is healthy (it vouches for "not published")
    vouches_for_misses: bool = False
    description: str = ""


def _cvmfs(settings: SourceSettings, ctx: SourceContext, opts: Options) -> LayerSource:
    return CvmfsSource(settings.repository_root, ctx.state_dir, name=ctx.name, budget=ctx.budget,
                       fs_timeout=opts["timeout"], build_timeout=opts["build-timeout"],
                       health_ttl=opts["health-ttl"])


def _lazy(settings: SourceSettings, ctx: SourceContext, opts: Options) -> LayerSource:
    return LazySource(ctx.state_dir, settings.lazy, name=ctx.name, budget=ctx.budget,
                      pull_credentials=settings.pull_credentials)


SOURCES: dict[str, SourceKind] = {
    "cvmfs": SourceKind(
        "cvmfs", _cvmfs,
        defaults={"timeout": 10.0, "build-timeout": 300.0, "health-ttl": 5.0, MAX_HANGING: float(MAX_STUCK_CALLS)},
        vouches_for_misses=True, description="layers published in the CVMFS repository"),
    "lazy": SourceKind(
        "lazy", _lazy, defaults={MAX_HANGING: float(MAX_STUCK_CALLS)},
        description="eStargz layers mounted lazily from their registry (the lazyfs process)"),
}
#: the sources a node uses when its config names none
DEFAULT_SOURCES = ("cvmfs", "lazy")
KNOWN_SOURCES = tuple(SOURCES)


def check_options(name: str, table: Mapping[str, object], where: str) -> dict[str, float]:
    """A source's options from the config (unknown source or key, a non-number or one <= 0: InvalidInputError),
    completed with its defaults."""
    if name not in SOURCES:
        raise InvalidInputError(f"{where}: unknown layer source {name!r}; known: {', '.join(KNOWN_SOURCES)}")
    kind = SOURCES[name]
    out = dict(kind.defaults)
    for k, v in table.items():
        if k not in kind.defaults:
            raise InvalidInputError(f"{where}.{k}: unknown option of layer source {name!r}; known: "
                                    f"{', '.join(sorted(kind.defaults))}")
        if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
            raise InvalidInputError(f"{where}.{k} must be a positive number, got {v!r}")
        out[k] = float(v)
    return out


def check_names(names: Sequence[str], where: str) -> None:
    """Refuse unknown or repeated source names (config errors name the file and key)."""
    seen: set[str] = set()
    for n in names:
        if n not in SOURCES:
            raise InvalidInputError(f"{where}: unknown layer source {n!r}; known: {', '.join(KNOWN_SOURCES)}")
        if n in seen:
            raise InvalidInputError(f"{where}: layer source {n!r} is listed twice")
        seen.add(n)


def build_sources(names: Sequence[str], settings: SourceSettings, root: Path) -> list[LayerSource]:
    """The configured sources in order, each with state dir ``root/<name>`` and its own budget."""
    check_names(names, "layer sources")
    out: list[LayerSource] = []
    for n in names:
        opts = settings.options.get(n) or check_options(n, {}, n)
        ctx = SourceContext(n, Path(root) / n, CallBudget(n, int(opts[MAX_HANGING])))
        out.append(SOURCES[n].build(settings, ctx, opts))
        log.info("layer source %s: %s (state in %s)", n, SOURCES[n].description, ctx.state_dir)
    return out


def vouching(sources: Sequence[LayerSource]) -> list[LayerSource]:
    """The sources whose health decides whether a miss means "not published" (see :class:`SourceKind`)."""
    return [s for s in sources if s.name in SOURCES and SOURCES[s.name].vouches_for_misses]
