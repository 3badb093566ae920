"""What gets published, in which order, and how concurrently.

For each image (tag): resolve the manifest (all platforms of a multi-arch index, optionally filtered), then publish
every layer not yet complete in the repository, then the flattened root filesystem, and only then, in one metadata
transaction, the image metadata and the public symlinks. That order is the crash-safety argument: a killed run can
leave finished layers (which the next run skips) and staging debris (which ``Backend.recover`` removes), never an
image whose metadata points at missing layers.

Concurrency: layers of *all* images being published go through one bounded pool (``concurrency`` workers) and a
layer wanted by several images at once is processed once (the in-flight table maps digest -> future). Each layer
thread downloads its blob and has it unpacked in one of ``concurrency`` worker processes (``publisher.workers``), so
that layers use every core. Image orchestration runs in lightweight threads that mostly wait; flat-tree builds share
the same bound.
Streaming end to end (registry -> decompressor -> unpacker), so memory does not grow with layer size. Flat trees
are built from the published layer trees (``publisher.layertree``), so each blob is downloaded once per publish.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cvmfs_snap.errors import CvmfsSnapError, InvalidInputError
from cvmfs_snap.fsutil import walk_fd
from cvmfs_snap.layer.limits import Limits
from cvmfs_snap.layout import (
    CONFIG_JSON,
    CVMFS_MARKER_FILES,
    IMAGE_JSON,
    INDEX_JSON,
    MANIFEST_JSON,
    REMOVE_SCHEDULE,
    ImageRecord,
    RepositoryLayout,
    digest_hex,
    link_resolves,
)
from cvmfs_snap.oci import Descriptor, ImageReference, Index, Manifest, Platform, RegistryClient

from . import metrics
from .backends.base import Backend, LayerInfo, LayerOpener, TarStream, Txn, layers_json, merge_origin, new_record
from .backends.local import disk_error
from .crashpoints import crash_point
from .inventory import image_names
from .locks import gc_lock
from .schedule import ScheduleEntry, parse_schedule, schedule_bytes
from .workers import LayerWorkers

log = logging.getLogger(__name__)


DEFAULT_ARCH = "amd64"


@dataclass
class ImageResult:
    """Outcome of publishing one image reference."""

    ref: str
    ok: bool
    error: str = ""
    #: digest the tag resolved to (the index digest for a multi-arch image)
    manifest_digest: str = ""
    layers_published: int = 0
    layers_skipped: int = 0
    #: the manifest was unchanged and complete: nothing was done
    unchanged: bool = False
    #: the previous digest of a moved tag (now in the remove schedule for GC)
    moved_from: str = ""
    platforms: list[str] = field(default_factory=list)
    seconds: float = 0.0


class ProgressSink(Protocol):
    """Receives progress events (the CLI draws rich progress bars from them). Called from worker threads."""

    def layer_started(self, digest: str, size: int) -> None: ...

    def layer_advanced(self, digest: str, nbytes: int) -> None: ...

    def layer_finished(self, digest: str, ok: bool) -> None: ...

    def image_finished(self, result: ImageResult) -> None: ...


@dataclass
class _Platform:
    key: str  # "amd64", "arm64-v8"; "" for a single-arch image
    platform: Platform | None
    manifest: Manifest
    config: bytes
    config_digest: str
    diff_ids: list[str]


class _CountingReader:
    def __init__(self, stream: Any, digest: str, sink: ProgressSink) -> None:
        self._s, self._d, self._sink = stream, digest, sink

    def read(self, n: int = -1, /) -> bytes:
        data: bytes = self._s.read(n)
        if data:
            self._sink.layer_advanced(self._d, len(data))
        return data


def arch_key(p: Platform) -> str:
    """Directory name of one platform under ``.multiarch`` and the per-arch metadata: ``amd64``, ``arm64:v8``.

    DUCC's spelling (``GetNameWithArch``: ``<arch>`` or ``<arch>:<variant>``), so the ``.multiarch/<arch>`` paths
    users and DUCC-era scripts know keep working. DUCC ignores the OS; non-Linux platforms get it in front here
    (``windows-amd64``) so that they cannot take the place of the Linux image of the same architecture."""
    key = p.architecture + (f":{p.variant}" if p.variant else "")
    return key if p.os == "linux" else f"{p.os}-{key}"


def platform_matches(p: Platform, wanted: Sequence[str]) -> bool:
    """True when ``wanted`` is empty or one of its ``os/arch[/variant]`` entries accepts ``p``."""
    return not wanted or any(Platform.parse(w).matches(p) for w in wanted)


class Publisher:
    """Publishes images through a backend. Thread-safe: the daemon may call ``publish_image`` from many threads."""

    def __init__(
        self,
        backend: Backend,
        client: RegistryClient,
        *,
        concurrency: int = 2,
        skip_flat: bool = False,
        platforms: Sequence[str] | None = None,
        progress: ProgressSink | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        limits: Limits | None = None,
        unpack_in_processes: bool = True,
        owns_client: bool = False,
    ) -> None:
        self.backend = backend
        #: bounds for every layer (passed to the backend, which unpacks) and every manifest and index
        self.limits: Limits = limits if limits is not None else backend.limits
        backend.limits = self.limits
        self.client = client
        self.layout: RepositoryLayout = backend.layout
        self.concurrency = max(1, concurrency)
        self.skip_flat = skip_flat
        self.platforms = list(platforms or [])
        self.progress = progress
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="publish-layer")
        #: layers are unpacked in worker processes (started on first use); None: in the layer threads
        self._workers = LayerWorkers(self.concurrency) if unpack_in_processes else None
        self._heavy = threading.BoundedSemaphore(self.concurrency)
        self._lock = threading.RLock()
        self._inflight: dict[str, Future[str]] = {}
        self._image_locks: dict[str, threading.Lock] = {}
        self._backend_label = backend.name
        #: where ``gc.lock`` lives (held shared while an image is published, so GC never sweeps under a publish);
        #: by default the backend's state directory
        sd = state_dir if state_dir is not None else getattr(backend, "state_dir", None)
        self.state_dir: Path | None = Path(sd) if sd is not None else None
        #: how long a publish waits for a running GC before the image fails with "garbage collection is running"
        self.gc_lock_timeout = 3600.0
        #: build flat trees from the published layer trees (no second download); False: from the registry
        self.flat_from_tree = True
        #: clients passed in belong to the caller, unless ``owns_client`` (``factory.make_publisher``): ours to close
        self._owns_client = owns_client

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._workers is not None:
            self._workers.close()
        self.backend.close()
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public API ------------------------------------------------------------------------------------------------
    def publish_images(self, refs: Iterable[ImageReference | str]) -> list[ImageResult]:
        """Publish several images concurrently (their layers share the bounded pool); results in input order."""
        refs = list(refs)
        if not refs:
            return []
        workers = min(len(refs), max(2, 2 * self.concurrency))
        with ThreadPoolExecutor(workers, thread_name_prefix="publish-image") as ex:
            return list(ex.map(self.publish_image, refs))

    def publish_image(self, ref: ImageReference | str) -> ImageResult:
        """Publish one image (all selected platforms); never raises for bad input: the result says what failed."""
        t0 = time.monotonic()
        name = str(ref)
        try:
            if isinstance(ref, str):
                ref = ImageReference.parse(ref)
            name = str(ref)
            with self._image_lock(name), self._gc_shared():
                result = self._publish(ref)
        except CvmfsSnapError as exc:
            result = ImageResult(ref=name, ok=False, error=str(exc))
            metrics.FAILURES.labels("image", type(exc).__name__).inc()
        except OSError as exc:  # disk full, permissions: say so, naming the path
            log.debug("OS error publishing %s", name, exc_info=exc)
            result = ImageResult(ref=name, ok=False, error=str(disk_error(exc, None)))
            metrics.FAILURES.labels("image", type(exc).__name__).inc()
        except Exception as exc:  # a bug or an OS error: still a clear result, with the traceback in the log
            log.exception("unexpected error publishing %s", name)
            result = ImageResult(ref=name, ok=False, error=f"unexpected error: {exc!r}")
            metrics.FAILURES.labels("image", type(exc).__name__).inc()
        result.seconds = time.monotonic() - t0
        metrics.IMAGE_SECONDS.labels(self._backend_label).observe(result.seconds)
        if result.ok:
            log.info(
                "%s: %s (%s; %d layers published, %d already there)", name,
                "unchanged" if result.unchanged else "published", result.manifest_digest,
                result.layers_published, result.layers_skipped,
            )
        else:
            log.error("%s: FAILED: %s", name, result.error)
        if self.progress is not None:
            self.progress.image_finished(result)
        return result

    # -- one image -------------------------------------------------------------------------------------------------
    @contextmanager
    def _image_lock(self, name: str) -> Iterator[None]:
        with self._lock:
            lock = self._image_locks.setdefault(name, threading.Lock())
        with lock:
            yield

    @contextmanager
    def _gc_shared(self) -> Iterator[None]:
        """Hold ``<state_dir>/gc.lock`` shared for one image, so ``gc`` (exclusive) never sweeps while layers it
        would consider unreferenced are being published or reused. ``flock`` shared locks taken on separate file
        descriptions coexist, so the daemon holding its own shared lock around this call cannot deadlock, and GC
        polls for its exclusive lock instead of queueing ahead of new shared holders."""
        if self.state_dir is None:
            yield
            return
        with gc_lock(self.state_dir, exclusive=False, timeout=self.gc_lock_timeout):
            yield

    def _publish(self, ref: ImageReference) -> ImageResult:
        registry, repository, tag = image_names(ref)
        meta_dir = self.layout.image_metadata_dir(registry, repository, tag)  # validates the names
        obj = self.client.get_manifest(ref)
        top_digest = obj.digest
        result = ImageResult(ref=str(ref), ok=False, manifest_digest=top_digest)

        old = self._read_image_record(meta_dir)
        if old is not None:
            old_top = old.index_digest or old.manifest_digest
            if old_top == top_digest and self._is_complete(ref, meta_dir, old):
                metrics.IMAGES_SKIPPED.labels(self._backend_label).inc()
                result.ok, result.unchanged = True, True
                result.platforms = self._recorded_platforms(meta_dir, old)
                return result
            if old_top != top_digest:
                result.moved_from = old_top

        plats = self._platforms(ref, obj)
        result.platforms = [p.key or "default" for p in plats]
        if self._workers is not None and not all(self.backend.has_layer(d.digest) for p in plats
                                                 for d in p.manifest.layers):
            self._workers.start()

        # layers of all platforms, deduplicated, through the shared pool
        futures: list[tuple[str, Future[str]]] = []
        seen: set[str] = set()
        for p in plats:
            for desc, diff_id in zip(p.manifest.layers, p.diff_ids, strict=True):
                if desc.digest in seen:
                    continue
                seen.add(desc.digest)
                futures.append((desc.digest, self._layer_future(ref, desc, diff_id, p.config_digest)))
        errors: list[str] = []
        for digest, fut in futures:
            try:
                outcome = fut.result()
            except CvmfsSnapError as exc:
                errors.append(f"layer {digest}: {exc}")
                continue
            except OSError as exc:
                errors.append(f"layer {digest}: {disk_error(exc, None)}")
                continue
            except Exception as exc:
                log.error("unexpected error publishing layer %s", digest, exc_info=exc)
                errors.append(f"layer {digest}: unexpected error: {exc!r}")
                continue
            if outcome == "published":
                result.layers_published += 1
            else:
                result.layers_skipped += 1
        if errors:
            raise _ImageFailed("; ".join(errors))
        self.backend.flush_layers(sorted(seen))  # backends that batch layers publish them now

        crash_point("image-layers-done")
        if not self.skip_flat:
            for p in plats:
                if not self.backend.has_flat(p.config_digest):
                    with self._heavy:
                        self._build_flat(ref, p)

        self._commit_metadata(ref, obj, plats, old)
        metrics.IMAGES_PUBLISHED.labels(self._backend_label).inc()
        result.ok = True
        return result

    def _platforms(self, ref: ImageReference, obj: Manifest | Index) -> list[_Platform]:
        if isinstance(obj, Manifest):
            return [self._load_platform(ref, obj, "", None)]
        limit = self.limits.max_platforms_per_index
        if len(obj.manifests) > limit:
            raise InvalidInputError(
                f"{ref}: index {obj.digest} lists {len(obj.manifests)} manifests, more than "
                f"limits.max_platforms_per_index ({limit}); not published (raise the limit in the publisher "
                "configuration if this index is genuine)"
            )
        out: list[_Platform] = []
        skipped: list[str] = []
        keys: set[str] = set()
        for desc in obj.manifests:
            p = desc.platform
            if p is None or p.os == "unknown" or p.architecture == "unknown":
                continue  # attestation manifests (buildx) and entries without a platform
            if not platform_matches(p, self.platforms):
                skipped.append(str(p))
                continue
            key = arch_key(p)
            if key in keys:
                log.warning("%s: index lists platform %s twice; publishing the first", ref, p)
                continue
            keys.add(key)
            m = self.client.get_manifest(ref.with_digest(desc.digest))
            if not isinstance(m, Manifest):
                raise InvalidInputError(f"{ref}: index entry {desc.digest} for {p} is not an image manifest")
            out.append(self._load_platform(ref, m, key, p))
        if skipped:
            log.info("%s: not publishing platforms %s (restricted to %s)", ref, ", ".join(skipped),
                     ", ".join(self.platforms))
        if not out:
            raise InvalidInputError(
                f"{ref}: no platform of the multi-arch index matches {', '.join(self.platforms) or 'any platform'}; "
                "check the recipe's 'platforms' list"
            )
        return out

    def _load_platform(self, ref: ImageReference, m: Manifest, key: str, p: Platform | None) -> _Platform:
        limit = self.limits.max_layers_per_image
        if len(m.layers) > limit:
            raise InvalidInputError(
                f"{ref}: manifest {m.digest} lists {len(m.layers)} layers, more than limits.max_layers_per_image "
                f"({limit}); not published (raise the limit in the publisher configuration if the image is genuine)"
            )
        cfg_digest = m.config.digest
        config = self.client.get_blob(ref, cfg_digest, size=m.config.size)
        try:
            cfg = json.loads(config)
            diff_ids = list(cfg["rootfs"]["diff_ids"])
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidInputError(f"{ref}: image config {cfg_digest} has no rootfs.diff_ids: {exc}") from exc
        for d in diff_ids:
            if not isinstance(d, str) or not _is_sha256(d):
                raise InvalidInputError(
                    f"{ref}: image config {cfg_digest} lists diffID {d!r}, which is not a sha256 digest; the image "
                    "is broken or hostile: rebuild it"
                )
        if len(diff_ids) != len(m.layers):
            raise InvalidInputError(
                f"{ref}: manifest {m.digest} lists {len(m.layers)} layers but its config {cfg_digest} "
                f"{len(diff_ids)} diffIDs; the image is broken, rebuild it"
            )
        return _Platform(key, p, m, config, cfg_digest, diff_ids)

    # -- layers ----------------------------------------------------------------------------------------------------
    def _layer_future(self, ref: ImageReference, desc: Descriptor, diff_id: str, cfg: str) -> Future[str]:
        with self._lock:
            fut = self._inflight.get(desc.digest)
            if fut is None:
                fut = self._pool.submit(self._do_layer, ref, desc, diff_id, cfg)
                self._inflight[desc.digest] = fut
                fut.add_done_callback(functools.partial(self._forget, desc.digest))
            return fut

    def _forget(self, digest: str, fut: Future[str]) -> None:
        with self._lock:
            if self._inflight.get(digest) is fut:
                del self._inflight[digest]

    @contextmanager
    def _open_layer(self, ref: ImageReference, desc: Descriptor, offload: bool = False) -> Iterator[TarStream]:
        """The layer's decoded tar; ``offload``: the undecoded blob for the backend's unpack step to run in a worker
        process (``publisher.workers``), when the publisher has them."""
        from cvmfs_snap.layer import open_layer

        with self.client.open_blob(ref, desc.digest, desc.size) as raw:
            src: Any = raw if self.progress is None else _CountingReader(raw, desc.digest, self.progress)
            name = f"layer {desc.digest} of {ref}"
            if offload and self._workers is not None:
                yield self._workers.layer(src, desc.media_type, name, self.limits)
            else:
                with open_layer(src, desc.media_type, name=name, limits=self.limits) as tar:
                    yield tar
            while src.read(1 << 20):  # to EOF: the blob stream checks the compressed digest there
                pass

    def _opener(self, ref: ImageReference, desc: Descriptor) -> LayerOpener:
        return lambda: self._open_layer(ref, desc)

    # -- flat trees ------------------------------------------------------------------------------------------------
    def _build_flat(self, ref: ImageReference, p: _Platform) -> None:
        """Build one flat tree, each layer read from its published tree when this host can read it (no second
        download), else from the registry. Should reading or applying a published tree fail, the flat is rebuilt
        from the registry alone: a flat must not depend on a tree that may be damaged."""
        failed: list[BaseException] = []
        openers: list[LayerOpener] = []
        from_tree = 0
        for desc in p.manifest.layers:
            tree = self.backend.layer_tree(desc.digest) if self.flat_from_tree else None
            if tree is None:
                openers.append(self._opener(ref, desc))
            else:
                openers.append(self._tree_opener(tree, desc.digest, failed))
                from_tree += 1
        log.info("%s: building flat root filesystem %s (%d of %d layers from the repository, %d from the "
                 "registry)", ref, p.config_digest, from_tree, len(openers), len(openers) - from_tree)
        try:
            self.backend.publish_flat(p.config_digest, openers)
            return
        except (CvmfsSnapError, OSError) as exc:
            if not failed:
                raise
            log.warning("%s: building flat %s from the published layer trees failed (%s); fetching its layers "
                        "from the registry instead", ref, p.config_digest, exc)
        self.backend.publish_flat(p.config_digest, [self._opener(ref, d) for d in p.manifest.layers])

    def _tree_opener(self, tree: Path, digest: str, failed: list[BaseException]) -> LayerOpener:
        from .layertree import open_layer_tree

        user_xattrs = not self.backend.reads_through_cvmfs

        @contextmanager
        def opened() -> Iterator[TarStream]:
            try:
                with open_layer_tree(tree, user_xattrs=user_xattrs, name=f"layer {digest}") as stream:
                    yield stream
            except BaseException as exc:
                failed.append(exc)
                raise

        return opened

    def _do_layer(self, ref: ImageReference, desc: Descriptor, diff_id: str, cfg: str) -> str:
        digest = desc.digest
        if self.backend.has_layer(digest):
            metrics.LAYERS_SKIPPED.labels(self._backend_label).inc()
            return "skipped"
        if desc.urls:
            log.info("layer %s is foreign (urls given); fetching it from the registry anyway", digest)
        t0 = time.monotonic()
        metrics.LAYERS_IN_FLIGHT.inc()
        if self.progress is not None:
            self.progress.layer_started(digest, desc.size)
        ok = False
        try:
            info = LayerInfo(digest, desc.media_type, desc.size, expected_diff_id=diff_id, origin=[cfg])
            with self._open_layer(ref, desc, offload=True) as tar:
                rec = self.backend.publish_layer(info, tar)
            ok = True
            metrics.LAYERS_PUBLISHED.labels(self._backend_label).inc()
            metrics.BYTES_PUBLISHED.labels(self._backend_label).inc(rec.uncompressed_size)
            metrics.LAYER_SECONDS.labels(self._backend_label).observe(time.monotonic() - t0)
            log.info("layer %s published (%d entries, %d bytes)", digest, rec.entries, rec.uncompressed_size)
            return "published"
        except Exception as exc:
            metrics.FAILURES.labels("layer", type(exc).__name__).inc()
            raise
        finally:
            metrics.LAYERS_IN_FLIGHT.dec()
            if self.progress is not None:
                self.progress.layer_finished(digest, ok)

    # -- metadata --------------------------------------------------------------------------------------------------
    def _read_image_record(self, meta_dir: Path) -> ImageRecord | None:
        try:
            return ImageRecord.from_json((meta_dir / IMAGE_JSON).read_bytes())
        except FileNotFoundError:
            return None
        except InvalidInputError as exc:
            log.warning("%s; republishing the image", exc)
            return None

    def _recorded_platforms(self, meta_dir: Path, rec: ImageRecord) -> list[str]:
        if not rec.index_digest:
            return ["default"]
        return sorted(p.name for p in meta_dir.iterdir() if (p / IMAGE_JSON).is_file())

    def _is_complete(self, ref: ImageReference, meta_dir: Path, rec: ImageRecord) -> bool:
        """Everything the previous run should have written is there (a crash between steps redoes the image)."""
        registry, repository, tag = image_names(ref)
        records = [rec]
        if rec.index_digest:
            subs = [(p.name, self._read_image_record(p)) for p in meta_dir.iterdir() if p.is_dir()]
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

    def _commit_metadata(self, ref: ImageReference, obj: Manifest | Index, plats: list[_Platform],
                         old: ImageRecord | None) -> None:
        registry, repository, tag = image_names(ref)
        layout = self.layout
        root = layout.root
        meta_dir = layout.image_metadata_dir(registry, repository, tag)
        multi = isinstance(obj, Index)
        default = next((p for p in plats if p.platform and p.platform.architecture == DEFAULT_ARCH
                        and p.platform.os == "linux"), plats[0])
        now = time.time()

        def rel(p: Path) -> str:
            return str(p.relative_to(root))

        def record(p: _Platform) -> ImageRecord:
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
        from cvmfs_snap.layer import scan_tree_whiteouts

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
        return (diff_id if isinstance(diff_id, str) and _is_sha256(diff_id) else "",
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
            rec = self._read_image_record(d)
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


def _is_sha256(digest: str) -> bool:
    try:
        digest_hex(digest)
    except CvmfsSnapError:
        return False
    return True


class _ImageFailed(CvmfsSnapError):
    """Some layers of an image failed (each named in the message); the image's metadata was not written."""
