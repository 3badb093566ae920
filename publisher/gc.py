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

What is deliberately *not* done (conservative; see docs/publisher-daemon.md): image metadata is never removed by GC
(an image dropped from the recipe keeps its metadata until an admin deletes ``.metadata/<image>``, after which the
next GC frees its layers and flat), and directories left empty by link removal stay.

Concurrency: an image being published is protected twice. Its new layers are younger than the grace period, and
the daemon holds :func:`gc_lock` shared while it publishes an image, while GC takes it exclusively and marks again
under it before sweeping, so a layer that a publish has just decided to reuse is seen as referenced. Removal goes
through the backend's transaction, so the cvmfs backends remove with ``cvmfs_server`` under the repository lock.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import logging
import os
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cvmfs_snap.errors import CvmfsSnapError, InvalidInputError, UnavailableError
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


def collect_references(layout: RepositoryLayout) -> References:
    """Mark: every layer and config digest named by ``.metadata/**/manifest.json`` and ``image.json``."""
    refs = References()
    top = layout.root / METADATA_DIR
    for dirpath, _dirnames, filenames in os.walk(top, followlinks=False):
        d = Path(dirpath)
        if MANIFEST_JSON in filenames:
            data = _read_metadata_json(d / MANIFEST_JSON)
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
    """One thing GC removes: ``kind`` is layer, flat or link; ``relpath`` is relative to the repository root."""

    kind: str
    relpath: str
    digest: str
    size: int
    age_days: float


@dataclass
class GcPlan:
    items: list[GcItem] = field(default_factory=list)
    #: unreferenced layers and flats kept because they are younger than the grace period
    kept_young: list[GcItem] = field(default_factory=list)
    referenced_layers: int = 0
    metadata_files: int = 0
    #: the remove schedule without its expired entries; None when it stays as it is
    schedule: list[dict[str, Any]] | None = None

    def count(self, kind: str) -> int:
        return sum(1 for i in self.items if i.kind == kind)

    @property
    def bytes(self) -> int:
        return sum(i.size for i in self.items)


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
    for dirpath, _dirs, files in os.walk(path, followlinks=False):
        for name in files:
            try:
                fst = os.lstat(os.path.join(dirpath, name))
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
        for dirpath, dirnames, filenames in os.walk(start, followlinks=False):
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


def _schedule_protection(layout: RepositoryLayout, plan: GcPlan, now: float, grace: float) -> dict[str, float]:
    """Digest -> latest time an image naming it was replaced (from the remove schedule); prunes old entries."""
    from publisher.pipeline import SCHEDULE_KEY, read_remove_schedule

    entries = read_remove_schedule(layout.root)
    protected: dict[str, float] = {}
    keep: list[dict[str, Any]] = []
    for entry in entries:
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
    if len(keep) != len(entries):
        plan.schedule = keep
    return protected


def plan_gc(layout: RepositoryLayout, grace_period_days: float, now: float | None = None) -> GcPlan:
    """Decide what to remove, changing nothing."""
    now = time.time() if now is None else now
    grace = grace_period_days * DAY
    refs = collect_references(layout)
    plan = GcPlan(referenced_layers=len(refs.layers), metadata_files=refs.metadata_files)
    root = layout.root
    protected = _schedule_protection(layout, plan, now, grace)

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

    links: list[GcItem] = []
    for link in _iter_links(root):
        flat_cfg = _flat_of_link(layout, link)
        if flat_cfg is None:
            continue
        cfg = flat_cfg
        age = now - link.lstat().st_mtime
        dangling_old = not layout.flat_dir(cfg).exists() and age >= grace
        if cfg in removed_flats or dangling_old:
            links.append(GcItem("link", str(link.relative_to(root)), cfg, 0, age / DAY))
    # links first, then flats, then layers: with backends that publish each removal on its own, nothing ever points
    # at something already gone
    order = {"link": 0, "flat": 1, "layer": 2}
    plan.items = sorted(links + plan.items, key=lambda i: (order[i.kind], i.relpath))
    return plan


# -- sweep --------------------------------------------------------------------------------------------------------
def apply_plan(backend: Any, plan: GcPlan) -> None:
    """Remove the plan's items in one backend transaction (committed on success, aborted on error)."""
    if not plan.items and plan.schedule is None:
        return
    from publisher.pipeline import REMOVE_SCHEDULE

    with backend.transaction() as txn:
        for item in plan.items:
            log.info("gc: removing %s %s (%s)", item.kind, item.digest, item.relpath)
            txn.remove(item.relpath)
        if plan.schedule is not None:
            txn.write_file(REMOVE_SCHEDULE, (json.dumps(plan.schedule, indent=1) + "\n").encode())


def collect_garbage(backend: Any, state_dir: str | os.PathLike[str], grace_period_days: float, *,
                    dry_run: bool, lock_timeout: float = 600.0) -> GcPlan:
    """Plan and (unless ``dry_run``) sweep, marking again under the exclusive GC lock before removing."""
    layout: RepositoryLayout = backend.layout
    if dry_run:
        return plan_gc(layout, grace_period_days)
    with gc_lock(state_dir, exclusive=True, timeout=lock_timeout):
        plan = plan_gc(layout, grace_period_days)
        apply_plan(backend, plan)
    return plan


def format_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def format_report(plan: GcPlan, *, dry_run: bool) -> str:
    verb = "would remove" if dry_run else "removed"
    lines = [
        f"{verb} {i.kind} {i.digest} {i.relpath} ({format_size(i.size)}, {i.age_days:.1f} days old)"
        for i in plan.items
    ]
    lines += [
        f"kept {i.kind} {i.digest}: unreferenced but younger than the grace period ({i.age_days:.1f} days old)"
        for i in plan.kept_young
    ]
    lines.append(
        f"gc: {verb} {plan.count('layer')} layers, {plan.count('flat')} flats, {plan.count('link')} links; "
        f"{'would free' if dry_run else 'freed'} {plan.bytes} bytes ({format_size(plan.bytes)}); "
        f"{plan.referenced_layers} layers referenced by {plan.metadata_files} metadata files; "
        f"{len(plan.kept_young)} unreferenced items kept (younger than the grace period)"
    )
    return "\n".join(lines)


def run_gc(args: argparse.Namespace, config: Any) -> int:
    """``cvmfs-snap-publisher gc [--grace-period DAYS] [--dry-run]``: print what goes (or went), return 0."""
    grace_arg: Any = getattr(args, "grace_period", None)
    if grace_arg is None:
        grace_arg = getattr(config, "grace_period_days", 7.0)
    dry_run = bool(getattr(args, "dry_run", False))
    try:
        grace = float(grace_arg)
        if grace < 0:
            raise InvalidInputError(f"grace period must be 0 days or more, got {grace}")
        backend = config.make_backend()
        try:
            plan = collect_garbage(backend, config.effective_state_dir(), grace, dry_run=dry_run)
        finally:
            backend.close()
    except CvmfsSnapError as exc:
        log.error("gc failed: %s", exc)
        return exc.exit_code
    print(format_report(plan, dry_run=dry_run), flush=True)
    return 0


__all__ = [
    "GcItem",
    "GcPlan",
    "References",
    "apply_plan",
    "collect_garbage",
    "collect_references",
    "format_report",
    "gc_lock",
    "plan_gc",
    "run_gc",
]

