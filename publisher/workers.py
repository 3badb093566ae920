"""Layers unpacked in worker processes, so that publishing uses every core.

Unpacking a layer is mostly per-entry Python work (tar headers, path checks, a dozen syscalls per file) that holds
the GIL, so layer threads of one process barely overlap: a file-heavy image gained nothing from a second worker.
Here the pipeline keeps what is cheap and shared in its own process (the HTTP download, the blob digest check,
progress) and hands the backend an :class:`OffloadedLayer` instead of a decoded tar. A backend step marked
:func:`offloadable` (``unpack_layer_dir``, ``spool_and_validate``: a tar in, a directory or spool file below a
staging path out, a :class:`LayerRecord` back) then runs in one of a bounded pool of worker processes:

- the compressed bytes go through a FIFO in a private (0700) directory; the worker decodes them (diffID, hashed
  once there; the blob digest is checked by the publisher process only), checks and applies the tar into the path
  it was given and returns the record;
- only paths, plain values and the result cross the process boundary (the step itself is pickled by its name);
- an exception raised in the worker arrives as the same exception (``CvmfsSnapError`` kinds and messages survive
  pickling); a download error in this process wins over the truncated-tar error it causes in the worker;
- the caller returns only after the worker has finished, so no worker writes below a staging directory that the
  backend is about to remove; workers die with the publisher (a pidfd watch) and a crash point reached in a worker
  kills the whole publisher, as ``kill -9`` of the service would (see :mod:`publisher.crashpoints`).

The pool uses the ``forkserver`` start method: workers are forked from a small server process that imported the
layer code once, never from the multi-threaded publisher itself.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import select
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Concatenate, Generic, ParamSpec, Protocol

from cvmfs_snap.errors import FailedPreconditionError
from cvmfs_snap.fsutil import remove_tree_quietly
from cvmfs_snap.layer import open_layer
from cvmfs_snap.layer.compression import LayerStream
from cvmfs_snap.layer.digesting import Readable
from cvmfs_snap.layer.limits import Limits
from cvmfs_snap.layout import LayerRecord

from . import crashpoints
from .backends.base import LayerInfo, TarStream

log = logging.getLogger(__name__)

P = ParamSpec("P")
#: one unpack step: a layer's tar in, something below ``target`` out, the layer's record back (further arguments,
#: e.g. limits, are passed on and must pickle)
Step = Callable[Concatenate[LayerInfo, TarStream, Path, P], LayerRecord]


class Job(Protocol):
    """What a worker process runs: an offloadable step with its further arguments bound."""

    def __call__(self, info: LayerInfo, tar: TarStream, target: Path, /) -> LayerRecord: ...


class BoundStep(Generic[P]):
    """An offloadable step and its further arguments, as one :class:`Job` (pickled: the step by name, the
    arguments by value)."""

    def __init__(self, step: Step[P], /, *args: P.args, **kwargs: P.kwargs) -> None:
        self.step = step
        self.args = args
        self.kwargs = kwargs

    def __call__(self, info: LayerInfo, tar: TarStream, target: Path, /) -> LayerRecord:
        return self.step(info, tar, target, *self.args, **self.kwargs)

_CHUNK = 1 << 20
#: ``<tmp>/cvmfs-snap-workers-<publisher pid>-<random>/``: the FIFOs of one publisher
_FIFO_DIR_PREFIX = "cvmfs-snap-workers-"


class OffloadedLayer:
    """A layer blob not decoded yet, as the pipeline hands it to ``Backend.publish_layer``.

    An :func:`offloadable` step given this runs in a worker process. Anything else may still ``read`` it: the blob
    is then decoded here, in the calling thread, exactly as ``open_layer`` would (``diff_id`` as on a LayerStream).
    """

    def __init__(self, raw: Readable, media_type: str, name: str, workers: LayerWorkers,
                 limits: Limits | None = None) -> None:
        self.raw = raw
        self.media_type = media_type
        self.name = name
        self.limits = limits
        self._workers = workers
        self._tar: LayerStream | None = None
        self._offloaded = False

    def read(self, n: int = -1, /) -> bytes:
        if self._offloaded:
            raise RuntimeError(f"{self.name}: already handed to a worker process")
        if self._tar is None:
            self._tar = open_layer(self.raw, self.media_type, name=self.name, limits=self.limits)
        return self._tar.read(n)

    @property
    def diff_id(self) -> str | None:
        """sha256 of the uncompressed tar once read here to EOF (None when unpacked in a worker)."""
        return self._tar.diff_id if self._tar is not None else None

    def can_offload(self) -> bool:
        """Nothing was read here yet and worker processes can run."""
        return self._tar is None and not self._offloaded and self._workers.usable

    def offload(self, job: Job, info: LayerInfo, target: Path) -> LayerRecord:
        """Run ``job`` (an :func:`offloadable` step, bound) on this layer in a worker process (here, should none
        start)."""
        self._offloaded = True
        try:
            return self._workers.run(job, info, self, target)
        except WorkersUnavailable:  # nothing was read from the blob yet: decode it here instead
            self._offloaded = False
            self._tar = open_layer(self.raw, self.media_type, name=self.name, limits=self.limits)
            return job(info, self, target)


#: modules defining offloadable steps, imported by the forkserver before it forks workers
_STEP_MODULES: set[str] = set()


def offloadable(job: Step[P]) -> Step[P]:
    """Mark a backend's unpack step ``(info, tar, target, ...)``: given an :class:`OffloadedLayer` it runs in a
    worker process.

    The step must be a module-level function (it is sent to the worker by name) that only writes below ``target``;
    further arguments are sent along (they must pickle). Called with any other tar stream (and so inside the worker)
    it runs as it is.
    """
    _STEP_MODULES.add(job.__module__)

    @functools.wraps(job)
    def step(info: LayerInfo, tar: TarStream, target: Path, /, *args: P.args, **kwargs: P.kwargs) -> LayerRecord:
        if isinstance(tar, OffloadedLayer) and tar.can_offload():
            return tar.offload(BoundStep(step, *args, **kwargs), info, target)
        return job(info, tar, target, *args, **kwargs)

    return step


class LayerWorkers:
    """A bounded pool of worker processes for :func:`offloadable` steps; started on first use. Thread-safe."""

    def __init__(self, processes: int) -> None:
        self.processes = max(1, processes)
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._dir: Path | None = None
        self._disabled = False
        self._closed = False

    def start(self) -> None:
        """Start the pool and its workers in the background (the first layer then finds them warm)."""
        if self._pool is None and not self._disabled and not self._closed:
            threading.Thread(target=self._warm_up, name="layer-workers-start", daemon=True).start()

    def _warm_up(self) -> None:
        try:
            pool, _ = self._get_pool()
            for _i in range(self.processes):
                pool.submit(time.sleep, 0)
        except Exception as exc:  # the first layer reports it
            log.debug("starting layer worker processes failed: %s", exc)

    def layer(self, raw: Readable, media_type: str, name: str, limits: Limits | None = None) -> OffloadedLayer:
        """The blob ``raw`` for an offloadable step (``limits``: as for ``open_layer``)."""
        return OffloadedLayer(raw, media_type, name, self, limits)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
            fifo_dir, self._dir = self._dir, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if fifo_dir is not None:
            remove_tree_quietly(fifo_dir)

    def _get_pool(self) -> tuple[ProcessPoolExecutor, Path]:
        with self._lock:
            if self._closed:
                raise RuntimeError("layer workers are closed")
            if self._pool is None or self._dir is None:
                ctx = _forkserver_context()
                root = logging.getLogger()
                fmt = next((h.formatter._fmt for h in root.handlers if h.formatter is not None
                            and h.formatter._fmt), None)
                _clean_abandoned_fifo_dirs()
                self._dir = Path(tempfile.mkdtemp(prefix=f"{_FIFO_DIR_PREFIX}{os.getpid()}-"))  # mode 0700
                self._pool = ProcessPoolExecutor(
                    self.processes, mp_context=ctx, initializer=_init_worker,
                    initargs=(os.getpid(), root.level, fmt, crashpoints.share_with_workers(ctx)),
                )
            return self._pool, self._dir

    def _broken(self, pool: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is pool:
                self._pool = None
        pool.shutdown(wait=False, cancel_futures=True)

    @property
    def usable(self) -> bool:
        """False once worker processes could not be started here (layers are then unpacked in the caller)."""
        return not self._disabled

    def run(self, job: Job, info: LayerInfo, layer: OffloadedLayer, target: Path) -> LayerRecord:
        """Run ``job`` in a worker on the blob ``layer.raw``; raises :class:`WorkersUnavailable` (nothing read from
        the blob yet) when no worker process could be started."""
        pool, fifo_dir = self._get_pool()
        fifo = fifo_dir / f"{uuid.uuid4().hex}.fifo"
        os.mkfifo(fifo, 0o600)
        args = (job, info, str(fifo), layer.media_type, layer.name, layer.limits, os.fspath(target))
        try:
            try:
                fut = pool.submit(_work, *args)
            except BrokenProcessPool:  # a worker died earlier (the OOM killer?): start a new pool, once
                self._broken(pool)
                pool, _ = self._get_pool()
                fut = pool.submit(_work, *args)
            try:
                wfd = _connect(fifo, fut)
            except BrokenProcessPool as exc:  # no worker came up to read the FIFO
                self._broken(pool)
                self._disable(exc)
                raise WorkersUnavailable(str(exc)) from None
            except BaseException:
                _unblock(fifo)  # the worker may wait in open(): give it an EOF so it ends
                _wait_quietly(fut)
                raise
        finally:
            fifo.unlink(missing_ok=True)
        pump_error: BaseException | None = None
        try:
            _pump(layer.raw, wfd)
        except BrokenPipeError:
            pass  # the worker stopped reading: its result says why
        except BaseException as exc:  # the download failed (or was cut): the worker sees a truncated tar
            pump_error = exc
        finally:
            os.close(wfd)
        try:
            rec = fut.result()  # always wait: the worker must be done with ``target`` before the caller goes on
        except BrokenProcessPool as exc:
            self._broken(pool)
            if pump_error is not None:
                raise pump_error from None
            raise FailedPreconditionError(
                f"{layer.name}: the worker process unpacking it died ({exc}); check the system log for the OOM "
                "killer or a crash, then publish again"
            ) from None
        except BaseException:
            if pump_error is not None:
                raise pump_error from None
            raise
        if pump_error is not None:
            raise pump_error
        return rec

    def _disable(self, exc: BaseException) -> None:
        with self._lock:
            if self._disabled:
                return
            self._disabled = True
        log.warning("cannot start layer worker processes (%s); unpacking layers in the publisher's threads, which "
                    "cannot use more than one core. Is the program's main module importable without side effects "
                    "(multiprocessing 'forkserver')?", exc)


def _forkserver_context() -> multiprocessing.context.BaseContext:
    ctx = multiprocessing.get_context("forkserver")
    # workers fork warm, with the steps' modules imported once (a forkserver already running keeps what it
    # preloaded); not the main module (a command line: its config and HTTP client imports, which no worker uses),
    # unless a step is defined there
    ctx.set_forkserver_preload([__name__, *sorted(_STEP_MODULES)])
    return ctx


def start_forkserver() -> None:
    """Start the forkserver now, in the background: a fresh interpreter importing the layer code (0.15-0.2 s of
    CPU), which a command should start before its own remaining imports and registry round trips rather than after
    them, so that the first layer does not wait for it. The modules defining offloadable steps must be imported
    (their steps registered) first. Failures are left to the first layer (which then unpacks in the caller)."""
    _forkserver_context()
    try:
        multiprocessing.forkserver.ensure_running()
    except Exception as exc:
        log.debug("starting the forkserver failed: %s", exc)


class WorkersUnavailable(Exception):
    """No worker process could be started; nothing of the layer was read yet (internal to this module)."""


def _clean_abandoned_fifo_dirs() -> None:
    """FIFO directories of publishers that were killed (named after their pid, ours, that pid gone)."""
    tmp = Path(tempfile.gettempdir())
    try:
        names = [n for n in os.listdir(tmp) if n.startswith(_FIFO_DIR_PREFIX)]
    except OSError:
        return
    for name in names:
        pid = name[len(_FIFO_DIR_PREFIX):].partition("-")[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            if os.lstat(tmp / name).st_uid != os.geteuid():
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            remove_tree_quietly(tmp / name)
        except OSError:
            continue


def _connect(fifo: Path, fut: Future[LayerRecord]) -> int:
    """Open the FIFO for writing once the worker opened it for reading (non-blocking polls: never wait on a
    worker that failed before opening it)."""
    delay = 0.0005
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
        else:
            os.set_blocking(fd, True)
            with contextlib.suppress(OSError):  # above /proc/sys/fs/pipe-max-size the default size works too
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _CHUNK)
            return fd
        if fut.done():
            fut.result()  # raises what the worker raised
            raise FailedPreconditionError(f"worker process ended without reading {fifo}")
        time.sleep(delay)
        delay = min(delay * 2, 0.005)


def _unblock(fifo: Path) -> None:
    try:
        rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC))
    except OSError:
        pass
    finally:
        os.close(rfd)


def _wait_quietly(fut: Future[LayerRecord]) -> None:
    with contextlib.suppress(BaseException):  # the caller raises its own error
        fut.result()


def _pump(raw: Readable, fd: int) -> None:
    while True:
        chunk = raw.read(_CHUNK)
        if not chunk:
            return
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view):]


# -- in the worker process -------------------------------------------------------------------------------------------
def _init_worker(publisher_pid: int, level: int, fmt: str | None,
                 crash_state: crashpoints.SharedState | None) -> None:
    _die_with(publisher_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the publisher, which shuts the pool down
    logging.basicConfig(level=level, format=fmt or logging.BASIC_FORMAT)
    crashpoints.join_from_worker(crash_state)


def _die_with(pid: int) -> None:
    """SIGKILL this worker when the publisher process ends, however it ends.

    Neither EOF on the pool's pipes (every worker holds both ends of the call queue) nor ``PR_SET_PDEATHSIG`` (the
    parent is the forkserver, which lives while workers do) would tell a worker that a publisher killed with
    ``kill -9`` is gone; a pidfd becomes readable when the process exits."""
    try:
        pidfd: int | None = os.pidfd_open(pid)
    except ProcessLookupError:
        os.kill(os.getpid(), signal.SIGKILL)
        return
    except (OSError, AttributeError):  # kernel before 5.3: poll
        pidfd = None

    def watch() -> None:
        if pidfd is not None:
            select.select([pidfd], [], [])
        else:
            while True:
                time.sleep(0.5)
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="watch-publisher", daemon=True).start()


class _CheckedBlob:
    """The blob as the publisher process sends it. That process checks its digest on the way (``BlobStream``) and
    fails the layer on a mismatch, so it is not hashed again here: like any stream that knows the digest of what it
    yields, it says so with ``diff_id`` (see cvmfs_snap.layer.digesting)."""

    def __init__(self, f: Readable, digest: str) -> None:
        self._f = f
        self._digest = digest
        self._eof = False

    def read(self, n: int = -1, /) -> bytes:
        data = self._f.read(n)
        if not data and n != 0:
            self._eof = True
        return data

    @property
    def diff_id(self) -> str | None:
        return self._digest if self._eof else None


def _work(job: Job, info: LayerInfo, fifo: str, media_type: str, name: str, limits: Limits | None,
          target: str) -> LayerRecord:
    with open(fifo, "rb", buffering=0) as f:
        raw = _CheckedBlob(f, info.digest)
        with open_layer(raw, media_type, name=name, limits=limits) as tar:
            rec = job(info, tar, Path(target))
        while raw.read(_CHUNK):  # normally nothing left: the decoders read their input to its end
            pass
    return rec
