"""DUCC recipes, publisher settings and the ``cvmfs-snap-publisher`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cvmfs_snap.errors import InvalidInputError
from cvmfs_snap.layout import RepositoryLayout
from cvmfs_snap.oci import RegistryClient
from cvmfs_snap_devenv import images as im
from cvmfs_snap_devenv.registry import Registry
from publisher.cli import build_parser, load_config
from publisher.config import PublisherConfig
from publisher.factory import make_client, make_publisher
from publisher.recipe import Recipe
from tests.support.http_servers import Reply, Request, serve
from tests.support.publisher_env import base_layer

REPO_ROOT = Path(__file__).resolve().parents[1]

DUCC_RECIPE = """\
version: 1
user: smosciat
cvmfs_repo: 'unpacked.cern.ch'
output_format: '$(scheme)://registry.gitlab.cern.ch/thin/$(image)'
input:
    - 'https://registry.hub.docker.com/library/fedora:latest'
    - 'https://registry.hub.docker.com/library/debian:stable'
    - 'https://registry.hub.docker.com/library/Centos:7'
    - 'https://gitlab-registry.cern.ch/atlas/athena/*:21.0.*'
    - 42
    - 'registry.cern.ch/cms/cmssw:CMSSW_*'
"""


def test_ducc_recipe_accepted_with_broken_lines(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    r = Recipe.parse(DUCC_RECIPE, "recipe.yaml")
    assert r.cvmfs_repo == "unpacked.cern.ch" and r.user == "smosciat"
    assert "output_format" in caplog.text and "ignored" in caplog.text
    good = [ln for ln in r.lines if ln.ref is not None]
    assert [str(ln.ref) for ln in good[:2]] == [
        "registry.hub.docker.com/library/fedora:latest", "registry.hub.docker.com/library/debian:stable",
    ]
    assert good[2].tag_glob == "CMSSW_*" and good[2].ref is not None
    assert good[2].ref.repository == "cms/cmssw"
    bad = {e.input: e.message for e in r.errors}
    assert len(bad) == 3
    assert "lower case" in bad["https://registry.hub.docker.com/library/Centos:7"]
    assert "only allowed in the tag" in bad["https://gitlab-registry.cern.ch/atlas/athena/*:21.0.*"]
    assert "not a string" in bad["42"]


@pytest.mark.parametrize(
    ("text", "needle"),
    [("version: 2\ninput: []\n", "version: expected 1: only DUCC recipe version 1 is understood"),
     ("version: 1\ninput: x\n", "input: expected a list of image references, got 'x'"),
     ("[1, 2", "not valid YAML"),
     ("version: 1\ninput: []\nplatforms: [amd64]\n", "platforms[0]: expected a platform such as linux/amd64"),
     ("input: []\n", "version: missing (a required key), expected 1"),
     ("version: 1\n", "input: missing (a required key), expected a list of image references"),
     ("[]\n", "expected a mapping with 'version: 1' and 'input', got list []"),
     ("", "expected a mapping with 'version: 1' and 'input', got nothing (the document is empty)")],
)
def test_unusable_recipes(text: str, needle: str) -> None:
    with pytest.raises(InvalidInputError, match=re.escape(needle)) as ei:
        Recipe.parse(text, "r.yaml")
    assert str(ei.value).startswith("recipe r.yaml")


def test_recipe_unknown_keys_warned_and_bad_lines_fail_alone(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="publisher.recipe"):
        r = Recipe.parse("version: 1\ninput: [reg.example.org/a:1, 3]\ncvmfs_repo: u.cern.ch\nuser: 5\ncolour: 1\n",
                         "r.yaml")
    assert "recipe r.yaml: ignoring unknown key(s) colour" in caplog.messages
    assert r.cvmfs_repo == "u.cern.ch" and r.user == "5" and r.lines[0].ref is not None
    assert r.lines[1].error == "input entry 3 is not a string image reference"


def test_recipe_platforms_and_http_registries() -> None:
    r = Recipe.parse("version: 1\nplatforms: [linux/amd64, linux/arm64/v8]\n"
                     "input: ['http://127.0.0.1:5000/a/b:1', 'https://reg.example.org/c:2']\n")
    assert r.platforms == ["linux/amd64", "linux/arm64/v8"]
    assert r.insecure_registries == ["127.0.0.1:5000"]


def test_recipe_http_lines_do_not_make_registries_insecure() -> None:
    """A recipe (perhaps user-contributed) writing http:// must not turn on plain HTTP, and so credentials in clear,
    for a registry the site never configured insecure (issue 7 item 1); the client then refuses such a line."""
    from cvmfs_snap.oci import ImageReference, RegistryClient
    from publisher.policy import recipe_into_config

    r = Recipe.parse("version: 1\ninput: ['http://reg.example.org:5000/a/b:1']\n")
    config = PublisherConfig(root="/x")
    recipe_into_config(r, config)
    assert config.insecure_registries == []
    with RegistryClient() as c, pytest.raises(InvalidInputError, match="not configured as an insecure registry"):
        c.base_url(ImageReference.parse("http://reg.example.org:5000/a/b:1"))


def test_tag_globs_expand_against_registry(registry: Registry) -> None:
    img = im.image([base_layer("glob")])
    for tag in ("v1.0", "v1.1", "v2.0", "latest"):
        im.push_image(registry.url, "recipe/globbed", tag, img)
    r = Recipe.parse(
        "version: 1\ninput:\n"
        f"  - 'http://{registry.host}/recipe/globbed:v1.*'\n"
        f"  - 'http://{registry.host}/recipe/globbed:latest'\n"
        f"  - 'http://{registry.host}/recipe/globbed:nothing*'\n"
        f"  - 'http://{registry.host}/recipe/no-such-repo:*'\n"
    )
    with RegistryClient(timeout=20, retries=0) as client:
        refs = r.expand(client)
        assert [ref.tag for ref in refs] == ["v1.0", "v1.1", "latest"]
        assert len(r.errors) == 2
        assert "no tag" in r.errors[0].message and "nothing*" in r.errors[0].message
        assert "recipe/no-such-repo" in r.errors[1].message
        r.expand(client)
        assert len(r.errors) == 2  # expanding again does not pile up errors


def test_config_file_and_flag_override(tmp_path: Path) -> None:
    cfg = tmp_path / "publisher.yaml"
    cfg.write_text(
        "backend: cvmfs-ingest\nrepo: unpacked.cern.ch\nconcurrency: 4\ninsecure_registries: [reg:5000]\n"
        "platforms: [linux/amd64]\ndaemon:\n  listen: 127.0.0.1:9999\n  publish_on_miss_allow: ['reg:5000/a/*']\n"
    )
    args = build_parser().parse_args(["convert", "r.yaml", "--config", str(cfg), "--concurrency", "3",
                                      "--insecure-registry", "other:1", "--backend", "cvmfs-transaction"])
    c = load_config(args)
    assert c.backend == "cvmfs-transaction" and c.concurrency == 3 and c.repo == "unpacked.cern.ch"
    assert c.insecure_registries == ["reg:5000", "other:1"]
    assert c.daemon.listen == "127.0.0.1:9999" and c.daemon.publish_on_miss_allow == ["reg:5000/a/*"]
    assert c.repository_root() == Path("/cvmfs/unpacked.cern.ch")
    assert c.effective_state_dir() == Path("/var/spool/cvmfs-snap/unpacked.cern.ch")
    with make_client(c) as client:  # the registry deadlines reach the client
        assert client._session.transfer_deadline == 300.0 and client._session.blob_min_rate == 256 * 1024
    with pytest.raises(InvalidInputError, match="registry_deadline: expected a number > 0, got 0"):
        PublisherConfig.from_dict({"registry_deadline": 0})
    fast = PublisherConfig.from_dict({"registry_deadline": 20, "registry_min_rate": 1e6})
    with make_client(fast) as client:
        assert client._session.transfer_deadline == 20.0 and client._session.blob_min_rate == 1e6
    gc_args = build_parser().parse_args(["gc", "--root", "/x", "--grace-period", "2", "--dry-run"])
    assert load_config(gc_args).grace_period_days == 2.0 and gc_args.dry_run


def test_config_file_with_every_daemon_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The keys the daemon reads are accepted, typed and reach the daemon's settings; the secret may come from env."""
    from publisher.daemon import WEBHOOK_SECRET_ENV, daemon_settings

    cfg = tmp_path / "publisher.yaml"
    cfg.write_text(
        "root: /srv/repo\ndaemon:\n  listen: 127.0.0.1:0\n  poll_interval: 60\n  debounce: 0.5\n"
        "  publish_on_miss_allow: ['reg:5000/a/*']\n  webhook_secret: s3cret\n  workers: 3\n"
        "  miss_cooldown: 10\n  miss_rate_per_minute: 5\n  shutdown_timeout: 7.5\n"
    )
    c = PublisherConfig.load(cfg)
    d = c.daemon
    assert (d.webhook_secret, d.workers, d.miss_cooldown, d.miss_rate_per_minute, d.shutdown_timeout) == (
        "s3cret", 3, 10, 5, 7.5)
    monkeypatch.setenv(WEBHOOK_SECRET_ENV, "from-env")
    s = daemon_settings(c)
    assert (s.webhook_secret, s.workers, s.miss_cooldown, s.miss_rate_per_minute, s.shutdown_timeout) == (
        "s3cret", 3, 10.0, 5.0, 7.5)  # the file wins over the environment
    defaults = PublisherConfig.load(None)
    assert defaults.daemon.webhook_secret is None and defaults.daemon.workers == 2
    assert daemon_settings(defaults).webhook_secret == "from-env"


