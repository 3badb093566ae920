"""Garbage collection of a published repository: remove what no image metadata references any more.

Mark and sweep over the repository tree, which is the one source of truth (see :mod:`cvmfs_snap.layout`):

* **Roots** are the image metadata files under ``.metadata/``: every ``manifest.json`` (its ``layers[].digest`` and
  ``config.digest``; Docker schema 1 ``fsLayers[].blobSum`` too) and every ``image.json`` (``layers`` and
  ``config_digest``). A metadata file that cannot be read stops the collection: guessing would delete layers that
  are in use.
* **Layers** under ``.layers/`` that no root references and that are older than the grace period are removed with
  their ``.metadata``. Age is ``layer.json``'s ``created``; for layers DUCC published (no ``layer.json``) it is the
  layer directory's mtime.
* **Flats** under ``.flat/`` whose config digest no root references and whose directory is older than the grace
  period are removed.
* **Recently replaced images** keep their layers and flat for the grace period too: when a tag moves, the pipeline
  appends the old manifest to DUCC's ``.metadata/remove-schedule.json`` with the time (``x-cvmfs-snap.scheduled_at``);
  until that time is older than the grace period, everything the old manifest names is kept, because nodes may
  still run containers of it. Entries older than the grace period are dropped from the schedule by the sweep;
  entries without a time (written by DUCC) neither protect nor get dropped.
* **Public and multiarch symlinks** are removed only when they point at a flat removed in the same run, or at a flat
  that is missing and the link is older than the grace period. A link to a flat that exists is never touched.

* **Images dropped from the recipe** (only when a recipe is given: ``gc --recipe``, or the daemon after each full
  pass): every image under ``.metadata`` that the expanded recipe no longer names gets an entry in the same remove
  schedule (``x-cvmfs-snap.reason = "dropped"``, the time first seen unwanted); an image named again is unscheduled.
  A later GC, once the entry is older than the grace period, removes the image's public and ``.multiarch`` links
  and its metadata directory, and the same sweep then frees its flat and layers unless another image uses them.
  Scheduling is all or nothing: when the recipe does not parse or any line does not expand (tag list unreadable,
  registry down), nothing is scheduled and no dropped image is removed in that run, so a typo or an outage never
  wipes images. Entries of dropped images carry the config descriptor and an *empty* ``layers`` list: DUCC's own gc
  (which removes every layer of a scheduled manifest at once, with no grace period) then leaves the still
  published image alone.

What is deliberately *not* done (conservative; see docs/publisher-daemon.md): without a recipe, image metadata is
never removed by GC (an admin may delete ``.metadata/<image>``, after which the next GC frees its layers and flat),
and directories left empty by link removal stay.

Concurrency: an image being published is protected twice. Its new layers are younger than the grace period, and
the daemon holds :func:`gc_lock` shared while it publishes an image, while GC takes it exclusively and marks again
under it before sweeping, so a layer that a publish has just decided to reuse is seen as referenced. Removal goes
through the backend's transaction, so the cvmfs backends remove with ``cvmfs_server`` under the repository lock.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import hashlib
import json
import logging
import os
import stat
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cvmfs_snap.errors import CvmfsSnapError, InvalidInputError, UnavailableError
from cvmfs_snap.fsutil import walk, walk_fd
from cvmfs_snap.layout import (
    FLAT_DIR,
    IMAGE_JSON,
    MANIFEST_JSON,
    METADATA_DIR,
    MULTIARCH_DIR,
    REMOVE_SCHEDULE,
    SCHEDULE_KEY,
    ImageRecord,
    RepositoryLayout,
    digest_hex,
)
from publisher.policy import allowed_by, recipe_into_config

if TYPE_CHECKING:
    from publisher.config import PublisherConfig

log = logging.getLogger(__name__)

DAY = 86400.0
GC_LOCK_NAME = "gc.lock"


# -- the lock shared by publishers and GC ------------------------------------------------------------------------
@contextmanager
def gc_lock(state_dir: str | os.PathLike[str], *, exclusive: bool, timeout: float = 600.0) -> Iterator[None]:
    """Hold ``<state_dir>/gc.lock``: shared while publishing an image, exclusive while GC sweeps.

    A blocking wait would hang a GC forever behind a busy daemon, so the lock is polled and, after ``timeout``
    seconds, :class:`UnavailableError` says who to wait for.
    """
    d = Path(state_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / GC_LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                if time.monotonic() >= deadline:
                    what = "publishing is running" if exclusive else "garbage collection is running"
                    raise UnavailableError(
                        f"could not lock {path} within {timeout:.0f}s: {what}; retry when it has finished"
                    ) from None
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)


# -- mark ---------------------------------------------------------------------------------------------------------
@dataclass
class References:
    """What the image metadata of a repository references."""

    layers: set[str] = field(default_factory=set)
    configs: set[str] = field(default_factory=set)
    metadata_files: int = 0


def _read_metadata_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise InvalidInputError(
            f"cannot read image metadata {path}: {exc}; garbage collection stopped so that no layer in use is "
            "removed: fix or delete that file, then run gc again"
        ) from exc


def _add_digest(out: set[str], value: Any) -> None:
    if isinstance(value, str) and value.startswith("sha256:"):
        out.add(value)


def collect_references(layout: RepositoryLayout, skip: set[Path] | None = None) -> References:
    """Mark: every layer and config digest named by ``.metadata/**/manifest.json`` and ``image.json``.

    ``skip``: image metadata directories being removed in this run (dropped images), whose references must not
    keep their flat and layers alive."""
    refs = References()
    top = layout.root / METADATA_DIR
    for dirpath, dirnames, filenames in _walk(top):
        d = Path(dirpath)
        if skip and d in skip:
            dirnames[:] = []
            continue
        if MANIFEST_JSON in filenames:
            data = _read_metadata_json(d / MANIFEST_JSON)
            if not isinstance(data, dict):
                raise InvalidInputError(
                    f"image metadata {d / MANIFEST_JSON} is not a JSON object (a manifest); garbage collection "
                    "stopped so that no layer in use is removed: fix or delete that file, then run gc again"
                )
            refs.metadata_files += 1
            if isinstance(data, dict):
                for lay in data.get("layers") or []:
                    if isinstance(lay, dict):
                        _add_digest(refs.layers, lay.get("digest"))
                for lay in data.get("fsLayers") or []:
                    if isinstance(lay, dict):
                        _add_digest(refs.layers, lay.get("blobSum"))
                cfg = data.get("config")
                if isinstance(cfg, dict):
                    _add_digest(refs.configs, cfg.get("digest"))
        if IMAGE_JSON in filenames:
            try:
                rec = ImageRecord.from_json((d / IMAGE_JSON).read_bytes())
            except (OSError, InvalidInputError) as exc:
                raise InvalidInputError(
                    f"cannot read image metadata {d / IMAGE_JSON}: {exc}; garbage collection stopped so that no "
                    "layer in use is removed: fix or delete that file, then run gc again"
                ) from exc
            refs.metadata_files += 1
            for digest in rec.layers if isinstance(rec.layers, list) else []:
                _add_digest(refs.layers, digest)
            _add_digest(refs.configs, rec.config_digest)
    return refs


# -- sweep plan ---------------------------------------------------------------------------------------------------
@dataclass
class GcItem:
    """One thing GC removes: ``kind`` is link, image, flat or layer; ``relpath`` is relative to the repository root.

    For an image, ``digest`` is the manifest (or index) digest it had when scheduled, ``name`` its
    ``<registry>/<repository>:<tag>`` and ``age_days`` the time since it was scheduled for removal."""

    kind: str
    relpath: str
    digest: str
    size: int
    age_days: float
    name: str = ""


@dataclass
class ScheduledImage:
    """An image dropped from the recipe, scheduled for removal but not removable yet."""

    name: str
    age_days: float
    #: days until a gc removes it (0: the next gc with the same grace period)
    remaining_days: float


@dataclass
class GcPlan:
    items: list[GcItem] = field(default_factory=list)
    #: unreferenced layers and flats kept because they are younger than the grace period
    kept_young: list[GcItem] = field(default_factory=list)
    referenced_layers: int = 0
    metadata_files: int = 0
    #: the remove schedule as it must be written; None when it stays as it is
    schedule: list[dict[str, Any]] | None = None
    #: dropped images still waiting for their grace period
    scheduled_images: list[ScheduledImage] = field(default_factory=list)
    #: what this run's recipe changed in the schedule (None: no recipe given)
    schedule_update: ScheduleUpdate | None = None

    def count(self, kind: str) -> int:
        return sum(1 for i in self.items if i.kind == kind)

    @property
    def bytes(self) -> int:
        return sum(i.size for i in self.items)


# -- images dropped from the recipe -------------------------------------------------------------------------------
#: ``x-cvmfs-snap.reason`` of remove-schedule entries for images no longer in the recipe (moved tags carry none)
REASON_DROPPED = "dropped"


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


def _image_identity(meta_dir: Path) -> str:
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


def split_image_name(name: str) -> tuple[str, str, str]:
    """``<registry>/<repository>:<tag>`` -> parts (the tag may itself hold ``:``, e.g. ``sha256:...``)."""
    registry, sep, rest = name.partition("/")
    head, _slash, last = rest.rpartition("/")
    repo_last, colon, tag = last.partition(":")
    if not sep or not colon or not repo_last or not tag:
        raise InvalidInputError(f"{name!r} is not an image name of the form <registry>/<repository>:<tag>")
    return registry, f"{head}/{repo_last}" if head else repo_last, tag


def iter_published_images(layout: RepositoryLayout) -> list[PublishedImage]:
    """Every image with metadata under ``.metadata`` (a ``<name>:<tag>`` directory holding manifest.json or
    image.json, at least two levels down); multi-arch platform directories belong to their image."""
    top = layout.metadata_root
    out: list[PublishedImage] = []
    for dirpath, dirnames, filenames in _walk(top):
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
            out.append(PublishedImage(registry, repository, tag, d, _image_identity(d)))
    return out


def image_name_of(ref: Any) -> str | None:
    """The ``.metadata`` name the pipeline publishes a reference (or reference text) under; None when it cannot
    be one."""
    from cvmfs_snap.oci import ImageReference
    from publisher.pipeline import Publisher

    try:
        if isinstance(ref, str):
            ref = ImageReference.parse(ref)
        registry, repository, tag = Publisher._names(ref)
        return RepositoryLayout.image_name(registry, repository, tag)
    except InvalidInputError:
        return None


@dataclass
class Wishlist:
    """What the expanded recipe names, and whether it may be trusted to schedule removals.

    ``problems`` (recipe unreadable, a line that did not parse or expand) make scheduling all or nothing: an image
    the recipe names is still unscheduled, but nothing new is scheduled and no dropped image is removed."""

    names: set[str]
    problems: list[str] = field(default_factory=list)
    #: (registry, repository) -> also wanted although not in the recipe (the publish-on-miss allow-list)
    keep: Callable[[str, str], bool] | None = None

    @classmethod
    def from_refs(cls, refs: Iterable[Any], problems: Iterable[str] = (),
                  keep: Callable[[str, str], bool] | None = None) -> Wishlist:
        names = {n for n in (image_name_of(r) for r in refs) if n is not None}
        return cls(names, list(problems), keep)

    def wants(self, registry: str, repository: str, tag: str) -> bool:
        if f"{registry}/{repository}:{tag}" in self.names:
            return True
        return self.keep is not None and self.keep(registry, repository)


@dataclass
class ScheduleUpdate:
    """Changes one recipe makes to the remove schedule."""

    schedule: list[dict[str, Any]]
    scheduled: list[str] = field(default_factory=list)
    unscheduled: list[str] = field(default_factory=list)
    #: why nothing was scheduled ("" when the recipe could be used)
    not_scheduled: str = ""

    @property
    def changed(self) -> bool:
        return bool(self.scheduled or self.unscheduled)


def _entry_info(entry: dict[str, Any]) -> dict[str, Any]:
    info = entry.get(SCHEDULE_KEY)
    return info if isinstance(info, dict) else {}


def is_dropped_entry(entry: dict[str, Any]) -> bool:
    return _entry_info(entry).get("reason") == REASON_DROPPED and isinstance(_entry_info(entry).get("image"), str)


def _dropped_entry(img: PublishedImage, now: float) -> dict[str, Any]:
    """A remove-schedule entry for a dropped image: manifest-shaped for DUCC's readers, with no layers."""
    try:
        manifest = json.loads((img.meta_dir / MANIFEST_JSON).read_bytes())
    except (OSError, ValueError):
        manifest = None
    manifest = manifest if isinstance(manifest, dict) else {}
    try:
        rec: ImageRecord | None = ImageRecord.from_json((img.meta_dir / IMAGE_JSON).read_bytes())
    except (OSError, InvalidInputError):
        rec = None
    config = manifest.get("config")
    cfg_digest = rec.config_digest if rec is not None else ""
    if not isinstance(config, dict) or not isinstance(config.get("digest"), str):
        config = {"digest": cfg_digest or img.identity or "sha256:" + hashlib.sha256(b"").hexdigest()}
    entry: dict[str, Any] = {
        "schemaVersion": manifest.get("schemaVersion", 2),
        "config": config,
        "layers": [],  # DUCC's gc removes the layers it finds here at once: the image is still published
    }
    if isinstance(manifest.get("mediaType"), str):
        entry["mediaType"] = manifest["mediaType"]
    entry[SCHEDULE_KEY] = {
        "reference": (rec.reference if rec is not None and rec.reference else img.name),
        "manifest_digest": (rec.manifest_digest if rec is not None else img.identity),
        "config_digest": cfg_digest or str(config.get("digest", "")),
        "index_digest": rec.index_digest if rec is not None else "",
        "scheduled_at": now,
        "reason": REASON_DROPPED,
        "image": img.name,
        "identity": img.identity,
    }
    return entry


