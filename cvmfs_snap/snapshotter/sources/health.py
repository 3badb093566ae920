"""Is the CVMFS repository usable right now? Asked without ever blocking the caller for long.

A CVMFS repository is a FUSE mount behind autofs: the first ``stat`` of ``/cvmfs/<repo>`` mounts it, a crashed
``cvmfs2`` process leaves ``ENOTCONN``, a repository that cannot be reached gives ``EIO``/``ENOENT``, and a client
stuck on a dead proxy can make ``stat`` hang for minutes. The snapshotter calls us inside containerd's ``Prepare``,
so every file-system call on the repository runs in a worker thread with a timeout (:func:`call_with_timeout`), and the
answer is cached for a few seconds so a burst of ``Prepare`` calls costs one probe. How many such calls may hang at
once is a :class:`CallBudget` of each source (the registry gives every source its own), so one hung mount cannot make
another source refuse work.

The transitions (first success, available -> unavailable, unavailable -> available) are logged once each, so an
outage gives one line to act on instead of one per layer.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from cvmfs_snap.errors import UnavailableError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: xattrs the CVMFS client exposes on the repository root that we read for diagnostics (absent on plain dirs)
XATTR_REVISION = "user.revision"
XATTR_FQRN = "user.fqrn"

#: default number of calls one source may have in worker threads at once before it stops starting new ones: a hung
#: FUSE mount must not make us leak one thread per Prepare
MAX_STUCK_CALLS = 8


class CallBudget:
    """How many bounded calls of *one* source may be running (or stuck) at once; each source has its own, so a
    hung CVMFS mount cannot starve another source's calls."""

    def __init__(self, name: str, limit: int = MAX_STUCK_CALLS) -> None:
        self.name = name
        self.limit = limit
        self._lock = threading.Lock()
        self.running = 0

    def acquire(self, what: str) -> None:
        with self._lock:
            if self.running >= self.limit:
                raise UnavailableError(
                    f"{what}: {self.running} earlier calls of layer source {self.name} are still hanging; its "
                    "file system looks hung (for CVMFS check the cvmfs2 process and its proxies, e.g. "
                    "`cvmfs_config probe`)"
                )
            self.running += 1

    def release(self) -> None:
        with self._lock:
            self.running -= 1


def call_with_timeout(fn: Callable[[], T], timeout: float, what: str, budget: CallBudget) -> T:
    """Run ``fn`` in a daemon thread and wait at most ``timeout`` seconds for it.

    Daemon threads (not a ThreadPoolExecutor, whose workers are joined at exit) so that a ``stat`` stuck in a hung
    FUSE mount can never keep the snapshotter from exiting. Raises :class:`UnavailableError` on timeout or when too
    many earlier calls on ``budget`` are still stuck; exceptions of ``fn`` are re-raised in the caller.
    """
    budget.acquire(what)
    done = threading.Event()
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # handed to the caller
            error.append(exc)
        finally:
            budget.release()
            done.set()

    threading.Thread(target=run, name=f"{budget.name}-fs-call: {what[:40]}", daemon=True).start()
    if not done.wait(timeout):
        raise UnavailableError(
            f"{what}: no answer within {timeout:g} s; the CVMFS mount looks hung "
            "(check the cvmfs2 process and its proxies, e.g. `cvmfs_config probe`)"
        )
    if error:
        raise error[0]
    return result[0]


@dataclass(frozen=True)
class HealthStatus:
    """One observation of the repository root."""

    available: bool
    reason: str  # "" when available; else what failed, for logs and error messages
    revision: int | None  # CVMFS catalog revision (user.revision), None on plain directories
    fqrn: str | None  # fully qualified repository name (user.fqrn), None on plain directories
    checked_at: float  # time.monotonic() of the probe


def _read_xattr(path: Path, name: str) -> str | None:
    try:
        return os.getxattr(path, name).decode("utf-8", "replace").strip("\x00").strip()
    except OSError:
        return None


