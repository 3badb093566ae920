"""Opening lazy layers for the lazyfs process (:class:`LayerOpener`): one registry client per registry host, shared
by the layers that read from it, and the image's other layers resolved ahead of their attach.

- :class:`ClientPool`: layers of one registry host, hosts.toml directory and credentials share one
  :class:`~cvmfs_snap.oci.client.RegistryClient` (its connections, auth tokens and blob-URL cache), reference
  counted: the client is closed when the last layer using it is detached. Layers attached with other credentials
  get a client of their own, so one image's credentials never serve another's reads.
- :class:`PreResolver` (model: stargz-snapshotter's ``fs.Mount``, which resolves the manifest's other layers in
  the background): the attach of an image's first lazy layer names the image's other eStargz layers (from the
  manifest the snapshotter read: their digest, size, TOC digest); their footer and TOC are fetched in the
  background, at most :data:`PARALLEL` at a time, checked against their TOC digests and kept (reader and tree,
  not shown in the mount) until their own attach takes them, so later Prepares of the image make no registry
  request before answering. Never blocking an attach; failures are only logged (the layer's own attach then
  opens it as usual); a hostile neighbour entry is skipped with a warning. Bounded: at most :data:`MAX_KEPT`
  resolved layers, each for at most :data:`TTL` seconds; those asked for by a layer that is detached are dropped
  with it (fetches still running are cancelled). A dropped layer's TOC also leaves the chunk cache (it was put
  there only for this layer) unless an attached layer uses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio  # type: ignore[import-untyped]

from cvmfs_snap.errors import CvmfsSnapError, UnavailableError
from cvmfs_snap.lazyfs.cache import ChunkCache
from cvmfs_snap.lazyfs.reader import LayerReader, open_layer_reader
from cvmfs_snap.lazyfs.remote import BlobFetcher
from cvmfs_snap.lazyfs.tree import Tree, build_tree
from cvmfs_snap.oci.client import RegistryClient
from cvmfs_snap.oci.hostclient import endpoint_client
from cvmfs_snap.oci.hosts import credentials_from_wire, endpoints
from cvmfs_snap.oci.reference import ImageReference

log = logging.getLogger(__name__)

#: neighbouring layers whose footer + TOC are fetched at the same time
PARALLEL = 2
#: resolved layers kept waiting for their attach (the oldest is dropped beyond)
MAX_KEPT = 32
#: seconds a resolved layer waits for its attach
TTL = 120.0
#: neighbours taken from one attach request (an image has at most a few hundred layers)
MAX_NEIGHBOURS = 256
#: trees of layers with up to this many TOC entries are built in the event loop (well under a millisecond)
INLINE_TREE = 500

ClientKey = tuple[str, str, str]


def credentials_key(wire: object) -> str:
    """A digest of the control protocol's ``credentials`` (never the credentials themselves as a key or in a log
    line): layers with equal keys may share a client."""
    if not wire:
        return ""
    return hashlib.sha256(json.dumps(wire, sort_keys=True).encode()).hexdigest()


@dataclass
class _Shared:
    """A pooled client and how many layers use it."""

    client: RegistryClient
    references: int = 0


class ClientPool:
    """Registry clients shared by layers (see the module docstring). Use from the trio thread only."""

    def __init__(self, **client_kwargs: Any) -> None:
        self._kwargs = client_kwargs
        self._clients: dict[ClientKey, _Shared] = {}

    def acquire(self, ref: ImageReference, hosts_dir: Path | None, credentials: object
                ) -> tuple[ClientKey, RegistryClient, ImageReference]:
        """(key for :meth:`release`, the client, ``ref`` as the client's endpoint names it): the first pull host
        of ``hosts_dir`` for ``ref``'s registry (a mirror when one is configured)."""
        ep = endpoints(ref, hosts_dir, "pull")[0]
        key = (ref.registry, str(hosts_dir or ""), credentials_key(credentials))
        entry = self._clients.get(key)
        if entry is None:
            client = endpoint_client(ep, credentials_from_wire(credentials), **self._kwargs)
            entry = self._clients[key] = _Shared(client)
        entry.references += 1
        return key, entry.client, ep.ref

    def release(self, key: ClientKey) -> None:
        entry = self._clients.get(key)
        if entry is None:
            return
        entry.references -= 1
        if entry.references <= 0:
            del self._clients[key]
            entry.client.close()

    def __len__(self) -> int:
        return len(self._clients)

    def close(self) -> None:
        for entry in self._clients.values():
            entry.client.close()
        self._clients.clear()


@dataclass
class Opened:
    """A layer's reader and tree, not (yet) shown in the mount; ``client_key`` is its reference in the pool."""

    reader: LayerReader
    tree: Tree
    client_key: ClientKey


class LayerOpener:
    """Opens a layer for attach or pre-resolve: its reader (footer and TOC fetched or found in the cache, checked
    against the TOC digest) and tree, on a client of the pool; the landmark prefetch; closing what was not shown."""

    def __init__(self, cache: ChunkCache, clients: ClientPool, *, spool_dir: Path, timeout: float,
                 prefetch_bound: int, force_single_range: bool = False) -> None:
        self.cache = cache
        self.clients = clients
        self.spool_dir = spool_dir
        self.timeout = timeout
        self.prefetch_bound = prefetch_bound
        self.force_single_range = force_single_range

    async def open(self, record: dict[str, Any], credentials: object) -> Opened:
        """The layer's reader (footer and TOC fetched, or found in the cache, and checked) and tree; not shown in
        the mount. Used by attach and by the pre-resolve of neighbouring layers."""
        ref = ImageReference.parse(record["image_ref"])
        hosts = Path(record["hosts_dir"]) if record["hosts_dir"] else None
        key, client, ep_ref = self.clients.acquire(ref, hosts, credentials)
        try:
            fetcher = BlobFetcher(client, ep_ref, record["digest"], record["size"],
                                  force_single_range=self.force_single_range,
                                  spool_dir=self.spool_dir, space=self.cache)
            try:
                with trio.fail_after(self.timeout):
                    reader = await open_layer_reader(fetcher, self.cache, digest=record["digest"],
                                                     size=record["size"], toc_digest=record["toc_digest"])
            except trio.TooSlowError:
                fetcher.close()
                raise UnavailableError(f"layer {record['digest']}: its TOC did not arrive from {ref.registry} "
                                       f"within {self.timeout:.0f} s") from None
            except BaseException:
                fetcher.close()
                raise
            try:
                toc = reader.stargz.toc
                small = len(toc.entries) <= INLINE_TREE  # no thread hop (it would hold the GIL all the same)
                tree = build_tree(toc) if small else await trio.to_thread.run_sync(build_tree, toc)
            except BaseException:
                reader.close()
                raise
        except BaseException:
            self.clients.release(key)
            raise
        return Opened(reader, tree, key)

    async def prefetch(self, opened: Opened, digest: str) -> None:
        if self.prefetch_bound > 0:
            with trio.move_on_after(self.timeout * 0.8):
                try:
                    await opened.reader.prefetch(self.prefetch_bound)
                except CvmfsSnapError as e:  # reads fetch what they need
                    log.warning("prefetch of layer %s: %s", digest, e)

    async def close(self, opened: Opened, release: str) -> None:
        """Close a layer that is not shown in the mount; ``release``: its digest, whose chunks (its TOC) leave the
        cache."""
        opened.reader.close()
        await opened.reader.settle()
        self.clients.release(opened.client_key)
        if release:
            await trio.to_thread.run_sync(self.cache.release_layer, release)


@dataclass
class _Entry:
    record: dict[str, Any]
    creds: str  # credentials_key of the attach that asked
    by: str  # id of the layer whose attach asked
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)
    opened: Opened | None = None
    at: float = field(default_factory=time.monotonic)
    #: dropped while its fetch was running: the resolve closes what it opened when it ends (release: its TOC too)
    dropped: bool = False
    release: bool = False


