"""What the recipe and the allow-list decide: which images may be published, and under which name.

* :func:`canonical_ref`: one spelling per image. Host names are case-insensitive, so ``LOCALHOST:5000/x`` and
  ``LocalHost:5000/x`` are one registry: every reference the daemon queues (recipe, webhook, publish-on-miss) is
  lower-cased here, so it gets one queue entry, one ``.metadata`` tree and one public link, which GC schedules.
* :class:`RecipePattern` / :func:`recipe_patterns`: which pushed tags a recipe asks for (webhooks).
* :func:`allowed_by`: the publish-on-miss allow-list (``daemon.publish_on_miss_allow``); GC uses it too, to keep
  the images nodes asked for.
* :func:`recipe_into_config`: what a recipe adds to the settings (``cvmfs_repo``, ``platforms``), for ``convert``,
  ``loop`` and ``gc --recipe`` alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from cvmfs_snap.oci.reference import ImageReference
from publisher.config import PublisherConfig
from publisher.recipe import Recipe
from publisher.webhooks import normalize_host

log = logging.getLogger(__name__)


def canonical_ref(ref: ImageReference) -> ImageReference:
    """``ref`` with its registry host in the one spelling it is queued and published under (lower case; the port,
    the Docker Hub alias the recipe wrote and the ``http://`` marker are kept, DUCC paths depend on them)."""
    host = ref.registry.lower()
    return ref if host == ref.registry else dataclasses.replace(ref, registry=host)


@dataclass(frozen=True)
class RecipePattern:
    """One usable recipe line as a match rule for pushed tags."""

    #: the registry as webhooks spell it (``normalize_host``)
    registry: str
    repository: str
    #: the tag, or the line's tag glob
    tag: str
    #: the line's reference: publishing ``line_ref.with_tag(tag)`` keeps the recipe's registry spelling (DUCC
    #: paths use it, lower-cased by :func:`canonical_ref`) and its ``http://`` marker
    line_ref: ImageReference

    def matches(self, registry: str, repository: str, tag: str) -> bool:
        return (
            normalize_host(registry) == self.registry
            and repository == self.repository
            and fnmatch.fnmatchcase(tag, self.tag)
        )

    def ref_for(self, tag: str) -> ImageReference:
        """The reference to publish for a pushed ``tag`` this pattern matches."""
        return canonical_ref(self.line_ref.with_tag(tag))


def recipe_patterns(recipe: Recipe) -> list[RecipePattern]:
    """Match rules from a loaded recipe (lines that failed to parse are skipped)."""
    out: list[RecipePattern] = []
    for line in recipe.lines:
        ref = line.ref
        if ref is None:
            continue
        tag = line.tag_glob or ref.tag
        if tag is None:
            continue  # pinned by digest only: a push of a tag never changes it
        out.append(RecipePattern(normalize_host(ref.registry), ref.repository, tag, ref))
    return out


def allowed_by(globs: Iterable[str], ref: ImageReference) -> bool:
    """Publish-on-miss allow-list: does any ``registry/repository`` glob match the image?

    Registries are compared in one spelling (``normalize_host``: case folded, default ports dropped, Docker Hub
    aliases as ``docker.io``), so ``LOCALHOST:5000/x/*`` admits ``localhost:5000/x/y`` and ``docker.io/library/*``
    admits ``registry-1.docker.io/library/ubuntu``.
    """
    name = f"{normalize_host(ref.registry)}/{ref.repository}"
    for g in globs:
        host, sep, repo_glob = g.strip().partition("/")
        if sep and fnmatch.fnmatchcase(name, f"{normalize_host(host)}/{repo_glob}"):
            return True
    return False


def recipe_into_config(recipe: Recipe, config: PublisherConfig, args: argparse.Namespace | None = None) -> None:
    """A recipe's ``cvmfs_repo`` and ``platforms`` complete the settings (flags win). Its ``http://`` lines do not
    make a registry insecure (a recipe may come from users): plain HTTP only to loopback registries and those the
    configuration or ``--insecure-registry`` names; other ``http://`` lines fail, saying so."""
    if recipe.cvmfs_repo and not config.repo:
        config.repo = recipe.cvmfs_repo
    elif recipe.cvmfs_repo and config.repo and recipe.cvmfs_repo != config.repo:
        log.warning("recipe names repository %s; publishing into %s as configured", recipe.cvmfs_repo, config.repo)
    if recipe.platforms and not (args is not None and getattr(args, "platform", None)):
        config.platforms = list(recipe.platforms)
    config.validate("recipe")
