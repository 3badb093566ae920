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

This module wires the parts and runs the recipe side; the others have one job each: :mod:`publisher.workqueue`
(the queue), :mod:`publisher.policy` (what the recipe and the allow-list admit, one spelling per registry),
:mod:`publisher.intake` (what webhooks and publish-on-miss reports queue), :mod:`publisher.httpapp` (the endpoint)
and :mod:`publisher.httpserver` (serving it).

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
import logging
import os
import signal
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from prometheus_client import Counter
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from cvmfs_snap.errors import CvmfsSnapError, InvalidInputError, UnavailableError
from cvmfs_snap.oci.reference import ImageReference
from publisher import metrics
from publisher.config import DaemonConfig, PublisherConfig
from publisher.factory import make_publisher
from publisher.gc import record_unwanted
from publisher.httpapp import Endpoint
from publisher.httpserver import HttpServer
from publisher.intake import Intake
from publisher.pipeline import Publisher
from publisher.policy import canonical_ref, recipe_into_config, recipe_patterns
from publisher.recipe import Recipe
from publisher.wishlist import Wishlist, publish_on_miss_keep
from publisher.workqueue import QueueItem, WorkQueue

log = logging.getLogger(__name__)

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

    def __init__(self, recipe_path: Path, settings: DaemonConfig, publisher: Publisher, *, state_dir: Path,
                 recipe_platforms: bool = True) -> None:
        self.recipe_path = recipe_path
        self.settings = settings
        self.publisher = publisher
        self.state_dir = state_dir
        self._recipe_platforms = recipe_platforms
        self.queue = WorkQueue()
        self.intake = Intake(settings, self.queue, publisher.backend)
        self.stopping = threading.Event()
        self._recipe_changed = threading.Event()
        self._wake = threading.Event()
        self.recipe: Recipe | None = None
        self.recipe_error: str | None = None
        self._loaded_signature: tuple[int, int, int, int] | None = None
        self._lock = threading.Lock()
        self.history: OrderedDict[str, ImageStatus] = OrderedDict()
        self._observer: BaseObserver | None = None
        self.server: HttpServer | None = None

    # -- recipe ------------------------------------------------------------------------------------------------
    def reload_recipe(self) -> bool:
        """Read the recipe; on error keep the previous one (a half-saved file must not empty the wishlist)."""
        self._loaded_signature = self._recipe_signature()
        try:
            recipe = Recipe.load(self.recipe_path)
        except CvmfsSnapError as exc:
            self.recipe_error = str(exc)
            log.error("recipe %s not (re)loaded, keeping the previous one: %s", self.recipe_path, exc)
            return False
        except OSError as exc:
            self.recipe_error = f"cannot read {self.recipe_path}: {exc.strerror}"
            log.error("recipe not (re)loaded, keeping the previous one: %s", self.recipe_error)
            return False
        patterns = recipe_patterns(recipe)
        with self._lock:
            self.recipe = recipe
            self.recipe_error = None
        self.intake.use_patterns(patterns)
        # the recipe's own `platforms:` applies when the configuration does not restrict platforms
        if self._recipe_platforms:
            self.publisher.platforms = list(recipe.platforms)
        log.info("recipe %s loaded: %d input(s)", self.recipe_path, len(patterns))
        return True

    def full_pass(self) -> int:
        """Expand the recipe (tag lists re-read) and queue every image; returns how many were queued."""
        with self._lock:
            recipe = self.recipe
        if recipe is None:
            return 0
        try:
            # one spelling per image, for the queue and for the schedule alike (gc compares .metadata names)
            refs = [canonical_ref(ref) for ref in recipe.expand(self.publisher.client)]
        except CvmfsSnapError as exc:
            log.error("recipe %s could not be expanded: %s", self.recipe_path, exc)
            return 0
        for err in recipe.errors:
            # a broken line fails on its own, visible in /status like a failed image
            self._record(ImageStatus(str(err.input), "recipe", False, str(err.message), time.time()))
        n = 0
        for ref in refs:
            if self.queue.request(ref, "poll") == "queued":
                n += 1
        log.info("full pass over %s: %d image(s), %d newly queued", self.recipe_path, len(refs), n)
        self.schedule_unwanted(recipe, refs)
        return n

    def schedule_unwanted(self, recipe: Recipe, refs: list[ImageReference]) -> None:
        """After a full pass: images the recipe no longer names go to the remove schedule (``gc`` removes them
        after the grace period), images it names again leave it. Skipped, with a log line, when the recipe file
        could not be re-read or any line failed: a typo or a registry outage must never schedule images."""
        problems = [f"recipe line {e.message}" for e in recipe.errors if e.whole_line]  # an invalid tag blocks nothing
        if self.recipe_error:
            problems.insert(0, f"recipe {self.recipe_path} not reloaded: {self.recipe_error}")
        keep = publish_on_miss_keep(self.settings.publish_on_miss_allow)
        wishlist = Wishlist.from_refs(refs, problems, keep)
        try:
            record_unwanted(self.publisher.backend, self.state_dir, wishlist)
        except CvmfsSnapError as exc:
            log.error("images dropped from the recipe not scheduled for removal this pass: %s", exc)

    # -- queue -------------------------------------------------------------------------------------------------
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
        self.intake.attempted(item.key)
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

    def health(self) -> dict[str, object]:
        return {"status": "ok", "recipe_error": self.recipe_error}

    def status(self) -> dict[str, object]:
        with self._lock:
            hist = [dataclasses.asdict(s) for s in self.history.values()]
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
        endpoint = Endpoint(self.intake, self.settings, health=self.health, status=self.status)
        self.server = HttpServer(endpoint, self.settings)
        bound_host, bound_port = self.server.start()
        self.reload_recipe()
        self._start_watcher()
        threads = [threading.Thread(target=self._poller, name="poller", daemon=True)]
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
            self.server.stop()
        self.queue.close()
        idle = self.queue.wait_idle(self.settings.shutdown_timeout)
        if not idle:
            log.warning("abandoning in-flight publishing of %s after %.0fs; it is redone on the next run",
                        ", ".join(self.queue.snapshot()["running"]), self.settings.shutdown_timeout)
        return idle


# -- entry point -----------------------------------------------------------------------------------------------------
def run_daemon(args: argparse.Namespace, config: PublisherConfig) -> int:
    """``cvmfs-snap-publisher loop RECIPE``: serve until SIGTERM/SIGINT, then exit 0."""
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
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
            recipe_into_config(Recipe.load(recipe_path), config, args)
        except CvmfsSnapError as exc:
            # not fatal: the daemon serves and picks the recipe up once it is fixed
            log.error("recipe %s cannot be used yet: %s", recipe_path, exc)
        publisher = make_publisher(config)
        daemon = Daemon(recipe_path, settings, publisher, state_dir=config.effective_state_dir(),
                        recipe_platforms=not platforms_fixed)
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
