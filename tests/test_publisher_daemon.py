"""The publisher daemon end to end: a real subprocess (``python -m publisher.cli loop``), a real registry whose
``notifications`` call it, the local backend, and plain HTTP requests for Harbor, publish-on-miss and /metrics."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from cvmfs_snap.layout import ImageRecord, RepositoryLayout
from cvmfs_snap_devenv import images as im
from cvmfs_snap_devenv.procs import stop_process
from cvmfs_snap_devenv.registry import Registry, free_port, start_registry, webhook_notifications
from tests.support import waiting

SECRET = "s3cret-for-tests"
WAIT = 90.0


def wait_for(what: str, cond: Callable[[], object], daemon: Daemon | None = None, timeout: float = WAIT) -> object:
    """:func:`tests.support.waiting.wait_for` with the daemon's log tail in the failure message."""
    return waiting.wait_for(cond, what, timeout,
                            details=lambda: "--- daemon log ---\n" + (daemon.log.read_text()[-4000:] if daemon else ""))


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    url: str
    root: Path
    recipe: Path
    log: Path
    layout: RepositoryLayout

    def record(self, host: str, repo: str, tag: str) -> ImageRecord | None:
        p = self.layout.image_metadata_dir(host, repo, tag) / "image.json"
        try:
            return ImageRecord.from_json(p.read_bytes())
        except FileNotFoundError:
            return None

    def wait_published(self, host: str, repo: str, tag: str, manifest_digest: str) -> ImageRecord:
        def done() -> ImageRecord | None:
            rec = self.record(host, repo, tag)
            return rec if rec is not None and rec.manifest_digest == manifest_digest else None

        rec = wait_for(f"{host}/{repo}:{tag} to be published", done, self)
        assert isinstance(rec, ImageRecord)
        return rec

    def write_recipe(self, lines: list[str]) -> None:
        """Save the recipe the way editors do: write a temporary file and rename it over the old one."""
        tmp = self.recipe.with_name(".recipe.yaml.swp")
        tmp.write_text(yaml.safe_dump({"version": 1, "input": lines}))
        os.replace(tmp, self.recipe)


def start_daemon(tmp: Path, recipe_lines: list[str], daemon_cfg: dict[str, object],
                 env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()) -> Daemon:
    """``cvmfs-snap-publisher loop`` as a subprocess (``prefix``: e.g. a ``prlimit`` command line to run it under)."""
    root = tmp / "repo"
    (tmp / "recipes").mkdir()
    recipe = tmp / "recipes" / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"version": 1, "input": recipe_lines}))
    cfg = tmp / "publisher.yaml"
    cfg.write_text(yaml.safe_dump({"backend": "local", "root": str(root), "state_dir": str(tmp / "state"),
                                   "daemon": daemon_cfg}))
    log = tmp / "recipes" / "daemon.log"  # beside the recipe: its own writes must not look like recipe edits
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "publisher.cli", "loop", str(recipe), "--config", str(cfg),
             "--log-level", "debug"],
            stdout=logf, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True,
        )
    url = f"http://{daemon_cfg['listen']}"
    d = Daemon(proc, url, root, recipe, log, RepositoryLayout(root))

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited with {proc.returncode}: {log.read_text()[-4000:]}")
        try:
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for("the daemon to serve /healthz", healthy, d)
    return d


def stop_daemon(d: Daemon) -> int:
    return stop_process(d.proc, timeout=60, group=False)


@dataclass
class Env:
    daemon: Daemon
    loud: Registry  # sends notifications to the daemon
    quiet: Registry  # sends nothing (Harbor payloads and publish-on-miss are posted by the tests)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("daemon")
    port = free_port()
    notifications = webhook_notifications(f"http://127.0.0.1:{port}/webhooks/registry", SECRET)
    with start_registry(tmp / "loud", extra_config=notifications) as loud, \
            start_registry(tmp / "quiet") as quiet:
        recipe = [f"{loud.host}/hook/app:*", f"{quiet.host}/harbor/img:v2"]
        d = start_daemon(
            tmp, recipe,
            {"listen": f"127.0.0.1:{port}", "poll_interval": 3600, "debounce": 0.2, "request_timeout": 2,
             "connection_lifetime": 8,
             "publish_on_miss_allow": [f"{quiet.host}/miss/*", f"LOCALHOST:{quiet.host.rsplit(':', 1)[1]}/case/*"]},
            env={"CVMFS_SNAP_WEBHOOK_SECRET": SECRET},
        )
        try:
            yield Env(d, loud, quiet)
        finally:
            rc = stop_daemon(d)
            assert rc == 0, d.log.read_text()[-4000:]


