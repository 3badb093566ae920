"""The one registry of layer sources: which names exist (config validates ``sources`` against it) and how the
daemon builds each one, with its own state directory ``<root>/<name>/`` and its own stuck-call budget.

Adding a source (the lazy eStargz one next) means one :class:`SourceKind` entry here; neither the config parser
nor the daemon changes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cvmfs_snap.errors import InvalidInputError

from .base import LayerSource, SourceContext
from .cvmfs import CvmfsSource
from .health import CallBudget

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceSettings:
    """The node settings sources may use (filled from the snapshotter's config by the daemon)."""

    repository_root: Path  # the CVMFS repository's mount point


@dataclass(frozen=True)
class SourceKind:
    name: str
    build: Callable[[SourceSettings, SourceContext], LayerSource]
    #: misses are reported to the publisher only while every such source is healthy (it vouches for "not published")
    vouches_for_misses: bool = False
    description: str = ""


def _cvmfs(settings: SourceSettings, ctx: SourceContext) -> LayerSource:
    return CvmfsSource(settings.repository_root, ctx.state_dir, name=ctx.name, budget=ctx.budget)


SOURCES: dict[str, SourceKind] = {
    "cvmfs": SourceKind("cvmfs", _cvmfs, vouches_for_misses=True,
                        description="layers published in the CVMFS repository"),
}
KNOWN_SOURCES = tuple(SOURCES)


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
        ctx = SourceContext(n, Path(root) / n, CallBudget(n))
        out.append(SOURCES[n].build(settings, ctx))
        log.info("layer source %s: %s (state in %s)", n, SOURCES[n].description, ctx.state_dir)
    return out


def vouching(sources: Sequence[LayerSource]) -> list[LayerSource]:
    """The sources whose health decides whether a miss means "not published" (see :class:`SourceKind`)."""
    return [s for s in sources if s.name in SOURCES and SOURCES[s.name].vouches_for_misses]
