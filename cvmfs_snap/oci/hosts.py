"""Registry hosts as containerd describes them (``hosts.toml`` under a ``certs.d`` directory) and the node's
registry credentials (docker ``config.json``, the kubelet's ``config.json``).

Why: a node's containerd is told where to pull from (mirrors, plain-HTTP registries, private CAs) in
``/etc/containerd/certs.d/<host>/hosts.toml``; a component that fetches blobs on containerd's behalf (the lazy layer
source) must go to the same places with the same TLS settings, or a site's mirror would be bypassed. The rules follow
containerd 1.6 ``remotes/docker/config`` (``ConfigureHosts``, ``HostDirFromRoot``, ``parseHostsFile``):

* the directory of registry ``host:port`` is ``<dir>/host_port_/`` or ``<dir>/host:port/``, else ``<dir>/_default/``;
* ``hosts.toml`` lists ``[host."<url>"]`` tables (mirrors, tried first, in file order) and then ``server`` (the
  upstream, tried last); a URL without scheme is HTTPS; ``capabilities`` (default pull, resolve, push), ``ca``
  (a file or a list, relative to the directory; added to the system CAs), ``client`` (certificate/key pairs),
  ``skip_verify``, ``override_path``;
* without a ``hosts.toml`` the directory's ``*.crt`` files are CAs and ``*.cert``/``*.key`` pairs client certificates
  (docker's ``certs.d`` convention); without a directory the registry itself over HTTPS -- except Docker Hub
  (``registry-1.docker.io``) and loopback registries, which are plain HTTP (containerd does the same).

A ``http://`` URL in ``hosts.toml`` is the site's configuration and makes that host plain HTTP (the client's
insecure list); an ``https://`` one (or one without scheme) is HTTPS even for a loopback host (a local TLS mirror:
loopback means plain HTTP only when no ``hosts.toml`` says otherwise); a ``skip_verify`` host keeps TLS but does not
verify the certificate. Endpoints whose API root is not ``/v2`` (``override_path``, a mirror under a path prefix)
cannot be served by our client and are skipped with a
warning. ``header`` tables are ignored (warned once): nothing here sends extra headers.

A client for an endpoint (its TLS settings) comes from :mod:`cvmfs_snap.oci.hostclient`: this module parses and
imports no HTTP client, so the snapshotter daemon, which only hands endpoints' credentials to the lazyfs process,
loads neither httpx nor ssl (issue 9's RSS goal, bench/README.md "Resident memory").

Credentials never appear in this module's logs or errors: :class:`~cvmfs_snap.oci.auth.Credentials` hides them.
"""

from __future__ import annotations

import logging
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cvmfs_snap.errors import InvalidInputError
from cvmfs_snap.oci.auth import Credentials, CredentialStore
from cvmfs_snap.oci.reference import DOCKER_HUB_ALIASES, DOCKER_HUB_API_HOST, ImageReference, is_loopback

log = logging.getLogger(__name__)

#: containerd's (and CRI's) usual ``config_path``
DEFAULT_HOSTS_DIR = Path("/etc/containerd/certs.d")
#: the kubelet's node-wide image pull credentials (first of its search paths)
KUBELET_CONFIG = Path("/var/lib/kubelet/config.json")
HOSTS_TOML = "hosts.toml"
DEFAULT_DIR = "_default"
CAPABILITIES = frozenset({"pull", "resolve", "push"})
API_PATH = "/v2"


@dataclass(frozen=True)
class RegistryHost:
    """One endpoint containerd would try for a registry (a mirror or the upstream server)."""

    host: str  # host[:port], lower case
    scheme: str = "https"  # "https" | "http"
    capabilities: frozenset[str] = CAPABILITIES
    ca: tuple[Path, ...] = ()
    #: (certificate, key or None when the certificate file holds both)
    client_pairs: tuple[tuple[Path, Path | None], ...] = ()
    skip_verify: bool = False
    path: str = API_PATH

    @property
    def plain_http(self) -> bool:
        return self.scheme == "http"

    def can(self, capability: str) -> bool:
        return capability in self.capabilities


def host_dirs(hosts_dir: Path, registry: str) -> list[Path]:
    """Where containerd looks for ``registry``'s configuration, in order (config_unix.go ``hostPaths``)."""
    out: list[Path] = []
    i = registry.rfind(":")
    if i > 0 and not registry.endswith("]"):
        out.append(hosts_dir / f"{registry[:i]}_{registry[i + 1:]}_")
    out += [hosts_dir / registry, hosts_dir / DEFAULT_DIR]
    return out


