"""Pull an image into containerd the way containerd's own ``client.Pull(..., WithPullUnpack)`` does, layer by layer
through a chosen snapshotter, so that a remote snapshotter can serve layers without them being downloaded.

The order of operations is the contract with the snapshotter (containerd 1.6 ``unpacker.go``): for each layer,
Stat the chain ID (already unpacked?), Prepare ``extract-<unique> <chainID>`` with the CRI labels and
``containerd.io/snapshot.ref``; an ``AlreadyExists`` answer means the snapshotter committed the chain ID itself (the
layer is served remotely, from CVMFS for our snapshotter) and the blob is never fetched. Otherwise the blob goes into
the content store, containerd's diff service applies it onto the Prepare's mounts (and we check the diffID), and the
snapshot is committed under the chain ID. Everything happens under a lease so nothing is garbage collected midway.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import functools
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from cvmfs_snap.containerd import labels as L
from cvmfs_snap.containerd.client import ContainerdClient, Mount
from cvmfs_snap.containerd.registry import RegistryAccess, ResolvedImage
from cvmfs_snap.errors import (
    AlreadyExistsError,
    CvmfsSnapError,
    FailedPreconditionError,
    IntegrityError,
    InvalidInputError,
    UnavailableError,
)
from cvmfs_snap.labelnames import GC_REF_SNAPSHOT, TOC_DIGEST, UNCOMPRESSED
from cvmfs_snap.mediatypes import CONFIG_TYPES, INDEX_TYPES, MANIFEST_TYPES
from cvmfs_snap.oci import Descriptor, ImageReference, Platform

log = logging.getLogger(__name__)

#: the containerd namespace the CRI plugin (Kubernetes) uses, and the label CRI puts on the images it manages
CRI_NAMESPACE = "k8s.io"
CRI_IMAGE_LABEL = "io.cri-containerd.image"
CRI_IMAGE_MANAGED = "managed"


class Outcome(enum.Enum):
    REMOTE = "remote"  # the snapshotter serves the layer (AlreadyExists on Prepare): nothing downloaded
    PULLED = "pulled"  # downloaded, applied and committed locally
    CACHED = "cached"  # blob already in the content store: applied and committed locally, nothing downloaded
    PRESENT = "present"  # the snapshot for this chain ID existed already


@dataclass
class LayerResult:
    index: int
    digest: str
    diff_id: str
    chain_id: str
    size: int
    outcome: Outcome
    downloaded: int = 0
    seconds: float = 0.0


@dataclass
class PullResult:
    name: str
    snapshotter: str
    target: Descriptor
    manifest_digest: str
    config_digest: str
    chain_id: str
    platform: str
    layers: list[LayerResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def downloaded(self) -> int:
        return sum(lay.downloaded for lay in self.layers)

    def count(self, outcome: Outcome) -> int:
        return sum(1 for lay in self.layers if lay.outcome is outcome)


class Progress(Protocol):
    """What the pull tells its user; see :mod:`cvmfs_snap.containerd.progress`."""

    def resolved(self, image: ResolvedImage) -> None: ...
    def layer_started(self, index: int, desc: Descriptor) -> None: ...
    def layer_bytes(self, index: int, nbytes: int) -> None: ...
    def layer_done(self, result: LayerResult) -> None: ...


class _NoProgress:
    def resolved(self, image: ResolvedImage) -> None:
        pass

    def layer_started(self, index: int, desc: Descriptor) -> None:
        pass

    def layer_bytes(self, index: int, nbytes: int) -> None:
        pass

    def layer_done(self, result: LayerResult) -> None:
        pass


def unpack_key(chain_id: str) -> str:
    """containerd's snapshots.UnpackKeyFormat ``extract-%s %s`` with its unique part (nanoseconds-random)."""
    rnd = base64.urlsafe_b64encode(os.urandom(3)).decode()
    return f"extract-{time.time_ns() % 1_000_000_000}-{rnd} {chain_id}"


