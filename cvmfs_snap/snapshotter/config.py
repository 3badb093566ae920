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
    cache-size = "4GiB"                  #   bound of chunks + spool files + unpacked copies (bytes, or KiB/MiB/...)
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
in the log but never stops a node. A value of the wrong type is an error naming the file, the key and what was
expected (validated by :mod:`cvmfs_snap.validation`, like the publisher's YAML and the layout's records).

Command-line flags (``--address``, ``--root``, ``--log-level``) are not read from the file, as upstream.
"""

from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, TypedDict
from urllib.parse import urlsplit

import msgspec

from ..errors import InvalidInputError, NotFoundError
from ..layout import CVMFS_MOUNT_ROOT
from ..validation import EXPECT, SECRET, Check, load_as, unknown_keys
from .defaults import DEFAULT_CONFIG
from .sources.lazy import LazySettings
from .sources.registry import DEFAULT_SOURCES, check_names, check_options

log = logging.getLogger(__name__)

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
        return CVMFS_MOUNT_ROOT / (self.repository or DEFAULT_REPOSITORY)


# -- the file's shape (validated by cvmfs_snap.validation; defaults stay on Config and LazySettings) ---------------
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30,
          "t": 1 << 40, "tib": 1 << 40, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4}
_SIZE_WORDS = 'a number of bytes or e.g. "4GiB", "512MiB"'


def parse_size(value: int | str) -> int | None:
    """A byte count from an integer, or a string such as ``"4GiB"``, ``"512 MiB"``, ``"64M"`` (binary K/M/G/T);
    None for a string without a number (``""``, ``"GiB"``); ValueError for one that is not a size."""
    if isinstance(value, int):
        return value
    text = value.strip().lower()
    num = text.rstrip("kmgtib ")
    try:
        return int(float(num) * _UNITS[text[len(num):].strip()]) if num else None
    except (ValueError, KeyError):
        raise ValueError(f"a size: {_SIZE_WORDS}") from None


def _size(value: int | str) -> int:
    size = parse_size(value)
    if size is None or size < 0:
        raise ValueError(f"a size: {_SIZE_WORDS}")
    return size


def _nonzero_size(value: int | str) -> int:
    size = parse_size(value)
    if size is None or size <= 0:
        raise ValueError(f"a size above 0: {_SIZE_WORDS}")
    return size


def _absolute_or_empty(value: str) -> str:
    if value and not value.startswith("/"):
        raise ValueError("an absolute path (or empty)")
    return value


def _host_port_or_empty(value: str) -> str:
    if value and ":" not in value:
        raise ValueError("HOST:PORT (or empty: off)")
    return value


def _url_or_empty(url: str) -> str:
    """An http(s) URL with a host, or empty (off). Credentials in the URL are refused: they would end up in logs
    and in ``ps``-style dumps of the configuration; the secret has its own keys. (The field is a SECRET: the value
    is never echoed in the error.)"""
    if not url:
        return url
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise ValueError(f"a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("an http:// or https:// URL with a host, e.g. http://stratum0.example.org:8080/publish-on-miss")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"a URL without credentials; put the shared secret in {OUR_TABLE}.publish-on-miss-secret-file")
    return url


Text = Annotated[str, Check(str.strip)]
AbsolutePath = Annotated[Text, Check(_absolute_or_empty)]
HostPort = Annotated[Text, Check(_host_port_or_empty)]
#: a byte count, or its text with a unit (``parse_size``); an integer once checked
Size = Annotated[int | str, Check(_size), msgspec.Meta(extra_json_schema={EXPECT: f"a size: {_SIZE_WORDS}"})]
NonZeroSize = Annotated[int | str, Check(_nonzero_size),
                        msgspec.Meta(extra_json_schema={EXPECT: f"a size above 0: {_SIZE_WORDS}"})]

#: ``[cvmfs-snap.lazy]``; keys as in the file, each the LazySettings field of the same name in snake case
LazyTable = TypedDict("LazyTable", {
    "enabled": bool, "cache-dir": AbsolutePath, "cache-size": NonZeroSize, "prefetch": bool,
    "prefetch-bound": Size, "background-fetch": bool, "timeout": Annotated[float, msgspec.Meta(gt=0)],
    "hosts-dir": AbsolutePath, "docker-config": AbsolutePath, "force-single-range": bool,
    "metrics-address": HostPort,
}, total=False)

#: ``[cvmfs-snap]``
OurTable = TypedDict("OurTable", {
    "metrics-address": HostPort,
    "sources": list[str],  # names checked by the source registry
    "grpc-workers": Annotated[int, msgspec.Meta(ge=1)],
    "publish-on-miss-url": Annotated[Text, Check(_url_or_empty), msgspec.Meta(extra_json_schema={SECRET: True})],
    "publish-on-miss-secret": Annotated[Text, msgspec.Meta(extra_json_schema={SECRET: True})],
    "publish-on-miss-secret-file": Text,
    "source-options": dict[str, dict[str, object]],  # options checked by the source registry
    "lazy": LazyTable,
}, total=False)

#: the file: the official snapshotter's keys and our table
ConfigFile = TypedDict("ConfigFile", {
    "repository": str, "absolute-mountpoint": Annotated[str, Check(_absolute_or_empty)],
    "cvmfs-snap": OurTable,  # OUR_TABLE
}, total=False)


def parse_config(data: object, where: str = "configuration") -> Config:
    """A parsed TOML document as a :class:`Config`: unknown keys warned and ignored, wrong types refused (naming
    the file and the key)."""
    for key in unknown_keys(ConfigFile, data):
        log.warning("%s: unknown key %r ignored", where, key)
    doc = load_as(ConfigFile, data, where, strict=True, kind="a table of settings")
    ours = doc.get("cvmfs-snap", {})
    cfg = Config()
    cfg.repository = doc.get("repository", cfg.repository)
    cfg.absolute_mountpoint = doc.get("absolute-mountpoint", cfg.absolute_mountpoint)
    cfg.metrics_address = ours.get("metrics-address", cfg.metrics_address)
    if "sources" in ours:
        check_names(ours["sources"], f"{where}: {OUR_TABLE}.sources")
        cfg.sources = list(ours["sources"])
    cfg.grpc_workers = ours.get("grpc-workers", cfg.grpc_workers)
    cfg.publish_on_miss_url = ours.get("publish-on-miss-url", "")
    cfg.publish_on_miss_secret = ours.get("publish-on-miss-secret", "")
    cfg.publish_on_miss_secret_file = ours.get("publish-on-miss-secret-file", "")
    for src, table in ours.get("source-options", {}).items():
        cfg.source_options[src] = check_options(src, table, f"{where}: {OUR_TABLE}.source-options.{src}")
    lazy = {k.replace("-", "_"): v for k, v in ours.get("lazy", {}).items()}  # LazyTable's keys, validated
    cfg.lazy = LazySettings(**lazy)  # type: ignore[arg-type]
    if not cfg.lazy.enabled and "lazy" in cfg.sources:
        cfg.sources = [n for n in cfg.sources if n != "lazy"]
    if cfg.publish_on_miss_secret_file:
        if cfg.publish_on_miss_secret:
            raise InvalidInputError(f"{where}: set {OUR_TABLE}.publish-on-miss-secret or "
                                    f"{OUR_TABLE}.publish-on-miss-secret-file, not both")
        cfg.publish_on_miss_secret = _read_secret(where, cfg.publish_on_miss_secret_file)
    return cfg


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