def _probe(root: Path) -> tuple[int | None, str | None]:
    """stat the root (which triggers autofs) and read the CVMFS xattrs; OSError means unavailable."""
    st = os.stat(root)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(root))
    # listing the root proves the FUSE daemon answers (a stale mount can still answer stat from the kernel cache)
    with os.scandir(root) as it:
        next(it, None)
    rev_text = _read_xattr(root, XATTR_REVISION)
    revision: int | None = None
    if rev_text:
        try:
            revision = int(rev_text)
        except ValueError:
            revision = None
    return revision, _read_xattr(root, XATTR_FQRN)


class RepositoryHealth:
    """Cached, timeout-bounded availability of one repository root; thread-safe."""

    def __init__(self, root: Path, *, ttl: float = 5.0, timeout: float = 5.0, name: str = "cvmfs",
                 budget: CallBudget | None = None) -> None:
        self.root = root
        self.budget = budget if budget is not None else CallBudget(name)
        self.ttl = ttl
        self.timeout = timeout
        self.name = name
        self._lock = threading.Lock()
        self._status: HealthStatus | None = None
        #: the availability last logged: None before the first probe, so the first result is logged too
        self._logged: bool | None = None

    def status(self, *, force: bool = False) -> HealthStatus:
        """The repository's health, probed at most once per ``ttl`` seconds (``force`` probes now)."""
        with self._lock:
            now = time.monotonic()
            cur = self._status
            if cur is not None and not force and now - cur.checked_at < self.ttl:
                return cur
            new = self._probe_now()
            self._status = new
            self._log_transition(new)
            return new

    def require(self, what: str) -> HealthStatus:
        """Return the status if available, else raise UnavailableError explaining what cannot be done.

        A cached "unavailable" is probed again first: this guards mounts (a container start), where being right
        as soon as the repository is back matters more than the cost of one bounded probe."""
        st = self.status()
        if not st.available:
            st = self.status(force=True)
        if not st.available:
            raise UnavailableError(
                f"{what}: the CVMFS repository at {self.root} is not available ({st.reason}); check the CVMFS client "
                "on this node (`cvmfs_config probe`, `cvmfs_config stat`), the snapshotter retries by itself"
            )
        return st

    def mark_unavailable(self, reason: str) -> None:
        """Record a failure seen outside a probe (e.g. EIO while reading a layer) so the next calls skip CVMFS."""
        with self._lock:
            new = HealthStatus(False, reason, None, None, time.monotonic())
            self._status = new
            self._log_transition(new)

    def _probe_now(self) -> HealthStatus:
        try:
            revision, fqrn = call_with_timeout(lambda: _probe(self.root), self.timeout,
                                               f"probing CVMFS repository {self.root}", self.budget)
        except UnavailableError as exc:
            return HealthStatus(False, str(exc), None, None, time.monotonic())
        except OSError as exc:
            code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            return HealthStatus(False, f"{code}: {exc.strerror or exc}", None, None, time.monotonic())
        return HealthStatus(True, "", revision, fqrn, time.monotonic())

    def _log_transition(self, st: HealthStatus) -> None:
        if st.available == self._logged:
            return
        prev, self._logged = self._logged, st.available
        if st.available:
            detail = ""
            if st.fqrn or st.revision is not None:
                detail = f" (repository {st.fqrn or '?'}, revision {st.revision if st.revision is not None else '?'})"
            if prev is None:
                log.info("layer source %s: CVMFS repository %s is available%s", self.name, self.root, detail)
            else:
                log.warning("layer source %s: CVMFS repository %s is available again%s; layers are served from "
                            "CVMFS again", self.name, self.root, detail)
        else:
            log.error("layer source %s: CVMFS repository %s is unavailable (%s); images are pulled normally until "
                      "it comes back. Check the CVMFS client on this node (`cvmfs_config probe`).",
                      self.name, self.root, st.reason)