def test_registry_push_makes_the_daemon_publish(env: Env) -> None:
    img = im.image([im.layer([("etc/hook", b"pushed\n")])])
    digest = im.push_image(env.loud.url, "hook/app", "v1", img)
    rec = env.daemon.wait_published(env.loud.host, "hook/app", "v1", digest)
    assert rec.layers == [lay.digest for lay in img.layers]
    assert env.daemon.layout.is_layer_complete(img.layers[0].digest)
    link = env.daemon.layout.public_link(env.loud.host, "hook/app", "v1")
    assert (link / "etc/hook").read_bytes() == b"pushed\n"

    # the tag moves: the next push publishes the new manifest
    img2 = im.image([im.layer([("etc/hook", b"pushed again\n")])])
    digest2 = im.push_image(env.loud.url, "hook/app", "v1", img2)
    env.daemon.wait_published(env.loud.host, "hook/app", "v1", digest2)
    assert (link / "etc/hook").read_bytes() == b"pushed again\n"


def test_recipe_edit_publishes_the_new_image(env: Env) -> None:
    img = im.image([im.layer([("etc/edit", b"added by editing the recipe\n")])])
    digest = im.push_image(env.loud.url, "edit/new", "v1", img)
    # not in the recipe: the registry's notification is acknowledged but ignored
    wait_for("the ignored webhook", lambda: "edit/new:v1" in env.daemon.log.read_text(), env.daemon)
    assert env.daemon.record(env.loud.host, "edit/new", "v1") is None
    recipe = yaml.safe_load(env.daemon.recipe.read_text())["input"]
    env.daemon.write_recipe([*recipe, f"{env.loud.host}/edit/new:v1", "Broken Line!"])
    env.daemon.wait_published(env.loud.host, "edit/new", "v1", digest)
    # the broken line fails on its own, with its reason
    status = httpx.get(f"{env.daemon.url}/status").json()
    (broken,) = [s for s in status["images"] if s["image"] == "Broken Line!"]
    assert broken["source"] == "recipe" and not broken["ok"] and "white space" in broken["message"]
    # a broken recipe is reported and the previous one kept; the daemon keeps serving
    env.daemon.recipe.write_text("version: 1\ninput: [unclosed\n")
    wait_for("the broken recipe to be reported",
             lambda: httpx.get(f"{env.daemon.url}/healthz").json()["recipe_error"], env.daemon)
    env.daemon.write_recipe([*recipe, f"{env.loud.host}/edit/new:v1"])
    wait_for("the fixed recipe to be loaded",
             lambda: httpx.get(f"{env.daemon.url}/healthz").json()["recipe_error"] is None, env.daemon)


def harbor_payload(resource_url: str, tag: str) -> dict[str, object]:
    return {"type": "PUSH_ARTIFACT", "occur_at": 1700000000, "operator": "admin",
            "event_data": {"resources": [{"digest": "", "tag": tag, "resource_url": resource_url}],
                           "repository": {"name": "img", "namespace": "harbor", "repo_full_name": "harbor/img"}}}


def test_harbor_webhook(env: Env) -> None:
    img = im.image([im.layer([("etc/harbor", b"from harbor\n")])])
    digest = im.push_image(env.quiet.url, "harbor/img", "v2", img)
    body = harbor_payload(f"{env.quiet.host}/harbor/img:v2", "v2")
    r = httpx.post(f"{env.daemon.url}/webhooks/harbor", json=body)
    assert r.status_code == 401  # the shared secret is required
    r = httpx.post(f"{env.daemon.url}/webhooks/harbor", json=body, headers={"Authorization": SECRET})
    assert r.status_code == 200, r.text
    assert r.json()["queued"] == [f"{env.quiet.host}/harbor/img:v2"]
    env.daemon.wait_published(env.quiet.host, "harbor/img", "v2", digest)
    # tags the recipe does not name are acknowledged and ignored
    r = httpx.post(f"{env.daemon.url}/webhooks", json=harbor_payload(f"{env.quiet.host}/harbor/img:v3", "v3"),
                   headers={"Authorization": f"Bearer {SECRET}"})
    assert r.status_code == 200 and r.json() == {"queued": [], "ignored": [f"{env.quiet.host}/harbor/img:v3"]}


