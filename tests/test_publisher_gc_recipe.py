"""Images dropped from the recipe: scheduled by ``gc --recipe`` (and the daemon), removed by a later gc after the
grace period; real registry on loopback, real publisher runs, local backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cvmfs_snap.layout import REMOVE_SCHEDULE, SCHEDULE_KEY, RepositoryLayout
from cvmfs_snap_devenv import images as im
from cvmfs_snap_devenv.registry import Registry, free_port
from publisher import inventory
from publisher.config import DaemonConfig, PublisherConfig
from publisher.factory import make_backend, make_publisher
from publisher.gc import collect_garbage, record_unwanted
from publisher.schedule import REASON_DROPPED
from publisher.wishlist import Wishlist
from tests.support.trees import names
from tests.test_publisher_gc import STATE, Repo, make_repo, publish_multiarch_and_keep


def write_recipe(path: Path, lines: list[str]) -> Path:
    path.write_text(yaml.safe_dump({"version": 1, "input": lines}))
    return path


def schedule(repo: Repo) -> list[dict[str, object]]:
    p = repo.root / REMOVE_SCHEDULE
    return json.loads(p.read_text()) if p.exists() else []


def dropped_names(repo: Repo) -> list[str]:
    return sorted(e[SCHEDULE_KEY]["image"] for e in schedule(repo)  # type: ignore[index]
                  if e.get(SCHEDULE_KEY, {}).get("reason") == REASON_DROPPED)  # type: ignore[attr-defined]


def gc_cli(repo: Repo, *extra: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "publisher.cli", "gc", "--root", str(repo.root), "--state-dir", str(repo.state),
           *extra]
    if config is not None:
        cmd += ["--config", str(config)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_dropped_image_is_scheduled_then_removed_after_the_grace_period(tmp_path: Path,
                                                                         registry: Registry) -> None:
    repo = make_repo(tmp_path, registry)
    tag = f"v{time.time_ns()}"  # the session registry is shared: own tags
    base = im.layer([("etc/base", b"shared base\n")])
    keep_only = im.layer([("etc/keep", b"kept\n" * 50)])
    drop_only = im.layer([("etc/drop", b"dropped\n" * 300)])
    keep, drop = im.image([base, keep_only]), im.image([base, drop_only])
    im.push_image(registry.url, "gcr/keep", tag, keep)
    im.push_image(registry.url, "gcr/drop", tag, drop)
    keep_ref, drop_ref = registry.ref("gcr/keep", tag), registry.ref("gcr/drop", tag)
    repo.publish(keep_ref, drop_ref)
    drop_name = f"{registry.host}/gcr/drop:{tag}"
    recipe = write_recipe(tmp_path / "recipe.yaml", [keep_ref, drop_ref])

    # both wanted: gc --recipe schedules nothing
    r = gc_cli(repo, "--recipe", str(recipe))
    assert r.returncode == 0, r.stderr
    assert dropped_names(repo) == []

    # the admin drops a line: the dry run tells, and changes nothing
    write_recipe(recipe, [keep_ref])
    before = names(repo.root, skip=[STATE])
    r = gc_cli(repo, "--recipe", str(recipe), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert f"would schedule image {drop_name} for removal: no longer in the recipe" in r.stdout
    assert names(repo.root, skip=[STATE]) == before and dropped_names(repo) == []

    # gc --recipe schedules it; nothing is removed yet
    r = gc_cli(repo, "--recipe", str(recipe))
    assert r.returncode == 0, r.stderr
    assert f"scheduled image {drop_name} for removal" in r.stdout
    (entry,) = schedule(repo)
    info = entry[SCHEDULE_KEY]
    assert isinstance(info, dict)
    assert info["reason"] == REASON_DROPPED and info["image"] == drop_name
    assert info["config_digest"] == drop.config_digest and abs(info["scheduled_at"] - time.time()) < 600
    # DUCC's gc reads every entry as a manifest and removes its layers at once: a config, and no layers
    assert entry["config"]["digest"] == drop.config_digest and entry["layers"] == []  # type: ignore[index]
    assert repo.meta("gcr/drop", tag).is_dir() and repo.link("gcr/drop", tag).is_symlink()
    assert repo.layout.is_layer_complete(drop_only.digest)
    first_time = info["scheduled_at"]

    # a second run keeps the time first seen unwanted; the dry run lists it with its age
    repo.age_everything(30)  # layers and flats published long ago
    r = gc_cli(repo, "--recipe", str(recipe), "--grace-period", "7", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert f"scheduled image {drop_name}: dropped from the recipe 0.0 days ago, removable in 7.0 days" in r.stdout
    assert "would remove image" not in r.stdout and drop_only.digest not in r.stdout
    assert schedule(repo)[0][SCHEDULE_KEY]["scheduled_at"] == first_time  # type: ignore[index]

    # eight days later: the dry run lists the image and everything only it uses, and removes nothing
    repo.age_schedule(8)
    before = names(repo.root, skip=[STATE])
    r = gc_cli(repo, "--recipe", str(recipe), "--grace-period", "7", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert f"would remove image {drop_name} .metadata/{drop_name}" in r.stdout
    assert "scheduled 8.0 days ago" in r.stdout
    assert f"would remove layer {drop_only.digest}" in r.stdout
    assert f"would remove flat {drop.config_digest}" in r.stdout
    assert f"would remove link {drop_name} of image {drop_name}" in r.stdout
    assert base.digest not in r.stdout and keep.config_digest not in r.stdout
    assert "gc: would remove 1 layers, 1 flats, 1 links, 1 images" in r.stdout
    assert names(repo.root, skip=[STATE]) == before

    # the real run (without --recipe: removal needs only the schedule)
    r = gc_cli(repo, "--grace-period", "7")
    assert r.returncode == 0, r.stderr
    assert "gc: removed 1 layers, 1 flats, 1 links, 1 images" in r.stdout
    layout = repo.layout
    assert not repo.meta("gcr/drop", tag).exists()
    assert not repo.link("gcr/drop", tag).is_symlink()
    assert not layout.flat_dir(drop.config_digest).exists()
    assert not layout.layer_dir(drop_only.digest).exists()
    assert schedule(repo) == []
    # the shared base layer and the kept image stay whole
    assert layout.is_layer_complete(base.digest) and layout.is_layer_complete(keep_only.digest)
    assert (repo.meta("gcr/keep", tag) / "image.json").is_file()
    assert (repo.link("gcr/keep", tag) / "etc/base").is_file() and (repo.link("gcr/keep", tag) / "etc/keep").is_file()

    # nothing is left to do, and the kept image is never scheduled
    r = gc_cli(repo, "--recipe", str(recipe), "--grace-period", "0")
    assert r.returncode == 0, r.stderr
    assert "gc: removed 0 layers, 0 flats, 0 links, 0 images" in r.stdout
    assert dropped_names(repo) == []


def test_an_image_back_in_the_recipe_before_expiry_is_unscheduled(tmp_path: Path, registry: Registry) -> None:
    repo = make_repo(tmp_path, registry)
    a = im.image([im.layer([("etc/a", b"a\n")])])
    b = im.image([im.layer([("etc/b", b"b\n")])])
    im.push_image(registry.url, "gcr/back-a", "v1", a)
    im.push_image(registry.url, "gcr/back-b", "v1", b)
    ref_a, ref_b = registry.ref("gcr/back-a", "v1"), registry.ref("gcr/back-b", "v1")
    repo.publish(ref_a, ref_b)
    backend = make_backend(repo.config)
    name_b = f"{registry.host}/gcr/back-b:v1"

    # grace 0: the run that schedules never removes what it has just scheduled
    plan = collect_garbage(backend, repo.state, 0, dry_run=False, wishlist=Wishlist.from_refs([ref_a]))
    assert plan.schedule_update is not None and plan.schedule_update.scheduled == [name_b]
    assert plan.count("image") == 0 and repo.meta("gcr/back-b", "v1").is_dir()
    assert dropped_names(repo) == [name_b]

    # the admin puts it back before the grace period is over: the next gc --recipe unschedules it
    plan = collect_garbage(backend, repo.state, 7, dry_run=False, wishlist=Wishlist.from_refs([ref_a, ref_b]))
    assert plan.schedule_update is not None and plan.schedule_update.unscheduled == [name_b]
    assert dropped_names(repo) == []

    # ... so that no later gc removes it, however old everything is
    repo.age_everything(30)
    plan = collect_garbage(backend, repo.state, 0, dry_run=False)
    assert plan.items == []
    assert repo.meta("gcr/back-b", "v1").is_dir() and repo.layout.is_layer_complete(b.layers[0].digest)

    # dropped again and left alone: with grace 0 the next gc (no recipe needed) removes it
    collect_garbage(backend, repo.state, 0, dry_run=False, wishlist=Wishlist.from_refs([ref_a]))
    assert dropped_names(repo) == [name_b]
    plan = collect_garbage(backend, repo.state, 0, dry_run=False)
    assert {(i.kind, i.name or i.digest) for i in plan.items} == {
        ("link", name_b), ("image", name_b), ("flat", b.config_digest), ("layer", b.layers[0].digest)}
    assert not repo.meta("gcr/back-b", "v1").exists() and repo.meta("gcr/back-a", "v1").is_dir()
    assert dropped_names(repo) == []


def test_an_image_published_again_after_scheduling_is_kept(tmp_path: Path, registry: Registry) -> None:
    """A scheduled image whose tag was published anew (e.g. by publish-on-miss) is not what was scheduled."""
    repo = make_repo(tmp_path, registry)
    im.push_image(registry.url, "gcr/again", "v1", im.image([im.layer([("etc/v", b"1\n")])]))
    ref = registry.ref("gcr/again", "v1")
    repo.publish(ref)
    backend = make_backend(repo.config)
    collect_garbage(backend, repo.state, 0, dry_run=False, wishlist=Wishlist({"other/x:y"}))
    assert dropped_names(repo) == [f"{registry.host}/gcr/again:v1"]
    v2 = im.image([im.layer([("etc/v", b"2\n")])])
    im.push_image(registry.url, "gcr/again", "v1", v2)
    repo.publish(ref)
    plan = collect_garbage(backend, repo.state, 0, dry_run=False)
    assert plan.count("image") == 0 and dropped_names(repo) == []
    assert repo.link("gcr/again", "v1").resolve() == repo.layout.flat_dir(v2.config_digest).resolve()


def test_a_recipe_line_whose_registry_is_down_schedules_nothing(tmp_path: Path, registry: Registry) -> None:
    repo = make_repo(tmp_path, registry)
    im.push_image(registry.url, "gcr/down-keep", "v1", im.image([im.layer([("etc/k", b"k\n")])]))
    im.push_image(registry.url, "gcr/down-old", "v1", im.image([im.layer([("etc/o", b"o\n")])]))
    im.push_image(registry.url, "gcr/down-new", "v1", im.image([im.layer([("etc/n", b"n\n")])]))
    keep_ref, old_ref = registry.ref("gcr/down-keep", "v1"), registry.ref("gcr/down-old", "v1")
    new_ref = registry.ref("gcr/down-new", "v1")
    repo.publish(keep_ref, old_ref, new_ref)
    recipe = write_recipe(tmp_path / "recipe.yaml", [keep_ref, new_ref])
    cfg = tmp_path / "publisher.yaml"
    cfg.write_text(yaml.safe_dump({"registry_retries": 0, "registry_timeout": 5}))
    old_name, new_name = f"{registry.host}/gcr/down-old:v1", f"{registry.host}/gcr/down-new:v1"

    # down-old was dropped long ago and is overdue
    assert gc_cli(repo, "--recipe", str(recipe), config=cfg).returncode == 0
    assert dropped_names(repo) == [old_name]
    repo.age_everything(30)
    repo.age_schedule(30)

    # now a glob line cannot be expanded (nothing listens on that port) and down-new is dropped too
    dead = f"127.0.0.1:{free_port()}/gcr/gone:v*"
    write_recipe(recipe, [keep_ref, dead])
    before = names(repo.root, skip=[STATE])
    r = gc_cli(repo, "--recipe", str(recipe), "--grace-period", "7", config=cfg)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "no image scheduled or removed as dropped from the recipe" in r.stdout
    assert "gcr/gone" in r.stderr and "could not be fully used" in r.stderr
    assert dropped_names(repo) == [old_name]  # down-new not scheduled, down-old not removed
    assert new_name not in r.stdout
    assert names(repo.root, skip=[STATE]) == before

    # a recipe that does not parse: the same
    recipe.write_text("version: 1\ninput: [unclosed\n")
    r = gc_cli(repo, "--recipe", str(recipe), "--grace-period", "0", config=cfg)
    assert r.returncode == 1
    assert "cannot be used" in r.stderr
    assert dropped_names(repo) == [old_name] and names(repo.root, skip=[STATE]) == before

    # a recipe naming nothing at all is taken for a mistake, not for "remove everything"
    write_recipe(recipe, [])
    r = gc_cli(repo, "--recipe", str(recipe), "--grace-period", "7", config=cfg)
    assert r.returncode == 1, r.stderr
    assert "the recipe names no image" in r.stdout
    assert dropped_names(repo) == [old_name]

    # fixed: down-old goes now; down-new is scheduled (and goes after its own grace period)
    write_recipe(recipe, [keep_ref])
    r = gc_cli(repo, "--recipe", str(recipe), "--grace-period", "7", config=cfg)
    assert r.returncode == 0, r.stderr
    assert f"removed image {old_name}" in r.stdout and f"scheduled image {new_name} for removal" in r.stdout
    assert dropped_names(repo) == [new_name] and repo.meta("gcr/down-new", "v1").is_dir()
    assert repo.meta("gcr/down-keep", "v1").is_dir()


def test_dropped_multiarch_image_loses_its_multiarch_links(tmp_path: Path, registry: Registry) -> None:
    repo = make_repo(tmp_path, registry)
    amd, arm, _, links = publish_multiarch_and_keep(repo, registry, "gcr/multi", "gcr/multi-keep")
    keep_ref = registry.ref("gcr/multi-keep", "v1")
    backend = make_backend(repo.config)

    collect_garbage(backend, repo.state, 0, dry_run=False, wishlist=Wishlist.from_refs([keep_ref]))
    plan = collect_garbage(backend, repo.state, 0, dry_run=False)
    name = f"{registry.host}/gcr/multi:v1"
    assert plan.count("image") == 1 and plan.count("link") == 3
    assert {i.name for i in plan.items if i.kind == "link"} == {name}
    assert not any(link.is_symlink() for link in links)
    assert not repo.meta("gcr/multi", "v1").exists()
    for img in (amd, arm):
        assert not repo.layout.flat_dir(img.config_digest).exists()
        assert not repo.layout.layer_dir(img.layers[0].digest).exists()
    assert (repo.link("gcr/multi-keep", "v1") / "etc/keep").is_file()


def test_daemon_full_pass_schedules_and_unschedules(tmp_path: Path, registry: Registry) -> None:
    """The daemon schedules after each full pass (never removes); a failing line stops scheduling."""
    from publisher.daemon import Daemon

    repo = make_repo(tmp_path, registry)
    for name in ("d-keep", "d-drop", "d-miss"):
        im.push_image(registry.url, f"gcr/{name}", "v1", im.image([im.layer([(f"etc/{name}", b"x\n")])]))
    keep_ref, drop_ref = registry.ref("gcr/d-keep", "v1"), registry.ref("gcr/d-drop", "v1")
    miss_ref = registry.ref("gcr/d-miss", "v1")
    repo.publish(keep_ref, drop_ref, miss_ref)
    recipe = write_recipe(tmp_path / "recipe.yaml", [keep_ref, drop_ref])
    config = PublisherConfig(backend="local", root=str(repo.root), state_dir=str(repo.state), registry_retries=0)
    # d-miss is not in the recipe but nodes may ask for it (publish-on-miss): it is never scheduled
    settings = DaemonConfig(listen="127.0.0.1:0", publish_on_miss_allow=[f"{registry.host}/gcr/d-miss"])
    pub = make_publisher(config)
    try:
        d = Daemon(recipe, settings, pub, state_dir=repo.state)
        assert d.reload_recipe()
        d.full_pass()
        assert dropped_names(repo) == []

        write_recipe(recipe, [keep_ref])
        assert d.reload_recipe()
        d.full_pass()
        drop_name = f"{registry.host}/gcr/d-drop:v1"
        assert dropped_names(repo) == [drop_name]
        assert repo.meta("gcr/d-drop", "v1").is_dir()  # scheduling only: removal is gc's job

        # a glob line whose registry is down: nothing new is scheduled (d-keep is no longer named either)
        write_recipe(recipe, [drop_ref, f"127.0.0.1:{free_port()}/gcr/gone:v*"])
        assert d.reload_recipe()
        d.full_pass()
        assert dropped_names(repo) == []  # d-drop is named again: unscheduled even so

        write_recipe(recipe, [keep_ref, drop_ref])
        assert d.reload_recipe()
        d.full_pass()
        assert dropped_names(repo) == []
    finally:
        pub.close()


def test_record_unwanted_needs_no_transaction_when_nothing_changes(tmp_path: Path, registry: Registry) -> None:
    """The daemon's hook opens a backend transaction (a cvmfs publish) only when the schedule changes."""
    repo = make_repo(tmp_path, registry)
    im.push_image(registry.url, "gcr/quiet", "v1", im.image([im.layer([("etc/q", b"q\n")])]))
    ref = registry.ref("gcr/quiet", "v1")
    repo.publish(ref)

    class CountingBackend:
        def __init__(self, inner: object) -> None:
            self.inner, self.layout, self.transactions = inner, inner.layout, 0  # type: ignore[attr-defined]

        def transaction(self) -> object:
            self.transactions += 1
            return self.inner.transaction()  # type: ignore[attr-defined]

    backend = CountingBackend(make_backend(repo.config))
    assert not record_unwanted(backend, repo.state, Wishlist.from_refs([ref])).changed
    assert backend.transactions == 0
    assert record_unwanted(backend, repo.state, Wishlist({"x/y:z"})).scheduled == [f"{registry.host}/gcr/quiet:v1"]
    assert backend.transactions == 1
    assert not record_unwanted(backend, repo.state, Wishlist({"x/y:z"})).changed
    assert backend.transactions == 1


