"""What gets published, in which order, and how concurrently.

For each image (tag): resolve the manifest (all platforms of a multi-arch index, optionally filtered), then publish
every layer not yet complete in the repository, then the flattened root filesystem, and only then, in one metadata
transaction, the image metadata and the public symlinks. That order is the crash-safety argument: a killed run can
leave finished layers (which the next run skips) and staging debris (which ``Backend.recover`` removes), never an
image whose metadata points at missing layers.

Concurrency: layers of *all* images being published go through one bounded pool (``concurrency`` workers) and a
layer wanted by several images at once is processed once (the in-flight table maps digest -> future). Each layer
thread downloads its blob and has it unpacked in one of ``concurrency`` worker processes (``publisher.workers``), so
that layers use every core. Image orchestration runs in lightweight threads that mostly wait; flat-tree builds (at
most ``concurrency`` at once) start with the image's layers and apply each layer as soon as it and the layers below
it are published, so the flat is ready soon after the last layer; it becomes visible only when complete. Layer
unpacks and flat applications share ``concurrency`` slots (``publisher.slots``), a flat's next layer first: the flat
is the critical path of an image.
Streaming end to end (registry -> decompressor -> unpacker), so memory does not grow with layer size. Flat trees
are built from the published layer trees (``publisher.flatbuild``, ``publisher.layertree``), so each blob is
downloaded once per publish. Which platforms are published is ``publisher.platforms``' job, the metadata written
last ``publisher.imagemeta``'s.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from cvmfs_snap.errors import CvmfsSnapError
from cvmfs_snap.layer import open_layer
from cvmfs_snap.layer.digesting import Readable
from cvmfs_snap.layer.limits import Limits
from cvmfs_snap.layout import RepositoryLayout
from cvmfs_snap.oci import Descriptor, ImageReference, RegistryClient

from . import metrics
from .backends.base import Backend, LayerInfo, LayerOpener, TarStream
from .backends.local import disk_error
from .crashpoints import crash_point
from .flatbuild import build_flat
from .imagemeta import ImageMetadata
from .inventory import image_names
from .locks import gc_lock
from .platforms import ImagePlatform, load_platforms
from .slots import LAYER, WorkSlots
from .workers import LayerWorkers

log = logging.getLogger(__name__)

_T = TypeVar("_T")


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


class _CountingReader:
    """Reports the bytes read from a blob stream to the progress sink."""

    def __init__(self, stream: Readable, digest: str, sink: ProgressSink) -> None:
        self._s, self._d, self._sink = stream, digest, sink

    def read(self, n: int = -1, /) -> bytes:
        data: bytes = self._s.read(n)
        if data:
            self._sink.layer_advanced(self._d, len(data))
        return data


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
        #: flat-tree builds (at most ``concurrency`` at once); each mostly waits for its layers, then applies them
        self._flat_pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="publish-flat")
        #: ``concurrency`` heavy units at once (a layer's unpack, a layer's application to a flat), flats first
        self.slots = WorkSlots(self.concurrency)
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

    @property
    def metadata(self) -> ImageMetadata:
        """Reads and writes the metadata of the images published here."""
        return ImageMetadata(self.backend, self.skip_flat)

    def start_workers(self) -> None:
        """Start the layer worker processes now, in the background (a fresh interpreter importing the layer code),
        so that they are up when the first layer needs them instead of starting after the registry round trips."""
        if self._workers is not None:
            self._workers.start()

    def close(self) -> None:
        self._flat_pool.shutdown(wait=True)
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

        old = self.metadata.read_record(meta_dir)
        if old is not None:
            old_top = old.index_digest or old.manifest_digest
            if old_top == top_digest and self.metadata.is_complete(ref, meta_dir, old):
                metrics.IMAGES_SKIPPED.labels(self._backend_label).inc()
                result.ok, result.unchanged = True, True
                result.platforms = self.metadata.recorded_platforms(meta_dir, old)
                return result
            if old_top != top_digest:
                result.moved_from = old_top

        plats = load_platforms(self.client, self.limits, self.platforms, ref, obj)
        result.platforms = [p.key or "default" for p in plats]
        if self._workers is not None and not all(self.backend.has_layer(d.digest) for p in plats
                                                 for d in p.manifest.layers):
            self._workers.start()

        # layers of all platforms, deduplicated, through the shared pool
        futures: dict[str, Future[str]] = {}
        for p in plats:
            for desc, diff_id in zip(p.manifest.layers, p.diff_ids, strict=True):
                if desc.digest not in futures:
                    futures[desc.digest] = self._layer_future(ref, desc, diff_id, p.config_digest)
        # flat trees are built while the layers are: layer k is applied to the flat as soon as it is published and
        # layers < k are applied (``_build_flat`` waits for each); the flat becomes visible only once complete
        # a backend that batches layers makes them visible in ``flush_layers`` only: a flat waits for that flush
        # before it reads a layer that is done but not visible yet
        flushed: Future[None] = Future()
        flats = [] if self.skip_flat else [
            self._flat_pool.submit(self._build_flat, ref, p, futures, flushed) for p in plats
            if not self.backend.has_flat(p.config_digest)
        ]
        try:
            try:
                self._collect_layers(futures, result)
            except BaseException as exc:
                flushed.set_exception(exc)
                raise
            flushed.set_result(None)
            crash_point("image-layers-done")
            for fut in flats:
                fut.result()
        finally:
            for fut in flats:  # a failed image still waits: no flat build may outlive the image's locks
                _wait_quietly(fut)

        self.metadata.commit(ref, obj, plats, old)
        metrics.IMAGES_PUBLISHED.labels(self._backend_label).inc()
        result.ok = True
        return result

    def _collect_layers(self, futures: dict[str, Future[str]], result: ImageResult) -> None:
        errors: list[str] = []
        for digest, fut in futures.items():
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
        self.backend.flush_layers(sorted(futures))  # backends that batch layers publish them now

    # -- layers ----------------------------------------------------------------------------------------------------
    def _layer_future(self, ref: ImageReference, desc: Descriptor, diff_id: str, cfg: str) -> Future[str]:
        with self._lock:
            fut = self._inflight.get(desc.digest)
            if fut is None:
                fut = self._pool.submit(self._do_layer, ref, desc, diff_id, cfg, self.slots.ticket())
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
        with self.client.open_blob(ref, desc.digest, desc.size) as raw:
            src: Readable = raw if self.progress is None else _CountingReader(raw, desc.digest, self.progress)
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
    def _build_flat(self, ref: ImageReference, p: ImagePlatform, layers: dict[str, Future[str]],
                    flushed: Future[None]) -> None:
        if self.concurrency == 1:  # one unit of heavy work at a time: the flat after the layers, not beside them
            _wait_quietly(flushed)
        build_flat(self.backend, ref, p, layers, flushed, functools.partial(self._opener, ref),
                   from_tree=self.flat_from_tree, claim=self.slots.after)

    def _do_layer(self, ref: ImageReference, desc: Descriptor, diff_id: str, cfg: str, order: int) -> str:
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
            with self.slots.hold(LAYER, order, key=digest), self._open_layer(ref, desc, offload=True) as tar:
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


def _wait_quietly(fut: Future[_T]) -> None:
    with suppress(BaseException):  # the caller reports its own error
        fut.result()


class _ImageFailed(CvmfsSnapError):
    """Some layers of an image failed (each named in the message); the image's metadata was not written."""
