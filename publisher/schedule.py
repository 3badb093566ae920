"""The remove schedule, ``.metadata/remove-schedule.json``: one typed place for both kinds of entries.

The file is DUCC's: a JSON list of manifests. Ours carry ``x-cvmfs-snap`` (:data:`SCHEDULE_KEY`) with
``reference``, ``manifest_digest``, ``config_digest``, ``index_digest`` and ``scheduled_at``:

* **moved tag** (written by the pipeline when a tag moves): the old manifest, whose layers and flat GC keeps for
  the grace period after ``scheduled_at``, then drops the entry;
* **dropped** (written for an image the recipe no longer names): ``reason = "dropped"``, ``image`` (its
  ``.metadata`` name) and ``identity`` (what it held when scheduled); an *empty* ``layers`` list, so that DUCC's own
  gc (which removes every layer of a scheduled manifest at once) leaves the still published image alone;
* entries without ``x-cvmfs-snap`` (DUCC's) neither protect nor are dropped.

Entries keep their JSON exactly as read (DUCC reads the same file); :class:`ScheduleEntry` gives typed access.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from cvmfs_snap.errors import InvalidInputError
from cvmfs_snap.layout import IMAGE_JSON, MANIFEST_JSON, REMOVE_SCHEDULE, SCHEDULE_KEY, ImageRecord, RepositoryLayout
from publisher.inventory import PublishedImage, iter_published_images, split_image_name
from publisher.wishlist import Wishlist

log = logging.getLogger(__name__)

#: ``x-cvmfs-snap.reason`` of remove-schedule entries for images no longer in the recipe (moved tags carry none)
REASON_DROPPED = "dropped"

#: one JSON object as read from or written to the schedule file
Json = dict[str, object]


def _sha256(value: object) -> str | None:
    return value if isinstance(value, str) and value.startswith("sha256:") else None


@dataclass
class ScheduleEntry:
    """One entry of the remove schedule; ``raw`` is its JSON (a manifest plus ``x-cvmfs-snap``)."""

    raw: Json

    @property
    def info(self) -> Json:
        info = self.raw.get(SCHEDULE_KEY)
        return info if isinstance(info, dict) else {}

    @property
    def is_dropped(self) -> bool:
        """An image dropped from the recipe (as opposed to a moved tag's old manifest or a DUCC entry)."""
        return self.info.get("reason") == REASON_DROPPED and isinstance(self.info.get("image"), str)

    @property
    def image(self) -> str:
        """The ``.metadata`` name of a dropped image ("" for other entries)."""
        name = self.info.get("image")
        return name if isinstance(name, str) else ""

    @property
    def scheduled_at(self) -> float | None:
        """When it was scheduled (None: DUCC's entries carry no time)."""
        when = self.info.get("scheduled_at")
        return float(when) if isinstance(when, (int, float)) and not isinstance(when, bool) else None

    @property
    def manifest_digest(self) -> str:
        d = self.info.get("manifest_digest")
        return d if isinstance(d, str) else ""

    @property
    def config_digest(self) -> str:
        d = self.info.get("config_digest")
        return d if isinstance(d, str) else ""

    @property
    def identity(self) -> str:
        """What a dropped image's metadata held when it was scheduled ("" when unknown)."""
        d = self.info.get("identity")
        return d if isinstance(d, str) else ""

    def digests(self) -> set[str]:
        """Layer and config digests the entry names (its manifest and ``x-cvmfs-snap.config_digest``)."""
        out: set[str] = set()
        layers = self.raw.get("layers")
        for lay in layers if isinstance(layers, list) else []:
            if isinstance(lay, dict) and (d := _sha256(lay.get("digest"))):
                out.add(d)
        cfg = self.raw.get("config")
        if isinstance(cfg, dict) and (d := _sha256(cfg.get("digest"))):
            out.add(d)
        if d := _sha256(self.info.get("config_digest")):
            out.add(d)
        return out

    @classmethod
    def moved_tag(cls, manifest: Json, reference: str, old: ImageRecord, now: float) -> ScheduleEntry:
        """The old manifest of a moved tag (its layers and flat stay for the grace period)."""
        raw = dict(manifest)
        raw[SCHEDULE_KEY] = {
            "reference": reference,
            "manifest_digest": old.manifest_digest,
            "config_digest": old.config_digest,
            "index_digest": old.index_digest,
            "scheduled_at": now,
        }
        return cls(raw)

    @classmethod
    def dropped(cls, img: PublishedImage, now: float) -> ScheduleEntry:
        """A dropped image: manifest-shaped for DUCC's readers, with no layers."""
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
        raw: Json = {
            "schemaVersion": manifest.get("schemaVersion", 2),
            "config": config,
            "layers": [],  # DUCC's gc removes the layers it finds here at once: the image is still published
        }
        if isinstance(manifest.get("mediaType"), str):
            raw["mediaType"] = manifest["mediaType"]
        raw[SCHEDULE_KEY] = {
            "reference": (rec.reference if rec is not None and rec.reference else img.name),
            "manifest_digest": (rec.manifest_digest if rec is not None else img.identity),
            "config_digest": cfg_digest or str(config.get("digest", "")),
            "index_digest": rec.index_digest if rec is not None else "",
            "scheduled_at": now,
            "reason": REASON_DROPPED,
            "image": img.name,
            "identity": img.identity,
        }
        return cls(raw)


def parse_schedule(data: bytes | None, where: str | Path) -> list[ScheduleEntry]:
    """Entries of a schedule file's bytes (None or empty: no schedule); :class:`InvalidInputError` when malformed."""
    if not data:
        return []
    try:
        parsed = json.loads(data)
    except ValueError as exc:
        raise InvalidInputError(f"malformed remove schedule {where}: {exc}; fix or delete it") from exc
    return [ScheduleEntry(e) for e in parsed if isinstance(e, dict)] if isinstance(parsed, list) else []


def read_remove_schedule(root: str | Path) -> list[ScheduleEntry]:
    """The remove schedule of the repository at ``root`` ([] when there is none)."""
    p = Path(root) / REMOVE_SCHEDULE
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        return []
    return parse_schedule(data or b"\0", p)  # an empty file is malformed, as any other non-JSON


def schedule_bytes(entries: list[ScheduleEntry]) -> bytes:
    return (json.dumps([e.raw for e in entries], indent=1) + "\n").encode()


def moved_tag_protection(entries: list[ScheduleEntry], now: float,
                         grace: float) -> tuple[dict[str, float], list[ScheduleEntry]]:
    """Digest -> latest time an image naming it was replaced (from the moved-tag entries), and the entries that
    stay (expired moved-tag entries leave; dropped-image entries are not handled here)."""
    protected: dict[str, float] = {}
    keep: list[ScheduleEntry] = []
    for entry in entries:
        if entry.is_dropped:
            keep.append(entry)
            continue
        when = entry.scheduled_at
        if when is None:
            keep.append(entry)  # DUCC's entries carry no time: leave them for DUCC
            continue
        if now - when >= grace:
            continue  # old enough: no longer protects anything, and leaves the schedule
        keep.append(entry)
        for d in entry.digests():
            protected[d] = max(protected.get(d, 0.0), when)
    return protected, keep


@dataclass
class ScheduleUpdate:
    """Changes one recipe makes to the remove schedule."""

    schedule: list[ScheduleEntry]
    scheduled: list[str] = field(default_factory=list)
    unscheduled: list[str] = field(default_factory=list)
    #: why nothing was scheduled ("" when the recipe could be used)
    not_scheduled: str = ""

    @property
    def changed(self) -> bool:
        return bool(self.scheduled or self.unscheduled)


def update_schedule(layout: RepositoryLayout, entries: list[ScheduleEntry], wishlist: Wishlist,
                    now: float) -> ScheduleUpdate:
    """The remove schedule after comparing ``.metadata`` with the recipe (nothing is written here).

    Images the recipe names are unscheduled; when the wishlist has no problems, images it does not name are
    scheduled with the time first seen unwanted (an entry already there keeps its time)."""
    upd = ScheduleUpdate(schedule=[])
    scheduled: set[str] = set()
    for entry in entries:
        if entry.is_dropped:
            name = entry.image
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
        upd.schedule.append(ScheduleEntry.dropped(img, now))
        upd.scheduled.append(img.name)
    return upd


__all__ = [
    "REASON_DROPPED",
    "ScheduleEntry",
    "ScheduleUpdate",
    "moved_tag_protection",
    "parse_schedule",
    "read_remove_schedule",
    "schedule_bytes",
    "update_schedule",
]
