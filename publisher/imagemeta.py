"""An image's metadata in the repository: reading what a previous run recorded, and writing a publish's metadata.

``commit`` writes, in one backend transaction and only after every layer and flat tree is complete, the layers'
``origin.json`` (and ``layer.json`` for complete layers that have none: DUCC-made or interrupted), the remove
schedule entries of a moved tag, the per-platform ``manifest.json`` / ``config.json`` / ``image.json``, the public
links and, last, the top-level ``image.json``. ``is_complete`` says whether what a previous run recorded is all
there (a crash between steps makes the next run redo the image)."""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from pathlib import Path

from cvmfs_snap.errors import CvmfsSnapError, InvalidInputError
from cvmfs_snap.fsutil import walk_fd
from cvmfs_snap.layer.whiteout import scan_tree_whiteouts
from cvmfs_snap.layout import (
    CONFIG_JSON,
    CVMFS_MARKER_FILES,
    IMAGE_JSON,
    INDEX_JSON,
    MANIFEST_JSON,
    REMOVE_SCHEDULE,
    ImageRecord,
    link_resolves,
)
from cvmfs_snap.oci import Descriptor, ImageReference, Index, Manifest, Platform

from .backends.base import Backend, LayerInfo, Txn, layers_json, merge_origin, new_record
from .inventory import image_names
from .platforms import ImagePlatform, arch_key, default_platform, is_sha256
from .schedule import ScheduleEntry, parse_schedule, schedule_bytes

log = logging.getLogger(__name__)


