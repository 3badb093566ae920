"""``cvmfs-snap lazyfs``: the node's one process serving every lazy eStargz layer through ONE FUSE mount.

Under its root (``<snapshotter root>/lazy/``, lazy-design.md "Paths"): ``mnt/`` the mount (a directory per layer,
:mod:`cvmfs_snap.lazyfs.fs`), ``control.sock`` the control socket (:mod:`cvmfs_snap.lazyfs.control`),
``state.json`` the attached layers, ``unpacked/`` node-local copies of completely fetched layers, and by default
``cache/`` the chunk cache shared by all layers.

- **attach** opens the layer's :class:`~cvmfs_snap.lazyfs.reader.LayerReader` (footer and TOC, checked against the
  TOC digest), builds its tree, prefetches the landmark files up to ``--prefetch-bound`` (waiting at most
  ``--timeout``), shows it at ``mnt/<id>``, starts the background fetch and records it in ``state.json`` (never
  the credentials: only whether there were any). Attaching an attached layer is a no-op.
- An attach may name the image's other layers (``neighbours``): their footer and TOC are fetched in the background
  and kept for their own attach, which then needs no registry request (:mod:`cvmfs_snap.lazyfs.resolve`). Layers
  of one registry host and credentials share one registry client.
- **detach** hides the layer, stops its reads, frees the chunks only it used and its unpacked copy, and drops the
  layers resolved ahead for it that nobody attached.
- At **start** the process mounts (lazily unmounting a dead predecessor's mount), then attaches again every layer of
  ``state.json`` that needed no credentials; layers that did are attached again by the snapshotter, which holds
  the credentials (``check`` answers ``notfound`` until then).
- When a layer is completely in the cache (background fetch done), an unpacked copy is written to
  ``unpacked/<id>`` and ``check`` answers that path: new containers get native read speed, running ones keep their
  FUSE mounts.
- **SIGTERM**/SIGINT: the mount is unmounted (lazily: containers still using it get ENOTCONN) and the process ends.
  When the process dies, reads of running containers on lazy layers fail (ENOTCONN/EIO); the snapshotter starts a
  new process, which re-attaches from ``state.json`` (docs/lazy.md).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio  # type: ignore[import-untyped]

from cvmfs_snap.errors import (
    CvmfsSnapError,
    InvalidInputError,
    NotFoundError,
    UnavailableError,
)
from cvmfs_snap.fsutil import remove_tree
from cvmfs_snap.labelnames import TOC_DIGEST
from cvmfs_snap.lazyfs import control, controlserver
from cvmfs_snap.lazyfs.cache import HOT_IDLE_SECONDS, ChunkCache
from cvmfs_snap.lazyfs.control import CACHE, MNT, SOCKET, SPOOL, STATE, UNPACKED
from cvmfs_snap.lazyfs.fs import LazyFS
from cvmfs_snap.lazyfs.fuse import Session
from cvmfs_snap.lazyfs.metrics import DEFAULT_METRICS
from cvmfs_snap.lazyfs.reader import LayerReader
from cvmfs_snap.lazyfs.resolve import MAX_NEIGHBOURS, ClientKey, ClientPool, LayerOpener, PreResolver
from cvmfs_snap.lazyfs.tree import Tree
from cvmfs_snap.lazyfs.unpack import copy_size, disk_usage, unpack_layer
from cvmfs_snap.oci.hostclient import manifest_layers
from cvmfs_snap.oci.hosts import credentials_from_wire
from cvmfs_snap.oci.reference import ImageReference, validate_digest
from cvmfs_snap.procmem import release_free_heap

log = logging.getLogger(__name__)

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
#: seconds between looks at a layer's background fetch (for the unpacked copy)
POLL = 1.0
#: layers whose background fetch runs at the same time (each holds a batch of chunks in memory)
BACKGROUND_LAYERS = 1
#: seconds between looks for layers resolved ahead whose time is up
RESOLVED_EXPIRY_POLL = 30.0


@dataclass(frozen=True)
class Options:
    root: Path
    cache_dir: Path | None = None
    cache_size: int = 4 << 30
    prefetch_bound: int = 64 << 20
    timeout: float = 30.0
    background: bool = True
    force_single_range: bool = False
    unpack: bool = True
    #: ``host:port`` to serve Prometheus metrics on (``/metrics``), "" = off
    metrics_address: str = ""

    @property
    def mnt(self) -> Path:
        return self.root / MNT


@dataclass
class Layer:
    id: str
    record: dict[str, Any]
    reader: LayerReader
    tree: Tree
    client_key: ClientKey
    unpacked: bool = False
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


def _neighbours(req: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The attach request's ``neighbours`` (the image's other layers: id, digest, size, TOC digest; its image
    reference and hosts directory) as validated records; a malformed entry is skipped with a warning, never
    failing the attach."""
    given = req.get("neighbours")
    if not isinstance(given, list):
        return {}
    out: dict[str, dict[str, Any]] = {}
    for n in given[:MAX_NEIGHBOURS]:
        if not isinstance(n, dict):
            continue
        try:
            rec = _record({**{k: n.get(k) for k in ("id", "digest", "size", "toc_digest")},
                           "image_ref": req.get("image_ref"), "hosts_dir": req.get("hosts_dir"),
                           "credentials": req.get("credentials")})
        except InvalidInputError as e:
            log.warning("attach of %s: neighbouring layer skipped: %s", str(req.get("digest"))[:80], e)
            continue
        out[str(n["id"])] = rec
    return out


