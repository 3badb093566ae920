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
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, ClassVar, Literal, get_args

import msgspec
import yaml

from cvmfs_snap.errors import InvalidInputError
from cvmfs_snap.layer.limits import Limits
from cvmfs_snap.layout import CVMFS_MOUNT_ROOT
from cvmfs_snap.validation import SECRET, Check, load_as

Backend = Literal["local", "cvmfs-ingest", "cvmfs-transaction"]
BACKENDS: tuple[str, ...] = get_args(Backend)

_REPO_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _host_port(value: str) -> str:
    if ":" not in value:
        raise ValueError("host:port, e.g. 127.0.0.1:8080")
    return value


def _repo_name(value: str) -> str:
    if not _REPO_NAME.match(value):
        raise ValueError("a CVMFS repository name such as unpacked.cern.ch")
    return value


def _relative(value: str) -> str:
    if value.startswith("/") or ".." in value.split("/"):
        raise ValueError("a relative path without '..'")
    return value


Seconds = Annotated[float, msgspec.Meta(ge=0)]
PositiveSeconds = Annotated[float, msgspec.Meta(gt=0)]
Count = Annotated[int, msgspec.Meta(ge=1)]


@dataclass
class DaemonConfig:
    """Settings of ``loop`` (the daemon, see ``publisher.daemon``)."""

    #: the settings file's own keys only: a typo is an error, not a silently ignored setting
    forbid_unknown_fields: ClassVar[bool] = True

    #: host:port of the HTTP endpoint (webhooks, /metrics, /healthz)
    listen: Annotated[str, Check(_host_port)] = "127.0.0.1:8080"
    #: seconds between two full passes over the recipe (tag lists re-read, moved tags republished)
    poll_interval: PositiveSeconds = 300.0
    #: seconds to wait after a webhook before publishing, to coalesce bursts of pushes
    debounce: Seconds = 5.0
    #: ``registry/repository`` globs the daemon may publish on demand (publish-on-miss); empty: none
    publish_on_miss_allow: list[str] = field(default_factory=list)
    #: shared secret webhooks must send (``Authorization: Bearer <secret>``); None: taken from the environment
    #: variable ``CVMFS_SNAP_WEBHOOK_SECRET``, and when that is unset too every webhook is accepted. Prefer the
    #: environment (a systemd ``EnvironmentFile`` readable only by the publisher) over a world-readable file.
    webhook_secret: Annotated[Annotated[str, msgspec.Meta(min_length=1)] | None,
                              msgspec.Meta(extra_json_schema={SECRET: True})] = None
    #: images published side by side (layers inside each image overlap according to ``concurrency``)
    workers: Count = 2
    #: seconds: a publish-on-miss request for an image tried less than this long ago is answered 429
    miss_cooldown: Seconds = 60.0
    #: publish-on-miss requests queued per minute at most (token bucket); the others are answered 429
    miss_rate_per_minute: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    #: seconds in-flight images may take to finish after SIGTERM/SIGINT before they are abandoned
    shutdown_timeout: Seconds = 30.0
    #: threads answering HTTP requests (connections themselves cost no thread)
    http_workers: Count = 4
    #: open HTTP connections at most (lowered to keep 64 file descriptors free under ``ulimit -n``)
    max_connections: Count = 1000
    #: seconds a connection may stay idle, or take to send a request's headers, before it is closed
    keep_alive_timeout: PositiveSeconds = 5.0
    #: seconds a request's body may take to arrive once its headers are in (else 408)
    request_timeout: PositiveSeconds = 10.0
    #: seconds an HTTP connection may stay open at most, whatever it does (requests take well under a second)
    connection_lifetime: PositiveSeconds = 60.0

    def validate(self, source: str = "configuration") -> None:
        """Types and ranges (as when the file is read: the daemon's own checks come too late for cron)."""
        load_as(DaemonConfig, dataclasses.asdict(self), source, strict=True, prefix=("daemon",))


@dataclass
class PublisherConfig:
    """Every publisher setting. ``load`` reads the YAML file, ``apply_args`` lays command-line flags over it."""

    forbid_unknown_fields: ClassVar[bool] = True

    backend: Backend = "local"
    #: directory the repository tree is written to / read from; default ``/cvmfs/<repo>``
    root: str | None = None
    #: CVMFS repository name (``unpacked.cern.ch``); for ``local`` only informational
    repo: Annotated[str, Check(_repo_name)] | None = None
    #: path of the ``cvmfs_server`` command (cvmfs backends)
    cvmfs_server: str = "cvmfs_server"
    #: a sub-path for ``cvmfs_server transaction <repo>/<lease_path>`` (gateway lease; cvmfs-transaction backend)
    lease_path: Annotated[str, Check(_relative)] | None = None
    #: seconds one ``cvmfs_server`` call may take (plus 1 s per ``cvmfs_server_min_rate_mib`` MiB fed to an
    #: ingest) before it is killed and its transaction aborted
    cvmfs_server_timeout: PositiveSeconds = 3600.0
    cvmfs_server_min_rate_mib: Annotated[float, msgspec.Meta(gt=0)] = 2.0
    #: how many layers are downloaded/unpacked at the same time
    concurrency: Count = 2
    #: do not build the flattened root filesystem (``.flat``) nor the public symlinks
    skip_flat: bool = False
    #: ``host:port`` of registries reached over plain HTTP
    insecure_registries: list[str] = field(default_factory=list)
    #: Docker ``config.json`` with registry credentials; default: ``$DOCKER_CONFIG`` / ``~/.docker/config.json``
    docker_config: str | None = None
    #: platforms to publish from multi-arch images (``linux/amd64``); empty: all
    platforms: list[str] = field(default_factory=list)
    #: GC keeps images scheduled for removal at least this long
    grace_period_days: Annotated[float, msgspec.Meta(ge=0)] = 7.0
    #: local state (lock file, staging of the cvmfs backends, GC schedule); default depends on the backend
    state_dir: str | None = None
    #: per-request registry timeout (seconds) and retries
    registry_timeout: PositiveSeconds = 60.0
    registry_retries: Annotated[int, msgspec.Meta(ge=0)] = 4
    #: overall deadline (seconds) of one manifest, token or tag-list transfer, retries included; a blob gets this
    #: plus its declared size at ``registry_min_rate`` bytes per second (a trickling registry is cut off)
    registry_deadline: PositiveSeconds = 300.0
    registry_min_rate: Annotated[float, msgspec.Meta(gt=0)] = 256 * 1024
    #: what one image and each of its layers may ask (``cvmfs_snap.layer.Limits``; ``limits:`` in the file)
    limits: Limits = field(default_factory=Limits)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)

    # -- loading ------------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: object, source: str = "configuration") -> PublisherConfig:
        """Settings from a parsed YAML document; an empty ``daemon:`` or ``limits:`` means their defaults."""
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if not (k in ("daemon", "limits") and v is None)}
        return load_as(cls, data, source, strict=True, kind="a mapping of settings at the top level")

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
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InvalidInputError(f"publisher configuration {p} is not valid YAML: {exc}") from exc
        return cls.from_dict({} if data is None else data, str(p))  # an empty file: the defaults

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
        """The same checks as for the file, on settings changed since (command-line flags, a recipe)."""
        load_as(PublisherConfig, dataclasses.asdict(self), source, strict=True)

    # -- derived ---------------------------------------------------------------------------------------------------
    def repository_root(self) -> Path:
        """Where the tree is: ``root`` when given, else ``/cvmfs/<repo>``."""
        if self.root:
            return Path(self.root)
        if self.repo:
            return CVMFS_MOUNT_ROOT / self.repo
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