@pytest.mark.parametrize(("name", "parts"), [
    ("127.0.0.1:5000/a/b/c:v1", ("127.0.0.1:5000", "a/b/c", "v1")),
    ("docker.io/library/ubuntu:sha256:abc", ("docker.io", "library/ubuntu", "sha256:abc")),
    ("reg/x:y", ("reg", "x", "y")),
])
def test_split_image_name(name: str, parts: tuple[str, str, str]) -> None:
    assert inventory.split_image_name(name) == parts


def test_dropped_image_is_removed_through_cvmfs_server(tmp_path: Path, registry: Registry) -> None:
    """cvmfs-transaction backend: scheduling and removal each change the repository only inside one
    `cvmfs_server transaction` ... `publish`."""
    from tests.support.publisher_env import make_fake_cvmfs

    fake = make_fake_cvmfs(tmp_path)
    keep, drop = im.image([im.layer([("etc/k", b"k\n")])]), im.image([im.layer([("etc/d", b"d\n")])])
    im.push_image(registry.url, "gcr/cvmfs-keep", "v1", keep)
    im.push_image(registry.url, "gcr/cvmfs-drop", "v1", drop)
    keep_ref, drop_ref = registry.ref("gcr/cvmfs-keep", "v1"), registry.ref("gcr/cvmfs-drop", "v1")
    recipe = write_recipe(tmp_path / "recipe.yaml", [keep_ref])
    args = ["--backend", "cvmfs-transaction", "--repo", fake.repo, "--root", str(fake.root), "--cvmfs-server",
            fake.exe, "--state-dir", str(tmp_path / "state")]
    env = {**os.environ, **fake.env()}

    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "publisher.cli", *argv, *args], env=env, capture_output=True,
                              text=True, timeout=120)

    for ref in (keep_ref, drop_ref):
        r = cli("convert-single-image", ref)
        assert r.returncode == 0, r.stderr
    n = len(fake.commands())
    r = cli("gc", "--recipe", str(recipe), "--grace-period", "0")
    assert r.returncode == 0, r.stderr
    assert fake.commands()[n:] == [["transaction", fake.repo], ["publish", fake.repo]]
    n = len(fake.commands())
    r = cli("gc", "--grace-period", "0")
    assert r.returncode == 0, r.stderr
    assert "gc: removed 1 layers, 1 flats, 1 links, 1 images" in r.stdout
    drop_layer = RepositoryLayout(fake.root).layer_dir(drop.layers[0].digest).relative_to(fake.root)
    assert fake.commands()[n:] == [["transaction", fake.repo], ["publish", fake.repo],
                                   ["ingest", "-d", str(drop_layer), fake.repo]]
    assert fake.violations() == ""
    layout = RepositoryLayout(fake.root)
    assert not layout.image_metadata_dir(registry.host, "gcr/cvmfs-drop", "v1").exists()
    assert not layout.flat_dir(drop.config_digest).exists()
    assert layout.flat_dir(keep.config_digest).is_dir()


def test_dropped_then_moved_tag_still_schedules_the_old_manifest(tmp_path: Path, registry: Registry) -> None:
    """An image dropped from the recipe (scheduled) whose tag then moves and is republished: the replaced manifest
    gets its own moved-tag entry, so its layers keep the moved-tag grace period."""
    repo = make_repo(tmp_path, registry)
    tag = f"v{time.time_ns()}"
    old = im.image([im.layer([("etc/v", b"old\n")])])
    new = im.image([im.layer([("etc/v", b"new\n")])])
    im.push_image(registry.url, "gcr/moving", tag, old)
    ref = registry.ref("gcr/moving", tag)
    repo.publish(ref)
    backend = make_backend(repo.config)
    assert record_unwanted(backend, repo.state, Wishlist({"x/y:z"})).scheduled == [f"{registry.host}/gcr/moving:{tag}"]
    im.push_image(registry.url, "gcr/moving", tag, new)
    repo.publish(ref)
    moved = [e for e in schedule(repo) if e.get(SCHEDULE_KEY, {}).get("reason") != REASON_DROPPED]  # type: ignore[attr-defined]
    assert [e[SCHEDULE_KEY]["manifest_digest"] for e in moved] == [old.manifest_digest]  # type: ignore[index]
