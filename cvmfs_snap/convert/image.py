"""Convert an image (every platform of an index by default) to eStargz, registry to registry.

Per layer: a layer that already is valid eStargz (footer and TOC verify against its annotation, or the annotation is
computed) is kept as it is and only copied (or cross-repository mounted) if the destination lacks it. Any other layer
streams from the source registry through the decoder and the eStargz writer straight into a chunked upload, so memory
stays bounded whatever the layer's size; its source digest and diffID are checked at its end and the upload is
committed only then. A new config (new diffIDs), manifests with the eStargz annotations
(``containerd.io/snapshot/stargz/toc.digest``, ``io.containers.estargz.uncompressed-size``) and an index follow,
the top-level manifest last, so a failed conversion never leaves the destination tag half-done.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from cvmfs_snap.errors import IntegrityError, InvalidInputError
from cvmfs_snap.estargz import DEFAULT_CHUNK_SIZE, DEFAULT_COMPRESSION_LEVEL, BuildOptions, EStargz, build, parse_footer
from cvmfs_snap.labelnames import TOC_DIGEST, UNCOMPRESSED_SIZE
from cvmfs_snap.layer import open_layer
from cvmfs_snap.layer.compression import MEDIA_TYPES
from cvmfs_snap.layer.readahead import ReadAhead
from cvmfs_snap.mediatypes import DOCKER_LAYER_GZIP, OCI_LAYER_GZIP
from cvmfs_snap.oci import (
    DOCKER_MANIFEST,
    Descriptor,
    ImageReference,
    Index,
    Manifest,
    Platform,
    RegistryClient,
    compute_digest,
)
from cvmfs_snap.oci.push import Pusher

log = logging.getLogger(__name__)

_GZIP_TYPES = {mt for mt, codec in MEDIA_TYPES.items() if codec == "gzip"}

#: layers converted at the same time when there is more than one worker (one downloading, one finishing)
LAYERS_AT_ONCE = 2


@dataclass(frozen=True)
class ConvertOptions:
    chunk_size: int = DEFAULT_CHUNK_SIZE
    compression_level: int = DEFAULT_COMPRESSION_LEVEL
    workers: int | None = None
    prioritized: Sequence[str] = ()
    #: only this platform (the destination is then a single manifest); None: every platform of an index
    platform: Platform | None = None


@dataclass
class LayerResult:
    source: str
    digest: str
    size: int
    kept: bool
    seconds: float
    uncompressed_size: int


@dataclass
class ConvertResult:
    destination: str
    digest: str
    media_type: str
    layers: list[LayerResult] = field(default_factory=list)
    seconds: float = 0.0


class Progress(Protocol):
    def image(self, ref: str, platform: str, layers: int) -> None: ...
    def layer_start(self, key: str, what: str, total: int) -> None: ...
    def layer_bytes(self, key: str, n: int) -> None: ...
    def layer_done(self, key: str, result: LayerResult) -> None: ...


class _NoProgress:
    def image(self, ref: str, platform: str, layers: int) -> None:
        pass

    def layer_start(self, key: str, what: str, total: int) -> None:
        pass

    def layer_bytes(self, key: str, n: int) -> None:
        pass

    def layer_done(self, key: str, result: LayerResult) -> None:
        pass


class _Counting:
    """Counts the compressed bytes read from the source (for progress); ``at_end`` is called at its end."""

    def __init__(self, raw: Any, progress: Progress, key: str, at_end: Callable[[], None] | None = None,
                 cancel: threading.Event | None = None) -> None:
        self._raw = raw
        self._progress = progress
        self._key = key
        self._at_end = at_end
        self._cancel = cancel

    def read(self, n: int = -1, /) -> bytes:
        if self._cancel is not None and self._cancel.is_set():
            raise InvalidInputError(f"layer {self._key}: stopped, another layer of the image failed")
        data: bytes = self._raw.read(n)
        if data:
            self._progress.layer_bytes(self._key, len(data))
        elif n != 0 and self._at_end is not None:
            self._at_end()
        return data


class _Once:
    """Calls ``fn`` on the first call only, from whichever thread."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self._fn: Callable[[], object] | None = fn
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            fn, self._fn = self._fn, None
        if fn is not None:
            fn()


