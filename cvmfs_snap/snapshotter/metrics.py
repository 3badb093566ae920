"""Prometheus metrics of the snapshotter daemon, on their own registry (so tests and several daemons never clash).

What a site admin wants to see: how many layers were served from CVMFS (or later lazily) instead of downloaded
(``cvmfs_snap_snapshotter_prepare_total{outcome=cvmfs|lazy|local}``), how long each RPC takes, and which RPCs fail
with which gRPC code.

A daemon that serves no metrics (no ``metrics-address``) and reports no misses (no ``publish-on-miss-url``) makes
``Metrics(enabled=False)``: nobody could read its counts, and prometheus_client is not imported (its exposition
module loads http.server, wsgiref, urllib.request and ssl with libcrypto: bench/README.md "Resident memory").
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Histogram

log = logging.getLogger(__name__)


class Metrics:
    def __init__(self, enabled: bool = True) -> None:
        self.registry: CollectorRegistry | None = None
        self.prepares: Counter | None = None
        self.latency: Histogram | None = None
        self.errors: Counter | None = None
        self._server: Any = None
        if not enabled:
            return
        # prometheus_client only where metrics are served or misses counted (optional at run time: module doc)
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.prepares = Counter(
            "cvmfs_snap_snapshotter_prepare_total",
            "Prepare calls by outcome: the source that served the layer remotely (cvmfs, lazy) or local",
            ["outcome"], registry=self.registry,
        )
        self.latency = Histogram(
            "cvmfs_snap_snapshotter_rpc_seconds", "Latency of snapshot service RPCs", ["rpc"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.errors = Counter(
            "cvmfs_snap_snapshotter_rpc_errors_total", "Snapshot service RPCs that failed, by gRPC code",
            ["rpc", "code"], registry=self.registry,
        )

    def prepare_outcome(self, outcome: str) -> None:
        if self.prepares is not None:
            self.prepares.labels(outcome=outcome).inc()

    def observe(self, rpc: str, seconds: float) -> None:
        if self.latency is not None:
            self.latency.labels(rpc=rpc).observe(seconds)

    def error(self, rpc: str, code: str) -> None:
        if self.errors is not None:
            self.errors.labels(rpc=rpc, code=code).inc()

    def text(self) -> str:
        """The metrics in Prometheus' text format ("" when not enabled)."""
        if self.registry is None:
            return ""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()

    def serve(self, address: str) -> tuple[str, int]:
        """Serve /metrics on ``host:port`` (port 0 picks a free one); returns the bound address."""
        if self.registry is None:
            raise RuntimeError("Metrics(enabled=False) cannot serve")
        from prometheus_client import start_http_server

        host, _, port = address.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        server, _thread = start_http_server(int(port), addr=host, registry=self.registry)
        self._server = server
        bound = server.server_address
        log.info("metrics on http://%s:%d/metrics", bound[0], bound[1])
        return str(bound[0]), int(bound[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
