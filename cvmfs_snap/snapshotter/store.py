"""The snapshotter's metadata: one sqlite database under the snapshotter root.

Why sqlite: snapshot metadata must survive daemon restarts (containers keep running on mounts containerd made from
our answers), must stay consistent when containerd calls us from many threads, and ``cvmfs-snap status`` must be able
to read it while the daemon runs. WAL mode lets readers in while a writer works; every write is one short
``BEGIN IMMEDIATE`` transaction that checks its preconditions (key free, parent committed, no children) and writes
in the same transaction, so concurrent RPCs cannot interleave into an inconsistent state.

A snapshot row keeps containerd's view (key, kind, parent key, labels, created/updated in nanoseconds) plus our own:
the integer ``id`` that names its directory ``<root>/snapshots/<id>`` (never reused: AUTOINCREMENT), and for remote
snapshots the source that serves it, the layer digest and the source's parsed request (JSON, see
:class:`~cvmfs_snap.snapshotter.sources.base.LayerRequest`). ``size``/``inodes`` are the usage computed at commit.

Ids are chosen in the insert's transaction, above every id ever handed out (``sqlite_sequence``) *and* above every
id the caller says is taken (its directory or link exists): after a lost or emptied database the old directories of
running containers are never reused. ``create`` runs the caller's ``place(id)`` inside that transaction, so a
snapshot's directory is renamed into place before its row commits: a crash leaves at most a directory without a
row (which Cleanup collects), never a row without a directory.

One corrupt row (labels that are not a JSON object, a non-integer time) is reported once and skipped by ``all``;
reading it by key fails with :class:`IntegrityError` naming it.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    UnavailableError,
)

log = logging.getLogger(__name__)

KIND_ACTIVE = "active"
KIND_VIEW = "view"
KIND_COMMITTED = "committed"
KINDS = (KIND_ACTIVE, KIND_VIEW, KIND_COMMITTED)

SCHEMA_VERSION = 2
DB_NAME = "metadata.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    key      TEXT NOT NULL UNIQUE,
    kind     TEXT NOT NULL CHECK (kind IN ('active', 'view', 'committed')),
    parent   TEXT NOT NULL DEFAULT '',
    labels   TEXT NOT NULL DEFAULT '{}',
    created  INTEGER NOT NULL,
    updated  INTEGER NOT NULL,
    source   TEXT NOT NULL DEFAULT '',
    digest   TEXT NOT NULL DEFAULT '',
    size     INTEGER NOT NULL DEFAULT 0,
    inodes   INTEGER NOT NULL DEFAULT 0,
    request  TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots (parent);
"""

_COLUMNS = "id, key, kind, parent, labels, created, updated, source, digest, size, inodes, request"
#: schema 1 -> 2: the source's parsed request stored with remote snapshots
_MIGRATIONS = {1: "ALTER TABLE snapshots ADD COLUMN request TEXT NOT NULL DEFAULT ''"}


@dataclass
class SnapshotRecord:
    id: int
    key: str
    kind: str
    parent: str
    labels: dict[str, str]
    created: int  # nanoseconds since the epoch
    updated: int
    source: str = ""  # remote snapshots: name of the LayerSource serving it
    digest: str = ""  # remote snapshots: compressed layer digest
    size: int = 0
    inodes: int = 0
    request: str = ""  # remote snapshots: the source's LayerRequest as JSON

    @property
    def remote(self) -> bool:
        return bool(self.source)


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{value!r} is not an integer")
    return value


def _row(row: tuple[object, ...]) -> SnapshotRecord:
    """A record from a database row; ValueError/TypeError when the row is corrupt."""
    rid, key, kind, parent, labels, created, updated, source, digest, size, inodes, request = row
    parsed = json.loads(str(labels))
    if not isinstance(parsed, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in parsed.items()):
        raise TypeError("labels are not a JSON object of strings")
    if not isinstance(key, str) or kind not in KINDS:
        raise TypeError(f"bad key or kind {kind!r}")
    return SnapshotRecord(
        id=_int(rid), key=key, kind=str(kind), parent=str(parent), labels=parsed, created=_int(created),
        updated=_int(updated), source=str(source), digest=str(digest), size=_int(size), inodes=_int(inodes),
        request=str(request or ""),
    )


def now_ns() -> int:
    return time.time_ns()


