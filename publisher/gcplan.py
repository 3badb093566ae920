"""GC's plan: mark what image metadata references, then decide what goes, changing nothing.

The rules (roots, grace period, moved tags, dropped images, links) are described in :mod:`publisher.gc`, which
sweeps the plan made here."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cvmfs_snap.errors import InvalidInputError
from cvmfs_snap.layout import (
    FLAT_DIR,
    IMAGE_JSON,
    MANIFEST_JSON,
    METADATA_DIR,
    MULTIARCH_DIR,
    ImageRecord,
    RepositoryLayout,
    digest_hex,
)
from publisher.inventory import image_identity, split_image_name, tree_size, walk_dir
from publisher.schedule import ScheduleEntry, ScheduleUpdate, moved_tag_protection, read_remove_schedule

log = logging.getLogger(__name__)

DAY = 86400.0


# -- mark ---------------------------------------------------------------------------------------------------------
@dataclass
class References:
    """What the image metadata of a repository references."""

    layers: set[str] = field(default_factory=set)
    configs: set[str] = field(default_factory=set)
    metadata_files: int = 0


def _read_metadata_json(path: Path) -> object:
    try:
        parsed: object = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise InvalidInputError(
            f"cannot read image metadata {path}: {exc}; garbage collection stopped so that no layer in use is "
            "removed: fix or delete that file, then run gc again"
        ) from exc
    return parsed


def _add_digest(out: set[str], value: object) -> None:
    if isinstance(value, str) and value.startswith("sha256:"):
        out.add(value)


def collect_references(layout: RepositoryLayout, skip: set[Path] | None = None) -> References:
    """Mark: every layer and config digest named by ``.metadata/**/manifest.json`` and ``image.json``.

    ``skip``: image metadata directories being removed in this run (dropped images), whose references must not
    keep their flat and layers alive."""
    refs = References()
    top = layout.root / METADATA_DIR
    for dirpath, dirnames, filenames in walk_dir(top):
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


# -- the plan -----------------------------------------------------------------------------------------------------
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
    schedule: list[ScheduleEntry] | None = None
    #: dropped images still waiting for their grace period
    scheduled_images: list[ScheduledImage] = field(default_factory=list)
    #: what this run's recipe changed in the schedule (None: no recipe given)
    schedule_update: ScheduleUpdate | None = None

    def count(self, kind: str) -> int:
        return sum(1 for i in self.items if i.kind == kind)

    @property
    def bytes(self) -> int:
        return sum(i.size for i in self.items)


def _plan_dropped(layout: RepositoryLayout, entries: list[ScheduleEntry], plan: GcPlan, now: float, grace: float,
                  *, fresh: set[str], may_remove: bool) -> tuple[list[ScheduleEntry], set[Path], list[GcItem]]:
    """Expired dropped images -> removal items (links, metadata); returns the entries that stay, the metadata
    directories to leave out of the mark, and the link items."""
    root = layout.root
    keep: list[ScheduleEntry] = []
    skip: set[Path] = set()
    links: list[GcItem] = []
    for entry in entries:
        if not entry.is_dropped:
            keep.append(entry)
            continue
        name = entry.image
        when = entry.scheduled_at
        try:
            registry, repository, tag = split_image_name(name)
            meta_dir = layout.image_metadata_dir(registry, repository, tag)
        except InvalidInputError as exc:
            log.warning("gc: remove schedule entry for %r left alone: %s", name, exc)
            keep.append(entry)
            continue
        if when is None:
            keep.append(entry)
            continue
        if not meta_dir.is_dir():
            log.info("gc: %s was scheduled for removal but its metadata is gone already; unscheduled", name)
            continue
        ident, then = image_identity(meta_dir), entry.identity
        if then and ident != then:
            log.info("gc: %s was published again (%s) since it was scheduled for removal; unscheduled and kept",
                     name, ident)
            continue
        age = now - when
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
        for dirpath, dirnames, filenames in walk_dir(start):
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


def plan_gc(layout: RepositoryLayout, grace_period_days: float, now: float | None = None, *,
            schedule: list[ScheduleEntry] | None = None, fresh: set[str] | None = None,
            remove_dropped: bool = True) -> GcPlan:
    """Decide what to remove, changing nothing.

    ``schedule``: the remove schedule to plan with (default: the one in the repository), e.g. after
    :func:`publisher.schedule.update_schedule`; ``fresh``: images scheduled in this very run, never removed by
    it; ``remove_dropped=False``: dropped images stay, whatever their age (the recipe could not be used)."""
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
    protected, entries = moved_tag_protection(entries, now, grace)
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


__all__ = ["DAY", "GcItem", "GcPlan", "References", "ScheduledImage", "collect_references", "plan_gc"]