def _record(req: dict[str, Any]) -> dict[str, Any]:
    """The validated attach request, as ``state.json`` keeps it (no credentials)."""
    lid = req.get("id")
    if not isinstance(lid, str) or not _ID.match(lid):
        raise InvalidInputError(f"layer id {str(lid)[:80]!r} is not a plain name")
    digest, toc, ref, size = req.get("digest"), req.get("toc_digest"), req.get("image_ref"), req.get("size")
    if not isinstance(digest, str) or not isinstance(toc, str) or not isinstance(ref, str):
        raise InvalidInputError("attach needs digest, toc_digest and image_ref strings")
    validate_digest(digest)
    validate_digest(toc)
    ImageReference.parse(ref)
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise InvalidInputError(f"attach of {digest}: size {size!r} is not a positive integer")
    hosts = req.get("hosts_dir")
    if hosts is not None and not isinstance(hosts, str):
        raise InvalidInputError("hosts_dir must be a path or null")
    return {"digest": digest, "size": size, "toc_digest": toc, "image_ref": ref, "hosts_dir": hosts,
            "auth": bool(req.get("credentials"))}


class LazyfsProcess:
    """The process's state and control handlers (see the module docstring)."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.fs = LazyFS()
        self.cache = ChunkCache(opts.cache_dir or opts.root / CACHE, opts.cache_size)
        self.layers: dict[str, Layer] = {}
        self.clients = ClientPool(timeout=opts.timeout, retries=2)
        self.opener = LayerOpener(self.cache, self.clients, spool_dir=opts.root / SPOOL, timeout=opts.timeout,
                                  prefetch_bound=opts.prefetch_bound, force_single_range=opts.force_single_range)
        self.resolver = PreResolver(self.opener.open, self.opener.close, self.cache)
        self._locks: dict[str, trio.Lock] = {}
        self.nursery: trio.Nursery | None = None
        self._background = trio.Semaphore(BACKGROUND_LAYERS)

    # ------------------------------------------------------------------ state.json
    def _save(self) -> None:
        data = {lid: layer.record for lid, layer in sorted(self.layers.items())}
        tmp = self.opts.root / (STATE + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, self.opts.root / STATE)

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads((self.opts.root / STATE).read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("%s is unreadable (%s): starting with no layers; the snapshotter attaches them again",
                        self.opts.root / STATE, e)
            return {}
        return {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}

    # ------------------------------------------------------------------ control
    async def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req["op"]
        if op == "health":
            st = self.cache.stats
            return {"layers": len(self.layers), "mount": str(self.opts.mnt), "resolved": self.resolver.ready,
                    "resolving": self.resolver.pending,
                    "clients": len(self.clients),
                    "fuse_requests": self.fs.session.request_counts() if self.fs.session is not None else {},
                    "cache": {"chunk_bytes": st.bytes, "reserved_bytes": st.reserved,
                              "bound": self.cache.max_bytes}}
        if op == "list":
            return {"layers": [self._describe(layer) for _, layer in sorted(self.layers.items())]}
        if op == "resolve":
            return {"layers": await trio.to_thread.run_sync(self._resolve, req)}
        if op == "attach":
            record = _record(req)
            return {"path": await self.attach(str(req["id"]), record, req.get("credentials"), _neighbours(req))}
        lid = str(req.get("id", ""))
        layer = self.layers.get(lid)
        if op == "check":
            pending = self._locks.get(lid)
            if layer is None and pending is not None:
                async with pending:  # an attach in progress (restore) is waited for
                    layer = self.layers.get(lid)
            if layer is None:
                raise NotFoundError(f"layer {lid[:80]} is not attached")
            return {"path": str(self._path(layer)), "complete": layer.reader.is_complete(),
                    "unpacked": layer.unpacked}
        if op == "detach":
            async with self._lock(lid):
                await self.detach(lid)
            return {}
        raise InvalidInputError(f"unknown op {op!r}")

    def _resolve(self, req: dict[str, Any]) -> dict[str, list[object]]:
        """The snapshotter's ``resolve``: {layer digest: [size, TOC digest annotation]} of an image manifest, read
        here, where the registry client lives (the daemon imports no HTTP client: issue 9's RSS goal)."""
        ref = ImageReference.parse(str(req.get("image_ref", "")))
        hosts = req.get("hosts_dir")
        if hosts is not None and not (isinstance(hosts, str) and hosts.startswith("/")):
            raise InvalidInputError("hosts_dir must be an absolute path or null")
        layers = manifest_layers(ref, Path(hosts) if hosts else None, credentials_from_wire(req.get("credentials")),
                                 timeout=self.opts.timeout, annotation=TOC_DIGEST)
        return {digest: [size, toc] for digest, (size, toc) in layers.items()}

    def _describe(self, layer: Layer) -> dict[str, Any]:
        return {"id": layer.id, "digest": layer.record["digest"], "path": str(self._path(layer)),
                "fetched_fraction": layer.reader.fetched_fraction(), "bytes_fetched": layer.reader.bytes_fetched,
                "complete": layer.reader.is_complete(), "unpacked": layer.unpacked,
                "background": layer.reader.background_state}

    def _path(self, layer: Layer) -> Path:
        return self.opts.root / UNPACKED / layer.id if layer.unpacked else self.opts.mnt / layer.id

    def _lock(self, lid: str) -> trio.Lock:
        return self._locks.setdefault(lid, trio.Lock())

    # ------------------------------------------------------------------ attach / detach
    def _busy(self, lid: str) -> bool:
        """Attached, or being attached or detached."""
        lock = self._locks.get(lid)
        return lid in self.layers or (lock is not None and lock.locked())

    async def attach(self, lid: str, record: dict[str, Any], credentials: object = None,
                     neighbours: dict[str, dict[str, Any]] | None = None) -> str:
        async with self._lock(lid):
            have = self.layers.get(lid)
            if have is not None:
                if have.record["digest"] != record["digest"]:
                    raise InvalidInputError(f"layer id {lid} is attached for {have.record['digest']}, not "
                                            f"{record['digest']}")
                self._preresolve(lid, neighbours, credentials)
                return str(self._path(have))
            opened = (await self.resolver.take(lid, record, credentials)
                      or await self.opener.open(record, credentials))
            # the neighbours after this layer's own footer and TOC: on the GIL and two cores, fetching them at
            # the same time would only slow down the attach that a Prepare waits for
            self._preresolve(lid, neighbours, credentials)
            try:
                await self.opener.prefetch(opened, record["digest"])
            except BaseException:
                await self.opener.close(opened, "")
                raise
            layer = Layer(lid, record, opened.reader, opened.tree, opened.client_key)
            self.layers[lid] = layer
            store = [p for p in layer.reader.stargz.prefetch if p in layer.reader.stargz.toc.chunks]
            self.fs.add_layer(lid, layer.tree, layer.reader, store)
            self._save()
            assert self.nursery is not None
            self.nursery.start_soon(self._follow, layer)
            log.info("attached layer %s (%s) at %s", record["digest"], record["image_ref"], self.opts.mnt / lid)
            return str(self._path(layer))

    def _preresolve(self, lid: str, neighbours: dict[str, dict[str, Any]] | None, credentials: object) -> None:
        if neighbours:
            assert self.nursery is not None
            self.resolver.start(self.nursery, lid, neighbours, credentials, self._busy)

    async def _follow(self, layer: Layer) -> None:
        """The layer's background fetch, then its unpacked copy once every chunk is cached."""
        with layer.scope:
            dest = self.opts.root / UNPACKED / layer.id
            if await trio.to_thread.run_sync(dest.is_dir):  # made before a restart
                await self._count_copy(layer.id)
                layer.unpacked = True
                return
            if self.opts.background:
                assert self.nursery is not None
                async with self._background:  # one layer at a time: bounded memory and bandwidth
                    layer.reader.start_background(self.nursery)
                    while layer.reader.background_state == "running":
                        await trio.sleep(POLL)
            # without a background fetch, reads alone rarely complete a layer: no copy (and no polling)
            if not (self.opts.unpack and self.opts.background):
                return
            if not await trio.to_thread.run_sync(layer.reader.is_complete):
                return  # the background pass ended without every chunk (failed, or the cache is too small)
            need = copy_size(layer.tree)
            if not self.cache.reserve(_copy_name(layer.id), need, keep_layer=layer.record["digest"]):
                log.info("layer %s is complete but its unpacked copy (%d bytes) does not fit in the cache bound "
                         "(%d bytes) next to its chunks: it stays on FUSE", layer.record["digest"], need,
                         self.cache.max_bytes)
                return
            try:
                await unpack_layer(layer.tree, layer.reader, dest)
            except BaseException as e:
                self.cache.unreserve(_copy_name(layer.id))
                if not isinstance(e, CvmfsSnapError | OSError):
                    raise
                log.warning("unpacked copy of layer %s failed (it stays on FUSE): %s", layer.record["digest"], e)
                return
            layer.unpacked = True
            log.info("layer %s is complete: new containers use its unpacked copy %s", layer.record["digest"], dest)

    async def detach(self, lid: str) -> None:
        layer = self.layers.pop(lid, None)
        if layer is None:
            raise NotFoundError(f"layer {lid[:80]} is not attached")
        layer.scope.cancel()
        self.fs.remove_layer(lid)
        layer.reader.close()
        await layer.reader.settle()  # a readahead thread still storing a chunk would outlive the release
        self.clients.release(layer.client_key)
        self._save()
        digest = layer.record["digest"]
        await trio.to_thread.run_sync(self.cache.release_layer, digest)
        await trio.to_thread.run_sync(lambda: remove_tree(self.opts.root / UNPACKED / lid))
        self.cache.unreserve(_copy_name(lid))
        await self.resolver.drop_for(lid, self._busy)
        log.info("detached layer %s", digest)

    async def _count_copy(self, lid: str) -> None:
        """An unpacked copy made before a restart counts in the cache bound with the space it takes."""
        used = await trio.to_thread.run_sync(disk_usage, self.opts.root / UNPACKED / lid)
        await trio.to_thread.run_sync(lambda: self.cache.reserve(_copy_name(lid), used, force=True))

    async def restore(self) -> None:
        """Attach again the layers of ``state.json`` (those needing credentials wait for the snapshotter)."""
        saved = self._load()
        unpacked = self.opts.root / UNPACKED
        for name in await trio.to_thread.run_sync(os.listdir, unpacked):
            if name not in saved:  # the copy of a layer no longer attached: not counted, so not kept
                log.info("removing the unpacked copy of a layer that is not attached: %s", unpacked / name)
                await trio.to_thread.run_sync(remove_tree, unpacked / name)
        async with trio.open_nursery() as n:
            for lid, record in saved.items():
                if record.get("auth"):
                    log.info("layer %s needs registry credentials: waiting for the snapshotter to attach it",
                             record.get("digest"))
                    if await trio.to_thread.run_sync((unpacked / lid).is_dir):
                        await self._count_copy(lid)  # on disk meanwhile: it counts
                    continue
                n.start_soon(self._restore_one, lid, record)
        self._save()

    async def _restore_one(self, lid: str, record: dict[str, Any]) -> None:
        try:
            await self.attach(lid, _record({**record, "id": lid}))
        except CvmfsSnapError as e:
            log.warning("layer %s from %s cannot be attached again (%s); the snapshotter attaches it when it "
                        "needs it", record.get("digest"), STATE, e)

    def close(self) -> None:
        for layer in self.layers.values():
            layer.reader.close()
        self.clients.close()


def _copy_name(lid: str) -> str:
    """The cache-bound reservation of a layer's unpacked copy."""
    return "unpacked:" + lid


# ---------------------------------------------------------------------------------------------------- running
def _clear_mountpoint(mnt: Path) -> None:
    """A dead predecessor's mount (ENOTCONN) or a live leftover is detached, so ours can take its place."""
    try:
        stale = os.path.ismount(mnt)
    except OSError as e:
        stale = e.errno in (errno.ENOTCONN, errno.EIO)
    if not stale:
        with contextlib.suppress(OSError):
            os.stat(mnt)
            return
        stale = True
    log.warning("%s: a mount of a previous lazyfs process is left; detaching it", mnt)
    subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)


