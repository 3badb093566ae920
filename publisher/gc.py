"""Garbage collection of a published repository: remove what no image metadata references any more.

This module sweeps (and runs plan + sweep under the lock); the plan is :mod:`publisher.gcplan`, the schedule
:mod:`publisher.schedule`, the inventory of published images :mod:`publisher.inventory`, the command
(``cvmfs-snap-publisher gc``) :mod:`publisher.gccommand`.

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
the daemon holds :func:`publisher.locks.gc_lock` shared while it publishes an image, while GC takes it exclusively
and marks again under it before sweeping, so a layer that a publish has just decided to reuse is seen as
referenced. Removal goes through the backend's transaction, so the cvmfs backends remove with ``cvmfs_server``
under the repository lock.
"""

from __future__ import annotations

import logging
import os
import time

from cvmfs_snap.layout import REMOVE_SCHEDULE, RepositoryLayout
from publisher.backends.base import Backend
from publisher.gcplan import GcPlan, plan_gc
from publisher.locks import gc_lock
from publisher.schedule import ScheduleUpdate, parse_schedule, read_remove_schedule, schedule_bytes, update_schedule
from publisher.wishlist import Wishlist

log = logging.getLogger(__name__)


def apply_plan(backend: Backend, plan: GcPlan) -> None:
    """Remove the plan's items in one backend transaction (committed on success, aborted on error)."""
    if not plan.items and plan.schedule is None:
        return

    with backend.transaction() as txn:
        for item in plan.items:
            log.info("gc: removing %s %s (%s)", item.kind, item.name or item.digest, item.relpath)
            txn.remove(item.relpath)
        if plan.schedule is not None:
            txn.write_file(REMOVE_SCHEDULE, schedule_bytes(plan.schedule))


def _log_update(upd: ScheduleUpdate, *, dry_run: bool) -> None:
    for name in upd.scheduled:
        log.info("%s %s for removal: no longer in the recipe", "would schedule" if dry_run else "scheduled", name)
    for name in upd.unscheduled:
        log.info("%s %s: back in the recipe", "would unschedule" if dry_run else "unscheduled", name)
    if upd.not_scheduled:
        log.warning("no image was scheduled for removal: %s", upd.not_scheduled)


def collect_garbage(backend: Backend, state_dir: str | os.PathLike[str], grace_period_days: float, *,
                    dry_run: bool, lock_timeout: float = 600.0, wishlist: Wishlist | None = None,
                    now: float | None = None) -> GcPlan:
    """Plan and (unless ``dry_run``) sweep, marking again under the exclusive GC lock before removing.

    With a ``wishlist`` (the expanded recipe), images it no longer names are scheduled first (and written in the
    same transaction as the removals); a dry run shows the would-be schedule and changes nothing."""
    layout: RepositoryLayout = backend.layout

    def plan_once() -> GcPlan:
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


def record_unwanted(backend: Backend, state_dir: str | os.PathLike[str], wishlist: Wishlist, *,
                    lock_timeout: float = 10.0, now: float | None = None) -> ScheduleUpdate:
    """Schedule images the recipe no longer names, unschedule those it names again; no removal (the daemon's
    hook after a full pass: removal stays with ``gc``).

    Holds the GC lock shared, as a publish does, so it never interleaves with a sweep; the schedule is read again
    and written inside one backend transaction, which is opened only when something changes (with the cvmfs
    backends every transaction is a publish)."""
    layout: RepositoryLayout = backend.layout
    t = time.time() if now is None else now
    with gc_lock(state_dir, exclusive=False, timeout=lock_timeout):
        upd = update_schedule(layout, read_remove_schedule(layout.root), wishlist, t)
        if upd.changed:
            with backend.transaction() as txn:
                current = parse_schedule(txn.read_file(REMOVE_SCHEDULE), layout.root / REMOVE_SCHEDULE)
                upd = update_schedule(layout, current, wishlist, t)
                if upd.changed:
                    txn.write_file(REMOVE_SCHEDULE, schedule_bytes(upd.schedule))
    _log_update(upd, dry_run=False)
    return upd


__all__ = ["apply_plan", "collect_garbage", "record_unwanted"]
