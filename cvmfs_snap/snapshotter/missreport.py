"""Publish-on-miss client: tell the publisher which images a node had to download because CVMFS lacked them.

Why: a node that pulls an image whose layers are not in the repository downloads them from the registry, and so does
every other node that runs it. The publisher daemon (``POST /publish-on-miss``, see docs/publisher-daemon.md) can
publish such an image on demand if it is in its allow-list, so that the next pulls are served from CVMFS.

The snapshot core calls :meth:`MissReporter.miss` inside containerd's ``Prepare`` (its ``on_miss`` callback), so
this module must never slow a pull down or fail it:

* ``miss`` only looks at the labels, checks an in-memory dedupe table and puts ``(image, layer)`` on a bounded queue;
  a full queue drops the report (counted, one warning per episode) instead of waiting;
* one background thread sends the reports with httpx and short timeouts;
* one image is reported at most once per ``dedupe_seconds`` (an image of 20 missing layers is one report); after a
  failure, a refused rate limit (429) or a skipped report the image may be reported again sooner;
* a report is sent only while the CVMFS repository is healthy (the ``available`` callback the daemon wires to the
  CVMFS source's health): a miss during a CVMFS outage says nothing about what is published;
* failures are logged at most once a minute per kind, and neither the shared secret nor URL credentials are logged.

Outcomes are counted in ``cvmfs_snap_snapshotter_miss_reports_total{outcome}``: ``sent`` (the publisher queued it,
or already has the layer), ``rate-limited`` (429), ``rejected`` (400/401/403/404: configuration to fix), ``failed``
(publisher unreachable, timeout, 5xx), ``dropped`` (queue full), ``skipped`` (CVMFS unavailable at the time).
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import httpx
from prometheus_client import CollectorRegistry, Counter

from cvmfs_snap.labelnames import CRI_IMAGE_REF, CRI_LAYER_DIGEST, SNAPSHOT_LAYER_DIGEST
from cvmfs_snap.oci.transport import parse_retry_after, safe_url

log = logging.getLogger(__name__)

OUTCOMES = ("sent", "rate-limited", "rejected", "failed", "dropped", "skipped")
#: a dedupe table larger than this is pruned of expired entries (an image name is ~100 bytes)
MAX_REMEMBERED = 10000
#: longest Retry-After we honour: a publisher asking for more must not silence a node for longer than a dedupe window
MAX_RETRY_AFTER = 3600.0


@dataclass(frozen=True)
class _Report:
    image: str
    layer: str


class _Throttle:
    """Log a kind of message at WARNING at most once per ``interval`` seconds, and at DEBUG in between."""

    def __init__(self, interval: float, clock: Callable[[], float]) -> None:
        self.interval = interval
        self.clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def warn(self, kind: str, msg: str, *args: object) -> None:
        now = self.clock()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self.interval:
                self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
                loud = False
            else:
                self._last[kind] = now
                loud = True
                suppressed = self._suppressed.pop(kind, 0)
        if not loud:
            log.debug(msg, *args)
            return
        if suppressed:
            msg += " (%d similar message(s) suppressed in the last minute)"
            args = (*args, suppressed)
        log.warning(msg, *args)


class MissReporter:
    """Reports layer misses to the publisher's ``POST /publish-on-miss`` from one background thread.

    ``available`` says whether the CVMFS source is healthy (asked in the background thread, never in ``Prepare``);
    None means always. ``registry`` is the Prometheus registry to count outcomes in (None: a private one).
    """

    def __init__(self, url: str, *, secret: str = "", available: Callable[[], bool] | None = None,
                 registry: CollectorRegistry | None = None, queue_size: int = 64, dedupe_seconds: float = 600.0,
                 retry_seconds: float = 60.0, timeout: float = 5.0, log_interval: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url
        self.safe_url = safe_url(url)
        self._secret = secret
        self.available = available
        self.dedupe_seconds = dedupe_seconds
        self.retry_seconds = retry_seconds
        self.timeout = timeout
        self.clock = clock
        self._queue: queue.Queue[_Report | None] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._until: dict[str, float] = {}  # image -> time before which it is not reported again
        self._full_warned = False
        self._no_image_warned = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._throttle = _Throttle(log_interval, clock)
        self.counter = Counter(
            "cvmfs_snap_snapshotter_miss_reports_total",
            "Publish-on-miss reports to the publisher by outcome: sent, rate-limited (429), rejected (400/401/403/"
            "404), failed (unreachable, timeout, 5xx), dropped (queue full), skipped (CVMFS unavailable)",
            ["outcome"], registry=registry if registry is not None else CollectorRegistry(),
        )
        for outcome in OUTCOMES:
            self.counter.labels(outcome=outcome)

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="publish-on-miss", daemon=True)
            self._thread.start()
            log.info("layers missing from CVMFS are reported to %s", self.safe_url)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread after the report in flight (at most ``timeout`` s); reports still queued are dropped."""
        self._stop.set()
        with contextlib.suppress(queue.Full):  # when full, the thread sees _stop before its next report
            self._queue.put_nowait(None)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the publish-on-miss reporter did not stop within %gs; abandoning it", timeout)
            self._thread = None

    def wait_idle(self, timeout: float) -> bool:
        """True once every queued report has been handled (for tests and orderly shutdown)."""
        deadline = time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._queue.all_tasks_done.wait(remaining)
        return True

    # -- the core's on_miss callback ------------------------------------------------------------------------------
    def miss(self, labels: Mapping[str, str]) -> None:
        """Queue a report for the image the Prepare labels name; never blocks, never raises."""
        image = labels.get(CRI_IMAGE_REF, "").strip()
        layer = labels.get(CRI_LAYER_DIGEST) or labels.get(SNAPSHOT_LAYER_DIGEST) or ""
        if not image:
            if not self._no_image_warned:
                self._no_image_warned = True
                log.info("a layer missing from CVMFS cannot be reported: the Prepare has no %s label (pulled with "
                         "`ctr` instead of CRI or `cvmfs-snap pull`?)", CRI_IMAGE_REF)
            return
        if self._stop.is_set():
            return
        now = self.clock()
        with self._lock:
            if self._until.get(image, 0.0) > now:
                return
            if len(self._until) >= MAX_REMEMBERED:
                self._until = {k: t for k, t in self._until.items() if t > now}
            self._until[image] = now + self.dedupe_seconds
            try:
                self._queue.put_nowait(_Report(image, layer))
            except queue.Full:
                del self._until[image]  # a later miss may try again
                self.counter.labels(outcome="dropped").inc()
                if not self._full_warned:
                    self._full_warned = True
                    log.warning("publish-on-miss queue is full (%d reports waiting for %s): dropping reports until "
                                "it drains; is the publisher slow or unreachable?", self._queue.maxsize,
                                self.safe_url)
                return
        log.debug("queued publish-on-miss report for %s (layer %s)", image, layer or "-")

    # -- the background thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        client = httpx.Client(timeout=httpx.Timeout(self.timeout, connect=min(self.timeout, 2.0)),
                              follow_redirects=False)
        try:
            while True:
                item = self._queue.get()
                try:
                    if item is None or self._stop.is_set():
                        return
                    self._handle(client, item)
                except Exception:  # a bug here must not end reporting for the daemon's lifetime
                    log.exception("unexpected error reporting a missing layer of %s", getattr(item, "image", "?"))
                finally:
                    self._queue.task_done()
                    if self._queue.empty():
                        self._full_warned = False
        finally:
            client.close()
            self._discard_pending()

    def _discard_pending(self) -> None:
        n = 0
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
            self._queue.task_done()
            n += 1
        if n:
            log.debug("dropped %d unsent publish-on-miss report(s) at shutdown", n)

    def _again_after(self, image: str, seconds: float) -> None:
        with self._lock:
            self._until[image] = self.clock() + max(0.0, min(seconds, self.dedupe_seconds))

    def _handle(self, client: httpx.Client, rep: _Report) -> None:
        if not self._cvmfs_available():
            self.counter.labels(outcome="skipped").inc()
            self._again_after(rep.image, 0.0)
            log.debug("not reporting %s: the CVMFS repository is unavailable, so the miss may not be one",
                      rep.image)
            return
        body: dict[str, str] = {"image": rep.image}
        if rep.layer:
            body["layer"] = rep.layer
        headers = {"Authorization": f"Bearer {self._secret}"} if self._secret else {}
        try:
            r = client.post(self.url, json=body, headers=headers)
        except httpx.HTTPError as exc:
            self.counter.labels(outcome="failed").inc()
            self._again_after(rep.image, self.retry_seconds)
            self._throttle.warn("failed", "cannot report missing image %s to the publisher at %s (%s: %s); the "
                                "image is pulled normally, retried on a later miss", rep.image, self.safe_url,
                                type(exc).__name__, _exc_text(exc))
            return
        detail = _detail(r)
        if r.status_code in (200, 202):
            self.counter.labels(outcome="sent").inc()
            log.info("reported missing image %s (layer %s) to the publisher: %s", rep.image, rep.layer or "-",
                     detail or r.status_code)
        elif r.status_code == 429:
            self.counter.labels(outcome="rate-limited").inc()
            self._again_after(rep.image, _retry_after(r, self.retry_seconds))
            self._throttle.warn("rate-limited", "the publisher at %s rate-limited the report of %s: %s",
                                self.safe_url, rep.image, detail or "429")
        elif r.status_code in (400, 401, 403, 404):
            self.counter.labels(outcome="rejected").inc()
            hint = {
                401: "check publish-on-miss-secret(-file) against the publisher's shared secret",
                403: "the image is not in the publisher's publish_on_miss_allow list",
                404: "check publish-on-miss-url (it should end in /publish-on-miss)",
                400: "the publisher did not accept the report",
            }[r.status_code]
            self._throttle.warn(f"rejected-{r.status_code}", "the publisher at %s refused the report of %s (HTTP "
                                "%d: %s); %s", self.safe_url, rep.image, r.status_code, detail or "-", hint)
        else:
            self.counter.labels(outcome="failed").inc()
            self._again_after(rep.image, self.retry_seconds)
            self._throttle.warn("failed", "the publisher at %s answered HTTP %d to the report of %s (%s); retried "
                                "on a later miss", self.safe_url, r.status_code, rep.image, detail or "-")

    def _cvmfs_available(self) -> bool:
        if self.available is None:
            return True
        try:
            return bool(self.available())
        except Exception as exc:
            log.debug("CVMFS health check failed: %s", exc)
            return False


def _exc_text(exc: BaseException) -> str:
    # httpx messages may embed the URL; ours has no credentials (config refuses them), but keep it short
    return str(exc)[:300] or "no detail"


def _detail(r: httpx.Response) -> str:
    """The publisher's ``status`` or ``error`` field, short; "" if the body is not the JSON we expect."""
    try:
        data = json.loads(r.content[:65536])
    except (ValueError, UnicodeDecodeError):
        return ""
    if not isinstance(data, dict):
        return ""
    value = data.get("error") or data.get("status") or ""
    return str(value)[:300]


def _retry_after(r: httpx.Response, default: float) -> float:
    after = parse_retry_after(r.headers.get("Retry-After"))
    return default if after is None else min(MAX_RETRY_AFTER, after)
