"""Prometheus metrics of the publisher, in a registry of their own (``REGISTRY``).

The pipeline updates them; the daemon (``publisher.daemon``) serves ``REGISTRY`` on ``/metrics``. A registry of our
own (not prometheus_client's global one) keeps tests and embedding processes from seeing each other's numbers twice.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

_DURATION_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

LAYERS_PUBLISHED = Counter(
    "cvmfs_snap_publisher_layers_published_total", "Layers unpacked/ingested into the repository",
    ["backend"], registry=REGISTRY,
)
LAYERS_SKIPPED = Counter(
    "cvmfs_snap_publisher_layers_skipped_total", "Layers already complete in the repository (not redone)",
    ["backend"], registry=REGISTRY,
)
BYTES_PUBLISHED = Counter(
    "cvmfs_snap_publisher_bytes_published_total", "Uncompressed layer bytes published", ["backend"],
    registry=REGISTRY,
)
IMAGES_PUBLISHED = Counter(
    "cvmfs_snap_publisher_images_published_total", "Images (tags) whose metadata was published", ["backend"],
    registry=REGISTRY,
)
IMAGES_SKIPPED = Counter(
    "cvmfs_snap_publisher_images_skipped_total", "Images whose manifest was unchanged (nothing to do)", ["backend"],
    registry=REGISTRY,
)
FAILURES = Counter(
    "cvmfs_snap_publisher_failures_total", "Failed layers and images", ["kind", "reason"], registry=REGISTRY,
)
LAYER_SECONDS = Histogram(
    "cvmfs_snap_publisher_layer_seconds", "Time to download and publish one layer", ["backend"],
    buckets=_DURATION_BUCKETS, registry=REGISTRY,
)
IMAGE_SECONDS = Histogram(
    "cvmfs_snap_publisher_image_seconds", "Time to publish one image (all platforms, layers, flat tree)",
    ["backend"], buckets=_DURATION_BUCKETS, registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "cvmfs_snap_publisher_queue_depth", "Images waiting to be published (the daemon sets it)", registry=REGISTRY,
)
LAYERS_IN_FLIGHT = Gauge(
    "cvmfs_snap_publisher_layers_in_flight", "Layers being downloaded/published now", registry=REGISTRY,
)
