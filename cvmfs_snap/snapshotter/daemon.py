"""``cvmfs-snap snapshotter``: the containerd proxy snapshotter daemon.

Flags, defaults and config file match the official cvmfs containerd snapshotter (``containerd-cvmfs-grpc``), so it
is a drop-in replacement: containerd's ``[proxy_plugins.cvmfs-snapshotter]`` keeps pointing at
``/run/containerd-cvmfs-grpc/containerd-cvmfs-grpc.sock``. See :mod:`cvmfs_snap.snapshotter.config` for the file.

The daemon never mounts anything for containers (containerd does, from our answers), so stopping or restarting it
leaves running containers alone; all state is in ``<root>/metadata.db``.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import signal
import socket
import stat
import threading
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import grpc

from ..errors import InvalidInputError, UnavailableError
from ..procmem import limit_malloc_arenas
from .config import Config, load_config
from .core import Snapshotter
from .credentials import CredentialServer, PullCredentials, socket_for
from .defaults import DEFAULT_ADDRESS, DEFAULT_ROOT
from .metrics import Metrics
from .service import add_to_server
from .sources.base import LayerSource
from .sources.registry import SourceSettings, vouching
from .sources.registry import build_sources as build_registered
from .store import DB_NAME, Store

if TYPE_CHECKING:
    from .missreport import MissReporter

log = logging.getLogger(__name__)

#: logrus level names the official snapshotter accepts, mapped to Python's
LOG_LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
              "warning": logging.WARNING, "error": logging.ERROR, "fatal": logging.CRITICAL,
              "panic": logging.CRITICAL}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None,
                        help="TOML configuration file (default /etc/containerd-cvmfs-grpc/config.toml if it exists)")
    parser.add_argument("--address", default=DEFAULT_ADDRESS,
                        help=f"unix socket to serve containerd's snapshot API on (default {DEFAULT_ADDRESS})")
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT,
                        help=f"directory for snapshots and metadata (default {DEFAULT_ROOT})")
    parser.add_argument("--log-level", default="info", choices=sorted(LOG_LEVELS),
                        help="logging level (default info)")


def build_sources(cfg: Config, root: Path, pull_credentials: PullCredentials | None = None) -> list[LayerSource]:
    """The configured sources in order (sources/registry.py), each with its state dir ``<root>/<name>``."""
    handed = pull_credentials if pull_credentials is not None else PullCredentials()
    settings = SourceSettings(repository_root=cfg.mountpoint, options=cfg.source_options, lazy=cfg.lazy,
                              pull_credentials=handed)
    return build_registered(cfg.sources, settings, root)


def build_reporter(cfg: Config, sources: list[LayerSource], metrics: Metrics) -> MissReporter | None:
    """The publish-on-miss reporter when ``publish-on-miss-url`` is set and a CVMFS source can vouch for misses.

    A miss means something only while the CVMFS repository answers, so the reporter asks the health of the
    sources that vouch for misses (the registry says which: the CVMFS one); without one nothing is reported."""
    if not cfg.publish_on_miss_url:
        return None
    judges = vouching(sources)
    if not judges:
        log.warning("publish-on-miss-url is set but no configured layer source reports CVMFS health (sources: %s): "
                    "misses are not reported", ", ".join(s.name for s in sources) or "none")
        return None

    def available() -> bool:
        return all(s.health().available for s in judges)

    # imported only when misses are reported: the reporter's HTTP client (httpx, ssl) and its counter
    # (prometheus_client) are several MiB of this daemon's RSS (bench/README.md "Resident memory")
    from .missreport import MissReporter

    return MissReporter(cfg.publish_on_miss_url, secret=cfg.publish_on_miss_secret, available=available,
                        registry=metrics.registry)


#: lock file in the root: one snapshotter per root, whatever its socket
ROOT_LOCK = "lock"


def _exclusive(path: Path, what: str) -> int:
    """Hold an exclusive flock on ``path`` for the life of the process (the kernel drops it when we die)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UnavailableError(f"{what} is in use by another cvmfs-snap snapshotter (it holds {path}): stop it "
                               "first, or give this one its own --root and --address") from None
    return fd


def _prepare_socket(address: str) -> None:
    """Make way for our socket: a stale one (nobody answers) is removed, a live one refused (and left alone)."""
    path = Path(address)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise InvalidInputError(f"{path} exists and is not a socket: remove it or choose another --address")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(str(path))
        except OSError:
            log.info("removing stale socket %s", path)
            path.unlink()
            return
    raise UnavailableError(f"another process is already serving on {path}: stop it first or choose another --address")


