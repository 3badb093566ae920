"""DUCC recipe v1: the list of images a site wants in its repository.

A DUCC recipe is accepted unchanged::

    version: 1
    user: smosciat
    cvmfs_repo: 'unpacked.cern.ch'
    output_format: '$(scheme)://registry.gitlab.cern.ch/thin/$(image)'
    input:
      - 'https://registry.hub.docker.com/library/fedora:latest'
      - 'https://registry.hub.docker.com/library/debian:*'

``input`` lines may carry ``*`` globs in the tag; they are matched against the registry's tag list. We add one
optional key, ``platforms: [linux/amd64, ...]``, to restrict which platforms of multi-arch images are published.
``user`` and ``output_format`` (DUCC's thin-image push) are read and ignored, with a log line saying so.

A broken input line does not spoil the recipe: it is recorded in :attr:`Recipe.errors` (and reported as a failed
image by the CLI/daemon) while the other lines proceed; a registry tag list holding an invalid tag fails that tag
alone (:meth:`Recipe.expand_lines` gives per-line results). Only a file that is not a recipe at all raises.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Required, TypedDict

import msgspec
import yaml

from cvmfs_snap.errors import CvmfsSnapError, InvalidInputError
from cvmfs_snap.oci import ImageReference, Platform, RegistryClient
from cvmfs_snap.validation import EXPECT, Check, load_as, unknown_keys

log = logging.getLogger(__name__)


def _platform(value: str) -> str:
    try:
        Platform.parse(value)
    except CvmfsSnapError as exc:
        raise ValueError(f"a platform such as linux/amd64 ({exc})") from None
    return value


#: the recipe file's shape (checked by cvmfs_snap.validation); ``input`` entries are checked one by one, so that a
#: bad line fails alone; ``user`` and ``output_format`` are DUCC's, read and ignored whatever they hold
class RecipeFile(TypedDict, total=False):
    version: Required[Annotated[Literal[1], msgspec.Meta(extra_json_schema={
        EXPECT: "1: only DUCC recipe version 1 is understood (add 'version: 1')"})]]
    input: Required[Annotated[list[object], msgspec.Meta(extra_json_schema={EXPECT: "a list of image references"})]]
    platforms: list[Annotated[str, Check(_platform)]] | None
    cvmfs_repo: str | None
    user: object
    output_format: object


@dataclass
class RecipeLine:
    """One ``input`` entry: parsed reference (tag glob kept apart) or why it cannot be used."""

    text: str
    ref: ImageReference | None = None
    #: the tag glob (``v1.*``) when the tag has ``*``; ``ref.tag`` is then a placeholder
    tag_glob: str | None = None
    error: str | None = None

    def ref_with_tag(self, tag: str) -> ImageReference:
        assert self.ref is not None
        return self.ref.with_tag(tag)


@dataclass
class RecipeError:
    """A recipe line that failed (bad syntax, tag list unreadable, no tag matching its glob), or one ``tag`` of a
    registry's tag list that is not a valid tag (the line's other tags expanded)."""

    input: str
    message: str
    #: the invalid tag when only that tag failed ("" when the whole line did)
    tag: str = ""

    @property
    def whole_line(self) -> bool:
        """The line did not expand (its images are unknown); False for a single invalid tag, which cannot name a
        published image, so it does not make the expansion incomplete for garbage collection."""
        return not self.tag


@dataclass
class LineResult:
    """What one usable recipe line expanded to: its references and its own failures (both may be non-empty)."""

    line: RecipeLine
    refs: list[ImageReference] = field(default_factory=list)
    errors: list[RecipeError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass
class Recipe:
    version: int
    cvmfs_repo: str | None
    lines: list[RecipeLine]
    user: str | None = None
    output_format: str | None = None
    platforms: list[str] = field(default_factory=list)
    path: str = ""
    errors: list[RecipeError] = field(default_factory=list)

    # -- loading ---------------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as exc:
            raise InvalidInputError(f"cannot read recipe {p}: {exc.strerror}") from exc
        return cls.parse(text, str(p))

    @classmethod
    def parse(cls, text: str, source: str = "recipe") -> Recipe:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InvalidInputError(f"recipe {source} is not valid YAML: {exc}") from exc
        unknown = unknown_keys(RecipeFile, data)
        if unknown:
            log.warning("recipe %s: ignoring unknown key(s) %s", source, ", ".join(unknown))
        doc = load_as(RecipeFile, data, f"recipe {source}", strict=True,
                      kind="a mapping with 'version: 1' and 'input'")
        inputs, platforms = doc["input"], doc.get("platforms") or []
        if doc.get("output_format"):
            log.info("recipe %s: 'output_format' (DUCC thin-image push) is not supported and is ignored", source)
        if doc.get("user"):
            log.debug("recipe %s: 'user' is informational and ignored", source)
        recipe = cls(
            version=1,
            cvmfs_repo=doc.get("cvmfs_repo") or None,
            lines=[parse_line(item) for item in inputs],
            user=str(doc["user"]) if doc.get("user") else None,
            output_format=str(doc["output_format"]) if doc.get("output_format") else None,
            platforms=list(platforms),
            path=source,
        )
        for line in recipe.lines:
            if line.error:
                recipe.errors.append(RecipeError(line.text, line.error))
                log.error("recipe %s: %s", source, line.error)
        return recipe

    @property
    def insecure_registries(self) -> list[str]:
        """Registries the recipe names with ``http://`` (plain HTTP)."""
        return sorted({ln.ref.registry for ln in self.lines if ln.ref is not None and ln.ref.insecure})

    # -- expansion -------------------------------------------------------------------------------------------------
    def expand_lines(self, client: RegistryClient) -> list[LineResult]:
        """Each usable line with the references it stands for and what failed in it, in recipe order.

        A line fails alone: an unreadable tag list or a glob matching nothing fails the whole line (``refs`` is
        empty), one tag of the registry's list that is not a valid tag fails only that tag (the line's other tags
        are kept and the bad tag is listed in ``errors``). Lines with syntax errors are not included (they are in
        :attr:`errors` since parsing). A reference listed by an earlier line is not repeated. Never raises for
        what a registry sends: a daemon's full pass must still queue the healthy lines.
        """
        self.errors = [RecipeError(ln.text, ln.error) for ln in self.lines if ln.error]
        out: list[LineResult] = []
        seen: set[str] = set()
        for line in self.lines:
            if line.ref is None:
                continue
            res = LineResult(line)
            out.append(res)
            refs = [line.ref] if line.tag_glob is None else self._expand_glob(client, line, res)
            for r in refs:
                if str(r) not in seen:
                    seen.add(str(r))
                    res.refs.append(r)
        return out

    def expand(self, client: RegistryClient) -> list[ImageReference]:
        """The concrete references: plain lines as they are, tag globs matched against the registry's tags.

        Lines (and single tags) that fail here are added to :attr:`errors`, which then holds the syntax errors plus
        this expansion's failures (a daemon expanding again and again does not pile up). See :meth:`expand_lines`.
        """
        return [r for res in self.expand_lines(client) for r in res.refs]

    def _expand_glob(self, client: RegistryClient, line: RecipeLine, res: LineResult) -> list[ImageReference]:
        assert line.ref is not None and line.tag_glob is not None
        try:
            tags = client.list_tags(line.ref)
        except CvmfsSnapError as exc:
            self._fail(line, res, f"{line.text}: cannot list tags to expand {line.tag_glob!r}: {exc}")
            return []
        except Exception as exc:  # a bug or an OS error: this line fails, the recipe goes on
            log.exception("recipe %s: unexpected error listing the tags of %s", self.path, line.ref.name)
            self._fail(line, res, f"{line.text}: cannot list tags to expand {line.tag_glob!r}: unexpected error: "
                                  f"{exc!r}")
            return []
        matched = sorted({t for t in tags if fnmatch.fnmatchcase(t, line.tag_glob)})
        refs: list[ImageReference] = []
        for t in matched:
            try:
                refs.append(line.ref_with_tag(t))
            except CvmfsSnapError as exc:
                self._fail(line, res, f"{line.text}: registry {line.ref.registry} lists tag {t!r} of "
                                      f"{line.ref.name}, which is not a valid tag ({exc}); skipped, the line's "
                                      "other tags are published", tag=t)
        if not matched:
            self._fail(line, res, f"{line.text}: no tag of {line.ref.name} matches {line.tag_glob!r}")
        elif refs:
            log.info("recipe %s: %s expands to %d tag(s)", self.path, line.text, len(refs))
        return refs

    def _fail(self, line: RecipeLine, res: LineResult, message: str, tag: str = "") -> None:
        log.error("recipe %s: %s", self.path, message)
        err = RecipeError(line.text, message, tag)
        self.errors.append(err)
        res.errors.append(err)


def parse_line(item: object) -> RecipeLine:
    """Parse one ``input`` entry; errors are returned in the line, never raised."""
    if not isinstance(item, str):
        return RecipeLine(text=repr(item), error=f"input entry {item!r} is not a string image reference")
    text = item.strip()
    glob: str | None = None
    body = text
    slash, colon = body.rfind("/"), body.rfind(":")
    if "*" in body:
        if colon <= slash or "*" in body[:colon] or "@" in body:
            return RecipeLine(text=text, error=f"{text}: '*' is only allowed in the tag (e.g. repo:v1.*)")
        glob = body[colon + 1:]
        body = body[:colon] + ":latest"
    try:
        ref = ImageReference.parse(body)
    except CvmfsSnapError as exc:
        return RecipeLine(text=text, error=f"{text}: {exc}")
    return RecipeLine(text=text, ref=ref, tag_glob=glob)