def _strings(value: object, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(x, str) for x in value):
        return list(value)
    raise InvalidInputError(f"{where} must be a string or a list of strings, got {value!r}")


def _abs(p: str, base: Path) -> Path:
    return Path(p) if os.path.isabs(p) else base / p


def _parse_host(server: str, table: Mapping[str, Any], base: Path, where: str) -> RegistryHost:
    url = server if server.startswith("http") else "https://" + server
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise InvalidInputError(f"{where}: cannot parse server {server!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidInputError(f"{where}: server {server!r} must be an http:// or https:// URL with a host")
    path = os.path.normpath(parts.path) if parts.path not in ("", "/") else ""
    override = table.get("override_path", False)
    if not isinstance(override, bool):
        raise InvalidInputError(f"{where}: override_path must be true or false")
    if not override and not path.endswith(API_PATH):
        path += API_PATH
    caps = table.get("capabilities")
    if caps is None:
        capabilities = CAPABILITIES
    else:
        names = [c.lower() for c in _strings(caps, f"{where}: capabilities")]
        unknown = sorted(set(names) - CAPABILITIES)
        if unknown:
            raise InvalidInputError(f"{where}: unknown capability {unknown[0]!r} (known: pull, resolve, push)")
        capabilities = frozenset(names)
    ca = tuple(_abs(p, base) for p in _strings(table["ca"], f"{where}: ca")) if "ca" in table else ()
    pairs: list[tuple[Path, Path | None]] = []
    client = table.get("client")
    if client is not None:
        items = client if isinstance(client, list) else [client]
        for item in items:
            if isinstance(item, str):
                pairs.append((_abs(item, base), None))
            elif isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item):
                pairs.append((_abs(item[0], base), _abs(item[1], base)))
            else:
                raise InvalidInputError(f"{where}: client must be a file, a list of files or of [cert, key] pairs")
    skip = table.get("skip_verify", False)
    if not isinstance(skip, bool):
        raise InvalidInputError(f"{where}: skip_verify must be true or false")
    if "header" in table:
        log.warning("%s: [header] tables are not sent by cvmfs-snap (ignored)", where)
    return RegistryHost(parts.netloc.lower(), parts.scheme, capabilities, ca, tuple(pairs), skip, path)


def parse_hosts_toml(text: str, base: Path, where: str, registry: str) -> list[RegistryHost]:
    """The hosts of one ``hosts.toml``: its ``[host."…"]`` tables in file order, then the upstream: ``server`` with
    the file's top-level settings, or (no ``server``) the registry itself with containerd's defaults."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInputError(f"{where} is not valid TOML: {exc}") from None
    out: list[RegistryHost] = []
    hosts = data.get("host", {})
    if not isinstance(hosts, dict):
        raise InvalidInputError(f"{where}: 'host' must be a table of [host.\"<url>\"] tables")
    for url, table in hosts.items():  # tomllib keeps the file's order
        if not isinstance(table, dict):
            raise InvalidInputError(f"{where}: host {url!r} must be a table")
        out.append(_parse_host(url, table, base, f"{where} [host.{url!r}]"))
    server = data.get("server", "")
    if not isinstance(server, str):
        raise InvalidInputError(f"{where}: server must be a string")
    if server:
        out.append(_parse_host(server, data, base, f"{where} server"))
    else:
        top = _parse_host("https://placeholder", data, base, f"{where}")
        out.append(replace(_default_host(registry), ca=top.ca, client_pairs=top.client_pairs,
                           skip_verify=top.skip_verify))
    return out


def _cert_files(d: Path) -> tuple[tuple[Path, ...], tuple[tuple[Path, Path | None], ...]]:
    """docker's certs.d convention: ``*.crt`` CAs, ``X.cert`` + ``X.key`` client pairs (loadCertFiles)."""
    try:
        names = sorted(os.listdir(d))
    except OSError:
        return (), ()
    ca = tuple(d / n for n in names if n.endswith(".crt"))
    pairs = tuple((d / n, d / (n[:-5] + ".key")) for n in names
                  if n.endswith(".cert") and (n[:-5] + ".key") in names)
    return ca, pairs


def _default_host(registry: str) -> RegistryHost:
    if registry in DOCKER_HUB_ALIASES:
        return RegistryHost(DOCKER_HUB_API_HOST)
    if is_loopback(registry):
        return RegistryHost(registry, "http")
    return RegistryHost(registry)