@pytest.mark.parametrize(
    ("text", "needle"),
    [("backend: nfs\n", "backend: expected one of 'local', 'cvmfs-ingest', 'cvmfs-transaction', got 'nfs'"),
     ("colour: blue\n", "colour: unknown setting"),
     ("concurrency: 0\n", "concurrency: expected an integer >= 1, got 0"),
     ("daemon: {port: 1}\n", "daemon.port: unknown setting"),
     ("daemon: {workers: 0}\n", "daemon.workers"), ("daemon: {miss_cooldown: soon}\n", "daemon.miss_cooldown"),
     ("daemon: {webhook_secret: ''}\n", "webhook_secret")],
)
def test_bad_config(tmp_path: Path, text: str, needle: str) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(InvalidInputError, match=re.escape(needle)):
        PublisherConfig.load(p)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "publisher.cli", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120, check=False, env={**os.environ, "COLUMNS": "200"})


def test_cli_convert_reports_failures_and_exit_status(registry: Registry, tmp_path: Path) -> None:
    img = im.image([base_layer("cli")])
    im.push_image(registry.url, "cli/good", "v1", img)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "version: 1\nuser: x\ncvmfs_repo: unpacked.test.ch\noutput_format: 'ignored'\ninput:\n"
        f"  - 'http://{registry.host}/cli/good:v1'\n"
        f"  - 'http://{registry.host}/cli/Bad Name:v1'\n"
        f"  - 'http://{registry.host}/cli/missing:v1'\n"
    )
    root = tmp_path / "repo"
    r = _cli("convert", str(recipe), "--root", str(root))
    assert r.returncode == 1, r.stderr
    assert "FAILED" in r.stderr and "cli/Bad Name" in r.stderr and "cli/missing" in r.stderr
    assert "1 image(s) published, 0 unchanged, 2 failed" in r.stderr
    assert RepositoryLayout(root).public_link(registry.host, "cli/good", "v1").is_dir()

    good_only = tmp_path / "good.yaml"
    good_only.write_text(f"version: 1\ninput: ['http://{registry.host}/cli/good:v1']\n")
    r2 = _cli("convert", str(good_only), "--root", str(root))
    assert r2.returncode == 0, r2.stderr
    assert "0 image(s) published, 1 unchanged, 0 failed" in r2.stderr


