"""Configuration of ``cvmfs-snap snapshotter``: a TOML file compatible with the official cvmfs containerd snapshotter.

Why compatible: sites already run the official ``containerd-cvmfs-grpc`` with a config file; they can point
cvmfs-snap at the same file (same default path, socket and root) and get the same repository served.

Keys of the official snapshotter (top level, same spelling and meaning)::

    repository = "unpacked.cern.ch"      # CVMFS repository whose .layers/ are served (default unpacked.cern.ch)
    absolute-mountpoint = ""             # where that repository is mounted; empty: /cvmfs/<repository>

Keys of cvmfs-snap (in the ``[cvmfs-snap]`` table, ignored by the official snapshotter)::

    [cvmfs-snap]
    metrics-address = "127.0.0.1:9102"   # serve Prometheus metrics on http://HOST:PORT/metrics; empty: off
    sources = ["cvmfs"]                  # layer sources asked in order at Prepare time (known: "cvmfs")
    grpc-workers = 16                    # threads serving gRPC calls

Unknown keys are logged as warnings and ignored (the official snapshotter ignores them too), so a typo is visible
in the log but never stops a node. A value of the wrong type is an error naming the file and the key.

Command-line flags (``--address``, ``--root``, ``--log-level``) are not read from the file, as upstream.
"""

from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError, NotFoundError

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path("/etc/containerd-cvmfs-grpc/config.toml")
DEFAULT_ADDRESS = "/run/containerd-cvmfs-grpc/containerd-cvmfs-grpc.sock"
DEFAULT_ROOT = Path("/var/lib/containerd-cvmfs-grpc")
DEFAULT_REPOSITORY = "unpacked.cern.ch"
KNOWN_SOURCES = ("cvmfs",)
OUR_TABLE = "cvmfs-snap"


@dataclass
class Config:
    repository: str = DEFAULT_REPOSITORY
    absolute_mountpoint: str = ""
    metrics_address: str = ""
    sources: list[str] = field(default_factory=lambda: ["cvmfs"])
    grpc_workers: int = 16
    path: Path | None = None  # the file it came from, if any

    @property
    def mountpoint(self) -> Path:
        """Where the repository is mounted: ``absolute-mountpoint``, else ``/cvmfs/<repository>`` (as upstream)."""
        if self.absolute_mountpoint:
            return Path(self.absolute_mountpoint)
        return Path("/cvmfs") / (self.repository or DEFAULT_REPOSITORY)


def _typed(where: str, key: str, value: Any, kind: type) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidInputError(
            f"{where}: key {key!r} must be a {kind.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def parse_config(data: dict[str, Any], where: str = "configuration") -> Config:
    cfg = Config()
    for key, value in data.items():
        if key == "repository":
            cfg.repository = _typed(where, key, value, str)
        elif key == "absolute-mountpoint":
            cfg.absolute_mountpoint = _typed(where, key, value, str)
        elif key == OUR_TABLE:
            _typed(where, key, value, dict)
            for k, v in value.items():
                name = f"{OUR_TABLE}.{k}"
                if k == "metrics-address":
                    cfg.metrics_address = _typed(where, name, v, str)
                    if cfg.metrics_address and ":" not in cfg.metrics_address:
                        raise InvalidInputError(f"{where}: {name} must be HOST:PORT, got {v!r}")
                elif k == "sources":
                    _typed(where, name, v, list)
                    for s in v:
                        if s not in KNOWN_SOURCES:
                            raise InvalidInputError(
                                f"{where}: unknown layer source {s!r} in {name}; known: {', '.join(KNOWN_SOURCES)}"
                            )
                    cfg.sources = list(v)
                elif k == "grpc-workers":
                    cfg.grpc_workers = _typed(where, name, v, int)
                    if cfg.grpc_workers < 1:
                        raise InvalidInputError(f"{where}: {name} must be at least 1")
                else:
                    log.warning("%s: unknown key %r ignored", where, name)
        else:
            log.warning("%s: unknown key %r ignored", where, key)
    if cfg.absolute_mountpoint and not cfg.absolute_mountpoint.startswith("/"):
        raise InvalidInputError(f"{where}: absolute-mountpoint must be an absolute path, got "
                                f"{cfg.absolute_mountpoint!r}")
    return cfg


def load_config(path: Path | None) -> Config:
    """Load ``path``; None means the default file, which may be missing (then defaults apply)."""
    explicit = path is not None
    p = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        if explicit:
            raise NotFoundError(f"configuration file {p} does not exist: fix --config or create the file") from None
        log.info("no configuration file at %s: using defaults", p)
        return Config()
    except OSError as exc:
        raise InvalidInputError(f"cannot read configuration file {p}: {exc}") from exc
    try:
        data = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"configuration file {p} is not valid TOML: {exc}") from exc
    cfg = parse_config(data, str(p))
    cfg.path = p
    return cfg
