"""The publisher daemon (``cvmfs-snap-publisher loop RECIPE``): keep a repository in step with a recipe.

Work arrives from four places and goes through **one** queue into the pipeline (:class:`publisher.pipeline.Publisher`):

* the recipe file, watched with watchdog (atomic saves by rename included) and re-read after ``debounce`` seconds of
  quiet; a recipe that does not parse is reported and the previous one is kept;
* a periodic full pass every ``poll_interval`` seconds, which re-lists tags, so globbed tags and tags that moved to
  another manifest are picked up even without webhooks;
* registry webhooks on the HTTP endpoint (distribution ``notifications`` and Harbor ``PUSH_ARTIFACT``); only tags the
  recipe names (or matches with a glob) are queued;
* publish-on-miss reports from nodes (``POST /publish-on-miss``), limited by an allow-list of
  ``registry/repository`` globs, deduplicated and rate-limited.

After each full pass, images the recipe no longer names are scheduled for removal (and images it names again are
unscheduled) in the remove schedule that ``gc`` works through; nothing is scheduled when the recipe or any of its
lines failed. The daemon never removes anything: that stays an explicit ``gc`` (see ``publisher.gc``).

The queue holds each image at most once and never hands one image to two workers at once; a request for an image
that is being published marks it to run once more afterwards (the push may have come after our manifest read).
Every item fails on its own: a broken recipe line, an unknown image, an auth failure or a hostile layer is logged
with its reason and counted, and the daemon carries on. SIGTERM/SIGINT stop intake, let in-flight images finish for
up to ``shutdown_timeout`` seconds and exit 0; what is still running then is abandoned, which the pipeline is built
to survive (a layer becomes visible only complete; the next run redoes the image).
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest

from cvmfs_snap.errors import CvmfsSnapError, InvalidInputError, UnavailableError
from cvmfs_snap.layout import digest_hex
from cvmfs_snap.oci.reference import ImageReference
from publisher import metrics
from publisher.config import DaemonConfig, PublisherConfig
from publisher.recipe import Recipe
from publisher.webhooks import (
    MAX_BODY,
    PushEvent,
    check_authorization,
    normalize_host,
    parse_distribution_events,
    parse_harbor,
    parse_webhook,
)

log = logging.getLogger(__name__)

WEBHOOKS_RECEIVED = Counter(
    "cvmfs_snap_publisher_webhooks_total", "Webhook requests by payload kind and outcome", ["kind", "outcome"],
    registry=metrics.REGISTRY,
)
MISSES_RECEIVED = Counter(
    "cvmfs_snap_publisher_publish_on_miss_total", "Publish-on-miss reports by outcome", ["outcome"],
    registry=metrics.REGISTRY,
)
DAEMON_IMAGES = Counter(
    "cvmfs_snap_publisher_daemon_images_total", "Images the daemon handed to the pipeline, by outcome", ["outcome"],
    registry=metrics.REGISTRY,
)

#: environment variable with the shared secret webhooks must send in ``Authorization`` (when not in the config)
WEBHOOK_SECRET_ENV = "CVMFS_SNAP_WEBHOOK_SECRET"


def daemon_settings(config: PublisherConfig) -> DaemonConfig:
    """The daemon's settings: the configuration's ``daemon`` section (typed and range-checked when the file was
    read), with the shared secret taken from the environment when the file does not set one."""
    settings = dataclasses.replace(config.daemon)
    if not settings.webhook_secret:
        settings.webhook_secret = os.environ.get(WEBHOOK_SECRET_ENV) or None
    return settings


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) -> (host, port); port 0 picks a free one."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise InvalidInputError(f"daemon listen address {listen!r} must be host:port, e.g. 127.0.0.1:8080")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


# -- the work queue -----------------------------------------------------------------------------------------------
@dataclass
class QueueItem:
    key: str
    ref: ImageReference
    source: str
    not_before: float = 0.0


class WorkQueue:
    """Images to publish, each at most once, never two workers on the same image.

    ``put`` of an image already waiting keeps one entry (the earlier due time wins); ``put`` of an image being
    published sets it to run once more after the current run, because the new request may describe a newer
    manifest than the one the running publish read.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._waiting: OrderedDict[str, QueueItem] = OrderedDict()
        self._running: set[str] = set()
        self._again: dict[str, QueueItem] = {}
        self._closed = False

    def put(self, item: QueueItem) -> str:
        """Queue an image; returns "queued", "already-queued" or "after-current-run"."""
        with self._cond:
            if self._closed:
                return "closing"
            if item.key in self._running:
                self._again.setdefault(item.key, item)
                return "after-current-run"
            old = self._waiting.get(item.key)
            if old is not None:
                old.not_before = min(old.not_before, item.not_before)
                return "already-queued"
            self._waiting[item.key] = item
            self._update_gauge()
            self._cond.notify_all()
            return "queued"

    def get(self) -> QueueItem | None:
        """The next due image (blocking); None once the queue is closed."""
        with self._cond:
            while True:
                if self._closed:
                    return None
                now = time.monotonic()
                due = next((it for it in self._waiting.values() if it.not_before <= now), None)
                if due is not None:
                    del self._waiting[due.key]
                    self._running.add(due.key)
                    self._update_gauge()
                    return due
                wait = min((it.not_before - now for it in self._waiting.values()), default=None)
                self._cond.wait(timeout=wait)

    def done(self, key: str) -> None:
        with self._cond:
            self._running.discard(key)
            again = self._again.pop(key, None)
            if again is not None and not self._closed:
                self._waiting.setdefault(key, again)
                self._update_gauge()
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def contains(self, key: str) -> bool:
        with self._cond:
            return key in self._waiting or key in self._running

    def snapshot(self) -> dict[str, list[str]]:
        with self._cond:
            return {"waiting": list(self._waiting), "running": sorted(self._running)}

    def wait_idle(self, timeout: float) -> bool:
        """True when nothing is running within ``timeout`` seconds (used at shutdown)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(timeout=left)
            return True

    def _update_gauge(self) -> None:
        metrics.QUEUE_DEPTH.set(len(self._waiting))


# -- recipe matching ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RecipePattern:
    """One usable recipe line as a match rule for pushed tags."""

    #: the registry as webhooks spell it (``normalize_host``)
    registry: str
    repository: str
    #: the tag, or the line's tag glob
    tag: str
    #: the line's reference: publishing ``line_ref.with_tag(tag)`` keeps the recipe's registry spelling (DUCC
    #: paths use it) and its ``http://`` marker
    line_ref: ImageReference

    def matches(self, registry: str, repository: str, tag: str) -> bool:
        return (
            normalize_host(registry) == self.registry
            and repository == self.repository
            and fnmatch.fnmatchcase(tag, self.tag)
        )


def recipe_patterns(recipe: Any) -> list[RecipePattern]:
    """Match rules from a loaded :class:`publisher.recipe.Recipe` (lines that failed to parse are skipped)."""
    out: list[RecipePattern] = []
    for line in recipe.lines:
        ref = line.ref
        if ref is None:
            continue
        tag = line.tag_glob or ref.tag
        if tag is None:
            continue  # pinned by digest only: a push of a tag never changes it
        out.append(RecipePattern(normalize_host(ref.registry), ref.repository, tag, ref))
    return out


def allowed_by(globs: Iterable[str], ref: ImageReference) -> bool:
    """Publish-on-miss allow-list: does any ``registry/repository`` glob match the image?

    Registries are compared in one spelling (``normalize_host``), so ``docker.io/library/*`` also admits
    ``registry-1.docker.io/library/ubuntu``.
    """
    name = f"{normalize_host(ref.registry)}/{ref.repository}"
    for g in globs:
        host, sep, repo_glob = g.strip().partition("/")
        if sep and fnmatch.fnmatchcase(name, f"{normalize_host(host)}/{repo_glob}"):
            return True
    return False


# -- the daemon -----------------------------------------------------------------------------------------------------
@dataclass
class ImageStatus:
    image: str
    source: str
    ok: bool
    message: str
    finished: float
    manifest_digest: str = ""


class Daemon:
    """All the moving parts of ``loop``; :meth:`start` and :meth:`stop` make it usable from tests too."""

    def __init__(self, recipe_path: Path, config: Any, settings: DaemonConfig, publisher: Any, client: Any,
                 backend: Any, *, load_recipe: Callable[[Path], Any], expand: Callable[[Any, Any], list[Any]],
                 state_dir: Path, recipe_platforms: bool = True) -> None:
        self.recipe_path = recipe_path
        self.config = config
        self.settings = settings
        self.publisher = publisher
        self.client = client
        self.backend = backend
        self._load_recipe = load_recipe
        self._expand = expand
        self.state_dir = state_dir
        self._recipe_platforms = recipe_platforms
        self.queue = WorkQueue()
        self.stopping = threading.Event()
        self._recipe_changed = threading.Event()
        self._wake = threading.Event()
        self.recipe: Recipe | None = None
        self.patterns: list[RecipePattern] = []
        self.recipe_error: str | None = None
        self._loaded_signature: tuple[int, int, int, int] | None = None
        self._lock = threading.Lock()
        self.history: OrderedDict[str, ImageStatus] = OrderedDict()
        self._last_attempt: dict[str, float] = {}
        self._miss_tokens = settings.miss_rate_per_minute
        self._miss_refill = time.monotonic()
        self._observer: Any = None
        self.server: ThreadingHTTPServer | None = None

    # -- recipe ------------------------------------------------------------------------------------------------
    def reload_recipe(self) -> bool:
        """Read the recipe; on error keep the previous one (a half-saved file must not empty the wishlist)."""
        self._loaded_signature = self._recipe_signature()
        try:
            recipe = self._load_recipe(self.recipe_path)
        except CvmfsSnapError as exc:
            self.recipe_error = str(exc)
            log.error("recipe %s not (re)loaded, keeping the previous one: %s", self.recipe_path, exc)
            return False
        except OSError as exc:
            self.recipe_error = f"cannot read {self.recipe_path}: {exc.strerror}"
            log.error("recipe not (re)loaded, keeping the previous one: %s", self.recipe_error)
            return False
        with self._lock:
            self.recipe = recipe
            self.patterns = recipe_patterns(recipe)
            self.recipe_error = None
        # the recipe's own `platforms:` applies when the configuration does not restrict platforms
        if self._recipe_platforms:
            self.publisher.platforms = list(recipe.platforms)
        log.info("recipe %s loaded: %d input(s)", self.recipe_path, len(self.patterns))
        return True

    def full_pass(self) -> int:
        """Expand the recipe (tag lists re-read) and queue every image; returns how many were queued."""
        with self._lock:
            recipe = self.recipe
        if recipe is None:
            return 0
        try:
            refs = self._expand(recipe, self.client)
        except CvmfsSnapError as exc:
            log.error("recipe %s could not be expanded: %s", self.recipe_path, exc)
            return 0
        for err in recipe.errors:
            # a broken line fails on its own, visible in /status like a failed image
            self._record(ImageStatus(str(err.input), "recipe", False, str(err.message), time.time()))
        n = 0
        for ref in refs:
            if self.enqueue(ref, "poll") == "queued":
                n += 1
        log.info("full pass over %s: %d image(s), %d newly queued", self.recipe_path, len(refs), n)
        self.schedule_unwanted(recipe, refs)
        return n

    def schedule_unwanted(self, recipe: Recipe, refs: list[Any]) -> None:
        """After a full pass: images the recipe no longer names go to the remove schedule (``gc`` removes them
        after the grace period), images it names again leave it. Skipped, with a log line, when the recipe file
        could not be re-read or any line failed: a typo or a registry outage must never schedule images."""
        from publisher import gc

        problems = [f"recipe line {e.message}" for e in recipe.errors if e.whole_line]  # an invalid tag blocks nothing
        if self.recipe_error:
            problems.insert(0, f"recipe {self.recipe_path} not reloaded: {self.recipe_error}")
        keep = gc.publish_on_miss_keep(self.settings.publish_on_miss_allow)
        wishlist = gc.Wishlist.from_refs(refs, problems, keep)
        try:
            gc.record_unwanted(self.backend, self.state_dir, wishlist)
        except CvmfsSnapError as exc:
            log.error("images dropped from the recipe not scheduled for removal this pass: %s", exc)

    def recipe_ref_for(self, ev: PushEvent) -> ImageReference | None:
        """The reference to publish for a pushed tag, spelt as the recipe spells it; None when not wanted."""
        with self._lock:
            pats = list(self.patterns)
        for p in pats:
            if p.matches(ev.registry, ev.repository, ev.tag):
                return p.line_ref.with_tag(ev.tag)
        return None

    # -- queue -------------------------------------------------------------------------------------------------
    def enqueue(self, ref: Any, source: str, delay: float = 0.0) -> str:
        key = str(ref)
        result = self.queue.put(QueueItem(key, ref, source, time.monotonic() + delay))
        if result == "queued":
            log.info("queued %s (%s)", key, source)
        return result

    def _worker(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            try:
                self._publish(item)
            finally:
                self.queue.done(item.key)

    def _publish(self, item: QueueItem) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._last_attempt) > 10000:  # only recent attempts matter (publish-on-miss cooldown)
                cutoff = now - self.settings.miss_cooldown
                self._last_attempt = {k: t for k, t in self._last_attempt.items() if t >= cutoff}
            self._last_attempt[item.key] = now
        t0 = time.monotonic()
        ok, message, digest = False, "", ""
        try:
            # publish_image holds the GC lock (shared) itself
            result = self.publisher.publish_image(item.ref)
            ok, message, digest = result.ok, result.error or "", result.manifest_digest or ""
        except CvmfsSnapError as exc:
            message = str(exc)
        except Exception as exc:
            log.exception("unexpected error publishing %s", item.key)
            message = f"internal error: {exc!r}"
        dt = time.monotonic() - t0
        DAEMON_IMAGES.labels("ok" if ok else "failed").inc()
        if ok:
            log.info("published %s (%s) in %.1fs %s", item.key, item.source, dt, digest)
        else:
            log.error("publishing %s (%s) failed: %s", item.key, item.source, message)
        self._record(ImageStatus(item.key, item.source, ok, message, time.time(), digest))

    def _record(self, status: ImageStatus) -> None:
        with self._lock:
            self.history[status.image] = status
            self.history.move_to_end(status.image)
            while len(self.history) > 1000:
                self.history.popitem(last=False)

    # -- webhooks and publish-on-miss -------------------------------------------------------------------------
    def handle_webhook(self, kind: str, body: bytes) -> dict[str, Any]:
        parse = {"registry": parse_distribution_events, "harbor": parse_harbor, "auto": parse_webhook}[kind]
        events = parse(body)
        queued, ignored = [], []
        for ev in events:
            ref = self.recipe_ref_for(ev)
            if ref is not None:
                self.enqueue(ref, f"webhook:{kind}", delay=self.settings.debounce)
                queued.append(str(ref))
            else:
                ignored.append(ev.image)
        if ignored:
            log.info("webhook (%s): ignored %d tag(s) not in the recipe: %s", kind, len(ignored),
                     ", ".join(ignored[:10]))
        return {"queued": queued, "ignored": ignored}

    def handle_miss(self, body: bytes) -> tuple[int, dict[str, Any]]:
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidInputError(f"publish-on-miss body is not valid JSON: {exc}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("image"), str):
            raise InvalidInputError('publish-on-miss body must be {"image": "registry/repository:tag"} '
                                    '(optionally with "layer": "sha256:...")')
        ref = ImageReference.parse(data["image"])
        layer = data.get("layer")
        if layer is not None:
            if not isinstance(layer, str):
                raise InvalidInputError('"layer" must be a sha256 digest string')
            digest_hex(layer)
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
        last = self._last_attempt.get(key)
        now = time.monotonic()
        if last is not None and now - last < self.settings.miss_cooldown:
            MISSES_RECEIVED.labels("rate-limited").inc()
            wait = int(self.settings.miss_cooldown - (now - last)) + 1
            return 429, {"error": f"{key} was tried {now - last:.0f}s ago; retry in {wait}s", "retry_after": wait}
        with self._lock:
            rate = self.settings.miss_rate_per_minute
            self._miss_tokens = min(rate, self._miss_tokens + (now - self._miss_refill) * rate / 60.0)
            self._miss_refill = now
            if self._miss_tokens < 1:
                MISSES_RECEIVED.labels("rate-limited").inc()
                return 429, {"error": f"too many publish-on-miss requests (limit {rate:g}/minute); retry later",
                             "retry_after": 60}
            self._miss_tokens -= 1
        status = self.enqueue(ref, "publish-on-miss")
        MISSES_RECEIVED.labels("queued").inc()
        return 202, {"status": status, "image": key}

    def status(self) -> dict[str, Any]:
        with self._lock:
            hist = [vars(s) for s in self.history.values()]
        return {"recipe": str(self.recipe_path), "recipe_error": self.recipe_error, "queue": self.queue.snapshot(),
                "images": hist}

    # -- recipe watching and polling --------------------------------------------------------------------------
    def _poller(self) -> None:
        self.full_pass()
        next_poll = time.monotonic() + self.settings.poll_interval
        while not self.stopping.is_set():
            self._wake.wait(timeout=max(0.0, next_poll - time.monotonic()))
            self._wake.clear()
            if self.stopping.is_set():
                return
            if self._recipe_changed.is_set():
                # debounce: editors write a file in several steps; wait until it has been quiet for `debounce`
                while True:
                    self._recipe_changed.clear()
                    if self.stopping.wait(self.settings.debounce):
                        return
                    if not self._recipe_changed.is_set():
                        break
                if not self.reload_recipe():
                    continue
            elif time.monotonic() < next_poll:
                continue
            else:
                self.check_recipe()  # in case the watcher missed an edit (network filesystems)
                if self._recipe_changed.is_set():
                    continue  # debounce and reload on the next turn, then pass
            self.full_pass()
            next_poll = time.monotonic() + self.settings.poll_interval

    def recipe_touched(self) -> None:
        self._recipe_changed.set()
        self._wake.set()

    def _recipe_signature(self) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(self.recipe_path)  # follows symlinks (ConfigMap-style ..data swaps included)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)

    def check_recipe(self) -> None:
        """Flag a reload when the recipe file is not the one last read (new inode, mtime or size)."""
        sig = self._recipe_signature()
        if sig is not None and sig != self._loaded_signature:
            self.recipe_touched()

    def _start_watcher(self) -> None:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        daemon = self
        names = {self.recipe_path.name, os.path.basename(os.path.realpath(self.recipe_path))}
        # watchdog's own debug lines would be events themselves when the log file sits beside the recipe
        logging.getLogger("watchdog").setLevel(max(logging.INFO, logging.getLogger("watchdog").getEffectiveLevel()))

        def concerns_recipe(path: bytes | str) -> bool:
            name = os.path.basename(os.fsdecode(path))
            # the recipe itself, or a Kubernetes ConfigMap's ..data / ..<timestamp> swap
            return name in names or name.startswith("..")

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                paths = [event.src_path, getattr(event, "dest_path", "")]
                if any(p and concerns_recipe(p) for p in paths):
                    # editors save by rename, in several steps: the file's own signature tells whether it changed
                    daemon.check_recipe()

        # watch the directory, not the file: atomic saves replace the file (new inode) by rename
        dirs = {os.path.dirname(self.recipe_path), os.path.dirname(os.path.realpath(self.recipe_path))}
        observer = Observer()
        for d in sorted(dirs):
            if not os.path.isdir(d):
                raise InvalidInputError(f"directory {d} of the recipe does not exist; cannot watch the recipe")
            observer.schedule(Handler(), d, recursive=False)
        observer.daemon = True
        observer.start()
        self._observer = observer

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> tuple[str, int]:
        host, port = parse_listen(self.settings.listen)
        self.server = make_server(self, host, port)
        bound_host, bound_port = self.server.server_address[:2]
        self.reload_recipe()
        self._start_watcher()
        threads = [threading.Thread(target=self.server.serve_forever, name="http", daemon=True),
                   threading.Thread(target=self._poller, name="poller", daemon=True)]
        threads += [threading.Thread(target=self._worker, name=f"worker-{i}", daemon=True)
                    for i in range(self.settings.workers)]
        for t in threads:
            t.start()
        log.info("publisher daemon listening on http://%s:%d/ (webhooks: /webhooks/registry, /webhooks/harbor; "
                 "/publish-on-miss, /metrics, /healthz, /status)", bound_host, bound_port)
        return str(bound_host), int(bound_port)

    def stop(self) -> bool:
        """Stop intake, wait for in-flight images (``shutdown_timeout``); True when nothing was abandoned."""
        self.stopping.set()
        self._wake.set()
        if self._observer is not None:
            self._observer.stop()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        self.queue.close()
        idle = self.queue.wait_idle(self.settings.shutdown_timeout)
        if not idle:
            log.warning("abandoning in-flight publishing of %s after %.0fs; it is redone on the next run",
                        ", ".join(self.queue.snapshot()["running"]), self.settings.shutdown_timeout)
        return idle


# -- HTTP ------------------------------------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    server_version = "cvmfs-snap-publisher"
    protocol_version = "HTTP/1.1"
    daemon: Daemon  # set on the subclass made by make_server

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s: " + format, self.address_string(), *args)

    def _send(self, code: int, payload: Any, content_type: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        body = payload if isinstance(payload, bytes) else (json.dumps(payload, indent=1) + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _body(self) -> bytes | None:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._send(HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length required"})
            return None
        n = int(length)
        if n > MAX_BODY:
            self.close_connection = True
            self._send(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"body larger than {MAX_BODY} bytes"})
            return None
        return self.rfile.read(n)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, generate_latest(metrics.REGISTRY), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            self._send(200, {"status": "ok", "recipe_error": self.daemon.recipe_error})
        elif path == "/status":
            self._send(200, self.daemon.status())
        else:
            self._send(404, {"error": f"no such endpoint {path}"})

    do_HEAD = do_GET

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        kinds = {"/webhooks/registry": "registry", "/webhooks/harbor": "harbor", "/webhooks": "auto"}
        if path not in kinds and path != "/publish-on-miss":
            self._send(404, {"error": f"no such endpoint {path}"})
            return
        body = self._body()
        if body is None:
            return
        # one shared secret guards every POST endpoint: registry webhooks and node reports alike
        if not check_authorization(self.headers.get("Authorization"), self.daemon.settings.webhook_secret):
            if path in kinds:
                WEBHOOKS_RECEIVED.labels(kinds[path], "unauthorized").inc()
            else:
                MISSES_RECEIVED.labels("unauthorized").inc()
            log.warning("POST %s from %s refused: missing or wrong Authorization", path, self.address_string())
            self._send(401, {"error": "missing or wrong Authorization header"},
                       headers={"WWW-Authenticate": 'Bearer realm="cvmfs-snap-publisher"'})
            return
        if path in kinds:
            kind = kinds[path]
            try:
                result = self.daemon.handle_webhook(kind, body)
            except InvalidInputError as exc:
                WEBHOOKS_RECEIVED.labels(kind, "invalid").inc()
                log.warning("malformed webhook from %s: %s", self.address_string(), exc)
                self._send(400, {"error": str(exc)})
                return
            WEBHOOKS_RECEIVED.labels(kind, "ok").inc()
            self._send(200, result)
            return
        try:
            code, payload = self.daemon.handle_miss(body)
        except InvalidInputError as exc:
            MISSES_RECEIVED.labels("invalid").inc()
            self._send(400, {"error": str(exc)})
            return
        headers = {"Retry-After": str(payload["retry_after"])} if code == 429 else None
        self._send(code, payload, headers=headers)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log instead of printing tracebacks; clients dropping idle keep-alive connections are routine."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            log.debug("http client %s went away: %s", client_address, exc)
        else:
            log.error("error serving a request from %s", client_address, exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


def make_server(daemon: Daemon, host: str, port: int) -> ThreadingHTTPServer:
    handler = type("Handler", (_Handler,), {"daemon": daemon})
    return (_Server6 if ":" in host else _Server)((host, port), handler)


# -- entry point -----------------------------------------------------------------------------------------------------
def run_daemon(args: argparse.Namespace, config: PublisherConfig) -> int:
    """``cvmfs-snap-publisher loop RECIPE``: serve until SIGTERM/SIGINT, then exit 0."""
    from publisher.pipeline import Publisher
    from publisher.recipe import Recipe

    stop = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    # handlers first: a SIGTERM that arrives while we start must still end in a clean exit 0
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        recipe_path = Path(str(getattr(args, "recipe", None) or "")).absolute()
        settings = daemon_settings(config)
        platforms_fixed = bool(config.platforms)
        try:
            # the recipe's http:// registries, repository and platforms complete the settings, as for `convert`
            from publisher.cli import recipe_into_config

            recipe_into_config(Recipe.load(recipe_path), config, args)
        except CvmfsSnapError as exc:
            # not fatal: the daemon serves and picks the recipe up once it is fixed
            log.error("recipe %s cannot be used yet: %s", recipe_path, exc)
        publisher = Publisher.from_config(config)
        daemon = Daemon(recipe_path, config, settings, publisher, publisher.client, publisher.backend,
                        load_recipe=Recipe.load, expand=lambda recipe, cl: list(recipe.expand(cl)),
                        state_dir=config.effective_state_dir(), recipe_platforms=not platforms_fixed)
        try:
            daemon.start()
        except OSError as exc:
            publisher.close()
            raise UnavailableError(
                f"cannot listen on {settings.listen}: {exc.strerror}; choose another daemon.listen address"
            ) from exc
        while not stop.wait(1.0):
            pass
    except CvmfsSnapError as exc:
        log.error("publisher daemon not started: %s", exc)
        return exc.exit_code
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    clean = daemon.stop()
    log.info("publisher daemon stopped%s", "" if clean else " (in-flight work abandoned)")
    if not clean:
        # worker threads and the pipeline's pool would keep the interpreter alive; the pipeline is crash-safe
        # (layers appear only complete, metadata last), so the next start redoes what was cut short
        logging.shutdown()
        os._exit(0)
    try:
        publisher.close()
    except Exception:
        log.debug("closing the publisher failed", exc_info=True)
    return 0
