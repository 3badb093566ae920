"""The remove schedule as one typed module: moved-tag, dropped and DUCC entries read, protect and round-trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cvmfs_snap.errors import InvalidInputError
from cvmfs_snap.layout import REMOVE_SCHEDULE, SCHEDULE_KEY
from publisher.schedule import (
    REASON_DROPPED,
    ScheduleEntry,
    moved_tag_protection,
    parse_schedule,
    read_remove_schedule,
    schedule_bytes,
)

L1, L2, CFG = "sha256:" + "1" * 64, "sha256:" + "2" * 64, "sha256:" + "c" * 64
DAY = 86400.0


def _entries() -> list[object]:
    return [
        {"schemaVersion": 2, "layers": [{"digest": L1}]},  # DUCC's: no x-cvmfs-snap
        {"schemaVersion": 2, "config": {"digest": CFG}, "layers": [{"digest": L2}],
         SCHEDULE_KEY: {"manifest_digest": "sha256:" + "a" * 64, "config_digest": CFG, "scheduled_at": 1000.0}},
        {"schemaVersion": 2, "config": {"digest": CFG}, "layers": [],
         SCHEDULE_KEY: {"reason": REASON_DROPPED, "image": "r.example/x:1", "scheduled_at": 500, "identity": "i"}},
        "not an entry",
    ]


def test_entries_are_typed_and_round_trip_unchanged(tmp_path: Path) -> None:
    data = json.dumps(_entries()).encode()
    entries = parse_schedule(data, "test")
    assert len(entries) == 3  # the string is not an entry
    ducc, moved, dropped = entries
    assert ducc.scheduled_at is None and not ducc.is_dropped and ducc.digests() == {L1}
    assert moved.scheduled_at == 1000.0 and moved.config_digest == CFG and moved.digests() == {L2, CFG}
    assert dropped.is_dropped and dropped.image == "r.example/x:1" and dropped.identity == "i"
    # written back exactly as read (DUCC reads the same file)
    assert json.loads(schedule_bytes(entries)) == _entries()[:3]


def test_moved_tag_protection_keeps_young_entries_and_drops_expired() -> None:
    entries = parse_schedule(json.dumps(_entries()).encode(), "test")
    protected, keep = moved_tag_protection(entries, now=1000.0 + DAY, grace=2 * DAY)
    assert protected == {L2: 1000.0, CFG: 1000.0}
    assert keep == entries
    protected, keep = moved_tag_protection(entries, now=1000.0 + 3 * DAY, grace=2 * DAY)
    assert protected == {}
    assert [e.scheduled_at for e in keep] == [None, 500.0]  # DUCC's and the dropped entry stay


def test_a_boolean_is_not_a_time() -> None:
    (entry,) = parse_schedule(json.dumps([{SCHEDULE_KEY: {"scheduled_at": True}}]).encode(), "test")
    assert entry.scheduled_at is None


def test_moved_tag_entry_names_the_old_manifest() -> None:
    from cvmfs_snap.layout import ImageRecord

    rec = ImageRecord(reference="r.example/x:1", manifest_digest="sha256:" + "a" * 64, config_digest=CFG, layers=[L1])
    e = ScheduleEntry.moved_tag({"layers": [{"digest": L1}]}, "r.example/x:1", rec, 42.0)
    assert e.scheduled_at == 42.0 and not e.is_dropped and e.manifest_digest == rec.manifest_digest
    assert e.digests() == {L1, CFG}


def test_malformed_schedule_is_a_clear_error(tmp_path: Path) -> None:
    assert read_remove_schedule(tmp_path) == []
    p = tmp_path / REMOVE_SCHEDULE
    p.parent.mkdir(parents=True)
    p.write_text("{not json")
    with pytest.raises(InvalidInputError, match=r"malformed remove schedule .*fix or delete it"):
        read_remove_schedule(tmp_path)
    p.write_text("")
    with pytest.raises(InvalidInputError, match="malformed remove schedule"):
        read_remove_schedule(tmp_path)
