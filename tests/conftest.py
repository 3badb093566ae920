"""Shared fixtures: real services on loopback, started by the tests themselves."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfs_snap.devenv.procs import unmount_below
from tests.support.registry import Registry, start_registry


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
def short_tmp() -> Iterator[Path]:
    """A short directory under /tmp (unix socket paths must stay under 108 bytes)."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="cs-", dir="/tmp"))
    try:
        yield d
    finally:
        unmount_below(d)
        shutil.rmtree(d, ignore_errors=True)