def content_ref(desc: Descriptor) -> str:
    """The ingest ref containerd's remotes.MakeRefKey uses, so concurrent pulls of the same blob share it."""
    mt = desc.media_type
    if mt in MANIFEST_TYPES:
        kind = "manifest"
    elif mt in INDEX_TYPES:
        kind = "index"
    elif L.is_layer_type(mt):
        kind = "layer"
    elif mt in CONFIG_TYPES:
        kind = "config"
    else:
        kind = "unknown"
    return f"{kind}-{desc.digest}"


class Puller:
    """One pull of one image into one containerd namespace through one snapshotter."""

    def __init__(self, client: ContainerdClient, registry: RegistryAccess, snapshotter: str,
                 progress: Progress | None = None, cri_labels: bool = True, cri_records: bool | None = None,
                 max_downloads: int = 3) -> None:
        if not snapshotter:
            raise InvalidInputError("no snapshotter given: pass --snapshotter (e.g. cvmfs-snapshotter, overlayfs)")
        self.client = client
        self.registry = registry
        self.snapshotter = snapshotter
        self.progress: Progress = progress or _NoProgress()
        self.cri_labels = cri_labels
        #: write the image records the way CRI does (default: in the k8s.io namespace)
        self.cri_records = client.namespace == CRI_NAMESPACE if cri_records is None else cri_records
        if max_downloads < 1:
            raise InvalidInputError(f"max downloads must be at least 1, got {max_downloads}")
        #: blobs downloaded at once: the current layer's and, after a layer that is not served remotely, the next
        #: ones (containerd does the same after the first local layer, for all remaining layers)
        self.max_downloads = max_downloads
        self._pool: ThreadPoolExecutor | None = None
        self._prefetch: dict[int, Future[int]] = {}

    def pull(self, ref: ImageReference, platform: Platform | None = None) -> PullResult:
        """Resolve ``ref`` for ``platform`` (default: this host's), store its index/manifest/config, unpack or
        remotely mount every layer, then record the image. Raises cvmfs-snap errors; on failure nothing is left
        but what the lease protected (collected by containerd once the lease is gone)."""
        t0 = time.monotonic()
        platform = platform or Platform.host()
        name = str(ref)
        self.check_snapshotter()
        with self.client.lease():
            image = self.registry.resolve(ref, platform)
            self.progress.resolved(image)
            self._store_metadata(image)
            chains = L.chain_ids(image.diff_ids)
            result = PullResult(name=name, snapshotter=self.snapshotter, target=image.target,
                                manifest_digest=image.manifest.digest, config_digest=image.config.digest,
                                chain_id=chains[-1] if chains else "", platform=str(image.platform))
            self._pool = ThreadPoolExecutor(self.max_downloads - 1, thread_name_prefix="prefetch") \
                if self.max_downloads > 1 else None
            try:
                for i in range(len(image.layers)):
                    result.layers.append(self._layer(image, chains, i))
            finally:
                self._stop_prefetch()
            if chains:
                self.client.update_content_labels(image.config.digest,
                                                  {GC_REF_SNAPSHOT + self.snapshotter: chains[-1]})
            for record in self.image_names(image):
                self.client.put_image(record, image.target, self.image_labels())
        result.seconds = time.monotonic() - t0
        log.info("pulled %s (%s) on snapshotter %s in %.2fs: %d layers, %d remote, %d bytes downloaded", name,
                 image.manifest.digest, self.snapshotter, result.seconds, len(result.layers),
                 result.count(Outcome.REMOTE), result.downloaded)
        return result

    def image_names(self, image: ResolvedImage) -> list[str]:
        """The image records to write. In the Kubernetes namespace, like CRI's PullImage: the image ID (config
        digest), the tag and the repo digest (name@target digest), so that the kubelet finds the image under
        every name it may ask for; elsewhere just the reference, like ``ctr images pull``."""
        if not self.cri_records:
            return [str(image.ref)]
        names = [image.config.digest]
        if image.ref.tag is not None and image.ref.digest is None:
            names.append(f"{image.ref.name}:{image.ref.tag}")
        names.append(f"{image.ref.name}@{image.target.digest}")
        return names

    def image_labels(self) -> dict[str, str]:
        return {CRI_IMAGE_LABEL: CRI_IMAGE_MANAGED} if self.cri_records else {}

    def check_snapshotter(self) -> None:
        """Fail early, before downloading anything, if containerd does not know the snapshotter. (Whether a proxy
        snapshotter's daemon answers shows only at Prepare: containerd answers Stat from its own metadata.)"""
        sn = self.snapshotter
        try:
            self.client.snapshot_stat(sn, "cvmfs-snap-probe-" + "0" * 16)
        except InvalidInputError as exc:
            raise InvalidInputError(
                f"containerd at {self.client.address} has no snapshotter {sn!r} ({exc}). For a proxy snapshotter "
                f"add [proxy_plugins.{sn}] with type = \"snapshot\" and its socket address to containerd's "
                "config.toml and restart containerd; or pick another one with --snapshotter") from exc
        except UnavailableError as exc:
            raise UnavailableError(
                f"snapshotter {sn!r} does not answer containerd ({exc}): is its daemon running (for ours: "
                "cvmfs-snap snapshotter) and listening on the socket containerd's config names?") from exc

    # -- blobs above the layers ---------------------------------------------------------------------------------

    def _put_small(self, ref: ImageReference, desc: Descriptor, raw: bytes, labels: dict[str, str]) -> None:
        """Write a manifest/index/config blob with its GC and source labels (labels updated if it existed)."""
        source = L.merge_source_label({}, ref.registry, ref.repository)
        if self.client.write_content(content_ref(desc), desc, [raw], {**labels, **source}):
            return
        info = self.client.content_info(desc.digest)
        existing = info.labels if info else {}
        update = {k: v for k, v in labels.items() if existing.get(k) != v}
        update.update(L.merge_source_label(existing, ref.registry, ref.repository))
        self.client.update_content_labels(desc.digest, update)

    def _store_metadata(self, image: ResolvedImage) -> None:
        if image.index_raw is not None:
            self._put_small(image.ref, image.target, image.index_raw, L.child_gc_labels(image.index_manifests))
        self._put_small(image.ref, image.manifest, image.manifest_raw,
                        L.child_gc_labels([image.config, *image.layers]))
        self._put_small(image.ref, image.config, image.config_raw, {})

    # -- layers -------------------------------------------------------------------------------------------------

    def _layer(self, image: ResolvedImage, chains: list[str], i: int) -> LayerResult:
        desc, diff_id, chain = image.layers[i], image.diff_ids[i], chains[i]
        parent = chains[i - 1] if i else ""
        sn = self.snapshotter
        t0 = time.monotonic()
        res = LayerResult(index=i, digest=desc.digest, diff_id=diff_id, chain_id=chain, size=desc.size,
                          outcome=Outcome.PRESENT)
        self.progress.layer_started(i, desc)

        def done(outcome: Outcome) -> LayerResult:
            res.outcome = outcome
            res.seconds = time.monotonic() - t0
            self.progress.layer_done(res)
            return res

        if self.client.snapshot_stat(sn, chain) is not None:
            self._forget_prefetch(i)
            return done(Outcome.PRESENT)
        labels = L.snapshot_labels(str(image.ref), image.manifest.digest, image.layers, i, chain, self.cri_labels)
        key = ""
        mounts: list[Mount] | None = None
        for _ in range(3):
            key = unpack_key(chain)
            try:
                mounts = self.client.prepare(sn, key, parent, labels)
                break
            except UnavailableError as exc:
                raise UnavailableError(
                    f"{exc}. Snapshotter {sn!r} does not answer containerd: is its daemon running (for ours: "
                    "cvmfs-snap snapshotter) on the socket containerd's proxy_plugins entry names?") from exc
            except AlreadyExistsError:
                info = self.client.snapshot_stat(sn, chain)
                if info is not None:
                    log.debug("layer %s (%s) is served by snapshotter %s", desc.digest, chain, sn)
                    self._forget_prefetch(i)
                    return done(Outcome.REMOTE)
                log.debug("extraction snapshot %s exists but chain ID %s does not; retrying", key, chain)
        if mounts is None:
            raise FailedPreconditionError(
                f"snapshotter {sn} answered AlreadyExists for layer {desc.digest} of {image.ref} but has no "
                f"snapshot {chain}: check the snapshotter's log")
        try:
            self._start_prefetch(image, i + 1)
            fut = self._prefetch.pop(i, None)
            if fut is not None:
                downloaded = fut.result()
            else:
                downloaded = self._fetch_layer(image.ref, desc, lambda n: self.progress.layer_bytes(i, n))
            res.downloaded = downloaded
            applied = self.client.apply(desc, mounts)
            if applied.digest != diff_id:
                raise IntegrityError(
                    f"layer {desc.digest} of {image.ref} unpacks to {applied.digest}, but the image config says "
                    f"{diff_id}: the image is corrupt or was tampered with")
            try:
                self.client.commit(sn, chain, key, labels)
            except AlreadyExistsError:  # another pull committed the same chain meanwhile: use theirs
                self._remove(key)
        except BaseException:
            self._remove(key)
            raise
        self.client.update_content_labels(desc.digest, {UNCOMPRESSED: diff_id})
        return done(Outcome.PULLED if downloaded else Outcome.CACHED)

    def _start_prefetch(self, image: ResolvedImage, start: int) -> None:
        """Download the blobs of the next layers in the background while this one is applied. Only called once a
        layer turned out not to be served remotely: then the image is most likely not published, and the next
        layers will be needed too -- except eStargz layers (a TOC digest annotation), which a lazy snapshotter may
        still serve without their blob: those are downloaded only if their own Prepare asks for it."""
        if self._pool is None:
            return
        for j in range(start, min(start + self.max_downloads - 1, len(image.layers))):
            if j not in self._prefetch:
                desc = image.layers[j]
                if self.cri_labels and TOC_DIGEST in desc.annotations:
                    continue
                self._prefetch[j] = self._pool.submit(
                    self._fetch_layer, image.ref, desc, functools.partial(self.progress.layer_bytes, j))

    def _forget_prefetch(self, i: int) -> None:
        """Layer ``i`` needs no blob after all: cancel its download if it has not started."""
        fut = self._prefetch.pop(i, None)
        if fut is not None and not fut.cancel():
            self._prefetch[i] = fut  # running: _stop_prefetch waits for it and reports it

    def _stop_prefetch(self) -> None:
        """Cancel the downloads not started, wait for the running ones (they hold content ingests)."""
        pool, self._pool = self._pool, None
        left, self._prefetch = self._prefetch, {}
        for fut in left.values():
            fut.cancel()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for j, fut in left.items():
            if fut.done() and not fut.cancelled() and fut.exception() is None and fut.result():
                log.info("layer %d was downloaded ahead (%d bytes) but then not needed: it was served remotely "
                         "or already unpacked", j + 1, fut.result())

    def _remove(self, key: str) -> None:
        with contextlib.suppress(CvmfsSnapError):
            self.client.remove_snapshot(self.snapshotter, key)

    def _fetch_layer(self, ref: ImageReference, desc: Descriptor, on_bytes: Callable[[int], None]) -> int:
        """Download a layer blob into the content store unless containerd has it; returns the bytes downloaded."""
        if self.client.content_info(desc.digest) is not None:
            return 0
        count = 0

        def counted(chunks: Iterable[bytes]) -> Iterator[bytes]:
            nonlocal count
            for c in chunks:
                count += len(c)
                on_bytes(len(c))
                yield c

        @contextlib.contextmanager
        def open_blob() -> Iterator[Iterable[bytes]]:
            with self.registry.open_blob(ref, desc) as chunks:
                yield counted(chunks)

        source = L.merge_source_label({}, ref.registry, ref.repository)
        if self.client.write_content(content_ref(desc), desc, open_blob, source):
            return count
        # containerd had it (pulled in another namespace, shared content policy): label it as its fetch does
        info = self.client.content_info(desc.digest)
        self.client.update_content_labels(
            desc.digest, L.merge_source_label(info.labels if info else {}, ref.registry, ref.repository))
        return 0