def _prepare(opts: Options) -> None:
    opts.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        control.call(opts.root / SOCKET, {"op": "health"}, timeout=2.0)
    except UnavailableError:
        pass
    else:
        raise UnavailableError(f"another lazyfs process serves {opts.root} (it answers on {opts.root / SOCKET})")
    _clear_mountpoint(opts.mnt)
    opts.mnt.mkdir(exist_ok=True)
    unpacked = opts.root / UNPACKED
    unpacked.mkdir(exist_ok=True, mode=0o700)
    for e in os.scandir(unpacked):
        if ".tmp-" in e.name:
            remove_tree(e.path)
    spool = opts.root / SPOOL  # whole blobs of a previous process: they would not count in the cache bound
    if spool.is_dir():
        for e in os.scandir(spool):
            if e.is_file(follow_symlinks=False) or e.is_symlink():
                os.unlink(e.path)


async def _serve(proc: LazyfsProcess) -> None:
    opts = proc.opts
    session = proc.fs.session = Session(proc.fs, opts.mnt)
    try:
        async with trio.open_nursery() as n:
            proc.nursery = n
            n.start_soon(_signals, n.cancel_scope)
            n.start_soon(_fuse_main, session, n.cancel_scope)
            n.start_soon(_trim_hot, proc.cache)
            n.start_soon(_expire_resolved, proc)
            await n.start(controlserver.serve, opts.root / SOCKET, proc.handle)
            await proc.restore()
            log.info("lazyfs serves %d layer(s) at %s (control %s)", len(proc.layers), opts.mnt,
                     opts.root / SOCKET)
    finally:
        proc.close()
        with contextlib.suppress(OSError):
            (opts.root / SOCKET).unlink()
        proc.fs.session = None
        session.close()
        log.debug("lazyfs: FUSE requests: %s", session.request_counts())
        log.info("lazyfs unmounted %s", opts.mnt)