Opener = Callable[[dict[str, Any], object], Awaitable[Opened]]
Closer = Callable[[Opened, str], Awaitable[None]]


class PreResolver:
    """Layers resolved ahead of their attach (see the module docstring). Use from the trio thread only."""

    def __init__(self, open_layer: Opener, close_layer: Closer, cache: ChunkCache) -> None:
        self._open = open_layer
        self._close = close_layer
        self.cache = cache
        self._entries: dict[str, _Entry] = {}
        self._slots = trio.Semaphore(PARALLEL)

    def __contains__(self, lid: str) -> bool:
        return lid in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def ready(self) -> int:
        """Layers resolved and waiting for their attach."""
        return sum(1 for e in self._entries.values() if e.opened is not None)

    @property
    def pending(self) -> int:
        """Layers whose footer and TOC are still being fetched (failed ones are neither pending nor ready)."""
        return sum(1 for e in self._entries.values() if not e.done.is_set())

    def start(self, nursery: trio.Nursery, by: str, neighbours: Mapping[str, dict[str, Any]], credentials: object,
              skip: Callable[[str], bool]) -> None:
        """Resolve ``neighbours`` (layer id -> validated attach record) in the background for the attach of
        ``by``; ids for which ``skip`` is true (attached, being attached) and those already resolving are left."""
        ckey = credentials_key(credentials)
        for lid, record in neighbours.items():
            if lid == by or lid in self._entries or skip(lid):
                continue
            entry = _Entry(record, ckey, by)
            self._entries[lid] = entry
            nursery.start_soon(self._resolve, entry, credentials)
        self._bound(nursery, skip)

    async def take(self, lid: str, record: Mapping[str, Any], credentials: object) -> Opened | None:
        """The resolved layer ``lid`` for its attach (waiting for a resolve in progress), or None: none was asked
        for, it failed, or it was resolved for another image or other credentials (then dropped: the attach opens
        the layer itself, finding its TOC in the chunk cache)."""
        entry = self._entries.pop(lid, None)
        if entry is None:
            return None
        if entry.record == dict(record) and entry.creds == credentials_key(credentials):
            await entry.done.wait()
            opened, entry.opened = entry.opened, None
            return opened
        await self._discard(entry, release=False)
        return None

    async def drop_for(self, by: str, keep: Callable[[str], bool]) -> None:
        """The attach of ``by`` is undone (detach): drop what it asked for and nobody attached."""
        for lid in [k for k, e in self._entries.items() if e.by == by]:
            await self._discard(self._entries.pop(lid), release=not keep(lid))

    async def expire(self, keep: Callable[[str], bool]) -> None:
        """Drop resolved layers older than :data:`TTL` (called now and then)."""
        now = time.monotonic()
        for lid in [k for k, e in self._entries.items() if e.done.is_set() and now - e.at > TTL]:
            await self._discard(self._entries.pop(lid), release=not keep(lid))

    async def close(self) -> None:
        while self._entries:
            await self._discard(self._entries.popitem()[1], release=False)

    # ------------------------------------------------------------------ internals
    def _bound(self, nursery: trio.Nursery, keep: Callable[[str], bool]) -> None:
        while len(self._entries) > MAX_KEPT:
            oldest = min(self._entries, key=lambda k: self._entries[k].at)
            nursery.start_soon(self._discard, self._entries.pop(oldest), not keep(oldest))

    async def _resolve(self, entry: _Entry, credentials: object) -> None:
        digest = entry.record["digest"]
        try:
            with entry.scope:
                async with self._slots:
                    entry.opened = await self._open(entry.record, credentials)
                log.debug("pre-resolved layer %s (%s)", digest, entry.record["image_ref"])
        except CvmfsSnapError as e:
            log.warning("pre-resolving layer %s of %s failed (its own attach opens it): %s", digest,
                        entry.record["image_ref"], e)
        except Exception:  # a bug here must not end the process (this runs in its main nursery)
            log.warning("pre-resolving layer %s failed (its own attach opens it)", digest, exc_info=True)
        finally:
            entry.done.set()
        if entry.dropped:
            await self._close_entry(entry, entry.release)

    async def _discard(self, entry: _Entry, release: bool) -> None:
        """Close a resolved layer nobody will take (already out of the table): cancel its resolve, close its
        reader and client reference; ``release``: its TOC leaves the chunk cache too. A resolve still running (a
        range read in a worker thread ends only with its HTTP timeout) is not waited for: it closes what it
        opened itself when it ends, so a detach (containerd's Remove) never waits for it."""
        entry.scope.cancel()
        if not entry.done.is_set():
            entry.dropped, entry.release = True, release
            return
        await self._close_entry(entry, release)

    async def _close_entry(self, entry: _Entry, release: bool) -> None:
        opened, entry.opened = entry.opened, None
        digest = entry.record["digest"]
        try:
            if opened is not None:
                await self._close(opened, digest if release else "")
            elif release:
                await trio.to_thread.run_sync(self.cache.release_layer, digest)
        except Exception:  # as above: logged, never the end of the process
            log.warning("dropping pre-resolved layer %s failed", digest, exc_info=True)
            return
        log.debug("dropped pre-resolved layer %s", digest)
