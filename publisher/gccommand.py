"""``cvmfs-snap-publisher gc``: read the recipe into a wishlist, collect, print the report, choose the exit status."""

from __future__ import annotations

import argparse
import logging
import sys

from cvmfs_snap.errors import CvmfsSnapError, InvalidInputError
from cvmfs_snap.progressbars import human_bytes
from publisher.config import PublisherConfig
from publisher.factory import make_backend, make_client
from publisher.gc import collect_garbage
from publisher.gcplan import GcPlan
from publisher.policy import recipe_into_config
from publisher.recipe import Recipe
from publisher.wishlist import Wishlist, publish_on_miss_keep

log = logging.getLogger(__name__)


def load_wishlist(recipe_path: str, config: PublisherConfig, args: argparse.Namespace | None = None) -> Wishlist:
    """Read and expand a recipe (tag lists read from the registries) into a :class:`Wishlist`.

    Never raises for a bad recipe or an unreachable registry: those become ``problems``, which stop scheduling."""
    keep = publish_on_miss_keep(config.daemon.publish_on_miss_allow)
    try:
        recipe = Recipe.load(recipe_path)
        recipe_into_config(recipe, config, args)
    except CvmfsSnapError as exc:
        return Wishlist(set(), [f"recipe {recipe_path} cannot be used: {exc}"], keep)
    client = make_client(config)
    try:
        refs = recipe.expand(client)
    finally:
        client.close()
    # an invalid tag in a registry's tag list names no publishable image: it does not make the wishlist incomplete
    problems = [f"recipe line {e.message}" for e in recipe.errors if e.whole_line]
    return Wishlist.from_refs(refs, problems, keep)


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
            lines.append(f"{verb} image {i.name} {i.relpath} ({human_bytes(i.size)} of metadata, scheduled "
                         f"{i.age_days:.1f} days ago)")
        elif i.name:
            lines.append(f"{verb} link {i.relpath} of image {i.name}")
        else:
            lines.append(f"{verb} {i.kind} {i.digest} {i.relpath} ({human_bytes(i.size)}, {i.age_days:.1f} days old)")
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
        f"{'would free' if dry_run else 'freed'} {plan.bytes} bytes ({human_bytes(plan.bytes)}); "
        f"{plan.referenced_layers} layers referenced by {plan.metadata_files} metadata files; "
        f"{len(plan.kept_young)} unreferenced items kept (younger than the grace period); "
        f"{len(plan.scheduled_images)} images scheduled for removal"
    )
    return "\n".join(lines)


def run_gc(args: argparse.Namespace, config: PublisherConfig) -> int:
    """``cvmfs-snap-publisher gc [--recipe RECIPE] [--grace-period DAYS] [--dry-run]``: print what goes (or went).

    Exit status 0; 1 when a recipe was given but could not be used for scheduling (it does not parse, a line does
    not expand, or it names no image at all); the rest of the collection still ran."""
    grace_arg: object = getattr(args, "grace_period", None)
    if grace_arg is None:
        grace_arg = config.grace_period_days
    dry_run = bool(getattr(args, "dry_run", False))
    recipe_path = getattr(args, "recipe", None)
    wishlist: Wishlist | None = None
    try:
        if not isinstance(grace_arg, (int, float, str)):
            raise InvalidInputError(f"grace period must be a number of days, got {grace_arg!r}")
        grace = float(grace_arg)
        if grace < 0:
            raise InvalidInputError(f"grace period must be 0 days or more, got {grace}")
        wishlist = load_wishlist(str(recipe_path), config, args) if recipe_path else None
        backend = make_backend(config)
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


__all__ = ["format_report", "load_wishlist", "run_gc"]