def update_schedule(layout: RepositoryLayout, entries: list[dict[str, Any]], wishlist: Wishlist,
                    now: float) -> ScheduleUpdate:
    """The remove schedule after comparing ``.metadata`` with the recipe (nothing is written here).

    Images the recipe names are unscheduled; when the wishlist has no problems, images it does not name are
    scheduled with the time first seen unwanted (an entry already there keeps its time)."""
    upd = ScheduleUpdate(schedule=[])
    scheduled: set[str] = set()
    for entry in entries:
        if is_dropped_entry(entry):
            name = str(_entry_info(entry)["image"])
            try:
                wanted = wishlist.wants(*split_image_name(name))
            except InvalidInputError:
                wanted = False
            if wanted:
                upd.unscheduled.append(name)
                continue
            scheduled.add(name)
        upd.schedule.append(entry)
    if wishlist.problems:
        upd.not_scheduled = "; ".join(wishlist.problems)
        return upd
    images = iter_published_images(layout)
    if not wishlist.names and images:
        upd.not_scheduled = (f"the recipe names no image; refusing to schedule all {len(images)} published "
                             "images for removal (delete their metadata by hand if that is really wanted)")
        return upd
    for img in images:
        if img.name in scheduled or wishlist.wants(img.registry, img.repository, img.tag):
            continue
        upd.schedule.append(_dropped_entry(img, now))
        upd.scheduled.append(img.name)
    return upd