def test_cli_convert_single_image_and_syntax(registry: Registry, tmp_path: Path) -> None:
    img = im.image([base_layer("single")])
    im.push_image(registry.url, "cli/single", "v1", img)
    root = tmp_path / "repo"
    r = _cli("convert-single-image", f"http://{registry.host}/cli/single:v1", "--root", str(root), "--skip-flat")
    assert r.returncode == 0, r.stderr
    layout = RepositoryLayout(root)
    assert (layout.image_metadata_dir(registry.host, "cli/single", "v1") / "image.json").is_file()
    assert not layout.public_link(registry.host, "cli/single", "v1").exists()  # --skip-flat
    assert not (root / ".flat").exists()

    ok = _cli("check-image-syntax", "https://registry.hub.docker.com/library/ubuntu:2*")
    assert ok.returncode == 0
    assert "registry:   registry.hub.docker.com" in ok.stdout and "2* (glob)" in ok.stdout
    bad = _cli("check-image-syntax", "Not Valid")
    assert bad.returncode == 2 and "invalid" in bad.stderr

    nobackend = _cli("convert-single-image", "x/y:1", "--backend", "cvmfs-ingest", "--root", str(root))
    assert nobackend.returncode == 2 and "--repo" in nobackend.stderr


def test_cli_never_logs_request_urls(registry: Registry, tmp_path: Path) -> None:
    """httpx logs every request URL at INFO (httpcore more at DEBUG); pre-signed blob URLs carry credentials in
    their query, so the CLI keeps both libraries at WARNING even with --log-level debug."""
    im.push_image(registry.url, "cli/quiet", "v1", im.image([base_layer("quiet")]))
    r = _cli("convert-single-image", f"http://{registry.host}/cli/quiet:v1", "--root", str(tmp_path / "repo"),
             "--log-level", "debug", "--skip-flat")
    assert r.returncode == 0, r.stderr
    assert "publisher" in r.stderr  # debug logging is on ...
    assert "HTTP Request:" not in r.stderr and "/blobs/sha256:" not in r.stderr  # ... but no request URLs
    assert " httpcore" not in r.stderr and " httpx:" not in r.stderr


