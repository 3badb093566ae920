"""The daemon's pure parts: webhook parsing and authentication, the work queue, recipe matching, allow-list."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable

import pytest

from cvmfs_snap.errors import InvalidInputError
from cvmfs_snap.mediatypes import OCI_MANIFEST
from cvmfs_snap.oci.reference import ImageReference
from publisher.policy import allowed_by, canonical_ref, recipe_patterns
from publisher.recipe import Recipe
from publisher.webhooks import (
    PushEvent,
    check_authorization,
    load_json,
    parse_distribution_events,
    parse_harbor,
    parse_webhook,
    split_resource_url,
)
from publisher.workqueue import QueueItem, WorkQueue

D1 = "sha256:" + "1" * 64


def envelope(*events: dict[str, object]) -> bytes:
    return json.dumps({"events": list(events)}).encode()


def push(repo: str, tag: str | None, media_type: str = OCI_MANIFEST, url_host: str | None = "reg.example:5000",
         request_host: str = "other.example:5000", action: str = "push") -> dict[str, object]:
    target: dict[str, object] = {"mediaType": media_type, "digest": D1, "repository": repo, "size": 10}
    if url_host:
        target["url"] = f"http://{url_host}/v2/{repo}/manifests/{D1}"
    if tag is not None:
        target["tag"] = tag
    return {"id": "x", "action": action, "target": target, "request": {"host": request_host, "method": "PUT"}}


def test_distribution_keeps_only_tag_pushes_of_manifests() -> None:
    body = envelope(
        push("a/b", "v1"),
        push("a/b", None),  # push by digest (index children)
        push("a/b", None, media_type="application/octet-stream"),  # blob upload
        push("a/b", "v1", action="pull"),
        push("c/d", "latest", url_host=None),
    )
    events = parse_distribution_events(body)
    assert events == [
        PushEvent("reg.example:5000", "a/b", "v1", D1),
        PushEvent("other.example:5000", "c/d", "latest", D1),  # host from request.host when no url
    ]
    assert events[0].image == "reg.example:5000/a/b:v1"
    assert parse_webhook(body) == events


def test_distribution_host_spelling_is_normalised() -> None:
    (ev,) = parse_distribution_events(envelope(push("library/ubuntu", "22.04", url_host="registry-1.docker.io:443")))
    assert ev.registry == "docker.io"


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"events": {}}',
        envelope({"action": "push"}),
        envelope("nope"),  # type: ignore[arg-type]
        envelope(push("../etc", "v1")),
        envelope(push("a/b", "bad tag!")),
        json.dumps({"events": [{"action": "push", "target": {"repository": "a/b", "tag": "v1"}}]}).encode(),
    ],
)
def test_malformed_distribution_payloads_are_invalid_input(body: bytes) -> None:
    with pytest.raises(InvalidInputError):
        parse_distribution_events(body)


def harbor(resource_url: str, tag: str | None = None, kind: str = "PUSH_ARTIFACT") -> bytes:
    res: dict[str, object] = {"digest": D1, "resource_url": resource_url}
    if tag is not None:
        res["tag"] = tag
    return json.dumps({
        "type": kind, "occur_at": 1700000000, "operator": "admin",
        "event_data": {"resources": [res], "repository": {"name": "repo", "namespace": "proj",
                                                           "repo_full_name": "proj/repo"}},
    }).encode()


def test_harbor_push_artifact() -> None:
    assert parse_harbor(harbor("harbor.example.org/proj/repo:v2", tag="v2")) == [
        PushEvent("harbor.example.org", "proj/repo", "v2", D1)
    ]
    # the tag may only be in the URL; a digest-only push names no tag; other event types are ignored
    assert parse_webhook(harbor("harbor.example.org:443/proj/sub/repo:v3"))[0].image == (
        "harbor.example.org/proj/sub/repo:v3"
    )
    assert parse_harbor(harbor(f"harbor.example.org/proj/repo@{D1}")) == []
    assert parse_harbor(harbor("harbor.example.org/proj/repo:v2", kind="DELETE_ARTIFACT")) == []
    assert split_resource_url("h:5000/p/r:t") == ("h:5000", "p/r", "t")
    for bad in (b'{"type": "PUSH_ARTIFACT"}', harbor("no-slash"), b'{"no": "type"}'):
        with pytest.raises(InvalidInputError):
            parse_webhook(bad)


def test_authorization() -> None:
    assert check_authorization(None, None)
    assert check_authorization("anything", "")
    assert not check_authorization(None, "s3cret")
    assert not check_authorization("Bearer wrong", "s3cret")
    assert check_authorization("Bearer s3cret", "s3cret")
    assert check_authorization("s3cret", "s3cret")


def _item(key: str) -> QueueItem:
    return QueueItem(key, ImageReference.parse(key), "test")


def test_queue_dedupes_and_never_runs_one_image_twice() -> None:
    q = WorkQueue()
    assert q.put(_item("r.example/a:1")) == "queued"
    assert q.put(_item("r.example/a:1")) == "already-queued"
    assert q.put(_item("r.example/b:1")) == "queued"
    first = q.get()
    assert first is not None and first.key == "r.example/a:1"
    # asked again while running: runs once more afterwards, not in parallel
    assert q.put(_item("r.example/a:1")) == "after-current-run"
    second = q.get()
    assert second is not None and second.key == "r.example/b:1"
    assert q.snapshot() == {"waiting": [], "running": ["r.example/a:1", "r.example/b:1"]}
    q.done("r.example/a:1")
    again = q.get()
    assert again is not None and again.key == "r.example/a:1"
    q.done("r.example/a:1")
    q.done("r.example/b:1")
    assert q.wait_idle(1)
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(q.get()))
    t.start()
    q.close()
    t.join(5)
    assert got == [None]
    assert q.put(_item("r.example/c:1")) == "closing"


def test_recipe_patterns_match_pushed_tags() -> None:
    recipe = Recipe.parse(
        "version: 1\ninput:\n"
        "  - 'https://registry.hub.docker.com/library/debian:*'\n"
        "  - 'http://127.0.0.1:5000/team/app:v1'\n"
        "  - 'not a reference!'\n"
    )
    pats = recipe_patterns(recipe)
    assert len(pats) == 2
    debian, app = pats
    assert debian.matches("registry-1.docker.io", "library/debian", "bookworm")
    assert not debian.matches("registry-1.docker.io", "library/ubuntu", "bookworm")
    assert app.matches("127.0.0.1:5000", "team/app", "v1")
    assert not app.matches("127.0.0.1:5000", "team/app", "v2")
    assert not app.matches("127.0.0.1:5001", "team/app", "v1")
    # the reference published keeps the recipe's spelling of the registry (DUCC paths) and its http:// marker
    ref = debian.line_ref.with_tag("bookworm")
    assert str(ref) == "registry.hub.docker.com/library/debian:bookworm"
    assert app.line_ref.insecure


def test_publish_on_miss_allow_list() -> None:
    allow = ["registry.cern.ch/atlas/*", "docker.io/library/*"]
    assert allowed_by(allow, ImageReference.parse("registry.cern.ch/atlas/athena:22"))
    assert allowed_by(allow, ImageReference.parse("ubuntu:22.04"))
    assert allowed_by(allow, ImageReference.parse("registry-1.docker.io/library/ubuntu"))
    assert not allowed_by(allow, ImageReference.parse("registry.cern.ch/cms/cmssw:1"))
    assert not allowed_by(allow, ImageReference.parse("evil.example/atlas/athena:22"))
    assert not allowed_by([], ImageReference.parse("registry.cern.ch/atlas/athena:22"))


def test_debounce_keeps_the_latest_due_time() -> None:
    """Each push of a burst moves the publish back: the burst is published once, after it has been quiet."""
    q = WorkQueue()
    key = "r.example/a:1"
    assert q.put(QueueItem(key, ImageReference.parse(key), "webhook", 100.0)) == "queued"
    assert q.put(QueueItem(key, ImageReference.parse(key), "webhook", 105.0)) == "already-queued"
    assert q.due(key) == 105.0
    # an earlier request (a poll) does not cut the quiet period short either
    assert q.put(QueueItem(key, ImageReference.parse(key), "poll", 0.0)) == "already-queued"
    assert q.due(key) == 105.0
    # requests while the image is being published: one more run, due at the latest of them
    q2 = WorkQueue()
    q2.put(QueueItem(key, ImageReference.parse(key), "poll", 0.0))
    item = q2.get()
    assert item is not None
    assert q2.put(QueueItem(key, ImageReference.parse(key), "webhook", 50.0)) == "after-current-run"
    assert q2.put(QueueItem(key, ImageReference.parse(key), "webhook", 60.0)) == "after-current-run"
    q2.done(key)
    assert q2.due(key) == 60.0


def test_registry_names_are_compared_and_queued_in_one_spelling() -> None:
    for spelling in ("LOCALHOST:5000", "LocalHost:5000", "localhost:5000"):
        ref = ImageReference.parse(f"{spelling}/team/app:v1")
        assert allowed_by(["LOCALHOST:5000/team/*"], ref)
        assert allowed_by(["localhost:5000/team/*"], ref)
        assert str(canonical_ref(ref)) == "localhost:5000/team/app:v1"
    ref = ImageReference.parse("http://Registry.Hub.Docker.com/library/debian:12")
    canon = canonical_ref(ref)
    # case folded, but the Docker Hub alias the recipe wrote (DUCC paths) and the http:// marker stay
    assert str(canon) == "registry.hub.docker.com/library/debian:12" and canon.insecure
    recipe = Recipe.parse("version: 1\ninput:\n  - 'LocalHost:5000/team/app:v*'\n")
    (pat,) = recipe_patterns(recipe)
    assert pat.matches("LOCALHOST:5000", "team/app", "v2")
    assert str(pat.ref_for("v2")) == "localhost:5000/team/app:v2"


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"a": ' * 100_000, b"[" * 5000 + b"]" * 5000])
def test_deeply_nested_json_is_invalid_input(body: bytes) -> None:
    with pytest.raises(InvalidInputError, match="nests JSON"):
        load_json(body)
    with pytest.raises(InvalidInputError):
        parse_webhook(body)


@pytest.mark.parametrize("field", ["tag", "repository"])
def test_webhook_names_with_a_trailing_newline_are_invalid(field: str) -> None:
    ev = push("team/app", "v1")
    target = ev["target"]
    assert isinstance(target, dict)
    target[field] = str(target[field]) + "\n"
    with pytest.raises(InvalidInputError, match="invalid image"):
        parse_distribution_events(envelope(ev))


@pytest.mark.parametrize("key, value", [("http_workers", 0), ("max_connections", True), ("keep_alive_timeout", 0),
                                        ("connection_lifetime", 0),
                                        ("request_timeout", -1), ("request_timeout", "10")])
def test_http_limits_are_range_checked(key: str, value: object) -> None:
    from publisher.config import DaemonConfig

    settings = DaemonConfig(**{key: value})  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match=f"daemon.{key}"):
        settings.validate("test")


def test_connections_are_shut_down_after_their_lifetime() -> None:
    from publisher.httpserver import CappedListener

    listener = CappedListener(socket.AF_INET, socket.SOCK_STREAM)
    listener.limit = 2
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    clients = [socket.create_connection(listener.getsockname()[:2], timeout=10) for _ in range(3)]
    try:
        conns = [listener.accept()[0] for _ in range(2)]
        with pytest.raises(OSError, match="HTTP connections open, the limit"):
            listener.accept()  # the third waits in the kernel's queue
        assert listener.expire(3600) == 0
        assert listener.expire(0) == 2
        assert [c.recv(10) for c in clients[:2]] == [b"", b""]  # the clients see the end of the stream
        for c in conns:
            c.close()
        third, _addr = listener.accept()  # closing made room
        third.close()
    finally:
        for c in clients:
            c.close()
        listener.close()


@pytest.mark.parametrize(("parse", "body", "says"), [
    (parse_distribution_events, b"[]",
     'registry notification: expected a JSON object with an "events" list, got list []'),
    (parse_distribution_events, b'{"events": {}}',
     "registry notification: events: expected a list of mappings, got {}"),
    (parse_distribution_events, b'{"events": [{"action": "pull"}, "nope"]}',
     "registry notification: events[1]: expected a mapping, got 'nope'"),
    (parse_distribution_events, b'{"events": [{"action": "push"}]}',
     "registry notification: events[0].target: missing (a required key), expected a mapping"),
    (parse_distribution_events, b'{"events": [{"action": "push", "target": {"repository": "a/b", "tag": 5}}]}',
     "registry notification: events[0].target.tag: expected a string, got 5"),
    (parse_harbor, b'{"type": 5}', "Harbor webhook: type: expected a string, got 5"),
    (parse_harbor, b'{"type": "PUSH_ARTIFACT"}',
     "Harbor PUSH_ARTIFACT webhook: event_data: missing (a required key), expected a mapping"),
    (parse_harbor, b'{"type": "PUSH_ARTIFACT", "event_data": {"resources": [{"tag": "v1"}]}}',
     "Harbor PUSH_ARTIFACT webhook: event_data.resources[0].resource_url: missing (a required key), expected a string"),
])
def test_malformed_webhook_messages_name_the_key(parse: Callable[[bytes], list[PushEvent]], body: bytes,
                                                 says: str) -> None:
    with pytest.raises(InvalidInputError) as ei:
        parse(body)
    assert str(ei.value) == says


def test_events_that_are_not_pushes_are_skipped_whatever_they_hold() -> None:
    body = b'{"events": [{"action": "pull", "target": 5}, {"action": "delete"}]}'
    assert parse_distribution_events(body) == []
    assert parse_harbor(b'{"type": "DELETE_ARTIFACT", "event_data": 5}') == []


@pytest.mark.parametrize(("body", "says"), [
    (b"[]", 'publish-on-miss body: expected {"image": "registry/repository:tag"} (optionally with "layer": '
            '"sha256:..."), got list []'),
    (b"{}", "publish-on-miss body: image: missing (a required key), expected a string"),
    (b'{"image": 5}', "publish-on-miss body: image: expected a string, got 5"),
    (b'{"image": "r.example/a:1", "layer": 5}', "publish-on-miss body: layer: expected a string or null, got 5"),
])
def test_malformed_publish_on_miss_bodies_name_the_key(body: bytes, says: str) -> None:
    from publisher.intake import Intake

    with pytest.raises(InvalidInputError) as ei:
        Intake._parse_miss(body)
    assert str(ei.value) == says