def _plan_dropped(layout: RepositoryLayout, entries: list[dict[str, Any]], plan: GcPlan, now: float, grace: float,
                  *, fresh: set[str], may_remove: bool) -> tuple[list[dict[str, Any]], set[Path], list[GcItem]]:
    """Expired dropped images -> removal items (links, metadata); returns the entries that stay, the metadata
    directories to leave out of the mark, and the link items."""
    root = layout.root
    keep: list[dict[str, Any]] = []
    skip: set[Path] = set()
    links: list[GcItem] = []
    for entry in entries:
        if not is_dropped_entry(entry):
            keep.append(entry)
            continue
        info = _entry_info(entry)
        name = str(info["image"])
        when = info.get("scheduled_at")
        try:
            registry, repository, tag = split_image_name(name)
            meta_dir = layout.image_metadata_dir(registry, repository, tag)
        except InvalidInputError as exc:
            log.warning("gc: remove schedule entry for %r left alone: %s", name, exc)
            keep.append(entry)
            continue
        if not isinstance(when, (int, float)):
            keep.append(entry)
            continue
        if not meta_dir.is_dir():
            log.info("gc: %s was scheduled for removal but its metadata is gone already; unscheduled", name)
            continue
        ident, then = _image_identity(meta_dir), info.get("identity")
        if isinstance(then, str) and then and ident != then:
            log.info("gc: %s was published again (%s) since it was scheduled for removal; unscheduled and kept",
                     name, ident)
            continue
        age = now - float(when)
        if not may_remove or name in fresh or age < grace:
            keep.append(entry)
            plan.scheduled_images.append(ScheduledImage(name, age / DAY, max(0.0, grace - age) / DAY))
            continue
        keep_entry = False
        link_paths = [layout.public_link(registry, repository, tag)]
        multiarch = root / MULTIARCH_DIR
        if multiarch.is_dir():
            link_paths += [multiarch / arch / name for arch in sorted(os.listdir(multiarch))]
        for link in link_paths:
            if link.is_symlink():
                links.append(GcItem("link", str(link.relative_to(root)), ident, 0, age / DAY, name))
            elif link.exists():
                log.warning("gc: %s is not a symlink; %s is not removed (move that path away, then run gc again)",
                            link, name)
                keep_entry = True
        if keep_entry:
            keep.append(entry)
            links = [i for i in links if i.name != name]
            continue
        plan.items.append(GcItem("image", str(meta_dir.relative_to(root)), ident, tree_size(meta_dir), age / DAY,
                                 name))
        skip.add(meta_dir)
    return keep, skip, links


