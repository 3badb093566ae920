"""Crash safety: the publisher killed with SIGKILL at named points and after arbitrary delays leaves a consistent
repository (no layer without its content, no image without its layers), and the next run completes the work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cvmfs_snap.layout import RepositoryLayout
from cvmfs_snap_devenv import images as im
from cvmfs_snap_devenv.registry import Registry
from publisher.backends.local import STAGING_DIR
from publisher.crashpoints import ENV
from tests.support.publisher_env import (
    FakeCvmfs,
    base_layer,
    check_invariants,
    make_fake_cvmfs,
    top_layer,
)
from tests.support.trees import Listing, listing

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def images(registry: Registry) -> list[tuple[str, str, im.BuiltImage]]:
    shared = base_layer("crash")
    big = im.layer([(f"data/blob{i}", os.urandom(400_000)) for i in range(4)])
    a = im.image([shared, big, top_layer("zstd", b"a\n")])
    b = im.image([shared, im.layer([("b.txt", b"b\n")])])
    im.push_image(registry.url, "crash/a", "v1", a)
    im.push_image(registry.url, "crash/b", "v1", b)
    return [("crash/a", "v1", a), ("crash/b", "v1", b)]


def _recipe(tmp: Path, registry: Registry) -> Path:
    p = tmp / "recipe.yaml"
    p.write_text(
        "version: 1\nuser: test\ncvmfs_repo: unpacked.test.ch\ninput:\n"
        f"  - 'http://{registry.host}/crash/a:v1'\n  - 'http://{registry.host}/crash/b:v1'\n"
    )
    return p


def _cmd(recipe: Path, root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "publisher.cli", "convert", str(recipe), "--root", str(root), "--concurrency", "2",
            "--no-progress", *extra]


def _run(cmd: list[str], env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **(env_extra or {})}
    env.pop(ENV, None)
    env.update(env_extra or {})
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)


def _check_complete(root: Path, registry: Registry, images: list[tuple[str, str, im.BuiltImage]],
                    *, ducc_ok: bool = False) -> None:
    assert check_invariants(root, allow_ducc_layers=ducc_ok) == []
    layout = RepositoryLayout(root)
    for repo, tag, img in images:
        link = layout.public_link(registry.host, repo, tag)
        assert link.resolve() == layout.flat_dir(img.config_digest).resolve()
        for lay in img.layers:
            assert layout.is_layer_complete(lay.digest)
            assert layout.read_layer_record(lay.digest) is not None  # layer.json everywhere after the re-run
    assert (layout.public_link(registry.host, "crash/a", "v1") / "opt/app/new.txt").read_text() == "a\n"


@pytest.fixture(scope="module")
def reference_tree(tmp_path_factory: pytest.TempPathFactory, registry: Registry,
                   images: list[tuple[str, str, im.BuiltImage]]) -> Listing:
    tmp = tmp_path_factory.mktemp("crash-ref")
    root = tmp / "repo"
    r = _run(_cmd(_recipe(tmp, registry), root))
    assert r.returncode == 0, r.stderr
    return _content(root)


def _content(root: Path) -> Listing:
    """The published content, without timestamps/bookkeeping that legitimately differ between runs."""
    out = {
        k: v for k, v in listing(root, content="bytes").items()
        if not k.startswith((STAGING_DIR, ".cvmfs-snap-state")) and not k.endswith(("layer.json", "layers.json",
                                                                                      "image.json"))
    }
    for k, v in out.items():  # origin order depends on which image finished first
        if k.endswith("origin.json"):
            out[k] = {**v, "data": sorted(json.loads(v["data"])["origin"])}
    return out


@pytest.mark.parametrize(
    "point",
    ["layer-unpacked:1", "layer-visible:1", "layer-visible:3", "image-layers-done:1", "flat-built:1",
     "txn-op:1", "txn-op:4", "txn-op:9", "atomic-write:1", "atomic-write:14"],
)
def test_kill_at_named_point_then_rerun(
    point: str, tmp_path: Path, registry: Registry, images: list[tuple[str, str, im.BuiltImage]],
    reference_tree: dict[str, str],
) -> None:
    root = tmp_path / "repo"
    recipe = _recipe(tmp_path, registry)
    killed = _run(_cmd(recipe, root), {ENV: point})
    assert killed.returncode == -signal.SIGKILL, f"point {point} not reached: {killed.stderr[-2000:]}"
    assert check_invariants(root) == []
    rerun = _run(_cmd(recipe, root))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    _check_complete(root, registry, images)
    assert os.listdir(root / STAGING_DIR) == []  # the killed run's staging was cleaned up
    assert _content(root) == reference_tree


def test_kill_after_delays_then_rerun(
    tmp_path: Path, registry: Registry, images: list[tuple[str, str, im.BuiltImage]], reference_tree: dict[str, str]
) -> None:
    recipe = _recipe(tmp_path, registry)
    for i, delay in enumerate((0.6, 0.9, 1.2)):
        root = tmp_path / f"repo{i}"
        proc = subprocess.Popen(_cmd(recipe, root), cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not root.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)  # count the delay from the repository's creation, not from a loaded machine's start-up
        assert root.exists(), "the publisher never created its repository"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert check_invariants(root) == [], f"after {delay}s"
        rerun = _run(_cmd(recipe, root))
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        _check_complete(root, registry, images)
        assert _content(root) == reference_tree


@pytest.mark.parametrize("point", ["layer-spooled:1", "ingest-done:1", "txn-before-publish:2", "txn-applied:2"])
def test_ingest_backend_kill_then_rerun(
    point: str, tmp_path: Path, registry: Registry, images: list[tuple[str, str, im.BuiltImage]]
) -> None:
    fake: FakeCvmfs = make_fake_cvmfs(tmp_path)
    recipe = _recipe(tmp_path, registry)
    cmd = _cmd(recipe, fake.root, "--backend", "cvmfs-ingest", "--repo", fake.repo, "--cvmfs-server", fake.exe,
               "--state-dir", str(tmp_path / "pstate"))
    killed = _run(cmd, {**fake.env(), ENV: point})
    assert killed.returncode == -signal.SIGKILL, f"point {point} not reached: {killed.stderr[-2000:]}"
    # ingest publishes atomically: a layerfs may be there without layer.json (then it is complete content)
    assert check_invariants(fake.root, allow_ducc_layers=True) == []
    rerun = _run(cmd, fake.env())
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    if point.startswith("txn-applied"):  # killed inside `cvmfs_server transaction` (changes are buffered before)
        assert ["abort", "-f", fake.repo] in fake.commands()  # the open transaction was aborted first
    _check_complete(fake.root, registry, images)
    assert fake.violations() == ""
