"""Garbage collection on a repository the real pipeline published from a real registry (local backend)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cvmfs_snap.errors import InvalidInputError, UnavailableError
from cvmfs_snap.layout import REMOVE_SCHEDULE, SCHEDULE_KEY, RepositoryLayout
from cvmfs_snap_devenv import images as im
from cvmfs_snap_devenv.registry import Registry
from publisher.config import PublisherConfig
from publisher.factory import make_backend, make_publisher
from publisher.gc import collect_garbage
from publisher.gcplan import plan_gc
from publisher.locks import gc_lock
from tests.support.trees import names

DAY = 86400.0


@dataclass
class Repo:
    root: Path
    state: Path
    layout: RepositoryLayout
    config: PublisherConfig
    host: str

    def meta(self, repo: str, tag: str) -> Path:
        return self.layout.image_metadata_dir(self.host, repo, tag)

    def link(self, repo: str, tag: str) -> Path:
        return self.layout.public_link(self.host, repo, tag)

    def publish(self, *refs: str) -> None:
        with make_publisher(self.config) as pub:
            results = pub.publish_images(refs)
        assert all(r.ok for r in results), [r.error for r in results]

    def age_everything(self, days: float) -> None:
        """Pretend every layer and flat was published ``days`` ago (layer.json ``created``, flat dir mtime)."""
        past = time.time() - days * DAY
        for digest in self.layout.iter_layer_digests():
            p = self.layout.layer_json(digest)
            rec = json.loads(p.read_text())
            rec["created"] = past
            p.write_text(json.dumps(rec))
        for bucket in (self.root / ".flat").iterdir():
            for flat in bucket.iterdir() if bucket.is_dir() else []:
                if flat.is_dir():
                    os.utime(flat, (past, past))

    def age_schedule(self, days: float) -> None:
        p = self.root / REMOVE_SCHEDULE
        entries = json.loads(p.read_text())
        for e in entries:
            e[SCHEDULE_KEY]["scheduled_at"] = time.time() - days * DAY
        p.write_text(json.dumps(entries))


def make_repo(tmp_path: Path, registry: Registry) -> Repo:
    root = tmp_path / "repo"
    state = tmp_path / "state"
    config = PublisherConfig(backend="local", root=str(root), state_dir=str(state))
    return Repo(root, state, RepositoryLayout(root), config, registry.host)


@dataclass
class Scenario:
    repo: Repo
    base: im.BuiltLayer
    a_only: im.BuiltLayer
    b_only: im.BuiltLayer
    c_only: im.BuiltLayer
    img_a: im.BuiltImage
    img_b: im.BuiltImage
    img_c: im.BuiltImage
    tag: str


@pytest.fixture
def scenario(tmp_path: Path, registry: Registry) -> Iterator[Scenario]:
    """gc/one:v1 = A (base + a), then moved to C (base + c); gc/two:v1 = B (base + b), metadata then dropped."""
    repo = make_repo(tmp_path, registry)
    tag = f"v{time.time_ns()}"  # the session registry is shared: own tags
    base = im.layer([("etc/base", b"shared base\n")])
    a_only = im.layer([("etc/a", b"only in A\n" * 100)])
    b_only = im.layer([("etc/b", b"only in B\n" * 200)])
    c_only = im.layer([("etc/c", b"only in C\n")])
    img_a, img_b, img_c = im.image([base, a_only]), im.image([base, b_only]), im.image([base, c_only])
    im.push_image(registry.url, "gc/one", tag, img_a)
    im.push_image(registry.url, "gc/two", tag, img_b)
    repo.publish(registry.ref("gc/one", tag), registry.ref("gc/two", tag))
    assert repo.layout.is_layer_complete(b_only.digest) and repo.link("gc/two", tag).is_symlink()
    # move gc/one:<tag> to C and republish: A's manifest goes to the remove schedule
    im.push_image(registry.url, "gc/one", tag, img_c)
    repo.publish(registry.ref("gc/one", tag))
    schedule = json.loads((repo.root / REMOVE_SCHEDULE).read_text())
    assert [e[SCHEDULE_KEY]["config_digest"] for e in schedule] == [img_a.config_digest]
    # an admin drops gc/two from the repository by deleting its metadata
    subprocess.run(["rm", "-r", str(repo.meta("gc/two", tag))], check=True)
    yield Scenario(repo, base, a_only, b_only, c_only, img_a, img_b, img_c, tag)


STATE = ".cvmfs-snap-state"  # the local backend's own state, below the repository root


def _kinds(plan: object) -> set[tuple[str, str]]:
    return {(i.kind, i.digest) for i in plan.items}  # type: ignore[attr-defined]


def test_gc_removes_exactly_the_unreferenced_old_things(scenario: Scenario) -> None:
    s, repo = scenario, scenario.repo
    tag = s.tag

    # 1. everything was just published: the grace period keeps it all
    before = names(repo.root, skip=[STATE])
    plan = collect_garbage(make_backend(repo.config), repo.state, 7, dry_run=False)
    assert plan.items == []
    assert {i.digest for i in plan.kept_young} >= {s.a_only.digest, s.b_only.digest}
    assert names(repo.root, skip=[STATE]) == before

    # 2. a month later: B was dropped long ago and goes; A was replaced only now (remove schedule) and stays
    repo.age_everything(30)
    dry = collect_garbage(make_backend(repo.config), repo.state, 7, dry_run=True)
    expected = {("layer", s.b_only.digest), ("flat", s.img_b.config_digest), ("link", s.img_b.config_digest)}
    assert _kinds(dry) == expected
    assert {i.digest for i in dry.kept_young} == {s.a_only.digest, s.img_a.config_digest}
    assert dry.bytes >= 2 * len(b"only in B\n" * 200)  # etc/b in the layer and in the flat tree
    assert names(repo.root, skip=[STATE]) == before  # dry run changes nothing

    done = collect_garbage(make_backend(repo.config), repo.state, 7, dry_run=False)
    assert _kinds(done) == expected
    layout = repo.layout
    assert not layout.layer_dir(s.b_only.digest).exists()
    assert not layout.flat_dir(s.img_b.config_digest).exists()
    assert not repo.link("gc/two", tag).is_symlink()
    # shared and current things stay
    for lay in (s.base, s.a_only, s.c_only):
        assert layout.is_layer_complete(lay.digest)
    assert layout.flat_dir(s.img_c.config_digest).is_dir() and layout.flat_dir(s.img_a.config_digest).is_dir()
    assert repo.link("gc/one", tag).resolve() == layout.flat_dir(s.img_c.config_digest).resolve()
    assert (repo.meta("gc/one", tag) / "image.json").is_file()

    # 3. the move is now older than the grace period too: A's own layer and flat go, the schedule is emptied
    repo.age_schedule(8)
    done = collect_garbage(make_backend(repo.config), repo.state, 7, dry_run=False)
    assert _kinds(done) == {("layer", s.a_only.digest), ("flat", s.img_a.config_digest)}
    assert not layout.layer_dir(s.a_only.digest).exists()
    assert json.loads((repo.root / REMOVE_SCHEDULE).read_text()) == []
    assert layout.is_layer_complete(s.base.digest) and layout.is_layer_complete(s.c_only.digest)

    # 4. nothing left to collect
    assert collect_garbage(make_backend(repo.config), repo.state, 0, dry_run=False).items == []


def test_gc_cli_dry_run_lists_and_changes_nothing(scenario: Scenario) -> None:
    s, repo = scenario, scenario.repo
    before = names(repo.root, skip=[STATE])
    cmd = [sys.executable, "-m", "publisher.cli", "gc", "--root", str(repo.root), "--state-dir", str(repo.state),
           "--grace-period", "0", "--dry-run"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"would remove layer {s.b_only.digest}" in r.stdout
    assert f"would remove layer {s.a_only.digest}" in r.stdout  # grace 0: the move no longer protects A
    assert s.base.digest not in r.stdout and s.c_only.digest not in r.stdout
    assert "gc: would remove 2 layers, 2 flats, 1 links" in r.stdout
    assert names(repo.root, skip=[STATE]) == before

    r = subprocess.run(cmd[:-1], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "gc: removed 2 layers, 2 flats, 1 links" in r.stdout
    assert not repo.layout.layer_dir(s.a_only.digest).exists()
    assert repo.layout.is_layer_complete(s.base.digest)


def test_gc_refuses_to_guess_when_metadata_is_unreadable(tmp_path: Path, registry: Registry) -> None:
    repo = make_repo(tmp_path, registry)
    lay = im.layer([("etc/x", b"x\n")])
    im.push_image(registry.url, "gc/bad", "v1", im.image([lay]))
    repo.publish(registry.ref("gc/bad", "v1"))
    (repo.meta("gc/bad", "v1") / "manifest.json").write_text("{broken")
    with pytest.raises(InvalidInputError, match=r"manifest\.json"):
        plan_gc(repo.layout, 0, now=time.time() + 365 * DAY)
    assert repo.layout.is_layer_complete(lay.digest)


@pytest.mark.parametrize(("name", "content"), [("image.json", "[]"), ("image.json", "42"), ("manifest.json", "[]")])
def test_gc_malformed_metadata_gives_the_documented_error(tmp_path: Path, registry: Registry, name: str,
                                                          content: str) -> None:
    """Issue 7.17: valid JSON of the wrong shape stops gc with its documented error, never a traceback."""
    repo = make_repo(tmp_path, registry)
    lay = im.layer([("etc/y", b"y\n")])
    im.push_image(registry.url, "gc/shape", "v1", im.image([lay]))
    repo.publish(registry.ref("gc/shape", "v1"))
    (repo.meta("gc/shape", "v1") / name).write_text(content)
    with pytest.raises(InvalidInputError, match=name.replace(".", r"\.") + ".*garbage collection stopped"):
        plan_gc(repo.layout, 0, now=time.time() + 365 * DAY)
    r = subprocess.run([sys.executable, "-m", "publisher.cli", "gc", "--root", str(repo.root), "--state-dir",
                        str(repo.state), "--grace-period", "0"], capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "garbage collection stopped" in r.stderr and name in r.stderr
    assert repo.layout.is_layer_complete(lay.digest)


def test_gc_waits_for_publishers(tmp_path: Path) -> None:
    """A publish in progress holds the GC lock shared; GC's exclusive lock then cannot be had."""
    with gc_lock(tmp_path, exclusive=False), gc_lock(tmp_path, exclusive=False, timeout=1), \
            pytest.raises(UnavailableError, match="publishing is running"), \
            gc_lock(tmp_path, exclusive=True, timeout=0.5):
        pass
    with gc_lock(tmp_path, exclusive=True, timeout=1):
        pass