def test_parser_has_ducc_verbs() -> None:
    parser = build_parser()
    for verb in ("convert", "loop", "convert-single-image", "gc", "check-image-syntax"):
        ns = parser.parse_args([verb, "x"] if verb not in ("gc",) else [verb])
        assert isinstance(ns, argparse.Namespace) and ns.command == verb


def _tag_list_proxy(registry: Registry, extra_tags: list[str]) -> Any:
    """A loopback registry front that relays everything to ``registry`` but adds ``extra_tags`` to tag lists."""
    import httpx

    def handler(req: Request) -> Reply:
        headers = {k: v for k, v in req.headers.items() if k in ("accept", "range")}
        resp = httpx.request(req.method, registry.url + req.path, headers=headers, timeout=20)
        body = resp.content
        if req.path.split("?")[0].endswith("/tags/list") and resp.status_code == 200:
            data = json.loads(body)
            data["tags"] = [*extra_tags, *data["tags"]]
            body = json.dumps(data).encode()
        keep = ("content-type", "docker-content-digest", "location")
        return Reply(resp.status_code, {k: v for k, v in resp.headers.items() if k in keep}, body)

    return serve(handler)


def test_bad_tag_in_tag_list_fails_only_itself(registry: Registry, tmp_path: Path) -> None:
    """Issue 7.15: a registry listing an invalid tag fails that tag alone; the line's good tags and the later
    healthy line are published, and the exit status says something failed."""
    img = im.image([base_layer("badtag")])
    for tag in ("v1", "v2"):
        im.push_image(registry.url, "cli/tagged", tag, img)
    im.push_image(registry.url, "cli/healthy", "v1", im.image([base_layer("healthy")]))
    with _tag_list_proxy(registry, ["bad tag", "-dash", "v3!"]) as proxy:
        r = Recipe.parse("version: 1\ninput:\n"
                         f"  - 'http://{proxy.host}/cli/tagged:*'\n"
                         f"  - 'http://{registry.host}/cli/healthy:v1'\n")
        with RegistryClient(timeout=20, retries=0) as client:
            lines = r.expand_lines(client)
        assert [[ref.tag for ref in res.refs] for res in lines] == [["v1", "v2"], ["v1"]]
        assert not lines[0].ok and lines[1].ok
        assert len(lines[0].errors) == 3 and all("not a valid tag" in e.message for e in lines[0].errors)
        assert len(r.errors) == 3

        recipe = tmp_path / "recipe.yaml"
        recipe.write_text("version: 1\ninput:\n"
                          f"  - 'http://{proxy.host}/cli/tagged:*'\n"
                          f"  - 'http://{registry.host}/cli/healthy:v1'\n")
        root = tmp_path / "repo"
        res = _cli("convert", str(recipe), "--root", str(root), "--skip-flat")
    assert res.returncode == 1, res.stderr
    assert "'bad tag'" in res.stderr and "'-dash'" in res.stderr and "not a valid tag" in res.stderr
    assert "3 image(s) published, 0 unchanged, 3 failed" in res.stderr
    layout = RepositoryLayout(root)
    for registry_host, repo, tag in ((proxy.host, "cli/tagged", "v1"), (proxy.host, "cli/tagged", "v2"),
                                     (registry.host, "cli/healthy", "v1")):
        assert (layout.image_metadata_dir(registry_host, repo, tag) / "image.json").is_file()


