"""Image references: parse what a site admin or a DUCC recipe writes into registry / repository / tag / digest.

The grammar follows the distribution reference grammar (the one docker, containerd and DUCC use), with two
deliberate differences:

* the registry is kept *as written*, only lower-cased (``registry.hub.docker.com`` stays that, it is not rewritten
  to ``docker.io``), because DUCC's public CVMFS paths are built from it; only :attr:`ImageReference.api_host` maps
  the Docker Hub aliases to the host that actually serves the API;
* ``https://`` and ``http://`` prefixes, as DUCC recipes write them, are accepted and stripped; ``http://`` is
  remembered in :attr:`ImageReference.insecure`, but it is a wish, not a setting: the client speaks plain HTTP only
  to loopback registries and to those configured insecure, and refuses an ``http://`` reference to any other host
  (see :mod:`cvmfs_snap.oci.transport`).

Every validator here matches the whole string (``re.fullmatch``): a tag or digest with a trailing newline is invalid.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, replace

from cvmfs_snap.errors import InvalidInputError

#: registries that are all Docker Hub; single-component repositories there live under ``library/``
DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry.hub.docker.com", "registry-1.docker.io"})
DOCKER_HUB_API_HOST = "registry-1.docker.io"
DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"

#: distribution limits the full name (registry + "/" + repository) to 255 characters
NAME_MAX = 255

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
# all validators here are used with ``fullmatch`` (never ``match`` with ``$``, which accepts a trailing newline)
_DOMAIN_RE = re.compile(
    rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]{{1,5}})?"
)
_PATH_COMPONENT_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
#: digest algorithms we can verify, with the length of their hex encoding
DIGEST_ALGORITHMS = {"sha256": 64, "sha512": 128}
_DIGEST_RE = re.compile(r"([a-z0-9]+(?:[.+_-][a-z0-9]+)*):([0-9a-f]+)")


def validate_digest(digest: str, what: str = "digest") -> str:
    """Return ``digest`` if it is ``sha256:<64 lower-case hex>`` (or sha512); raise InvalidInputError otherwise.

    Digests come from registries and manifests (untrusted) and end up in URLs and paths, so they are checked
    strictly here, once.
    """
    m = _DIGEST_RE.fullmatch(digest) if isinstance(digest, str) else None
    if not m:
        raise InvalidInputError(f"invalid {what} {digest!r}: expected 'sha256:' followed by 64 lower-case hex digits")
    algo, hexpart = m.group(1), m.group(2)
    if algo not in DIGEST_ALGORITHMS:
        raise InvalidInputError(f"unsupported digest algorithm in {what} {digest!r}: only sha256 and sha512 are "
                                "supported")
    if len(hexpart) != DIGEST_ALGORITHMS[algo]:
        raise InvalidInputError(f"invalid {what} {digest!r}: {algo} needs {DIGEST_ALGORITHMS[algo]} hex digits, "
                                f"got {len(hexpart)}")
    return digest


def is_valid_name(registry: str, repository: str, tag: str) -> bool:
    """Whether ``registry`` (host[:port]), ``repository`` and ``tag`` are each valid as :meth:`ImageReference.parse`
    checks them (for names that arrive already split, e.g. in registry webhooks)."""
    return bool(_DOMAIN_RE.fullmatch(registry) and _TAG_RE.fullmatch(tag)
                and all(_PATH_COMPONENT_RE.fullmatch(c) for c in repository.split("/")))


def _is_domain(component: str) -> bool:
    # same rule as docker's reference normalisation: a first component is a registry host when it looks like one
    # (has a dot or a port, is localhost, or has upper-case letters, which repositories never have)
    return "." in component or ":" in component or component == "localhost" or component.lower() != component


@dataclass(frozen=True)
class ImageReference:
    """A parsed image reference; ``tag`` is None only for digest-only references.

    ``registry`` is the host[:port] as written but in its one canonical spelling: lower case (DNS names and IPv6
    literals are case-insensitive), port kept. ``LOCALHOST:5000/x`` and ``localhost:5000/x`` are the same image
    and get the same metadata path, allow-list entry and credentials.
    """

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None
    #: the reference was written with ``http://``: use plain HTTP for this registry
    insecure: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.registry, str) and self.registry != self.registry.lower():
            object.__setattr__(self, "registry", self.registry.lower())

    @classmethod
    def parse(cls, text: str) -> ImageReference:
        """Parse ``[scheme://][registry/]repository[:tag][@digest]``; InvalidInputError says what is wrong."""
        if not isinstance(text, str):
            raise InvalidInputError(f"image reference must be a string, got {type(text).__name__}")
        original = text
        s = text.strip()
        if not s:
            raise InvalidInputError("empty image reference: write e.g. 'docker.io/library/ubuntu:22.04'")
        insecure = False
        low = s.lower()
        if low.startswith("https://"):
            s = s[len("https://"):]
        elif low.startswith("http://"):
            s = s[len("http://"):]
            insecure = True
        elif "://" in s:
            raise InvalidInputError(f"invalid image reference {original!r}: only http:// and https:// prefixes "
                                    "are understood")
        if any(c.isspace() for c in s):
            raise InvalidInputError(f"invalid image reference {original!r}: contains white space")

        digest: str | None = None
        if "@" in s:
            s, digest = s.split("@", 1)
            try:
                validate_digest(digest)
            except InvalidInputError as e:
                raise InvalidInputError(f"invalid image reference {original!r}: {e}") from None

        tag: str | None = None
        slash = s.rfind("/")
        colon = s.rfind(":")
        if colon > slash:
            s, tag = s[:colon], s[colon + 1:]
            if not _TAG_RE.fullmatch(tag):
                raise InvalidInputError(
                    f"invalid tag {tag!r} in image reference {original!r}: a tag is 1-128 characters of letters, "
                    "digits, '_', '.', '-' and must not start with '.' or '-'")
        if not s:
            raise InvalidInputError(f"invalid image reference {original!r}: no repository name")

        parts = s.split("/")
        if len(parts) > 1 and _is_domain(parts[0]):
            registry, path = parts[0], parts[1:]
            if not _DOMAIN_RE.fullmatch(registry):
                raise InvalidInputError(f"invalid registry host {registry!r} in image reference {original!r}")
        else:
            registry, path = DEFAULT_REGISTRY, parts
        if registry.lower() in DOCKER_HUB_ALIASES and len(path) == 1:
            path = ["library", *path]
        for comp in path:
            if not _PATH_COMPONENT_RE.fullmatch(comp):
                hint = " (repository names must be lower case)" if comp.lower() != comp else ""
                raise InvalidInputError(
                    f"invalid repository name component {comp!r} in image reference {original!r}{hint}: use "
                    "lower-case letters, digits and single separators '.', '_', '__', '-'")
        repository = "/".join(path)
        if len(registry) + 1 + len(repository) > NAME_MAX:
            raise InvalidInputError(f"image name in {original!r} is longer than {NAME_MAX} characters")
        if tag is None and digest is None:
            tag = DEFAULT_TAG
        return cls(registry=registry, repository=repository, tag=tag, digest=digest, insecure=insecure)

    @property
    def api_host(self) -> str:
        """The host[:port] that serves the registry API (Docker Hub aliases map to registry-1.docker.io)."""
        if self.registry.lower() in DOCKER_HUB_ALIASES:
            return DOCKER_HUB_API_HOST
        return self.registry

    @property
    def name(self) -> str:
        """``registry/repository`` without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def reference(self) -> str:
        """What to put after ``/manifests/`` in a registry URL: the digest when known, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def with_tag(self, tag: str) -> ImageReference:
        """The same repository with another tag (and no digest)."""
        if not isinstance(tag, str) or not _TAG_RE.fullmatch(tag):
            raise InvalidInputError(f"invalid tag {tag!r} for image {self.name}: a tag is 1-128 characters of "
                                    "letters, digits, '_', '.', '-' (no white space or line breaks) and must not "
                                    "start with '.' or '-'")
        return replace(self, tag=tag, digest=None)

    def with_digest(self, digest: str) -> ImageReference:
        """The same repository pinned to ``digest`` (the tag is kept for display)."""
        validate_digest(digest)
        return replace(self, digest=digest)

    def __str__(self) -> str:
        s = self.name
        if self.tag is not None:
            s += f":{self.tag}"
        if self.digest is not None:
            s += f"@{self.digest}"
        return s


def is_loopback(host: str) -> bool:
    """``host[:port]`` is localhost, 127.0.0.0/8 or ::1."""
    h = host.lower()
    if h.startswith("["):
        h = h[1:h.find("]")] if "]" in h else h[1:]
    else:
        h = h.rsplit(":", 1)[0] if h.count(":") == 1 else h
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False