def _walk(top: Path) -> Iterator[tuple[str, list[str], list[str]]]:
    """``fsutil.walk`` (no recursion limit, symlinks never followed); nothing for a missing top or a non-directory,
    as ``os.walk``."""
    try:
        st = top.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        yield from walk(top)


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


def _layer_created(layout: RepositoryLayout, digest: str) -> float:
    """When a layer was published: layer.json ``created``, else (DUCC layers, broken records) the dir's mtime."""
    try:
        rec = layout.read_layer_record(digest)
    except InvalidInputError:
        rec = None
    if rec is not None and rec.created > 0:
        return float(rec.created)
    try:
        return layout.layer_dir(digest).lstat().st_mtime
    except FileNotFoundError:
        return time.time()


def _iter_flats(layout: RepositoryLayout) -> Iterator[str]:
    top = layout.root / FLAT_DIR
    try:
        buckets = sorted(os.listdir(top))
    except FileNotFoundError:
        return
    for b in buckets:
        if len(b) != 2 or not (top / b).is_dir():
            continue
        for name in sorted(os.listdir(top / b)):
            digest = f"sha256:{name}"
            try:
                digest_hex(digest)
            except InvalidInputError:
                continue
            if name[:2] == b:
                yield digest


def _iter_links(root: Path) -> Iterator[Path]:
    """Public links (under top-level directories named like registry hosts) and multiarch links.

    Only ``<host>/`` trees are walked (``host.name``, ``host:port``, ``localhost``): other content a site keeps in
    the repository root is neither walked nor touched.
    """
    starts = [root / name for name in sorted(os.listdir(root))
              if not name.startswith(".") and ("." in name or ":" in name or name == "localhost")]
    starts.append(root / MULTIARCH_DIR)
    for start in starts:
        if start.is_symlink():
            yield start
            continue
        for dirpath, dirnames, filenames in _walk(start):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                if p.is_symlink():
                    yield p