def test_daemon_full_pass_queues_the_healthy_lines_despite_a_bad_tag(registry: Registry, tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Issue 7.15, daemon side: the full pass records the bad tag as a failed recipe entry, queues the rest, and
    (an invalid tag naming no publishable image) still keeps the remove schedule up to date."""
    from publisher.config import DaemonConfig
    from publisher.daemon import Daemon

    img = im.image([base_layer("daemon-badtag")])
    im.push_image(registry.url, "cli/dtagged", "v1", img)
    im.push_image(registry.url, "cli/dhealthy", "v1", img)
    with _tag_list_proxy(registry, ["bad tag"]) as proxy:
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text("version: 1\ninput:\n"
                          f"  - 'http://{proxy.host}/cli/dtagged:*'\n"
                          f"  - 'http://{registry.host}/cli/dhealthy:v1'\n")
        config = PublisherConfig(backend="local", root=str(tmp_path / "repo"), state_dir=str(tmp_path / "state"),
                                 insecure_registries=[proxy.host, registry.host])
        with make_publisher(config) as pub:
            d = Daemon(recipe, DaemonConfig(listen="127.0.0.1:0"), pub, state_dir=tmp_path / "state")
            assert d.reload_recipe()
            assert d.full_pass() == 2
            assert sorted(d.queue.snapshot()["waiting"]) == sorted(
                [f"{proxy.host}/cli/dtagged:v1", f"{registry.host}/cli/dhealthy:v1"])
            failed = [s for s in d.history.values() if not s.ok]
            assert len(failed) == 1 and "'bad tag'" in failed[0].message
            assert "no image was scheduled for removal" not in caplog.text


def test_gc_wishlist_is_complete_despite_a_bad_tag(registry: Registry, tmp_path: Path) -> None:
    """An invalid tag in a tag list cannot name a published image, so gc --recipe still schedules dropped images;
    a line that does not expand at all still stops scheduling."""
    from publisher.gccommand import load_wishlist

    im.push_image(registry.url, "cli/wtagged", "v1", im.image([base_layer("wishlist")]))
    with _tag_list_proxy(registry, ["bad tag"]) as proxy:
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(f"version: 1\ninput: ['http://{proxy.host}/cli/wtagged:*']\n")
        wl = load_wishlist(str(recipe), PublisherConfig(root=str(tmp_path / "repo")))
        assert wl.problems == [] and wl.names == {f"{proxy.host}/cli/wtagged:v1"}
        recipe.write_text(f"version: 1\ninput: ['http://{proxy.host}/cli/no-such-repo:*']\n")
        wl = load_wishlist(str(recipe), PublisherConfig(root=str(tmp_path / "repo")))
        assert len(wl.problems) == 1 and "cannot list tags" in wl.problems[0]