class Converter:
    def __init__(self, client: RegistryClient, options: ConvertOptions, progress: Progress | None = None) -> None:
        self.client = client
        self.pusher = Pusher(client)
        self.opts = options
        self.progress = progress or _NoProgress()
        self._workers = options.workers or os.cpu_count() or 1
        #: set when a layer failed: the layers being converted beside it stop at their next read (nothing committed)
        self._cancel = threading.Event()
        #: source layer digest -> its conversion (a layer shared by platforms or repeated is converted once)
        self._started: dict[str, Future[tuple[dict[str, Any], str, LayerResult]]] = {}

    # -- layers ----------------------------------------------------------------------------------------------
    def _probe(self, src: ImageReference, desc: Descriptor) -> EStargz | None:
        """The layer as eStargz if it is a valid one (TOC checked against its annotation when it has one)."""
        if desc.media_type not in _GZIP_TYPES or desc.size < 100:
            return None
        name = f"layer {desc.digest} of {src.name}"
        try:
            off, n = EStargz.footer_range(desc.size)
            footer = parse_footer(self.client.read_range(src, desc.digest, off, n), desc.size, name)
            toc = self.client.read_range(src, desc.digest, footer.toc_offset, footer.toc_size)
            return EStargz.from_parts(name, desc.size, footer, toc,
                                      toc_digest=desc.annotations.get(TOC_DIGEST))
        except InvalidInputError:
            return None
        except IntegrityError as e:
            log.warning("%s: looks like eStargz but does not verify (%s): converting it again", name, e)
            return None

    def _copy_blob(self, src: ImageReference, dst: ImageReference, desc: Descriptor, key: str,
                   count: bool) -> int | None:
        """Make ``desc`` exist in ``dst``; with ``count``, the uncompressed size (which needs the bytes)."""
        present = self.pusher.blob_exists(dst, desc.digest)
        if present and not count:
            return None
        if not present and not count and self.pusher.mount(dst, desc.digest, src):
            return None
        upload = None if present else self.pusher.start_upload(dst)
        usize = 0
        try:
            with self.client.open_blob(src, desc.digest, desc.size) as raw:
                counted = _Counting(raw, self.progress, key)
                if count:
                    tee = _Tee(counted, upload)
                    with open_layer(tee, desc.media_type, name=f"layer {desc.digest}") as stream:
                        while data := stream.read(1 << 20):
                            usize += len(data)
                    tee.finish()
                else:
                    while data := counted.read(1 << 20):
                        assert upload is not None
                        upload.write(data)
            if upload is not None:
                upload.commit(desc.digest)
        except BaseException:
            if upload is not None:
                upload.abort()
            raise
        return usize if count else None

    def _layer(self, src: ImageReference, dst: ImageReference, desc: Descriptor, diff_id: str, docker: bool,
               key: str, downloaded: Callable[[], None] | None = None) -> tuple[dict[str, Any], str, LayerResult]:
        """Convert (or keep) one layer; ``downloaded`` is called once its source has been read whole."""
        t0 = time.monotonic()
        es = self._probe(src, desc)
        if es is not None:
            self.progress.layer_start(key, f"{desc.digest[7:19]} keep", desc.size)
            ann = dict(desc.annotations)
            ann[TOC_DIGEST] = es.toc_digest
            usize_s = ann.get(UNCOMPRESSED_SIZE, "")
            usize = self._copy_blob(src, dst, desc, key, count=not usize_s.isdigit())
            if usize is not None:
                ann[UNCOMPRESSED_SIZE] = str(usize)
            out = {"mediaType": desc.media_type, "digest": desc.digest, "size": desc.size, "annotations": ann}
            res = LayerResult(desc.digest, desc.digest, desc.size, True, time.monotonic() - t0,
                              int(ann[UNCOMPRESSED_SIZE]))
            return out, diff_id, res
        self.progress.layer_start(key, f"{desc.digest[7:19]} convert", desc.size)
        name = f"layer {desc.digest} of {src.name}"
        upload = self.pusher.start_upload(dst)
        workers = self._workers
        bopts = BuildOptions(chunk_size=self.opts.chunk_size, compression_level=self.opts.compression_level,
                             prioritized=tuple(self.opts.prioritized), workers=workers)
        try:
            with self.client.open_blob(src, desc.digest, desc.size) as raw, \
                    open_layer(_Counting(raw, self.progress, key, downloaded, self._cancel), desc.media_type,
                               name=name) as stream:
                if workers > 1:  # download + inflate + sha256s of the source on their own thread
                    with ReadAhead(stream, name=desc.digest[7:19]) as ahead:
                        built = build(ahead, upload, bopts, name=name)
                        ahead.drain()
                else:
                    built = build(stream, upload, bopts, name=name)
                stream.drain()
                stream.verify_digest(desc.digest)
                stream.verify_diff_id(diff_id)
            upload.commit(built.digest)
        except BaseException:
            upload.abort()
            raise
        media = DOCKER_LAYER_GZIP if docker else OCI_LAYER_GZIP
        ann = {k: v for k, v in desc.annotations.items() if k not in (TOC_DIGEST,)}
        ann[TOC_DIGEST] = built.toc_digest
        ann[UNCOMPRESSED_SIZE] = str(built.uncompressed_size)
        out = {"mediaType": media, "digest": built.digest, "size": built.size, "annotations": ann}
        res = LayerResult(desc.digest, built.digest, built.size, False, time.monotonic() - t0,
                          built.uncompressed_size)
        return out, built.diff_id, res

    # -- manifests -------------------------------------------------------------------------------------------
    def manifest(self, src: ImageReference, dst: ImageReference, m: Manifest, platform: str,
                 results: list[LayerResult]) -> tuple[bytes, str]:
        """Convert one image manifest; returns the new manifest's bytes and media type (not pushed yet)."""
        config_raw = self.client.get_blob(src, m.config.digest, m.config.size)
        try:
            cfg = json.loads(config_raw)
            diff_ids = cfg["rootfs"]["diff_ids"]
            if not isinstance(diff_ids, list) or len(diff_ids) != len(m.layers):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise InvalidInputError(
                f"image {src}: config {m.config.digest} has no rootfs.diff_ids matching its {len(m.layers)} layers"
            ) from None
        docker = m.media_type == DOCKER_MANIFEST
        self.progress.image(str(src), platform, len(m.layers))
        for i, desc in enumerate(m.layers):
            if desc.media_type not in MEDIA_TYPES:
                raise InvalidInputError(f"image {src}: layer {i + 1} has media type {desc.media_type!r}, not a "
                                        "layer this converter can read")
        layers: list[dict[str, Any]] = []
        keys = [f"{platform} {i + 1}/{len(m.layers)}" for i in range(len(m.layers))]
        # With more than one worker, a layer starts as soon as the one before it has been downloaded, so that the
        # end of that one (its last members, TOC, commit) does not leave cores idle; one layer downloads at a time.
        downloading = threading.Semaphore(1)

        def one(i: int, desc: Descriptor) -> tuple[dict[str, Any], str, LayerResult]:
            downloading.acquire()
            done = _Once(downloading.release)
            try:
                return self._layer(src, dst, desc, str(diff_ids[i]), docker, keys[i], done)
            except BaseException:
                self._cancel.set()  # before the next layer may start: it stops at once
                raise
            finally:
                done()

        with ThreadPoolExecutor(LAYERS_AT_ONCE if self._workers > 1 else 1, "convert-layer") as pool:
            futs = []
            for i, desc in enumerate(m.layers):
                fut = self._started.get(desc.digest)
                if fut is None:
                    fut = self._started[desc.digest] = pool.submit(one, i, desc)
                futs.append(fut)
            try:
                for i, fut in enumerate(futs):
                    out, new_diff, res = fut.result()
                    diff_ids[i] = new_diff
                    layers.append(out)
                    results.append(res)
                    self.progress.layer_done(keys[i], res)
            except BaseException:
                for fut in futs:
                    fut.cancel()
                raise
        cfg["rootfs"]["diff_ids"] = diff_ids
        new_cfg = json.dumps(cfg, separators=(",", ":")).encode()
        cfg_digest = self.pusher.push_blob(dst, new_cfg)
        doc = json.loads(m.raw)
        doc["config"] = {**doc["config"], "digest": cfg_digest, "size": len(new_cfg)}
        doc["layers"] = layers
        return json.dumps(doc, separators=(",", ":")).encode(), m.media_type