def _flat_of_link(layout: RepositoryLayout, link: Path) -> str | None:
    """The config digest of the flat a link points at, or None when it points elsewhere."""
    target = os.readlink(link)
    if os.path.isabs(target):
        return None  # our links are relative; an absolute one is someone else's business
    resolved = Path(os.path.normpath(link.parent / target))
    flat_root = Path(os.path.normpath(layout.root / FLAT_DIR))
    try:
        rel = resolved.relative_to(flat_root)
    except ValueError:
        return None
    if len(rel.parts) != 2:
        return None
    digest = f"sha256:{rel.parts[1]}"
    try:
        digest_hex(digest)
    except InvalidInputError:
        return None
    return digest


def _schedule_protection(entries: list[dict[str, Any]], now: float,
                         grace: float) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Digest -> latest time an image naming it was replaced (from the remove schedule's moved-tag entries), and
    the entries that stay (expired moved-tag entries leave; dropped-image entries are not handled here)."""
    protected: dict[str, float] = {}
    keep: list[dict[str, Any]] = []
    for entry in entries:
        if is_dropped_entry(entry):
            keep.append(entry)
            continue
        info = entry.get(SCHEDULE_KEY)
        when = info.get("scheduled_at") if isinstance(info, dict) else None
        if not isinstance(when, (int, float)):
            keep.append(entry)  # DUCC's entries carry no time: leave them for DUCC
            continue
        if now - when >= grace:
            continue  # old enough: no longer protects anything, and leaves the schedule
        keep.append(entry)
        digests: set[str] = set()
        for lay in entry.get("layers") or []:
            if isinstance(lay, dict):
                _add_digest(digests, lay.get("digest"))
        cfg = entry.get("config")
        if isinstance(cfg, dict):
            _add_digest(digests, cfg.get("digest"))
        if isinstance(info, dict):
            _add_digest(digests, info.get("config_digest"))
        for d in digests:
            protected[d] = max(protected.get(d, 0.0), float(when))
    return protected, keep


def plan_gc(layout: RepositoryLayout, grace_period_days: float, now: float | None = None, *,
            schedule: list[dict[str, Any]] | None = None, fresh: set[str] | None = None,
            remove_dropped: bool = True) -> GcPlan:
    """Decide what to remove, changing nothing.

    ``schedule``: the remove schedule to plan with (default: the one in the repository), e.g. after
    :func:`update_schedule`; ``fresh``: images scheduled in this very run, never removed by it;
    ``remove_dropped=False``: dropped images stay, whatever their age (the recipe could not be used)."""
    from publisher.pipeline import read_remove_schedule

    now = time.time() if now is None else now
    grace = grace_period_days * DAY
    root = layout.root
    on_disk = read_remove_schedule(root)
    entries = on_disk if schedule is None else schedule
    plan = GcPlan()
    entries, skip, dropped_links = _plan_dropped(layout, entries, plan, now, grace, fresh=fresh or set(),
                                                 may_remove=remove_dropped)
    refs = collect_references(layout, skip)
    plan.referenced_layers, plan.metadata_files = len(refs.layers), refs.metadata_files
    protected, entries = _schedule_protection(entries, now, grace)
    if entries != on_disk:
        plan.schedule = entries

    for digest in layout.iter_layer_digests():
        if digest in refs.layers:
            continue
        path = layout.layer_dir(digest)
        age = now - _layer_created(layout, digest)
        age = min(age, now - protected.get(digest, 0.0))
        item = GcItem("layer", str(path.relative_to(root)), digest, tree_size(path), age / DAY)
        (plan.items if age >= grace else plan.kept_young).append(item)

    removed_flats: set[str] = set()
    for cfg in _iter_flats(layout):
        if cfg in refs.configs:
            continue
        path = layout.flat_dir(cfg)
        age = min(now - path.lstat().st_mtime, now - protected.get(cfg, 0.0))
        item = GcItem("flat", str(path.relative_to(root)), cfg, tree_size(path), age / DAY)
        if age >= grace:
            plan.items.append(item)
            removed_flats.add(cfg)
        else:
            plan.kept_young.append(item)

    links: list[GcItem] = list(dropped_links)
    seen = {i.relpath for i in links}
    for link in _iter_links(root):
        flat_cfg = _flat_of_link(layout, link)
        if flat_cfg is None:
            continue
        cfg = flat_cfg
        age = now - link.lstat().st_mtime
        dangling_old = not layout.flat_dir(cfg).exists() and age >= grace
        rel = str(link.relative_to(root))
        if (cfg in removed_flats or dangling_old) and rel not in seen:
            seen.add(rel)
            links.append(GcItem("link", rel, cfg, 0, age / DAY))
    # links first, then image metadata, flats, layers: with backends that publish each removal on its own,
    # nothing ever points at something already gone
    order = {"link": 0, "image": 1, "flat": 2, "layer": 3}
    plan.items = sorted(links + plan.items, key=lambda i: (order[i.kind], i.relpath))
    return plan


# -- sweep --------------------------------------------------------------------------------------------------------
def _schedule_bytes(schedule: list[dict[str, Any]]) -> bytes:
    return (json.dumps(schedule, indent=1) + "\n").encode()


def apply_plan(backend: Any, plan: GcPlan) -> None:
    """Remove the plan's items in one backend transaction (committed on success, aborted on error)."""
    if not plan.items and plan.schedule is None:
        return

    with backend.transaction() as txn:
        for item in plan.items:
            log.info("gc: removing %s %s (%s)", item.kind, item.name or item.digest, item.relpath)
            txn.remove(item.relpath)
        if plan.schedule is not None:
            txn.write_file(REMOVE_SCHEDULE, _schedule_bytes(plan.schedule))


def _log_update(upd: ScheduleUpdate, *, dry_run: bool) -> None:
    for name in upd.scheduled:
        log.info("%s %s for removal: no longer in the recipe", "would schedule" if dry_run else "scheduled", name)
    for name in upd.unscheduled:
        log.info("%s %s: back in the recipe", "would unschedule" if dry_run else "unscheduled", name)
    if upd.not_scheduled:
        log.warning("no image was scheduled for removal: %s", upd.not_scheduled)


def collect_garbage(backend: Any, state_dir: str | os.PathLike[str], grace_period_days: float, *,
                    dry_run: bool, lock_timeout: float = 600.0, wishlist: Wishlist | None = None,
                    now: float | None = None) -> GcPlan:
    """Plan and (unless ``dry_run``) sweep, marking again under the exclusive GC lock before removing.

    With a ``wishlist`` (the expanded recipe), images it no longer names are scheduled first (and written in the
    same transaction as the removals); a dry run shows the would-be schedule and changes nothing."""
    layout: RepositoryLayout = backend.layout

    def plan_once() -> GcPlan:
        from publisher.pipeline import read_remove_schedule

        t = time.time() if now is None else now
        if wishlist is None:
            return plan_gc(layout, grace_period_days, t)
        upd = update_schedule(layout, read_remove_schedule(layout.root), wishlist, t)
        _log_update(upd, dry_run=dry_run)
        plan = plan_gc(layout, grace_period_days, t, schedule=upd.schedule, fresh=set(upd.scheduled),
                       remove_dropped=not upd.not_scheduled)
        plan.schedule_update = upd
        return plan

    if dry_run:
        return plan_once()
    with gc_lock(state_dir, exclusive=True, timeout=lock_timeout):
        plan = plan_once()
        apply_plan(backend, plan)
    return plan


def record_unwanted(backend: Any, state_dir: str | os.PathLike[str], wishlist: Wishlist, *,
                    lock_timeout: float = 10.0, now: float | None = None) -> ScheduleUpdate:
    """Schedule images the recipe no longer names, unschedule those it names again; no removal (the daemon's
    hook after a full pass: removal stays with ``gc``).

    Holds the GC lock shared, as a publish does, so it never interleaves with a sweep; the schedule is read again
    and written inside one backend transaction, which is opened only when something changes (with the cvmfs
    backends every transaction is a publish)."""
    from publisher.pipeline import read_remove_schedule

    layout: RepositoryLayout = backend.layout
    t = time.time() if now is None else now
    with gc_lock(state_dir, exclusive=False, timeout=lock_timeout):
        upd = update_schedule(layout, read_remove_schedule(layout.root), wishlist, t)
        if upd.changed:
            with backend.transaction() as txn:
                raw = txn.read_file(REMOVE_SCHEDULE)
                try:
                    current = json.loads(raw) if raw else []
                except ValueError as exc:
                    raise InvalidInputError(
                        f"malformed remove schedule {layout.root / REMOVE_SCHEDULE}: {exc}; fix or delete it"
                    ) from exc
                current = [e for e in current if isinstance(e, dict)] if isinstance(current, list) else []
                upd = update_schedule(layout, current, wishlist, t)
                if upd.changed:
                    txn.write_file(REMOVE_SCHEDULE, _schedule_bytes(upd.schedule))
    _log_update(upd, dry_run=False)
    return upd


def format_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def format_report(plan: GcPlan, *, dry_run: bool) -> str:
    verb = "would remove" if dry_run else "removed"
    lines: list[str] = []
    upd = plan.schedule_update
    if upd is not None:
        lines += [f"{'would schedule' if dry_run else 'scheduled'} image {n} for removal: no longer in the recipe"
                  for n in upd.scheduled]
        lines += [f"{'would unschedule' if dry_run else 'unscheduled'} image {n}: back in the recipe"
                  for n in upd.unscheduled]
        if upd.not_scheduled:
            lines.append(f"no image scheduled or removed as dropped from the recipe: {upd.not_scheduled}")
    for i in plan.items:
        if i.kind == "image":
            lines.append(f"{verb} image {i.name} {i.relpath} ({format_size(i.size)} of metadata, scheduled "
                         f"{i.age_days:.1f} days ago)")
        elif i.name:
            lines.append(f"{verb} link {i.relpath} of image {i.name}")
        else:
            lines.append(f"{verb} {i.kind} {i.digest} {i.relpath} ({format_size(i.size)}, {i.age_days:.1f} days old)")
    lines += [
        f"scheduled image {s.name}: dropped from the recipe {s.age_days:.1f} days ago, removable in "
        f"{s.remaining_days:.1f} days"
        for s in plan.scheduled_images
    ]
    lines += [
        f"kept {i.kind} {i.digest}: unreferenced but younger than the grace period ({i.age_days:.1f} days old)"
        for i in plan.kept_young
    ]
    lines.append(
        f"gc: {verb} {plan.count('layer')} layers, {plan.count('flat')} flats, {plan.count('link')} links, "
        f"{plan.count('image')} images; "
        f"{'would free' if dry_run else 'freed'} {plan.bytes} bytes ({format_size(plan.bytes)}); "
        f"{plan.referenced_layers} layers referenced by {plan.metadata_files} metadata files; "
        f"{len(plan.kept_young)} unreferenced items kept (younger than the grace period); "
        f"{len(plan.scheduled_images)} images scheduled for removal"
    )
    return "\n".join(lines)


def load_wishlist(recipe_path: str, config: PublisherConfig, args: argparse.Namespace | None = None) -> Wishlist:
    """Read and expand a recipe (tag lists read from the registries) into a :class:`Wishlist`.

    Never raises for a bad recipe or an unreachable registry: those become ``problems``, which stop scheduling."""
    from publisher.recipe import Recipe

    keep = publish_on_miss_keep(config.daemon.publish_on_miss_allow)
    try:
        recipe = Recipe.load(recipe_path)
        recipe_into_config(recipe, config, args)
    except CvmfsSnapError as exc:
        return Wishlist(set(), [f"recipe {recipe_path} cannot be used: {exc}"], keep)
    client = config.make_client()
    try:
        refs = recipe.expand(client)
    finally:
        client.close()
    # an invalid tag in a registry's tag list names no publishable image: it does not make the wishlist incomplete
    problems = [f"recipe line {e.message}" for e in recipe.errors if e.whole_line]
    return Wishlist.from_refs(refs, problems, keep)


def publish_on_miss_keep(allow: Iterable[str] | None) -> Callable[[str, str], bool] | None:
    """Images the publish-on-miss allow-list (``daemon.publish_on_miss_allow``) admits are wanted by nodes, not
    by the recipe: they are never scheduled (else they would go, be missed, be published again, go again...)."""
    globs = list(allow or [])
    if not globs:
        return None
    from cvmfs_snap.oci import ImageReference

    return lambda registry, repository: allowed_by(globs, ImageReference(registry, repository, "latest"))


def run_gc(args: argparse.Namespace, config: Any) -> int:
    """``cvmfs-snap-publisher gc [--recipe RECIPE] [--grace-period DAYS] [--dry-run]``: print what goes (or went).

    Exit status 0; 1 when a recipe was given but could not be used for scheduling (it does not parse, a line does
    not expand, or it names no image at all); the rest of the collection still ran."""
    grace_arg: Any = getattr(args, "grace_period", None)
    if grace_arg is None:
        grace_arg = getattr(config, "grace_period_days", 7.0)
    dry_run = bool(getattr(args, "dry_run", False))
    recipe_path = getattr(args, "recipe", None)
    try:
        grace = float(grace_arg)
        if grace < 0:
            raise InvalidInputError(f"grace period must be 0 days or more, got {grace}")
        wishlist = load_wishlist(str(recipe_path), config, args) if recipe_path else None
        backend = config.make_backend()
        try:
            plan = collect_garbage(backend, config.effective_state_dir(), grace, dry_run=dry_run, wishlist=wishlist)
        finally:
            backend.close()
    except CvmfsSnapError as exc:
        log.error("gc failed: %s", exc)
        return exc.exit_code
    except OSError as exc:  # e.g. a tree the backend may not remove: a clear failure, not a traceback
        log.debug("gc failed", exc_info=exc)
        log.error("gc failed: %s: %s; check that path (permissions, immutable files, free space), then run gc again",
                  exc.filename or "the repository", exc.strerror or exc)
        return 1
    print(format_report(plan, dry_run=dry_run), flush=True)
    if plan.schedule_update is not None and plan.schedule_update.not_scheduled:
        for problem in (wishlist.problems if wishlist is not None else []):
            print(f"gc: {problem}", file=sys.stderr)
        print("gc: the recipe could not be fully used, so no image was scheduled or removed as dropped from it; "
              "fix the recipe (or wait for the registry) and run gc again", file=sys.stderr, flush=True)
        return 1
    return 0


__all__ = [
    "REASON_DROPPED",
    "GcItem",
    "GcPlan",
    "PublishedImage",
    "References",
    "ScheduleUpdate",
    "ScheduledImage",
    "Wishlist",
    "apply_plan",
    "collect_garbage",
    "collect_references",
    "format_report",
    "gc_lock",
    "iter_published_images",
    "load_wishlist",
    "plan_gc",
    "record_unwanted",
    "run_gc",
    "update_schedule",
]
