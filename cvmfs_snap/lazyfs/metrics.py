"""Prometheus metrics of lazy layers, on their own registry (the lazyfs process serves it; tests make their own).

``cvmfs_snap_lazy_fetched_bytes_total{layer}``: compressed bytes fetched from registries per layer;
``cvmfs_snap_lazy_fetch_seconds``: latency of one range fetch (all its spans, retries included);
``cvmfs_snap_lazy_cache_{hits,misses,evictions}_total`` and ``cvmfs_snap_lazy_cache_bytes``: the chunk cache;
``cvmfs_snap_lazy_background_fraction{layer}``: the part of a layer present in the cache, updated by the background
fetch. Labels carry layer digests only, never image references or credentials.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class LazyMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.fetched_bytes = Counter("cvmfs_snap_lazy_fetched_bytes", "Compressed bytes fetched from the registry",
                                     ["layer"], registry=self.registry)
        self.fetch_seconds = Histogram(
            "cvmfs_snap_lazy_fetch_seconds", "Latency of one range fetch (retries included)", registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.cache_hits = Counter("cvmfs_snap_lazy_cache_hits", "Chunk cache hits", registry=self.registry)
        self.cache_misses = Counter("cvmfs_snap_lazy_cache_misses", "Chunk cache misses", registry=self.registry)
        self.cache_evictions = Counter("cvmfs_snap_lazy_cache_evictions", "Chunks evicted from the cache (LRU)",
                                       registry=self.registry)
        self.cache_bytes = Gauge("cvmfs_snap_lazy_cache_bytes", "Bytes held by the chunk cache",
                                 registry=self.registry)
        self.background_fraction = Gauge("cvmfs_snap_lazy_background_fraction",
                                         "Part of a layer's chunk bytes present in the cache", ["layer"],
                                         registry=self.registry)

    def forget_layer(self, layer: str) -> None:
        """Drop a released layer's labelled series (a long-lived process must not grow one per layer ever seen)."""
        for metric in (self.fetched_bytes, self.background_fraction):
            with contextlib.suppress(KeyError):
                metric.remove(layer)


#: the process-wide default (the lazyfs process exports it); components take their own for tests
DEFAULT_METRICS = LazyMetrics()