async def _fuse_main(session: Session, scope: trio.CancelScope) -> None:
    """The FUSE loop; when it ends (someone unmounted ``mnt/``), so does the process: a process without its mount
    must not keep answering ``health``, so the snapshotter starts a new one."""
    await session.serve()
    if not scope.cancel_called:  # (SIGTERM cancels first)
        log.warning("lazyfs: the FUSE mount was unmounted from outside; exiting")
    scope.cancel()


async def _trim_hot(cache: ChunkCache) -> None:
    """Hot chunks nobody read for a while leave the cache's memory tier; after a whole period without reads, the
    heap's free pages go back to the system, once (resident memory of an idle node)."""
    seen, trimmed = -1, False
    while True:
        await trio.sleep(HOT_IDLE_SECONDS)
        dropped = cache.trim_hot(HOT_IDLE_SECONDS)
        if dropped:
            log.debug("chunk cache: %d bytes of idle hot chunks dropped", dropped)
        stats = cache.stats
        activity = stats.hits + stats.misses
        if activity != seen:
            seen, trimmed = activity, False
        elif not trimmed:
            await trio.to_thread.run_sync(release_free_heap)
            trimmed = True


async def _expire_resolved(proc: LazyfsProcess) -> None:
    """Layers resolved ahead that no attach took within their time are dropped."""
    while True:
        await trio.sleep(RESOLVED_EXPIRY_POLL)
        await proc.resolver.expire(proc._busy)