def test_publish_on_miss_respects_the_allow_list(env: Env) -> None:
    img = im.image([im.layer([("etc/miss", b"published on demand\n")])])
    digest = im.push_image(env.quiet.url, "miss/one", "v1", img)
    im.push_image(env.quiet.url, "other/one", "v1", img)
    url = f"{env.daemon.url}/publish-on-miss"
    # node reports need the shared secret too
    r = httpx.post(url, json={"image": f"{env.quiet.host}/miss/one:v1"})
    assert r.status_code == 401
    auth = {"Authorization": f"Bearer {SECRET}"}
    r = httpx.post(url, json={"image": f"{env.quiet.host}/other/one:v1"}, headers=auth)
    assert r.status_code == 403 and "allow-list" in r.json()["error"]
    assert httpx.post(url, json={"image": "Not An Image!"}, headers=auth).status_code == 400
    r = httpx.post(url, json={"image": f"{env.quiet.host}/miss/one:v1", "layer": "sha256:../x"}, headers=auth)
    assert r.status_code == 400
    r = httpx.post(url, json={"image": f"{env.quiet.host}/miss/one:v1", "layer": img.layers[0].digest}, headers=auth)
    assert r.status_code == 202, r.text
    env.daemon.wait_published(env.quiet.host, "miss/one", "v1", digest)
    assert env.daemon.record(env.quiet.host, "other/one", "v1") is None
    # the layer is there now; and asking again right away for the image is rate-limited, not re-queued
    r = httpx.post(url, json={"image": f"{env.quiet.host}/miss/one:v1", "layer": img.layers[0].digest}, headers=auth)
    assert r.status_code == 200 and r.json()["status"] == "present"
    r = httpx.post(url, json={"image": f"{env.quiet.host}/miss/one:v1"}, headers=auth)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0


@pytest.mark.parametrize("body", [b"{not json", b'{"events": "x"}', b'{"events": [{"action": "push"}]}', b"[]"])
def test_malformed_webhooks_get_400_and_the_daemon_keeps_serving(env: Env, body: bytes) -> None:
    auth = {"Authorization": f"Bearer {SECRET}", "Content-Type": "application/json"}
    r = httpx.post(f"{env.daemon.url}/webhooks/registry", content=body, headers=auth)
    assert r.status_code == 400 and r.json()["error"]
    assert httpx.get(f"{env.daemon.url}/healthz").status_code == 200
    assert env.daemon.proc.poll() is None


def test_metrics_and_status(env: Env) -> None:
    img = im.image([im.layer([("etc/metrics", b"m\n")])])
    digest = im.push_image(env.loud.url, "hook/app", "metrics", img)
    env.daemon.wait_published(env.loud.host, "hook/app", "metrics", digest)
    text = httpx.get(f"{env.daemon.url}/metrics").text

    def value(sample: str) -> float:
        lines = [ln for ln in text.splitlines() if ln.startswith(sample + " ") or ln.startswith(sample + "{")]
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)

    assert value("cvmfs_snap_publisher_images_published_total") >= 1
    assert value("cvmfs_snap_publisher_layers_published_total") >= 1
    assert value("cvmfs_snap_publisher_bytes_published_total") >= len(b"m\n")
    assert value("cvmfs_snap_publisher_image_seconds_count") >= 1
    assert "cvmfs_snap_publisher_queue_depth" in text
    assert value('cvmfs_snap_publisher_webhooks_total{kind="registry",outcome="ok"}') >= 1
    status = httpx.get(f"{env.daemon.url}/status").json()
    key = f"{env.loud.host}/hook/app:metrics"
    assert any(s["image"] == key and s["ok"] for s in status["images"])