class ImageMetadata:
    """Reads and writes the metadata of images published through ``backend`` (``skip_flat``: images are published
    without flat trees and public links)."""

    def __init__(self, backend: Backend, skip_flat: bool = False) -> None:
        self.backend = backend
        self.layout = backend.layout
        self.skip_flat = skip_flat

    def read_record(self, meta_dir: Path) -> ImageRecord | None:
        """The ``image.json`` in ``meta_dir``; None when there is none or it is malformed (then republished)."""
        try:
            return ImageRecord.from_json((meta_dir / IMAGE_JSON).read_bytes())
        except FileNotFoundError:
            return None
        except InvalidInputError as exc:
            log.warning("%s; republishing the image", exc)
            return None

    def recorded_platforms(self, meta_dir: Path, rec: ImageRecord) -> list[str]:
        """The platform keys recorded under ``meta_dir`` (``["default"]`` for a single-arch image)."""
        if not rec.index_digest:
            return ["default"]
        return sorted(p.name for p in meta_dir.iterdir() if (p / IMAGE_JSON).is_file())

    def is_complete(self, ref: ImageReference, meta_dir: Path, rec: ImageRecord) -> bool:
        """Everything the previous run should have written is there (a crash between steps redoes the image)."""
        registry, repository, tag = image_names(ref)
        records = [rec]
        if rec.index_digest:
            subs = [(p.name, self.read_record(p)) for p in meta_dir.iterdir() if p.is_dir()]
            records = [r for _name, r in subs if r is not None]
            if not records:
                return False
            for name, r in subs:
                # a directory named otherwise than arch_key names it today (``arm64-v8`` before the DUCC spelling
                # ``arm64:v8``): republish, which renames the metadata and the ``.multiarch`` link
                try:
                    if r is None or not r.platform or arch_key(Platform.parse(r.platform)) != name:
                        return False
                except CvmfsSnapError:
                    return False
                if not self.skip_flat and not self.layout.multiarch_link(name, registry, repository, tag).is_dir():
                    return False
        for r in records:
            if not all(self.layout.is_layer_complete(d) for d in r.layers):
                return False
            if not self.skip_flat and not self.layout.flat_dir(r.config_digest).is_dir():
                return False
        if not self.skip_flat:
            link = self.layout.public_link(registry, repository, tag)
            if not link_resolves(link):
                return False
            if rec.index_digest and self.backend.variant_symlinks and rec.platform and os.readlink(link) != (
                self.layout.variant_link_target(registry, repository, tag, arch_key(Platform.parse(rec.platform)))
            ):
                return False  # an older layout (a plain link to the default flat): republish as a variant link
        return True

    def commit(self, ref: ImageReference, obj: Manifest | Index, plats: list[ImagePlatform],
               old: ImageRecord | None) -> None:
        """Write the metadata of a published image in one transaction (``old``: what the tag recorded before)."""
        registry, repository, tag = image_names(ref)
        layout = self.layout
        root = layout.root
        meta_dir = layout.image_metadata_dir(registry, repository, tag)
        multi = isinstance(obj, Index)
        default = default_platform(plats)
        now = time.time()

        def rel(p: Path) -> str:
            return str(p.relative_to(root))

        def record(p: ImagePlatform) -> ImageRecord:
            return ImageRecord(
                reference=str(ref), manifest_digest=p.manifest.digest, config_digest=p.config_digest,
                layers=[d.digest for d in p.manifest.layers],
                platform=str(p.platform) if p.platform else "",
                index_digest=obj.digest if multi else "", published=now,
            )

        with self.backend.transaction() as txn:
            # origin.json of every layer (merged: several images share layers)
            cfg_by_layer: dict[str, list[str]] = {}
            for p in plats:
                for d in p.manifest.layers:
                    cfg_by_layer.setdefault(d.digest, []).append(p.config_digest)
            for p in plats:
                for d, diff_id in zip(p.manifest.layers, p.diff_ids, strict=True):
                    if not layout.layer_json(d.digest).exists():
                        self._adopt_layer(txn, d, diff_id)
            for digest, cfgs in cfg_by_layer.items():
                origin_rel = rel(layout.origin_json(digest))
                merged = merge_origin(txn.read_file(origin_rel), cfgs)
                if merged is not None:
                    txn.write_file(origin_rel, merged)

            # a moved tag: schedule what it pointed to before for GC
            if old is not None and (old.index_digest or old.manifest_digest) != obj.digest:
                self._schedule_removal(txn, ref, meta_dir, old, {p.config_digest for p in plats})

            # per-platform metadata, then the public links, then the top-level image.json (LAST)
            if multi:
                txn.write_file(rel(meta_dir / INDEX_JSON), obj.raw)
                wanted = {p.key for p in plats}
                if old is not None and old.index_digest:
                    for sub in meta_dir.iterdir():
                        if sub.is_dir() and sub.name not in wanted:  # a platform the tag no longer has
                            txn.remove(rel(sub))
                            txn.remove(rel(layout.multiarch_link(sub.name, registry, repository, tag)))
                for p in plats:
                    sub = layout.image_metadata_dir(registry, repository, tag, p.key)
                    txn.write_file(rel(sub / MANIFEST_JSON), p.manifest.raw)
                    txn.write_file(rel(sub / CONFIG_JSON), p.config)
                    txn.write_file(rel(sub / IMAGE_JSON), record(p).to_json().encode())
            else:
                if old is not None and old.index_digest:  # was multi-arch, is not any more
                    for sub in meta_dir.iterdir():
                        if sub.is_dir():
                            txn.remove(rel(sub))
                            txn.remove(rel(layout.multiarch_link(sub.name, registry, repository, tag)))
                    txn.remove(rel(meta_dir / INDEX_JSON))
            txn.write_file(rel(meta_dir / MANIFEST_JSON), default.manifest.raw)
            txn.write_file(rel(meta_dir / CONFIG_JSON), default.config)

            if not self.skip_flat:
                if multi:
                    for p in plats:
                        link = layout.multiarch_link(p.key, registry, repository, tag)
                        txn.symlink(rel(link), layout.flat_link_target(link, p.config_digest))
                link = layout.public_link(registry, repository, tag)
                if multi and self.backend.variant_symlinks:  # DUCC's: resolved by each node on $(CVMFS_ARCH)
                    txn.symlink(rel(link), layout.variant_link_target(registry, repository, tag, default.key))
                    for alias, target in layout.multiarch_alias_links({p.key for p in plats}):
                        txn.symlink(rel(alias), target)
                else:
                    txn.symlink(rel(link), layout.flat_link_target(link, default.config_digest))

            txn.write_file(rel(meta_dir / IMAGE_JSON), record(default).to_json().encode())

    def _adopt_layer(self, txn: Txn, desc: Descriptor, claimed_diff_id: str) -> None:
        """Write our ``layer.json`` for a complete layer that has none: published by DUCC, or by a run killed
        between ``cvmfs_server ingest`` and the metadata publish. Built from the tree (whiteouts as plain files);
        ``uncompressed_size`` is then the sum of file sizes, not the tar size.

        The image naming the layer is not its author: its claimed diffID, media type and size were never checked
        against this tree, so none of them is recorded. Only what the repository itself says is: the digest (the
        layer's path), the tree, and what its own ``layers.json`` (written by whoever published the layer) holds,
        when well-formed; otherwise diff_id and media_type stay empty and compressed_size 0 (unknown)."""
        layerfs = self.layout.layerfs(desc.digest)
        idx = scan_tree_whiteouts(layerfs)
        entries = size = 0
        for _rel, dfd, dirs, files in walk_fd(layerfs):
            for name in dirs + files:
                if name in CVMFS_MARKER_FILES:
                    continue
                entries += 1
                st = os.lstat(name, dir_fd=dfd)
                if stat.S_ISREG(st.st_mode):
                    size += st.st_size
        diff_id, compressed_size = self._recorded_layer_facts(desc.digest)
        if diff_id and diff_id != claimed_diff_id:
            log.warning("layer %s: the image's config claims diffID %s, but the layer's own layers.json records %s; "
                        "keeping the recorded one", desc.digest, claimed_diff_id, diff_id)
        info = LayerInfo(desc.digest, "", compressed_size)
        rec = new_record(info, diff_id, size, entries, idx.whiteouts, idx.opaque_dirs, idx.hidden)
        root = self.layout.root
        if not self.layout.layers_json(desc.digest).exists():
            txn.write_file(str(self.layout.layers_json(desc.digest).relative_to(root)), layers_json(rec))
        txn.write_file(str(self.layout.layer_json(desc.digest).relative_to(root)), rec.to_json().encode())
        log.info("layer %s had no layer.json (DUCC-made or interrupted); wrote one from its tree%s", desc.digest,
                 "" if diff_id else " (diffID unknown: not taken from the image naming it)")

    def _recorded_layer_facts(self, digest: str) -> tuple[str, int]:
        """(diffID, compressed size) from the layer's own ``layers.json`` when it is DUCC's well-formed record of
        this very layer, else ("", 0)."""
        try:
            data = json.loads(self.layout.layers_json(digest).read_bytes())
        except (OSError, ValueError):
            return "", 0
        entry = data[0] if isinstance(data, list) and len(data) == 1 and isinstance(data[0], dict) else None
        if entry is None or entry.get("compressed-diff-digest") != digest:
            return "", 0
        diff_id = entry.get("diff-digest")
        size = entry.get("compressed-size")
        return (diff_id if isinstance(diff_id, str) and is_sha256(diff_id) else "",
                size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else 0)

    def _schedule_removal(self, txn: Txn, ref: ImageReference, meta_dir: Path, old: ImageRecord,
                          keep_configs: set[str]) -> None:
        """Append the replaced manifest(s) to DUCC's remove schedule (GC deletes them after the grace period)."""
        old_dirs = [meta_dir]
        if old.index_digest:
            old_dirs = [p for p in meta_dir.iterdir() if p.is_dir()]
        try:
            schedule = parse_schedule(txn.read_file(REMOVE_SCHEDULE), REMOVE_SCHEDULE)
        except InvalidInputError:
            log.warning("%s is malformed; starting a new one", REMOVE_SCHEDULE)
            schedule = []
        # manifests already scheduled as moved tags (an image dropped from the recipe and then moved still needs
        # its moved-tag entry: the dropped entry is withdrawn when the image is named again)
        known = {e.manifest_digest for e in schedule if not e.is_dropped and e.manifest_digest}
        added = 0
        for d in old_dirs:
            rec = self.read_record(d)
            try:
                manifest = json.loads((d / MANIFEST_JSON).read_bytes())
            except (OSError, ValueError):
                continue
            if rec is None or not isinstance(manifest, dict) or rec.config_digest in keep_configs:
                continue
            if rec.manifest_digest in known:
                continue
            schedule.append(ScheduleEntry.moved_tag(manifest, str(ref), rec, time.time()))
            added += 1
        if added:
            log.info("%s: tag moved; %d old manifest(s) scheduled for garbage collection", ref, added)
            txn.write_file(REMOVE_SCHEDULE, schedule_bytes(schedule))