async def _signals(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
        async for sig in received:
            log.info("lazyfs: %s, unmounting", signal.Signals(sig).name)
            scope.cancel()
            return


def serve_metrics(address: str) -> tuple[str, int]:
    """Serve the lazy metrics (:data:`~cvmfs_snap.lazyfs.metrics.DEFAULT_METRICS`: layer digests as labels, never
    image references or credentials) on ``host:port``, counted from now on; returns the bound address."""
    # prometheus_client only where metrics are served (lazyfs/metrics.py)
    from prometheus_client import start_http_server

    DEFAULT_METRICS.enable()
    host, _, port = address.rpartition(":")
    try:
        server, _thread = start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1",
                                            registry=DEFAULT_METRICS.registry)  # type: ignore[arg-type]
    except (ValueError, OSError) as e:
        raise InvalidInputError(f"lazyfs: cannot serve metrics on {address!r}: {e}") from None
    bound = server.server_address
    log.info("lazyfs metrics on http://%s:%d/metrics", bound[0], bound[1])
    return str(bound[0]), int(bound[1])


def run(opts: Options) -> int:
    _prepare(opts)
    proc = LazyfsProcess(opts)
    if opts.metrics_address:
        serve_metrics(opts.metrics_address)
    trio.run(_serve, proc)
    return 0