def raw_request(url: str, head: bytes, body: bytes = b"", timeout: float = 15.0) -> tuple[bytes, bool]:
    """Send ``head`` (and ``body``) on a plain socket, read until the server closes or ``timeout``; returns what
    came back and whether the server closed the connection."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(head + body)
        got = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    return got, True
                got += chunk
        except TimeoutError:
            return got, False
        except ConnectionResetError:
            return got, True


def test_the_secret_is_checked_before_the_body_is_read(env: Env) -> None:
    # the headers promise a body that never comes: the answer must not wait for it
    head = b"POST /webhooks/registry HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
    got, closed = raw_request(env.daemon.url, head)
    assert got.startswith(b"HTTP/1.1 401"), got
    assert closed  # and the connection is not kept for the unread body
    wrong = head.replace(b"Host: x\r\n", b"Host: x\r\nAuthorization: Bearer wrong\r\n")
    got, closed = raw_request(env.daemon.url, wrong)
    assert got.startswith(b"HTTP/1.1 401") and closed, got
    miss = head.replace(b"/webhooks/registry", b"/publish-on-miss")
    assert raw_request(env.daemon.url, miss)[0].startswith(b"HTTP/1.1 401")


def test_body_size_and_time_are_bounded(env: Env) -> None:
    auth = f"Authorization: Bearer {SECRET}\r\n".encode()
    # too large: refused on the header, before the body is sent
    head = b"POST /webhooks/registry HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 2000000000\r\n\r\n"
    got, closed = raw_request(env.daemon.url, head)
    assert got.startswith(b"HTTP/1.1 413") and closed, got
    # a chunked body is cut at the same limit
    chunk = b"%x\r\n" % (1 << 20) + b" " * (1 << 20) + b"\r\n"
    head = b"POST /webhooks/registry HTTP/1.1\r\nHost: x\r\n" + auth + b"Transfer-Encoding: chunked\r\n\r\n"
    got, closed = raw_request(env.daemon.url, head, chunk * 2 + b"0\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 413"), got
    # a body that does not arrive within daemon.request_timeout (2 s here): 408, connection closed
    head = b"POST /publish-on-miss HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 100\r\n\r\n"
    got, closed = raw_request(env.daemon.url, head, b'{"image": ')
    assert got.startswith(b"HTTP/1.1 408") and closed, got
    # no length at all
    head = b"POST /publish-on-miss HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n"
    assert raw_request(env.daemon.url, head)[0].startswith(b"HTTP/1.1 411")
    assert httpx.get(f"{env.daemon.url}/healthz").status_code == 200


def test_http2_with_prior_knowledge_is_refused(env: Env) -> None:
    """An HTTP/2 connection that opens no stream is never idle to hypercorn: such connections are ended at once
    (webhooks and nodes speak HTTP/1.1)."""
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + SETTINGS
    got, closed = raw_request(env.daemon.url, preface, timeout=30)
    assert closed and got == b"", got  # not even hypercorn's own SETTINGS frame
    got, closed = raw_request(env.daemon.url, preface[:5], preface[5:], timeout=30)  # in two pieces
    assert closed and got == b"", got


def test_a_client_that_does_not_read_its_answers_is_disconnected(env: Env) -> None:
    """Pipelined requests whose answers are never read: the daemon gives up on the connection after
    ``request_timeout`` (2 s here) instead of waiting forever (hypercorn alone would answer all 100 a connection
    may carry, once the client reads again)."""
    host, port = env.daemon.url.removeprefix("http://").rsplit(":", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(30)
        s.connect((host, int(port)))
        # each answer repeats the 15 KB path: 100 of them are more than the socket buffers hold
        s.sendall((b"GET /" + b"x" * 15000 + b" HTTP/1.1\r\nHost: x\r\n\r\n") * 100)
        time.sleep(6)  # not reading: the daemon's writes block, then time out
        got = b""
        try:
            while chunk := s.recv(1 << 20):
                got += chunk
        except ConnectionResetError:
            pass  # closed with requests unread: a reset
    answers = got.count(b"HTTP/1.1 404")
    assert answers < 100, answers
    assert httpx.get(f"{env.daemon.url}/healthz").status_code == 200


@pytest.mark.parametrize("path", ["/webhooks/registry", "/webhooks/harbor", "/webhooks", "/publish-on-miss"])
def test_deeply_nested_json_is_a_400(env: Env, path: str) -> None:
    auth = {"Authorization": f"Bearer {SECRET}", "Content-Type": "application/json"}
    for body in (b"[" * 200_000, b'{"events": ' * 50_000, b'{"image": ' + b"[" * 300_000 + b"]" * 300_000 + b"}"):
        r = httpx.post(f"{env.daemon.url}{path}", content=body, headers=auth)
        assert r.status_code == 400, r.text
        assert "nests JSON" in r.json()["error"] or "must be" in r.json()["error"]
    assert httpx.get(f"{env.daemon.url}/healthz").status_code == 200


def test_registry_host_names_are_one_registry_whatever_their_case(env: Env) -> None:
    """``LOCALHOST:port`` and ``LocalHost:port`` are one registry: one queue entry, one metadata tree, lower case,
    through publish-on-miss and through webhooks."""
    port = env.quiet.host.rsplit(":", 1)[1]
    auth = {"Authorization": f"Bearer {SECRET}"}
    img = im.image([im.layer([("etc/case", b"one registry\n")])])
    digest = im.push_image(env.quiet.url, "case/miss", "v1", img)
    # publish-on-miss: the allow-list says LOCALHOST, the nodes say LocalHost and localhost
    url = f"{env.daemon.url}/publish-on-miss"
    r = httpx.post(url, json={"image": f"LocalHost:{port}/case/miss:v1"}, headers=auth)
    assert r.status_code == 202 and r.json() == {"status": "queued", "image": f"localhost:{port}/case/miss:v1"}
    r = httpx.post(url, json={"image": f"LOCALHOST:{port}/case/miss:v1"}, headers=auth)
    assert r.status_code in (202, 429) and r.json().get("status") != "queued", r.text
    env.daemon.wait_published(f"localhost:{port}", "case/miss", "v1", digest)
    r = httpx.post(url, json={"image": f"localhost:{port}/case/miss:v1"}, headers=auth)
    assert r.status_code == 429  # the same image, tried just now

    # webhooks: the recipe spells the registry one way, the pushes two others
    recipe = yaml.safe_load(env.daemon.recipe.read_text())["input"]
    env.daemon.write_recipe([*recipe, f"LocalHost:{port}/case/hook:v*"])
    img2 = im.image([im.layer([("etc/case", b"pushed\n")])])
    digest2 = im.push_image(env.quiet.url, "case/hook", "v1", img2)
    want = [f"localhost:{port}/case/hook:v1"]

    def queued(host: str) -> object:
        body = harbor_payload(f"{host}:{port}/case/hook:v1", "v1")
        return httpx.post(f"{env.daemon.url}/webhooks/harbor", json=body, headers=auth).json()["queued"]

    assert wait_for("the recipe with the new line to be loaded", lambda: queued("LOCALHOST"), env.daemon) == want
    assert queued("LocalHost") == want
    env.daemon.wait_published(f"localhost:{port}", "case/hook", "v1", digest2)
    names = {p.name for p in (env.daemon.root / ".metadata").iterdir()}
    assert f"localhost:{port}" in names
    assert not {n for n in names if n.lower() == f"localhost:{port}" and n != f"localhost:{port}"}, names
    status = httpx.get(f"{env.daemon.url}/status").json()
    # (a recipe line's own failure is reported as the line is written; published images are in one spelling)
    assert not [s for s in status["images"]
                if "case/" in s["image"] and "localhost" not in s["image"] and s["source"] != "recipe"], status
    env.daemon.write_recipe(recipe)


def test_bad_image_fails_alone_and_sigterm_finishes_in_flight_work(tmp_path: Path, registry: Registry) -> None:
    """An image that does not exist fails with a message in /status; SIGTERM while an image is being published
    lets that publish finish, then the daemon exits with status 0."""
    import threading

    from tests.support.http_servers import Reply, Request, serve

    release = threading.Event()
    stalled = threading.Event()

    def stalling_registry(req: Request) -> Reply:
        if "/manifests/" in req.path:
            stalled.set()
            release.wait(60)
            return Reply(404, {"Content-Type": "application/json"},
                         b'{"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]}')
        return Reply(200, {"Content-Type": "application/json"}, b"{}")

    img = im.image([im.layer([("etc/ok", b"ok\n")])])
    digest = im.push_image(registry.url, "term/ok", "v1", img)
    port = free_port()
    with serve(stalling_registry) as slow:
        d = start_daemon(tmp_path, [f"{registry.host}/term/missing:v1", f"{registry.host}/term/ok:v1",
                                    f"{slow.host}/stall/img:v1"],
                         {"listen": f"127.0.0.1:{port}", "poll_interval": 3600, "debounce": 0.1})
        try:
            d.wait_published(registry.host, "term/ok", "v1", digest)

            def failed() -> list[dict[str, object]]:
                images = httpx.get(f"{d.url}/status").json()["images"]
                return [s for s in images if "term/missing" in str(s["image"]) and not s["ok"]]

            statuses = wait_for("the missing image to fail", failed, d)
            assert isinstance(statuses, list)
            assert "term/missing" in str(statuses[0]["message"])

            wait_for("the stalled image to be in flight", stalled.is_set, d)
            assert httpx.get(f"{d.url}/status").json()["queue"]["running"] == [f"{slow.host}/stall/img:v1"]
            d.proc.send_signal(signal.SIGTERM)
            wait_for("SIGTERM to be received", lambda: "received SIGTERM" in d.log.read_text(), d)
            assert d.proc.poll() is None  # still finishing the in-flight image
            release.set()
            rc = d.proc.wait(60)
        finally:
            release.set()
            stop_daemon(d)
    log = d.log.read_text()
    assert rc == 0, log[-4000:]
    assert f"publishing {slow.host}/stall/img:v1 (poll) failed" in log
    assert "publisher daemon stopped" in log and "abandoned" not in log


def test_stop_abandons_work_that_outlasts_the_shutdown_timeout(tmp_path: Path) -> None:
    """In process: stop() reports in-flight work it had to abandon (run_daemon then exits 0 regardless)."""
    import threading

    from publisher.config import DaemonConfig, PublisherConfig
    from publisher.daemon import Daemon
    from publisher.factory import make_publisher
    from tests.support.http_servers import Reply, Request, serve

    release, stalled = threading.Event(), threading.Event()

    def stalling_registry(req: Request) -> Reply:
        if "/manifests/" in req.path:
            stalled.set()
            release.wait(60)
            return Reply(404, {"Content-Type": "application/json"}, b'{"errors": []}')
        return Reply(200, {"Content-Type": "application/json"}, b"{}")

    with serve(stalling_registry) as slow:
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(yaml.safe_dump({"version": 1, "input": [f"{slow.host}/stall/img:v1"]}))
        config = PublisherConfig(backend="local", root=str(tmp_path / "repo"), state_dir=str(tmp_path / "state"))
        pub = make_publisher(config)
        settings = DaemonConfig(listen="127.0.0.1:0", debounce=0, shutdown_timeout=0.5)
        d = Daemon(recipe, settings, pub, state_dir=tmp_path / "state")
        try:
            _host, port = d.start()
            assert port > 0
            assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
            wait_for("the stalled image to be in flight", stalled.is_set)
            assert d.stop() is False
            assert d.queue.snapshot()["running"] == [f"{slow.host}/stall/img:v1"]
            with pytest.raises(httpx.HTTPError):
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
        finally:
            release.set()
        assert d.queue.wait_idle(30)
        assert d.status()["images"][0]["ok"] is False
        pub.close()


def test_a_recipe_spelling_the_host_in_capitals_schedules_nothing(tmp_path: Path, registry: Registry) -> None:
    """The full pass queues and schedules in the one spelling the image is published under: a recipe writing
    ``LocalHost:port`` publishes ``localhost:port`` and does not schedule that image as dropped."""
    from publisher.config import DaemonConfig, PublisherConfig
    from publisher.daemon import Daemon
    from publisher.factory import make_publisher
    from publisher.schedule import read_remove_schedule

    port = registry.host.rsplit(":", 1)[1]
    img = im.image([im.layer([("etc/caps", b"caps\n")])])
    digest = im.push_image(registry.url, "caps/app", "v1", img)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"version": 1, "input": [f"LocalHost:{port}/caps/app:v1"]}))
    config = PublisherConfig(backend="local", root=str(tmp_path / "repo"), state_dir=str(tmp_path / "state"))
    pub = make_publisher(config)
    try:
        d = Daemon(recipe, DaemonConfig(listen="127.0.0.1:0"), pub, state_dir=tmp_path / "state")
        assert d.reload_recipe()
        assert d.full_pass() == 1
        assert d.queue.snapshot()["waiting"] == [f"localhost:{port}/caps/app:v1"]
        item = d.queue.get()
        assert item is not None
        assert pub.publish_image(item.ref).ok
        d.queue.done(item.key)
        layout = RepositoryLayout(tmp_path / "repo")
        rec = ImageRecord.from_json((layout.image_metadata_dir(f"localhost:{port}", "caps/app", "v1")
                                     / "image.json").read_bytes())
        assert rec.manifest_digest == digest
        d.full_pass()  # the image is in the recipe: nothing to schedule
        dropped = [e for e in read_remove_schedule(tmp_path / "repo")
                   if e.is_dropped]
        assert dropped == []
    finally:
        pub.close()
