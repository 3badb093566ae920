"""Configuration of ``cvmfs-snap snapshotter``: a TOML file compatible with the official cvmfs containerd snapshotter.

Why compatible: sites already run the official ``containerd-cvmfs-grpc`` with a config file; they can point
cvmfs-snap at the same file (same default path, socket and root) and get the same repository served.

Keys of the official snapshotter (top level, same spelling and meaning)::

    repository = "unpacked.cern.ch"      # CVMFS repository whose .layers/ are served (default unpacked.cern.ch)
    absolute-mountpoint = ""             # where that repository is mounted; empty: /cvmfs/<repository>

Keys of cvmfs-snap (in the ``[cvmfs-snap]`` table, ignored by the official snapshotter)::

    [cvmfs-snap]
    metrics-address = "127.0.0.1:9102"   # serve Prometheus metrics on http://HOST:PORT/metrics; empty: off
    sources = ["cvmfs", "lazy"]          # layer sources asked in order at Prepare time (sources/registry.py)
    [cvmfs-snap.source-options.cvmfs]    # per source: its time budget (seconds) and how many calls may hang
    timeout = 10.0                       #   one file-system call on the repository
    build-timeout = 300.0                #   first build of a layer's node-local dirs
    health-ttl = 5.0                     #   how long a health probe is trusted
    max-hanging-calls = 8                #   calls stuck at once before the source refuses new ones
    grpc-workers = 16                    # threads serving gRPC calls
    publish-on-miss-url = ""             # publisher daemon's POST /publish-on-miss; empty: never report misses
    publish-on-miss-secret = ""          # sent as "Authorization: Bearer <secret>"; better: the file below
    publish-on-miss-secret-file = ""     # file holding that secret (e.g. mode 0600), read at start
    [cvmfs-snap.lazy]                    # lazy eStargz layers (sources/lazy.py, the lazyfs process)
    enabled = true                       #   false: the "lazy" source is left out of `sources`
    cache-dir = ""                       #   chunk cache; empty: <root>/lazy/cache
    cache-size = "4GiB"                  #   its bound (bytes, or a number with KiB/MiB/GiB/TiB)
    prefetch = true                      #   fetch the landmark files at attach ...
    prefetch-bound = "64MiB"             #   ... up to this many bytes before the container may start
    background-fetch = true              #   then fetch the rest at low priority
    timeout = 30.0                       #   s: one registry or control-socket call
    hosts-dir = "/etc/containerd/certs.d"   # containerd's hosts.toml directory (mirrors, plain HTTP, CAs)
    docker-config = ""                   #   registry credentials; empty: ~/.docker/config.json if present
                                         #   (the kubelet's /var/lib/kubelet/config.json is read too)
    force-single-range = false           #   one Range per request (registries that botch multi-range)
    metrics-address = ""                 #   the lazyfs process's Prometheus metrics on HOST:PORT; empty: off

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
from urllib.parse import urlsplit

from ..errors import InvalidInputError, NotFoundError
from .sources.lazy import LazySettings
from .sources.registry import DEFAULT_SOURCES, check_names, check_options

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path("/etc/containerd-cvmfs-grpc/config.toml")
DEFAULT_ADDRESS = "/run/containerd-cvmfs-grpc/containerd-cvmfs-grpc.sock"
DEFAULT_ROOT = Path("/var/lib/containerd-cvmfs-grpc")
DEFAULT_REPOSITORY = "unpacked.cern.ch"
OUR_TABLE = "cvmfs-snap"


@dataclass
class Config:
    repository: str = DEFAULT_REPOSITORY
    absolute_mountpoint: str = ""
    metrics_address: str = ""
    sources: list[str] = field(default_factory=lambda: list(DEFAULT_SOURCES))
    grpc_workers: int = 16
    #: where misses are reported (publisher daemon's POST /publish-on-miss); "" = off
    publish_on_miss_url: str = ""
    #: shared secret for that endpoint, from publish-on-miss-secret or read from publish-on-miss-secret-file;
    #: kept out of repr() so that logging a Config never shows it
    publish_on_miss_secret: str = field(default="", repr=False)
    publish_on_miss_secret_file: str = ""
    #: per layer source: its options (timeouts, stuck-call budget), defaults filled in by the source registry
    source_options: dict[str, dict[str, float]] = field(default_factory=dict)
    #: ``[cvmfs-snap.lazy]``
    lazy: LazySettings = field(default_factory=LazySettings)
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
                    check_names(v, f"{where}: {name}")
                    cfg.sources = list(v)
                elif k == "grpc-workers":
                    cfg.grpc_workers = _typed(where, name, v, int)
                    if cfg.grpc_workers < 1:
                        raise InvalidInputError(f"{where}: {name} must be at least 1")
                elif k == "publish-on-miss-url":
                    cfg.publish_on_miss_url = _typed(where, name, v, str).strip()
                    _check_url(where, name, cfg.publish_on_miss_url)
                elif k == "publish-on-miss-secret":
                    cfg.publish_on_miss_secret = _typed(where, name, v, str).strip()
                elif k == "source-options":
                    _typed(where, name, v, dict)
                    for src, table in v.items():
                        _typed(where, f"{name}.{src}", table, dict)
                        cfg.source_options[src] = check_options(src, table, f"{where}: {name}.{src}")
                elif k == "lazy":
                    cfg.lazy = parse_lazy(_typed(where, name, v, dict), f"{where}: {name}")
                elif k == "publish-on-miss-secret-file":
                    cfg.publish_on_miss_secret_file = _typed(where, name, v, str).strip()
                else:
                    log.warning("%s: unknown key %r ignored", where, name)
        else:
            log.warning("%s: unknown key %r ignored", where, key)
    if cfg.absolute_mountpoint and not cfg.absolute_mountpoint.startswith("/"):
        raise InvalidInputError(f"{where}: absolute-mountpoint must be an absolute path, got "
                                f"{cfg.absolute_mountpoint!r}")
    if not cfg.lazy.enabled and "lazy" in cfg.sources:
        cfg.sources = [n for n in cfg.sources if n != "lazy"]
    if cfg.publish_on_miss_secret_file:
        if cfg.publish_on_miss_secret:
            raise InvalidInputError(f"{where}: set {OUR_TABLE}.publish-on-miss-secret or "
                                    f"{OUR_TABLE}.publish-on-miss-secret-file, not both")
        cfg.publish_on_miss_secret = _read_secret(where, cfg.publish_on_miss_secret_file)
    return cfg


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30,
          "t": 1 << 40, "tib": 1 << 40, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4}


def parse_size(value: object, where: str) -> int:
    """A byte count: an integer, or a string such as ``"4GiB"``, ``"512 MiB"``, ``"64M"`` (binary for K/M/G/T)."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str):
        text = value.strip().lower()
        num = text.rstrip("kmgtib ")
        unit = text[len(num):].strip()
        try:
            n = int(float(num) * _UNITS[unit]) if num else -1
        except (ValueError, KeyError):
            raise InvalidInputError(f"{where}: {value!r} is not a size (e.g. 4294967296, \"4GiB\", \"512MiB\")") \
                from None
    else:
        raise InvalidInputError(f"{where} must be a size (a number of bytes or e.g. \"4GiB\"), got {value!r}")
    if n < 0:
        raise InvalidInputError(f"{where} must not be negative, got {value!r}")
    return n


