"""Parse registry push notifications into the (registry, repository, tag) triples the daemon may publish.

Two payload families are understood:

* the CNCF distribution registry's ``notifications`` envelope
  (``application/vnd.docker.distribution.events.v1+json``): ``{"events": [{"action": "push", "target": {...},
  "request": {"host": ...}}]}``. The registry also sends events for blob uploads, pulls and pushes by digest; only
  manifest pushes *by tag* name something a recipe can ask for, so everything else is ignored (not an error: the
  registry would otherwise retry it forever).
* Harbor's ``PUSH_ARTIFACT`` webhook: ``{"type": "PUSH_ARTIFACT", "event_data": {"resources": [{"resource_url":
  "host/project/repo:tag", "tag": ...}], "repository": {...}}}``.

This module only parses and authenticates; which events are wanted (the recipe) is the daemon's decision. Malformed
input raises :class:`InvalidInputError`, which the daemon turns into HTTP 400 without stopping.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from typing import Required, TypedDict
from urllib.parse import urlsplit

from cvmfs_snap.errors import InvalidInputError
from cvmfs_snap.mediatypes import DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED, INDEX_TYPES, MANIFEST_TYPES
from cvmfs_snap.oci.reference import DOCKER_HUB_ALIASES, is_valid_name
from cvmfs_snap.validation import load_as

#: media types of things a tag can point to; blob pushes carry layer/config types or octet-stream
_MANIFEST_TYPES = MANIFEST_TYPES | INDEX_TYPES | {DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED}


#: the largest webhook body we read (registries batch events, but never megabytes of them)
MAX_BODY = 1 << 20


# -- the payloads' shapes (checked by cvmfs_snap.validation; only what is read, other keys are ignored) -------------
class _Envelope(TypedDict):
    events: list[dict[str, object]]


class _Action(TypedDict, total=False):
    action: object  # only "push" is read further


class _Target(TypedDict, total=False):
    repository: str
    tag: str
    mediaType: str  # the registry's spelling
    url: object  # read when it is a string
    digest: object


class _Push(TypedDict, total=False):
    target: Required[_Target]
    request: object  # its host is read when the target has no URL


class _HarborType(TypedDict):
    type: str


class _HarborResource(TypedDict, total=False):
    resource_url: Required[str]
    tag: object  # read when it is a non-empty string
    digest: object


class _HarborEventData(TypedDict):
    resources: list[_HarborResource]


class _HarborPush(TypedDict):
    event_data: _HarborEventData


@dataclass(frozen=True)
class PushEvent:
    """One tag that a registry says was pushed."""

    registry: str
    repository: str
    tag: str
    digest: str = ""

    @property
    def image(self) -> str:
        """``registry/repository:tag``, the form a recipe line and ``ImageReference.parse`` use."""
        return f"{self.registry}/{self.repository}:{self.tag}"


def normalize_host(host: str) -> str:
    """A registry host in one spelling, so that webhook hosts compare equal to recipe hosts.

    Default ports are dropped (``harbor.example.org:443`` is ``harbor.example.org``), case is folded, and every Docker
    Hub alias becomes ``docker.io``.
    """
    h = host.strip().lower()
    for default in (":443", ":80"):
        if h.endswith(default):
            h = h[: -len(default)]
    return "docker.io" if h in DOCKER_HUB_ALIASES else h


def check_authorization(header: str | None, secret: str | None) -> bool:
    """True when no secret is configured, or the ``Authorization`` header carries it.

    The distribution registry sends whatever the endpoint's ``headers`` say and Harbor its "auth header" verbatim, so
    both ``<secret>`` and ``Bearer <secret>`` are accepted. The comparison is constant-time.
    """
    if not secret:
        return True
    if not header:
        return False
    value = header.strip()
    candidates = [value]
    if value.lower().startswith("bearer "):
        candidates.append(value[7:].strip())
    want = secret.encode()
    ok = False
    for c in candidates:
        ok |= hmac.compare_digest(c.encode(), want)
    return ok


def load_json(body: bytes, what: str = "webhook body") -> object:
    """Parse a request body; too large, not JSON or nested too deeply for the parser is InvalidInputError."""
    if len(body) > MAX_BODY:
        raise InvalidInputError(f"{what} of {len(body)} bytes is larger than the {MAX_BODY} bytes accepted")
    try:
        return json.loads(body)
    except RecursionError as exc:
        raise InvalidInputError(f"{what} nests JSON arrays/objects too deeply to be a real payload") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{what} is not valid JSON: {exc}") from exc


def parse_distribution_events(body: bytes) -> list[PushEvent]:
    """Tag pushes from a distribution ``notifications`` envelope; other events are skipped."""
    return _distribution_events(load_json(body))


def _distribution_events(data: object) -> list[PushEvent]:
    events = load_as(_Envelope, data, "registry notification", strict=True,
                     kind='a JSON object with an "events" list')["events"]
    out: list[PushEvent] = []
    for i, raw in enumerate(events):
        what, at = f"registry notification event #{i}", ("events", i)
        if load_as(_Action, raw, "registry notification", strict=True, prefix=at).get("action") != "push":
            continue
        ev = load_as(_Push, raw, "registry notification", strict=True, prefix=at)
        target = ev["target"]
        tag = target.get("tag")
        media_type = target.get("mediaType", "")
        if not tag or (media_type and media_type not in _MANIFEST_TYPES):
            continue  # a blob upload or a push by digest: nothing a recipe names
        repository = target.get("repository")
        url = target.get("url")
        host = urlsplit(url).netloc if isinstance(url, str) and url else ""
        request = ev.get("request")
        if not host and isinstance(request, dict) and isinstance(request.get("host"), str):
            host = request["host"]
        if not repository or not host:
            raise InvalidInputError(
                f"{what} lacks target.repository, target.tag or a registry host (target.url or request.host)"
            )
        host = normalize_host(host)
        if not is_valid_name(host, repository, tag):
            raise InvalidInputError(f"{what} names an invalid image {host[:100]}/{repository[:200]}:{tag[:130]}")
        digest = target.get("digest", "")
        out.append(PushEvent(host, repository, tag, digest if isinstance(digest, str) else ""))
    return out


def split_resource_url(resource_url: str) -> tuple[str, str, str]:
    """``host/project/repo:tag`` (optionally ``@digest``) -> (host, repository, tag); tag "" for digest-only URLs."""
    url = resource_url.strip()
    if "://" in url:
        url = url.split("://", 1)[1]
    url = url.split("@", 1)[0]
    host, sep, rest = url.partition("/")
    if not sep or not rest:
        raise InvalidInputError(f"Harbor resource_url {resource_url[:300]!r} is not of the form host/project/repo:tag")
    repository, tag = rest, ""
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        repository, tag = rest.rsplit(":", 1)
    return normalize_host(host), repository, tag


def parse_harbor(body: bytes) -> list[PushEvent]:
    """Tag pushes from a Harbor ``PUSH_ARTIFACT`` webhook; other Harbor event types give an empty list."""
    return _harbor_events(load_json(body))


def _harbor_events(data: object) -> list[PushEvent]:
    if load_as(_HarborType, data, "Harbor webhook", strict=True, kind='a JSON object with a "type"')["type"] \
            != "PUSH_ARTIFACT":
        return []
    resources = load_as(_HarborPush, data, "Harbor PUSH_ARTIFACT webhook", strict=True)["event_data"]["resources"]
    out: list[PushEvent] = []
    for i, res in enumerate(resources):
        host, repository, tag = split_resource_url(res["resource_url"])
        given = res.get("tag")
        if isinstance(given, str) and given:
            tag = given
        if not tag:
            continue  # pushed by digest only
        if not is_valid_name(host, repository, tag):
            raise InvalidInputError(
                f"Harbor webhook resource #{i} names an invalid image {host[:100]}/{repository[:200]}:{tag[:130]}"
            )
        digest = res.get("digest", "")
        out.append(PushEvent(host, repository, tag, digest if isinstance(digest, str) else ""))
    return out


def parse_webhook(body: bytes) -> list[PushEvent]:
    """Either payload family, told apart by shape (``events`` list vs Harbor ``type``)."""
    data = load_json(body)
    if isinstance(data, dict) and "events" in data:
        return _distribution_events(data)
    if isinstance(data, dict) and "type" in data:
        return _harbor_events(data)
    raise InvalidInputError(
        'unknown webhook payload: expected a distribution registry envelope ({"events": [...]}) or a Harbor '
        'event ({"type": "PUSH_ARTIFACT", ...})'
    )