def convert_image(client: RegistryClient, src: ImageReference, dst: ImageReference, options: ConvertOptions,
                  progress: Progress | None = None) -> ConvertResult:
    """Convert ``src`` into ``dst`` (a tag or digest reference); returns what was pushed."""
    t0 = time.monotonic()
    conv = Converter(client, options, progress)
    obj = client.get_manifest(src)
    results: list[LayerResult] = []
    if isinstance(obj, Index):
        if options.platform is not None:
            desc = obj.select(options.platform, str(src))
            child = client.get_manifest(src.with_digest(desc.digest))
            if not isinstance(child, Manifest):
                raise InvalidInputError(f"image {src}: the {options.platform} entry is not an image manifest")
            body, mt = conv.manifest(src, dst, child, str(options.platform), results)
        else:
            doc = json.loads(obj.raw)
            for entry in doc.get("manifests", []):
                child = client.get_manifest(src.with_digest(entry["digest"]))
                if not isinstance(child, Manifest):
                    raise InvalidInputError(f"image {src}: nested index {entry['digest']} is not supported")
                plat = entry.get("platform") or {}
                label = "/".join(x for x in (plat.get("os"), plat.get("architecture"), plat.get("variant")) if x)
                if all(d.media_type in MEDIA_TYPES for d in child.layers):
                    cbody, cmt = conv.manifest(src, dst, child, label or "?", results)
                else:  # not an image (an attestation, a signature): copied unchanged
                    for d in [child.config, *child.layers]:
                        conv._copy_blob(src, dst, d, label, count=False)
                    cbody, cmt = child.raw, child.media_type
                entry["digest"] = conv.pusher.push_manifest(dst, cbody, cmt, reference=compute_digest(cbody))
                entry["size"] = len(cbody)
                entry["mediaType"] = cmt
            body, mt = json.dumps(doc, separators=(",", ":")).encode(), obj.media_type
    else:
        body, mt = conv.manifest(src, dst, obj, "image", results)
    digest = conv.pusher.push_manifest(dst, body, mt)
    return ConvertResult(str(dst), digest, mt, results, time.monotonic() - t0)


class _Tee:
    """Passes the source blob through to an upload (if any) while it is decoded."""

    def __init__(self, raw: Any, upload: Any) -> None:
        self._raw = raw
        self._upload = upload

    def read(self, n: int = -1, /) -> bytes:
        data: bytes = self._raw.read(n)
        if data and self._upload is not None:
            self._upload.write(data)
        return data

    def finish(self) -> None:
        while self.read(1 << 20):
            pass
