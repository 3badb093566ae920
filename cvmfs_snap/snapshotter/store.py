"""The snapshotter's metadata: one sqlite database under the snapshotter root.

Why sqlite: snapshot metadata must survive daemon restarts (containers keep running on mounts containerd made from
our answers), must stay consistent when containerd calls us from many threads, and ``cvmfs-snap status`` must be able
to read it while the daemon runs. WAL mode lets readers in while a writer works; every write is one short
``BEGIN IMMEDIATE`` transaction that checks its preconditions (key free, parent committed, no children) and writes
in the same transaction, so concurrent RPCs cannot interleave into an inconsistent state.

A snapshot row keeps containerd's view (key, kind, parent key, labels, created/updated in nanoseconds) plus our own:
the integer ``id`` that names its directory ``<root>/snapshots/<id>`` (never reused: AUTOINCREMENT), and for remote
snapshots the source that serves it and the layer digest. ``size``/``inodes`` are the usage computed at commit.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidInputError,
    NotFoundError,
    UnavailableError,
)

log = logging.getLogger(__name__)

KIND_ACTIVE = "active"
KIND_VIEW = "view"
KIND_COMMITTED = "committed"
KINDS = (KIND_ACTIVE, KIND_VIEW, KIND_COMMITTED)

SCHEMA_VERSION = 1
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
    inodes   INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots (parent);
"""

_COLUMNS = "id, key, kind, parent, labels, created, updated, source, digest, size, inodes"


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

    @property
    def remote(self) -> bool:
        return bool(self.source)


def _row(row: tuple[object, ...]) -> SnapshotRecord:
    rid, key, kind, parent, labels, created, updated, source, digest, size, inodes = row
    return SnapshotRecord(
        id=int(rid),  # type: ignore[call-overload]
        key=str(key),
        kind=str(kind),
        parent=str(parent),
        labels=json.loads(str(labels)),
        created=int(created),  # type: ignore[call-overload]
        updated=int(updated),  # type: ignore[call-overload]
        source=str(source),
        digest=str(digest),
        size=int(size),  # type: ignore[call-overload]
        inodes=int(inodes),  # type: ignore[call-overload]
    )


def now_ns() -> int:
    return time.time_ns()


class Store:
    """Thread-safe access to the metadata database (one connection, one lock, short transactions)."""

    def __init__(self, path: Path, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._lock = threading.RLock()
        try:
            if readonly:
                if not self.path.exists():
                    raise NotFoundError(
                        f"no snapshotter metadata at {self.path}: is --root right, and has the snapshotter run there?"
                    )
                self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None,
                                           check_same_thread=False, timeout=10)
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
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise UnavailableError(f"cannot open snapshotter metadata {self.path}: {exc}") from exc

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

    @staticmethod
    def _get(db: sqlite3.Connection, key: str) -> SnapshotRecord | None:
        row = db.execute(f"SELECT {_COLUMNS} FROM snapshots WHERE key = ?", (key,)).fetchone()
        return _row(row) if row else None

    # -- reads ----------------------------------------------------------------------------------------------------
    def find(self, key: str) -> SnapshotRecord | None:
        rows = self._query(f"SELECT {_COLUMNS} FROM snapshots WHERE key = ?", (key,))
        return _row(rows[0]) if rows else None

    def get(self, key: str) -> SnapshotRecord:
        rec = self.find(key)
        if rec is None:
            raise NotFoundError(f"snapshot {key!r} does not exist")
        return rec

    def all(self) -> list[SnapshotRecord]:
        return [_row(r) for r in self._query(f"SELECT {_COLUMNS} FROM snapshots ORDER BY key")]

    def ids(self) -> set[int]:
        return {int(r[0]) for r in self._query("SELECT id FROM snapshots")}  # type: ignore[call-overload]

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
               digest: str = "", created: int | None = None) -> SnapshotRecord:
        """Insert a snapshot: AlreadyExists if the key is taken, NotFound/InvalidInput for a bad parent."""
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
            cur = db.execute(
                "INSERT INTO snapshots (key, kind, parent, labels, created, updated, source, digest) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (key, kind, parent, json.dumps(dict(labels), sort_keys=True), ts, ts, source, digest),
            )
            rid = int(cur.lastrowid or 0)
        return SnapshotRecord(rid, key, kind, parent, dict(labels), ts, ts, source, digest)

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
                              rec.digest, size, inodes)

    def remove(self, key: str) -> SnapshotRecord:
        """Delete a snapshot's row; FailedPrecondition if other snapshots have it as parent."""
        with self._tx() as db:
            rec = self._get(db, key)
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
