"""The daemon's intake decisions: what a webhook or a publish-on-miss report puts in the work queue.

Transport-free: the HTTP endpoint (:mod:`publisher.httpapp`) authenticates and reads the body, then calls
:meth:`Intake.handle_webhook` or :meth:`Intake.handle_miss`. Webhooks queue only tags the recipe names or matches
(:mod:`publisher.policy`); publish-on-miss reports queue images the allow-list admits, deduplicated, with a
per-image cooldown and a token bucket. Every reference is queued in its canonical spelling
(:func:`publisher.policy.canonical_ref`). Malformed input raises :class:`InvalidInputError` (HTTP 400).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Required, TypedDict

from prometheus_client import Counter

from cvmfs_snap.errors import InvalidInputError
from cvmfs_snap.layout import digest_hex
from cvmfs_snap.oci.reference import ImageReference
from cvmfs_snap.validation import load_as
from publisher import metrics
from publisher.backends.base import Backend
from publisher.config import DaemonConfig
from publisher.policy import RecipePattern, allowed_by, canonical_ref
from publisher.webhooks import PushEvent, load_json, parse_distribution_events, parse_harbor, parse_webhook
from publisher.workqueue import WorkQueue

log = logging.getLogger(__name__)

WEBHOOKS_RECEIVED = Counter(
    "cvmfs_snap_publisher_webhooks_total", "Webhook requests by payload kind and outcome", ["kind", "outcome"],
    registry=metrics.REGISTRY,
)
MISSES_RECEIVED = Counter(
    "cvmfs_snap_publisher_publish_on_miss_total", "Publish-on-miss reports by outcome", ["outcome"],
    registry=metrics.REGISTRY,
)

#: webhook endpoint kinds and their parsers
WEBHOOK_PARSERS = {"registry": parse_distribution_events, "harbor": parse_harbor, "auto": parse_webhook}

#: a JSON answer: (HTTP status, body)
Answer = tuple[int, dict[str, object]]


class _MissBody(TypedDict, total=False):
    """``POST /publish-on-miss``'s body (checked by cvmfs_snap.validation)."""

    image: Required[str]
    #: the layer that missed (a sha256 digest): answered "present" when it is published already
    layer: str | None


class Intake:
    """Turns webhooks and publish-on-miss reports into queue entries. Thread-safe."""

    def __init__(self, settings: DaemonConfig, queue: WorkQueue, backend: Backend) -> None:
        self.settings = settings
        self.queue = queue
        self.backend = backend
        self._lock = threading.Lock()
        self._patterns: list[RecipePattern] = []
        self._last_attempt: dict[str, float] = {}
        self._miss_tokens = settings.miss_rate_per_minute
        self._miss_refill = time.monotonic()

    def use_patterns(self, patterns: list[RecipePattern]) -> None:
        """The recipe changed: these are the tags webhooks may queue from now on."""
        with self._lock:
            self._patterns = list(patterns)

    def attempted(self, key: str) -> None:
        """A worker starts publishing ``key`` (the publish-on-miss cooldown counts from here)."""
        now = time.monotonic()
        with self._lock:
            if len(self._last_attempt) > 10000:  # only recent attempts matter
                cutoff = now - self.settings.miss_cooldown
                self._last_attempt = {k: t for k, t in self._last_attempt.items() if t >= cutoff}
            self._last_attempt[key] = now

    # -- webhooks -----------------------------------------------------------------------------------------------
    def recipe_ref_for(self, ev: PushEvent) -> ImageReference | None:
        """The reference to publish for a pushed tag, spelt as the recipe spells it; None when not wanted."""
        with self._lock:
            pats = list(self._patterns)
        for p in pats:
            if p.matches(ev.registry, ev.repository, ev.tag):
                return p.ref_for(ev.tag)
        return None

    def handle_webhook(self, kind: str, body: bytes) -> dict[str, list[str]]:
        """Queue the pushed tags the recipe wants (after ``debounce``); the answer lists queued and ignored."""
        try:
            events = WEBHOOK_PARSERS[kind](body)
        except InvalidInputError:
            WEBHOOKS_RECEIVED.labels(kind, "invalid").inc()
            raise
        queued: list[str] = []
        ignored: list[str] = []
        for ev in events:
            ref = self.recipe_ref_for(ev)
            if ref is not None:
                self.queue.request(ref, f"webhook:{kind}", delay=self.settings.debounce)
                queued.append(str(ref))
            else:
                ignored.append(ev.image)
        if ignored:
            log.info("webhook (%s): ignored %d tag(s) not in the recipe: %s", kind, len(ignored),
                     ", ".join(ignored[:10]))
        WEBHOOKS_RECEIVED.labels(kind, "ok").inc()
        return {"queued": queued, "ignored": ignored}

    # -- publish-on-miss ----------------------------------------------------------------------------------------
    def handle_miss(self, body: bytes) -> Answer:
        """A node's report of an image (and layer) it did not find; see docs/publisher-daemon.md for the answers."""
        try:
            ref, layer = self._parse_miss(body)
        except InvalidInputError:
            MISSES_RECEIVED.labels("invalid").inc()
            raise
        if not allowed_by(self.settings.publish_on_miss_allow, ref):
            MISSES_RECEIVED.labels("forbidden").inc()
            return 403, {"error": f"{ref.name} is not in the publish-on-miss allow-list of this publisher; ask the "
                                  "repository admins to add it (daemon.publish_on_miss_allow) or to the recipe"}
        if layer is not None and self.backend.has_layer(layer):
            MISSES_RECEIVED.labels("present").inc()
            return 200, {"status": "present", "image": str(ref), "layer": layer}
        key = str(ref)
        if self.queue.contains(key):
            MISSES_RECEIVED.labels("duplicate").inc()
            return 202, {"status": "already-queued", "image": key}
        now = time.monotonic()
        with self._lock:
            last = self._last_attempt.get(key)
            if last is not None and now - last < self.settings.miss_cooldown:
                MISSES_RECEIVED.labels("rate-limited").inc()
                wait = int(self.settings.miss_cooldown - (now - last)) + 1
                return 429, {"error": f"{key} was tried {now - last:.0f}s ago; retry in {wait}s", "retry_after": wait}
            rate = self.settings.miss_rate_per_minute
            self._miss_tokens = min(rate, self._miss_tokens + (now - self._miss_refill) * rate / 60.0)
            self._miss_refill = now
            if self._miss_tokens < 1:
                MISSES_RECEIVED.labels("rate-limited").inc()
                return 429, {"error": f"too many publish-on-miss requests (limit {rate:g}/minute); retry later",
                             "retry_after": 60}
            self._miss_tokens -= 1
        status = self.queue.request(ref, "publish-on-miss")
        MISSES_RECEIVED.labels("queued").inc()
        return 202, {"status": status, "image": key}

    @staticmethod
    def _parse_miss(body: bytes) -> tuple[ImageReference, str | None]:
        data = load_as(_MissBody, load_json(body, "publish-on-miss body"), "publish-on-miss body", strict=True,
                       kind='{"image": "registry/repository:tag"} (optionally with "layer": "sha256:...")')
        ref = canonical_ref(ImageReference.parse(data["image"]))
        layer = data.get("layer")
        if layer is not None:
            digest_hex(layer)
        return ref, layer