def parse_lazy(table: dict[str, Any], where: str) -> LazySettings:
    """``[cvmfs-snap.lazy]``: unknown keys warned and ignored, wrong types refused (naming file and key)."""
    kw: dict[str, Any] = {}
    bools = {"enabled": "enabled", "prefetch": "prefetch", "background-fetch": "background_fetch",
             "force-single-range": "force_single_range"}
    strings = {"cache-dir": "cache_dir", "hosts-dir": "hosts_dir", "docker-config": "docker_config"}
    paths = set(strings)
    strings["metrics-address"] = "metrics_address"
    sizes = {"cache-size": "cache_size", "prefetch-bound": "prefetch_bound"}
    for k, v in table.items():
        if k in bools:
            kw[bools[k]] = _typed(where, k, v, bool)
        elif k in strings:
            kw[strings[k]] = _typed(where, k, v, str).strip()
            if k in paths and kw[strings[k]] and not kw[strings[k]].startswith("/"):
                raise InvalidInputError(f"{where}.{k} must be an absolute path, got {v!r}")
            if k == "metrics-address" and kw[strings[k]] and ":" not in kw[strings[k]]:
                raise InvalidInputError(f"{where}.{k} must be HOST:PORT, got {v!r}")
        elif k in sizes:
            kw[sizes[k]] = parse_size(v, f"{where}.{k}")
        elif k == "timeout":
            if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
                raise InvalidInputError(f"{where}.{k} must be a positive number of seconds, got {v!r}")
            kw["timeout"] = float(v)
        else:
            log.warning("%s: unknown key %r ignored", where, k)
    if kw.get("cache_size", 1) == 0:
        raise InvalidInputError(f"{where}.cache-size must be more than 0")
    return LazySettings(**kw)


def _check_url(where: str, name: str, url: str) -> None:
    """An http(s) URL with a host, or empty (off). Credentials in the URL are refused: they would end up in logs
    and in ``ps``-style dumps of the configuration; the secret has its own keys."""
    if not url:
        return
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise InvalidInputError(f"{where}: {name} is not a valid URL ({exc})") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInputError(f"{where}: {name} must be an http:// or https:// URL with a host, e.g. "
                                "http://stratum0.example.org:8080/publish-on-miss")
    if parts.username is not None or parts.password is not None:
        raise InvalidInputError(f"{where}: {name} must not contain credentials; put the shared secret in "
                                f"{OUR_TABLE}.publish-on-miss-secret-file instead")


def _read_secret(where: str, path: str) -> str:
    """The secret in ``path`` (surrounding white space and a trailing newline dropped); never echoed in errors."""
    p = Path(path)
    try:
        secret = p.read_text().strip()
    except FileNotFoundError:
        raise NotFoundError(f"{where}: {OUR_TABLE}.publish-on-miss-secret-file {p} does not exist: create it "
                            "with the publisher's shared secret or remove the key") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise InvalidInputError(f"{where}: cannot read {OUR_TABLE}.publish-on-miss-secret-file {p}: "
                                f"{reason}") from None
    if not secret:
        raise InvalidInputError(f"{where}: {OUR_TABLE}.publish-on-miss-secret-file {p} is empty")
    return secret


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