def publish_multiarch_and_keep(repo: Repo, registry: Registry, multi: str, other: str
                               ) -> tuple[im.BuiltImage, im.BuiltImage, im.BuiltImage, list[Path]]:
    """Push and publish ``multi:v1`` (amd64 and arm64/v8) and a single-platform ``other:v1``: (amd, arm, other's
    image, the public and both ``.multiarch`` links of ``multi``, checked to exist)."""
    amd = im.image([im.layer([("etc/arch", b"amd64\n")])], architecture="amd64")
    arm = im.image([im.layer([("etc/arch", b"arm64\n")])], architecture="arm64", variant="v8")
    keep = im.image([im.layer([("etc/keep", b"kept\n")])])
    p = im.Pusher(registry.url)
    try:
        p.multiarch(multi, "v1", [(amd, {"os": "linux", "architecture": "amd64"}),
                                  (arm, {"os": "linux", "architecture": "arm64", "variant": "v8"})])
        p.image(other, "v1", keep)
    finally:
        p.close()
    repo.publish(registry.ref(multi, "v1"), registry.ref(other, "v1"))
    links = [repo.link(multi, "v1"),
             repo.layout.multiarch_link("amd64", registry.host, multi, "v1"),
             repo.layout.multiarch_link("arm64:v8", registry.host, multi, "v1")]
    assert all(link.is_symlink() for link in links)
    return amd, arm, keep, links


