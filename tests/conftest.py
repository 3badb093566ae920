"""Shared fixtures: real services on loopback, started by the tests themselves."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfs_snap.fsutil import remove_tree, remove_tree_quietly
from cvmfs_snap.oci.client import RegistryClient
from cvmfs_snap_devenv.procs import unmount_below
from cvmfs_snap_devenv.registry import Registry, start_registry


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """An anonymous docker-registry on 127.0.0.1 shared by the whole test session (use unique repo names)."""
    with start_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture
def fresh_registry(tmp_path: Path) -> Iterator[Registry]:
    """A registry of this test's own (for tests that count requests or read its log)."""
    with start_registry(tmp_path / "registry") as reg:
        yield reg


@pytest.fixture
def client() -> Iterator[RegistryClient]:
    """A registry client for the loopback registries: one retry, quick back-off, a generous timeout."""
    with RegistryClient(timeout=30, retries=1, backoff_base=0.01) as c:
        yield c


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory under /tmp (unix socket paths must stay under 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="cs-", dir="/tmp"))
    try:
        yield d
    finally:
        unmount_below(d)
        remove_tree_quietly(d)


def pytest_sessionstart(session: pytest.Session) -> None:
    """A ``--basetemp`` left by an earlier run may hold 5,000-level trees that pytest's own recursive removal of it
    cannot remove: remove it ourselves first."""
    given = session.config.option.basetemp
    if given and Path(given).is_dir():
        unmount_below(Path(given))
        remove_tree(given)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """After a green run, remove this run's temporary tree ourselves: the deep trees the tests make (5,000 levels)
    would make pytest's own recursive clean-up of old runs fail at exit. A failed run's tree is kept to look at."""
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None or factory._basetemp is None:
        return
    if exitstatus == 0:
        unmount_below(factory._basetemp)
        remove_tree(factory._basetemp)
    if not session.config.option.basetemp:
        _prune_old_runs(factory._basetemp.parent)


def _prune_old_runs(root: Path, keep: int = 3) -> None:
    """What pytest's own clean-up at exit would remove from its numbered ``pytest-N`` directories (all but the
    newest ``keep``) and the ``garbage-*`` directories it failed to remove before, removed here without recursion:
    a failed run's 5,000-level trees make pytest's recursive removal raise RecursionError at every later exit."""
    runs = sorted((int(d.name.removeprefix("pytest-")), d) for d in root.glob("pytest-*")
                  if d.name.removeprefix("pytest-").isdigit() and not d.is_symlink())
    for _, d in [*runs[:-keep], *((0, g) for g in root.glob("garbage-*"))]:
        unmount_below(d)
        remove_tree_quietly(d)