class Daemon:
    """The running server: core + gRPC + metrics. ``start()``, then ``stop()`` (idempotent)."""

    def __init__(self, cfg: Config, address: str, root: Path,
                 sources: list[LayerSource] | None = None) -> None:
        self.cfg = cfg
        self.address = address
        self.root = Path(root)
        self.metrics = Metrics(enabled=bool(cfg.metrics_address or cfg.publish_on_miss_url))
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        # before anything touches the root (sources clean their temporaries at start, Cleanup collects unknown dirs)
        self._locks = [_exclusive(self.root / ROOT_LOCK, f"snapshotter root {self.root}")]
        #: credentials ``cvmfs-snap pull`` hands over on the credentials socket (memory only, with a TTL)
        self.pull_credentials = PullCredentials()
        self.credentials_server: CredentialServer | None = None
        self.sources = sources if sources is not None else build_sources(cfg, self.root, self.pull_credentials)
        self.reporter = build_reporter(cfg, self.sources, self.metrics)
        self.core = Snapshotter(self.root, Store(self.root / DB_NAME), self.sources, observer=self.metrics,
                                on_miss=self.reporter.miss if self.reporter is not None else None)
        self.core.restore_sources()
        self.server: grpc.Server | None = None
        #: (st_dev, st_ino) of the socket we bound; only that file is ours to unlink
        self._socket_id: tuple[int, int] | None = None
        self.metrics_bound: tuple[str, int] | None = None
        self._stopped = threading.Event()

    def start(self) -> None:
        self._locks.append(_exclusive(Path(self.address + ".lock"), f"socket {self.address}"))
        _prepare_socket(self.address)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=self.cfg.grpc_workers,
                                                        thread_name_prefix="snapshots"),
                             options=[("grpc.max_receive_message_length", 16 << 20)])
        add_to_server(server, self.core, self.metrics)
        old = os.umask(0o177)  # the socket is born 0600: only root (containerd) may talk to us
        try:
            if server.add_insecure_port(f"unix:{self.address}") == 0:
                raise UnavailableError(f"cannot listen on unix socket {self.address}")
            server.start()
        finally:
            os.umask(old)
        os.chmod(self.address, 0o600)
        st = os.lstat(self.address)
        self._socket_id = (st.st_dev, st.st_ino)
        self.server = server
        cred_sock = socket_for(self.address)
        _prepare_socket(str(cred_sock))
        self.credentials_server = CredentialServer(cred_sock, self.pull_credentials)
        self.credentials_server.start()
        if self.reporter is not None:
            self.reporter.start()
        if self.cfg.metrics_address:
            self.metrics_bound = self.metrics.serve(self.cfg.metrics_address)
        log.info("cvmfs-snap snapshotter serving on %s (root %s, sources: %s)", self.address, self.root,
                 ", ".join(s.name for s in self.sources) or "none")

    def stop(self, grace: float = 5.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self.server is not None:
            self.server.stop(grace).wait()
        if self.credentials_server is not None:
            self.credentials_server.close()
        if self.reporter is not None:
            self.reporter.close()
        self.metrics.stop()
        self.core.close()
        self._remove_own_socket()
        for fd in self._locks:  # lock files stay: unlinking them would let two instances lock different files
            os.close(fd)
        self._locks = []
        log.info("cvmfs-snap snapshotter stopped")

    def _remove_own_socket(self) -> None:
        """Unlink the socket only if it is the one we bound: an instance that refused to start (another one serves
        there) or whose socket was replaced meanwhile must not cut the running one off from containerd."""
        if self._socket_id is None:
            return
        try:
            st = os.lstat(self.address)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) == self._socket_id and stat.S_ISSOCK(st.st_mode):
            os.unlink(self.address)
        else:
            log.warning("%s is no longer the socket this snapshotter bound: left in place", self.address)


def main(args: argparse.Namespace) -> int:
    logging.getLogger().setLevel(LOG_LEVELS.get(str(args.log_level), logging.INFO))
    limit_malloc_arenas()  # before gRPC's threads start
    cfg = load_config(args.config)
    daemon = Daemon(cfg, str(args.address), Path(args.root))
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("got %s: stopping", signal.Signals(signum).name)
        stop.set()

    previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, on_signal)
    try:
        daemon.start()
        while not stop.wait(3600):
            pass
    finally:
        daemon.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0
