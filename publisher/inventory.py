"""The published-image inventory: which images a repository holds under ``.metadata``, under which names.

Read-only: used by the remove schedule (images dropped from the recipe) and by GC's plan."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cvmfs_snap.errors import InvalidInputError
from cvmfs_snap.fsutil import walk, walk_fd
from cvmfs_snap.layout import IMAGE_JSON, MANIFEST_JSON, ImageRecord, RepositoryLayout
from cvmfs_snap.oci import ImageReference

log = logging.getLogger(__name__)


@dataclass
class PublishedImage:
    """One image present under ``.metadata`` (``<registry>/<repository>:<tag>``)."""

    registry: str
    repository: str
    tag: str
    meta_dir: Path
    #: index digest, else manifest digest (image.json), else the sha256 of manifest.json (DUCC-made images)
    identity: str

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}:{self.tag}"


def image_identity(meta_dir: Path) -> str:
    """What an image's metadata directory holds now: index digest, else manifest digest, else the sha256 of
    ``manifest.json`` (DUCC-made images); "" when there is neither."""
    try:
        rec = ImageRecord.from_json((meta_dir / IMAGE_JSON).read_bytes())
        ident = rec.index_digest or rec.manifest_digest
        if isinstance(ident, str) and ident:
            return ident
    except (OSError, InvalidInputError):
        pass
    try:
        return "sha256:" + hashlib.sha256((meta_dir / MANIFEST_JSON).read_bytes()).hexdigest()
    except OSError:
        return ""


def image_names(ref: ImageReference) -> tuple[str, str, str]:
    """(registry, repository, tag) a reference is published under: a digest-only reference under its digest."""
    tag = ref.tag or (ref.digest or "latest")
    return ref.registry, ref.repository, tag


def image_name_of(ref: ImageReference | str) -> str | None:
    """The ``.metadata`` name the pipeline publishes a reference (or reference text) under; None when it cannot
    be one."""
    try:
        parsed = ImageReference.parse(ref) if isinstance(ref, str) else ref
        registry, repository, tag = image_names(parsed)
        return RepositoryLayout.image_name(registry, repository, tag)
    except InvalidInputError:
        return None


def split_image_name(name: str) -> tuple[str, str, str]:
    """``<registry>/<repository>:<tag>`` -> parts (the tag may itself hold ``:``, e.g. ``sha256:...``)."""
    registry, sep, rest = name.partition("/")
    head, _slash, last = rest.rpartition("/")
    repo_last, colon, tag = last.partition(":")
    if not sep or not colon or not repo_last or not tag:
        raise InvalidInputError(f"{name!r} is not an image name of the form <registry>/<repository>:<tag>")
    return registry, f"{head}/{repo_last}" if head else repo_last, tag


def walk_dir(top: Path) -> Iterator[tuple[str, list[str], list[str]]]:
    """``fsutil.walk`` (no recursion limit, symlinks never followed); nothing for a missing top or a non-directory,
    as ``os.walk``."""
    try:
        st = top.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        yield from walk(top)


def iter_published_images(layout: RepositoryLayout) -> list[PublishedImage]:
    """Every image with metadata under ``.metadata`` (a ``<name>:<tag>`` directory holding manifest.json or
    image.json, at least two levels down); multi-arch platform directories belong to their image."""
    top = layout.metadata_root
    out: list[PublishedImage] = []
    for dirpath, dirnames, filenames in walk_dir(top):
        d = Path(dirpath)
        rel = d.relative_to(top)
        dirnames.sort()
        if len(rel.parts) >= 2 and ":" in rel.parts[-1] and (MANIFEST_JSON in filenames or IMAGE_JSON in filenames):
            dirnames[:] = []
            try:
                registry, repository, tag = split_image_name(str(rel))
                layout.image_metadata_dir(registry, repository, tag)  # validates the components
            except InvalidInputError:
                log.warning("gc: %s does not look like image metadata; left alone", d)
                continue
            out.append(PublishedImage(registry, repository, tag, d, image_identity(d)))
    return out


def tree_size(path: Path) -> int:
    """Bytes of the regular files below ``path`` (symlinks not followed; hard links counted once)."""
    total = 0
    seen: set[tuple[int, int]] = set()
    try:
        st = path.lstat()
    except FileNotFoundError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size if stat.S_ISREG(st.st_mode) else 0
    for _rel, dfd, _dirs, files in walk_fd(path):
        for name in files:
            try:
                fst = os.lstat(name, dir_fd=dfd)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(fst.st_mode) and (fst.st_dev, fst.st_ino) not in seen:
                if fst.st_nlink > 1:
                    seen.add((fst.st_dev, fst.st_ino))
                total += fst.st_size
    return total


__all__ = [
    "PublishedImage",
    "image_identity",
    "image_name_of",
    "image_names",
    "iter_published_images",
    "split_image_name",
    "tree_size",
    "walk_dir",
]