def test_gc_removes_multiarch_flats_and_links_of_a_dropped_image(tmp_path: Path, registry: Registry) -> None:
    repo = make_repo(tmp_path, registry)
    amd, arm, keep, links = publish_multiarch_and_keep(repo, registry, "gc/multi", "gc/keep")

    subprocess.run(["rm", "-r", str(repo.meta("gc/multi", "v1"))], check=True)
    repo.age_everything(30)
    plan = collect_garbage(make_backend(repo.config), repo.state, 7, dry_run=False)
    assert _kinds(plan) == {
        ("layer", amd.layers[0].digest), ("layer", arm.layers[0].digest),
        ("flat", amd.config_digest), ("flat", arm.config_digest),
        ("link", amd.config_digest), ("link", arm.config_digest),
    }
    assert plan.count("link") == 3  # the public link and both .multiarch links
    assert not any(link.is_symlink() for link in links)
    assert repo.layout.is_layer_complete(keep.layers[0].digest)
    assert repo.link("gc/keep", "v1").is_symlink() and (repo.link("gc/keep", "v1") / "etc/keep").is_file()


@pytest.mark.parametrize("backend", ["cvmfs-ingest", "cvmfs-transaction"])
def test_gc_removes_through_cvmfs_server(tmp_path: Path, registry: Registry, backend: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """With the cvmfs backends GC changes the repository only through `cvmfs_server`: transaction ... publish, and
    `ingest -d` for layers."""
    from tests.support.publisher_env import make_fake_cvmfs

    fake = make_fake_cvmfs(tmp_path)
    base = im.layer([("etc/base", b"base\n")])
    gone = im.layer([("etc/gone", b"gone\n")])
    keep, drop = im.image([base]), im.image([base, gone])
    im.push_image(registry.url, "gcvmfs/keep", backend, keep)
    im.push_image(registry.url, "gcvmfs/drop", backend, drop)
    args = ["--backend", backend, "--repo", fake.repo, "--root", str(fake.root), "--cvmfs-server", fake.exe,
            "--state-dir", str(tmp_path / "state")]
    env = {**os.environ, **fake.env()}
    r = subprocess.run([sys.executable, "-m", "publisher.cli", "convert-single-image", registry.ref("gcvmfs/keep",
                        backend), *args], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "publisher.cli", "convert-single-image", registry.ref("gcvmfs/drop",
                        backend), *args], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    layout = RepositoryLayout(fake.root)
    # the admin drops the image (in a transaction, as on a real stratum-0)
    config = PublisherConfig(backend=backend, root=str(fake.root), repo=fake.repo, cvmfs_server=fake.exe,
                             state_dir=str(tmp_path / "state"))
    fake.apply_env(monkeypatch)
    with make_backend(config).transaction() as txn:
        txn.remove(str(layout.image_metadata_dir(registry.host, "gcvmfs/drop", backend).relative_to(fake.root)))
    before = len(fake.commands())

    r = subprocess.run([sys.executable, "-m", "publisher.cli", "gc", "--grace-period", "0", *args], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "gc: removed 1 layers, 1 flats, 1 links" in r.stdout
    # links, metadata and flats in one transaction, then the layer with `ingest -d` (directories ingest made
    # cannot be changed by a transaction)
    assert fake.commands()[before:] == [["transaction", fake.repo], ["publish", fake.repo],
                                        ["ingest", "-d", str(layout.layer_dir(gone.digest).relative_to(fake.root)),
                                         fake.repo]]
    assert fake.violations() == ""  # nothing changed outside a transaction
    assert not layout.layer_dir(gone.digest).exists()
    assert not layout.flat_dir(drop.config_digest).exists()
    assert layout.is_layer_complete(base.digest) and layout.flat_dir(keep.config_digest).is_dir()