class Store:
    """Thread-safe access to the metadata database (one connection, one lock, short transactions)."""

    def __init__(self, path: Path, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._lock = threading.RLock()
        self._warned_rows: set[object] = set()
        self._columns = _COLUMNS
        try:
            if readonly:
                if not self.path.exists():
                    raise NotFoundError(
                        f"no snapshotter metadata at {self.path}: is --root right, and has the snapshotter run there?"
                    )
                self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None,
                                           check_same_thread=False, timeout=10)
                if int(self._db.execute("PRAGMA user_version").fetchone()[0]) < 2:  # a daemon not upgraded yet
                    self._columns = _COLUMNS.replace(", request", ", '' AS request")
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False,
                                           timeout=30)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
                if version > SCHEMA_VERSION:
                    raise InvalidInputError(
                        f"snapshotter metadata {self.path} has schema version {version}, newer than this cvmfs-snap "
                        f"understands ({SCHEMA_VERSION}): upgrade cvmfs-snap on this node"
                    )
                self._db.executescript(_SCHEMA)
                while 0 < version < SCHEMA_VERSION:
                    self._db.execute(_MIGRATIONS[version])
                    version += 1
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise UnavailableError(
                f"cannot open snapshotter metadata {self.path}: {exc}. If it is damaged, move it (and its -wal/-shm "
                "files) away: the snapshotter then starts empty, keeps the directories running containers use, "
                "and containerd pulls images again"
            ) from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        with self._lock:
            try:
                return list(self._db.execute(sql, args).fetchall())
            except sqlite3.Error as exc:
                raise UnavailableError(f"reading snapshotter metadata {self.path} failed: {exc}") from exc

    def _parse(self, row: tuple[object, ...]) -> SnapshotRecord:
        try:
            return _row(row)
        except (ValueError, TypeError) as exc:
            raise IntegrityError(
                f"snapshot row id {row[0]!r} (key {str(row[1])[:200]!r}) in {self.path} is corrupt ({exc}): remove "
                "the snapshot (`ctr snapshots rm`) and pull its image again"
            ) from exc

    def _get(self, db: sqlite3.Connection, key: str) -> SnapshotRecord | None:
        row = db.execute(f"SELECT {self._columns} FROM snapshots WHERE key = ?", (key,)).fetchone()
        return self._parse(row) if row else None

    # -- reads ----------------------------------------------------------------------------------------------------
    def find(self, key: str) -> SnapshotRecord | None:
        rows = self._query(f"SELECT {self._columns} FROM snapshots WHERE key = ?", (key,))
        return self._parse(rows[0]) if rows else None

    def get(self, key: str) -> SnapshotRecord:
        rec = self.find(key)
        if rec is None:
            raise NotFoundError(f"snapshot {key!r} does not exist")
        return rec

    def all(self) -> list[SnapshotRecord]:
        """Every readable snapshot; a corrupt row is logged (once) and skipped, never fails the listing."""
        out: list[SnapshotRecord] = []
        for r in self._query(f"SELECT {self._columns} FROM snapshots ORDER BY key"):
            try:
                out.append(self._parse(r))
            except IntegrityError as exc:
                with self._lock:
                    first = r[0] not in self._warned_rows
                    self._warned_rows.add(r[0])
                if first:
                    log.warning("skipping a snapshot in listings: %s", exc)
        return out

    def ids(self) -> set[int]:
        return {int(r[0]) for r in self._query("SELECT id FROM snapshots")}  # type: ignore[call-overload]

    def count_remote(self, source: str, digest: str) -> int:
        """How many snapshots are served by ``source`` for layer ``digest`` (the layer's reference count)."""
        rows = self._query("SELECT COUNT(*) FROM snapshots WHERE source = ? AND digest = ?", (source, digest))
        return int(rows[0][0])  # type: ignore[call-overload]

    def remote_layers(self) -> list[tuple[str, str, str, str]]:
        """(source, key, digest, request JSON) of every remote snapshot, for restoring sources at start."""
        rows = self._query("SELECT source, key, digest, request FROM snapshots WHERE source != '' ORDER BY id")
        return [(str(s), str(k), str(d), str(r or "")) for s, k, d, r in rows]

    def chain(self, rec: SnapshotRecord) -> list[SnapshotRecord]:
        """The parents of ``rec``, nearest (top-most) first."""
        out: list[SnapshotRecord] = []
        seen = {rec.key}
        parent = rec.parent
        while parent:
            p = self.find(parent)
            if p is None:
                raise NotFoundError(
                    f"parent {parent!r} of snapshot {rec.key!r} is missing from the metadata {self.path}"
                )
            if p.key in seen:
                raise InvalidInputError(f"snapshot {rec.key!r} has a parent loop at {p.key!r}")
            seen.add(p.key)
            out.append(p)
            parent = p.parent
        return out

    # -- writes ---------------------------------------------------------------------------------------------------
    def create(self, key: str, kind: str, parent: str, labels: Mapping[str, str], *, source: str = "",
               digest: str = "", request: str = "", created: int | None = None,
               taken: Callable[[int], bool] | None = None,
               place: Callable[[int], None] | None = None) -> SnapshotRecord:
        """Insert a snapshot: AlreadyExists if the key is taken, NotFound/InvalidInput for a bad parent.

        The id is above every id used before and skips ids for which ``taken(id)`` is true; ``place(id)`` runs
        before the commit (its exception rolls the insert back)."""
        if kind not in KINDS:
            raise InvalidInputError(f"unknown snapshot kind {kind!r}")
        ts = created if created is not None else now_ns()
        with self._tx() as db:
            if self._get(db, key) is not None:
                raise AlreadyExistsError(f"snapshot {key!r} already exists")
            if parent:
                p = self._get(db, parent)
                if p is None:
                    raise NotFoundError(f"parent snapshot {parent!r} of {key!r} does not exist")
                if p.kind != KIND_COMMITTED:
                    raise InvalidInputError(
                        f"parent {parent!r} of {key!r} is a {p.kind} snapshot, not a committed one: commit it first"
                    )
            rid = self._next_id(db, taken)
            db.execute(
                "INSERT INTO snapshots (id, key, kind, parent, labels, created, updated, source, digest, request) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (rid, key, kind, parent, json.dumps(dict(labels), sort_keys=True), ts, ts, source, digest, request),
            )
            if place is not None:
                place(rid)
        return SnapshotRecord(rid, key, kind, parent, dict(labels), ts, ts, source, digest, request=request)

    @staticmethod
    def _next_id(db: sqlite3.Connection, taken: Callable[[int], bool] | None) -> int:
        row = db.execute("SELECT MAX(n) FROM (SELECT MAX(id) AS n FROM snapshots UNION ALL "
                         "SELECT seq FROM sqlite_sequence WHERE name = 'snapshots')").fetchone()
        rid = int(row[0] or 0) + 1
        while taken is not None and taken(rid):
            rid += 1
        return rid

    def commit(self, key: str, name: str, labels: Mapping[str, str], size: int, inodes: int) -> SnapshotRecord:
        """Turn active snapshot ``key`` into committed ``name`` (same id, so the same directory)."""
        ts = now_ns()
        with self._tx() as db:
            rec = self._get(db, key)
            if rec is None:
                raise NotFoundError(f"cannot commit: active snapshot {key!r} does not exist")
            if rec.kind != KIND_ACTIVE:
                raise FailedPreconditionError(f"cannot commit snapshot {key!r}: it is a {rec.kind} snapshot, "
                                              "only active snapshots can be committed")
            if self._get(db, name) is not None:
                raise AlreadyExistsError(f"cannot commit {key!r}: snapshot {name!r} already exists")
            db.execute(
                "UPDATE snapshots SET key = ?, kind = 'committed', labels = ?, created = ?, updated = ?, size = ?, "
                "inodes = ? WHERE id = ?",
                (name, json.dumps(dict(labels), sort_keys=True), ts, ts, size, inodes, rec.id),
            )
        return SnapshotRecord(rec.id, name, KIND_COMMITTED, rec.parent, dict(labels), ts, ts, rec.source,
                              rec.digest, size, inodes, rec.request)

    def remove(self, key: str) -> SnapshotRecord:
        """Delete a snapshot's row; FailedPrecondition if other snapshots have it as parent.

        A corrupt row can still be removed (that is the way out the error messages give): the record returned
        then carries only its id, key, source and digest."""
        with self._tx() as db:
            try:
                rec = self._get(db, key)
            except IntegrityError:
                row = db.execute("SELECT id, source, digest FROM snapshots WHERE key = ?", (key,)).fetchone()
                rec = SnapshotRecord(int(row[0]), key, "", "", {}, 0, 0, str(row[1] or ""), str(row[2] or ""))
            if rec is None:
                raise NotFoundError(f"cannot remove snapshot {key!r}: it does not exist")
            children = db.execute("SELECT key FROM snapshots WHERE parent = ? LIMIT 3", (key,)).fetchall()
            if children:
                names = ", ".join(repr(c[0]) for c in children)
                raise FailedPreconditionError(
                    f"cannot remove snapshot {key!r}: it has child snapshots ({names}); remove them first"
                )
            db.execute("DELETE FROM snapshots WHERE id = ?", (rec.id,))
        return rec

    def set_labels(self, key: str, labels: Mapping[str, str]) -> SnapshotRecord:
        ts = now_ns()
        with self._tx() as db:
            rec = self._get(db, key)
            if rec is None:
                raise NotFoundError(f"cannot update snapshot {key!r}: it does not exist")
            db.execute("UPDATE snapshots SET labels = ?, updated = ? WHERE id = ?",
                       (json.dumps(dict(labels), sort_keys=True), ts, rec.id))
        rec.labels = dict(labels)
        rec.updated = ts
        return rec
