"""Prometheus metrics of lazy layers, on their own registry (the lazyfs process serves it; tests make their own).

``cvmfs_snap_lazy_fetched_bytes_total{layer}``: compressed bytes fetched from registries per layer;
``cvmfs_snap_lazy_fetch_seconds``: latency of one range fetch (all its spans, retries included);
``cvmfs_snap_lazy_cache_{hits,misses,evictions}_total`` and ``cvmfs_snap_lazy_cache_bytes``: the chunk cache;
``cvmfs_snap_lazy_background_fraction{layer}``: the part of a layer present in the cache, updated by the background
fetch. Labels carry layer digests only, never image references or credentials.

The process-wide :data:`DEFAULT_METRICS` counts nothing until :meth:`LazyMetrics.enable` (the process calls it when
it serves metrics, ``--metrics-address``): a lazyfs process without metrics does not import prometheus_client
(its exposition module loads http.server, wsgiref and urllib.request: 1.5 MiB of RSS, bench/README.md "Resident
memory"). ``LazyMetrics()`` (as tests make them) is enabled at once.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class _Off:
    """A metric that is not counted (metrics not served): every update is a no-op."""

    def labels(self, *_args: object, **_kw: object) -> _Off:
        return self

    def inc(self, _amount: float = 1) -> None:
        pass

    def set(self, _value: float) -> None:
        pass

    def observe(self, _value: float) -> None:
        pass

    def remove(self, *_labels: str) -> None:
        pass


_OFF = _Off()


class LazyMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, enabled: bool = True) -> None:
        self.registry: CollectorRegistry | None = None
        self.fetched_bytes: Counter | _Off = _OFF
        self.fetch_seconds: Histogram | _Off = _OFF
        self.cache_hits: Counter | _Off = _OFF
        self.cache_misses: Counter | _Off = _OFF
        self.cache_evictions: Counter | _Off = _OFF
        self.cache_bytes: Gauge | _Off = _OFF
        self.background_fraction: Gauge | _Off = _OFF
        if enabled:
            self.enable(registry)

    def enable(self, registry: CollectorRegistry | None = None) -> None:
        """Count from now on (idempotent); the metrics go to ``registry`` (default: a registry of their own)."""
        if self.registry is not None:
            return
        # prometheus_client only where metrics are served (optional at run time: module doc)
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = reg = registry or CollectorRegistry()
        self.fetched_bytes = Counter("cvmfs_snap_lazy_fetched_bytes", "Compressed bytes fetched from the registry",
                                     ["layer"], registry=reg)
        self.fetch_seconds = Histogram(
            "cvmfs_snap_lazy_fetch_seconds", "Latency of one range fetch (retries included)", registry=reg,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.cache_hits = Counter("cvmfs_snap_lazy_cache_hits", "Chunk cache hits", registry=reg)
        self.cache_misses = Counter("cvmfs_snap_lazy_cache_misses", "Chunk cache misses", registry=reg)
        self.cache_evictions = Counter("cvmfs_snap_lazy_cache_evictions", "Chunks evicted from the cache (LRU)",
                                       registry=reg)
        self.cache_bytes = Gauge("cvmfs_snap_lazy_cache_bytes", "Bytes held by the chunk cache", registry=reg)
        self.background_fraction = Gauge("cvmfs_snap_lazy_background_fraction",
                                         "Part of a layer's chunk bytes present in the cache", ["layer"],
                                         registry=reg)

    def forget_layer(self, layer: str) -> None:
        """Drop a released layer's labelled series (a long-lived process must not grow one per layer ever seen)."""
        for metric in (self.fetched_bytes, self.background_fraction):
            with contextlib.suppress(KeyError):
                metric.remove(layer)


#: the process-wide default (the lazyfs process enables and exports it when it serves metrics); components take
#: their own for tests
DEFAULT_METRICS = LazyMetrics(enabled=False)
