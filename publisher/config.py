"""Publisher settings: one dataclass, filled from an optional YAML file and then from command-line flags.

Why a file at all: the stratum-0 runs the publisher as a service (``loop``) and as a cron job (``convert``); both
should read the same site settings (backend, repository, credentials file, insecure registries) without repeating
them on every command line. Flags given on the command line always win over the file.

Example ``/etc/cvmfs-snap/publisher.yaml``::

    backend: cvmfs-ingest
    repo: unpacked.cern.ch
    cvmfs_server: /usr/bin/cvmfs_server
    concurrency: 4
    insecure_registries: ["registry.internal:5000"]
    platforms: [linux/amd64, linux/arm64]
    grace_period_days: 7
    state_dir: /var/spool/cvmfs-snap/unpacked.cern.ch
    limits:                      # defaults in cvmfs_snap/layer/limits.py and docs/publisher.md
      max_expanded_size: 107374182400
      allow_devices: false
    daemon:
      listen: 127.0.0.1:8080
      poll_interval: 300
      debounce: 5
      publish_on_miss_allow: ["registry.cern.ch/atlas/*"]
      workers: 2
      miss_cooldown: 60
      miss_rate_per_minute: 30
      shutdown_timeout: 30
      # webhook_secret: better in the environment, CVMFS_SNAP_WEBHOOK_SECRET
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from cvmfs_snap.errors import InvalidInputError
from cvmfs_snap.layer.limits import Limits

BACKENDS = ("local", "cvmfs-ingest", "cvmfs-transaction")

_REPO_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class DaemonConfig:
    """Settings of ``loop`` (the daemon, see ``publisher.daemon``)."""

    #: host:port of the HTTP endpoint (webhooks, /metrics, /healthz)
    listen: str = "127.0.0.1:8080"
    #: seconds between two full passes over the recipe (tag lists re-read, moved tags republished)
    poll_interval: float = 300.0
    #: seconds to wait after a webhook before publishing, to coalesce bursts of pushes
    debounce: float = 5.0
    #: ``registry/repository`` globs the daemon may publish on demand (publish-on-miss); empty: none
    publish_on_miss_allow: list[str] = field(default_factory=list)
    #: shared secret webhooks must send (``Authorization: Bearer <secret>``); None: taken from the environment
    #: variable ``CVMFS_SNAP_WEBHOOK_SECRET``, and when that is unset too every webhook is accepted. Prefer the
    #: environment (a systemd ``EnvironmentFile`` readable only by the publisher) over a world-readable file.
    webhook_secret: str | None = None
    #: images published side by side (layers inside each image overlap according to ``concurrency``)
    workers: int = 2
    #: seconds: a publish-on-miss request for an image tried less than this long ago is answered 429
    miss_cooldown: float = 60.0
    #: publish-on-miss requests queued per minute at most (token bucket); the others are answered 429
    miss_rate_per_minute: float = 30.0
    #: seconds in-flight images may take to finish after SIGTERM/SIGINT before they are abandoned
    shutdown_timeout: float = 30.0
    #: threads answering HTTP requests (connections themselves cost no thread)
    http_workers: int = 4
    #: open HTTP connections at most (lowered to keep 64 file descriptors free under ``ulimit -n``)
    max_connections: int = 1000
    #: seconds a connection may stay idle, or take to send a request's headers, before it is closed
    keep_alive_timeout: float = 5.0
    #: seconds a request's body may take to arrive once its headers are in (else 408)
    request_timeout: float = 10.0
    #: seconds an HTTP connection may stay open at most, whatever it does (requests take well under a second)
    connection_lifetime: float = 60.0

    def validate(self, source: str = "configuration") -> None:
        """Types and ranges, checked when the file is read (the daemon's own checks come too late for cron)."""
        numbers = ("poll_interval", "debounce", "miss_cooldown", "miss_rate_per_minute", "shutdown_timeout",
                   "keep_alive_timeout", "request_timeout", "connection_lifetime")
        for name in numbers:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise InvalidInputError(f"{source}: daemon.{name} must be a number >= 0, got {value!r}")
        if self.poll_interval <= 0:
            raise InvalidInputError(f"{source}: daemon.poll_interval must be > 0, got {self.poll_interval!r}")
        for name in ("workers", "http_workers", "max_connections"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"{source}: daemon.{name} must be a positive integer, got {value!r}")
        for name in ("keep_alive_timeout", "request_timeout", "connection_lifetime"):
            if getattr(self, name) <= 0:
                raise InvalidInputError(f"{source}: daemon.{name} must be > 0, got {getattr(self, name)!r}")
        if not isinstance(self.listen, str) or ":" not in self.listen:
            raise InvalidInputError(f"{source}: daemon.listen must be host:port, got {self.listen!r}")
        if self.webhook_secret is not None and (not isinstance(self.webhook_secret, str) or not self.webhook_secret):
            raise InvalidInputError(f"{source}: daemon.webhook_secret must be a non-empty string")
        if not isinstance(self.publish_on_miss_allow, list) or not all(
            isinstance(g, str) for g in self.publish_on_miss_allow
        ):
            raise InvalidInputError(
                f"{source}: daemon.publish_on_miss_allow must be a list of registry/repository globs"
            )


@dataclass
class PublisherConfig:
    """Every publisher setting. ``load`` reads the YAML file, ``apply_args`` lays command-line flags over it."""

    backend: str = "local"
    #: directory the repository tree is written to / read from; default ``/cvmfs/<repo>``
    root: str | None = None
    #: CVMFS repository name (``unpacked.cern.ch``); for ``local`` only informational
    repo: str | None = None
    #: path of the ``cvmfs_server`` command (cvmfs backends)
    cvmfs_server: str = "cvmfs_server"
    #: a sub-path for ``cvmfs_server transaction <repo>/<lease_path>`` (gateway lease; cvmfs-transaction backend)
    lease_path: str | None = None
    #: seconds one ``cvmfs_server`` call may take (plus 1 s per ``cvmfs_server_min_rate_mib`` MiB fed to an
    #: ingest) before it is killed and its transaction aborted
    cvmfs_server_timeout: float = 3600.0
    cvmfs_server_min_rate_mib: float = 2.0
    #: how many layers are downloaded/unpacked at the same time
    concurrency: int = 2
    #: do not build the flattened root filesystem (``.flat``) nor the public symlinks
    skip_flat: bool = False
    #: ``host:port`` of registries reached over plain HTTP
    insecure_registries: list[str] = field(default_factory=list)
    #: Docker ``config.json`` with registry credentials; default: ``$DOCKER_CONFIG`` / ``~/.docker/config.json``
    docker_config: str | None = None
    #: platforms to publish from multi-arch images (``linux/amd64``); empty: all
    platforms: list[str] = field(default_factory=list)
    #: GC keeps images scheduled for removal at least this long
    grace_period_days: float = 7.0
    #: local state (lock file, staging of the cvmfs backends, GC schedule); default depends on the backend
    state_dir: str | None = None
    #: per-request registry timeout (seconds) and retries
    registry_timeout: float = 60.0
    registry_retries: int = 4
    #: overall deadline (seconds) of one manifest, token or tag-list transfer, retries included; a blob gets this
    #: plus its declared size at ``registry_min_rate`` bytes per second (a trickling registry is cut off)
    registry_deadline: float = 300.0
    registry_min_rate: float = 256 * 1024
    #: what one image and each of its layers may ask (``cvmfs_snap.layer.Limits``; ``limits:`` in the file)
    limits: Limits = field(default_factory=Limits)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)

    # -- loading ------------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "configuration") -> PublisherConfig:
        if not isinstance(data, dict):
            raise InvalidInputError(f"{source}: expected a mapping of settings at the top level")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInputError(
                f"{source}: unknown setting(s) {', '.join(unknown)}; known settings: {', '.join(sorted(known))}"
            )
        values = dict(data)
        values["limits"] = Limits.from_dict(values.pop("limits", None), source)
        daemon_data = values.pop("daemon", None) or {}
        if not isinstance(daemon_data, dict):
            raise InvalidInputError(f"{source}: 'daemon' must be a mapping")
        dknown = {f.name for f in fields(DaemonConfig)}
        dunknown = sorted(set(daemon_data) - dknown)
        if dunknown:
            raise InvalidInputError(
                f"{source}: unknown daemon setting(s) {', '.join(dunknown)}; known: {', '.join(sorted(dknown))}"
            )
        try:
            cfg = cls(**values, daemon=DaemonConfig(**daemon_data))
        except TypeError as exc:
            raise InvalidInputError(f"{source}: {exc}") from exc
        cfg.validate(source)
        return cfg

    @classmethod
    def load(cls, path: str | Path | None) -> PublisherConfig:
        """The settings from a YAML file, or the defaults when ``path`` is None."""
        if path is None:
            return cls()
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as exc:
            raise InvalidInputError(f"cannot read publisher configuration {p}: {exc.strerror}") from exc
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise InvalidInputError(f"publisher configuration {p} is not valid YAML: {exc}") from exc
        return cls.from_dict(data, str(p))

    def apply_args(self, args: argparse.Namespace) -> PublisherConfig:
        """Lay command-line flags over these settings (flags left unset keep the file's value)."""
        mapping = {
            "backend": "backend",
            "root": "root",
            "repo": "repo",
            "cvmfs_server": "cvmfs_server",
            "lease_path": "lease_path",
            "concurrency": "concurrency",
            "docker_config": "docker_config",
            "state_dir": "state_dir",
            "grace_period": "grace_period_days",
        }
        for arg, attr in mapping.items():
            value = getattr(args, arg, None)
            if value is not None:
                setattr(self, attr, value)
        if getattr(args, "skip_flat", False):
            self.skip_flat = True
        extra_insecure = getattr(args, "insecure_registry", None)
        if extra_insecure:
            self.insecure_registries = [*self.insecure_registries, *extra_insecure]
        plats = getattr(args, "platform", None)
        if plats:
            self.platforms = list(plats)
        self.validate("command line")
        return self

    def validate(self, source: str = "configuration") -> None:
        if self.backend not in BACKENDS:
            raise InvalidInputError(f"{source}: unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if not isinstance(self.concurrency, int) or self.concurrency < 1:
            raise InvalidInputError(f"{source}: concurrency must be a positive integer, got {self.concurrency!r}")
        if self.repo is not None and not _REPO_NAME.match(self.repo):
            raise InvalidInputError(f"{source}: {self.repo!r} is not a CVMFS repository name")
        if self.lease_path is not None and (
            self.lease_path.startswith("/") or ".." in self.lease_path.split("/")
        ):
            raise InvalidInputError(f"{source}: lease_path {self.lease_path!r} must be relative, without '..'")
        for name in ("insecure_registries", "platforms"):
            value = getattr(self, name)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise InvalidInputError(f"{source}: {name} must be a list of strings")
        if self.grace_period_days < 0:
            raise InvalidInputError(f"{source}: grace_period_days must not be negative")
        for name in ("registry_deadline", "registry_min_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise InvalidInputError(f"{source}: {name} must be a positive number, got {value!r}")
        for name in ("cvmfs_server_timeout", "cvmfs_server_min_rate_mib"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise InvalidInputError(f"{source}: {name} must be a positive number of seconds/MiB, got {value!r}")
        self.daemon.validate(source)

    # -- derived ---------------------------------------------------------------------------------------------------
    def repository_root(self) -> Path:
        """Where the tree is: ``root`` when given, else ``/cvmfs/<repo>``."""
        if self.root:
            return Path(self.root)
        if self.repo:
            return Path("/cvmfs") / self.repo
        raise InvalidInputError(
            "no repository given: pass --root DIR (local backend) or --repo NAME (cvmfs backends), "
            "or set root/repo in the configuration file"
        )

    def effective_state_dir(self) -> Path:
        """Local state directory: ``state_dir`` if set; for ``local`` a hidden directory in the root; else
        ``/var/spool/cvmfs-snap/<repo>`` (must be on the stratum-0's local disk, not in the repository)."""
        if self.state_dir:
            return Path(self.state_dir)
        if self.backend == "local":
            return self.repository_root() / ".cvmfs-snap-state"
        return Path("/var/spool/cvmfs-snap") / (self.repo or "default")