def hosts_for(registry: str, hosts_dir: Path | None) -> list[RegistryHost]:
    """The endpoints containerd would try for ``registry`` (mirrors first, the server last).

    A malformed ``hosts.toml`` is an InvalidInputError naming the file (containerd logs it and falls back to the
    directory's certificate files; we refuse, so the admin sees why the mirror is not used)."""
    registry = registry.lower()
    if hosts_dir is None:
        return [_default_host(registry)]
    for d in host_dirs(Path(hosts_dir), registry):
        if not d.is_dir():
            continue
        f = d / HOSTS_TOML
        try:
            text = f.read_text(encoding="utf-8")
        except FileNotFoundError:
            text = ""
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidInputError(f"cannot read {f}: {exc}") from None
        if text.strip():
            hosts = parse_hosts_toml(text, d, str(f), registry)
        else:
            ca, pairs = _cert_files(d)
            hosts = [replace(_default_host(registry), ca=ca, client_pairs=pairs)]
        log.debug("registry %s: hosts from %s: %s", registry, d, ", ".join(f"{h.scheme}://{h.host}" for h in hosts))
        return hosts
    return [_default_host(registry)]


@dataclass(frozen=True)
class Endpoint:
    """One place to fetch an image's blobs from: the host and the image reference pointed at it."""

    host: RegistryHost
    ref: ImageReference


def endpoints(ref: ImageReference, hosts_dir: Path | None, capability: str = "pull") -> list[Endpoint]:
    """The endpoints for ``ref`` that have ``capability``, in containerd's order. Hosts our client cannot use (an
    API root other than ``/v2``) are left out with a warning; InvalidInputError when none is left."""
    out: list[Endpoint] = []
    for h in hosts_for(ref.registry, hosts_dir):
        if not h.can(capability):
            continue
        if h.path != API_PATH:
            log.warning("registry host %s://%s%s (for %s): an API root other than %s is not supported; skipped",
                        h.scheme, h.host, h.path, ref.registry, API_PATH)
            continue
        target = ref if h.host == ref.registry else replace(ref, registry=h.host, insecure=False)
        out.append(Endpoint(h, target))
    if not out:
        raise InvalidInputError(f"no usable {capability} host for registry {ref.registry} in {hosts_dir}: check "
                                "its hosts.toml (capabilities, server)")
    return out


def load_credentials(docker_config: Path | None = None, *, kubelet_config: Path | None = KUBELET_CONFIG
                     ) -> CredentialStore:
    """The node's registry credentials: ``docker_config`` (an explicit file must exist; None: ``$DOCKER_CONFIG``
    or ``~/.docker/config.json`` if present), then the kubelet's ``config.json`` for hosts the first lacks."""
    stores = [CredentialStore.from_docker_config(docker_config)]
    if kubelet_config is not None and Path(kubelet_config).is_file():
        stores.append(CredentialStore.from_docker_config(kubelet_config))
    merged: dict[str, Credentials] = {}
    for s in reversed(stores):  # earlier stores win
        for h in s.hosts():
            cred = s.get(h)
            if cred is not None:
                merged[h] = cred
    return CredentialStore(merged)


def credentials_for(store: CredentialStore, eps: Sequence[Endpoint]) -> dict[str, Credentials]:
    """The credentials each endpoint host needs (hosts without any are left out)."""
    out: dict[str, Credentials] = {}
    for ep in eps:
        cred = store.get(ep.ref.registry)
        if cred is not None:
            out[ep.ref.registry] = cred
    return out


def credentials_to_wire(creds: Mapping[str, Credentials]) -> dict[str, dict[str, str]] | None:
    """The control protocol's ``credentials`` field (lazy-design.md): ``{host: {"username", "secret"}}`` or None.
    Only for the 0600 control socket: never log, store or echo it."""
    return {h: {"username": c.username, "secret": c.password} for h, c in creds.items()} or None


def credentials_from_wire(value: object) -> CredentialStore:
    """The inverse of :func:`credentials_to_wire` (None or {} = anonymous); InvalidInputError without the secret
    for anything malformed."""
    if value is None:
        return CredentialStore()
    if not isinstance(value, dict):
        raise InvalidInputError("credentials must be an object of host -> {username, secret}")
    out: dict[str, Credentials] = {}
    for host, entry in value.items():
        if not (isinstance(host, str) and isinstance(entry, dict) and isinstance(entry.get("username"), str)
                and isinstance(entry.get("secret"), str)):
            raise InvalidInputError(f"credentials for {str(host)[:100]!r} must be {{username, secret}} strings")
        out[host] = Credentials(entry["username"], entry["secret"])
    return CredentialStore(out)
