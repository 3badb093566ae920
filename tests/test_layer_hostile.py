"""Every hostile layer in the corpus is refused with the right error, naming the entry, touching nothing outside."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pytest

from cvmfs_snap.errors import UnsafeLayerError
from cvmfs_snap.layer import apply_layer, iter_layer, open_layer
from tests.support.hostile import ClampedCase, HostileCase, build_clamped_corpus, build_corpus
from tests.support.trees import TYPES, Listing, listing

_IDS = [c.id for c in build_corpus(Path("/nonexistent"))]
_CLAMPED_IDS = [c.id for c in build_clamped_corpus(Path("/nonexistent"))]


def snapshot(top: Path, skip: Path) -> Listing:
    """Everything under ``top`` except ``skip``: type, mode, owner, content, link target, xattrs, links, mtime."""
    return listing(top, skip=[str(skip.relative_to(top))], nlink=True, mtimes=TYPES)


@pytest.fixture
def arena(tmp_path: Path) -> tuple[Path, Path]:
    """A target directory with sentinel trees around it: ``outside`` beside it and files next to it."""
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "secret").write_text("do not touch")
    (outside / "sub" / "file").write_text("nor this")
    work = tmp_path / "work"
    target = work / "a" / "target"
    target.mkdir(parents=True)
    (work / "neighbour").write_text("keep")
    return target, outside


@pytest.mark.parametrize("case_id", _IDS)
def test_hostile_layer_refused(case_id: str, arena: tuple[Path, Path], tmp_path: Path) -> None:
    target, outside = arena
    case: HostileCase = next(c for c in build_corpus(outside) if c.id == case_id)
    if case.setup:
        case.setup(target)
    before = snapshot(tmp_path, target)
    passwd = Path("/etc/passwd").stat()
    with pytest.raises(case.error) as info, open_layer(
        io.BytesIO(case.blob), case.media_type, name=f"sha256:{case.id}"
    ) as stream:
        apply_layer(stream, target, mode=case.mode, limits=case.limits)  # type: ignore[arg-type]
    msg = str(info.value)
    assert f"sha256:{case.id}" in msg  # names the layer
    msg = msg.replace(f"sha256:{case.id}", "<layer>")
    assert case.names in msg, f"message does not name the entry ({case.names!r}): {msg}"
    assert type(info.value) is case.error, f"{type(info.value).__name__} where the case expects {case.error.__name__}"
    assert snapshot(tmp_path, target) == before, "something outside the target changed"
    assert Path("/etc/passwd").stat().st_nlink == passwd.st_nlink
    assert not (outside / "pwned").exists()


def test_corpus_is_big_enough() -> None:
    cases = build_corpus(Path("/tmp/x"))
    assert len(cases) >= 20
    assert len({c.id for c in cases}) == len(cases)
    assert sum(1 for c in cases if c.error is UnsafeLayerError) >= 20


@pytest.mark.parametrize("case_id", [c.id for c in build_corpus(Path("/nonexistent")) if c.mode == "layer"])
def test_iter_layer_refuses_the_same_layers_without_unpacking(case_id: str, tmp_path: Path) -> None:
    """Consumers that hand the tar to another tool (cvmfs_server ingest) get the same verdict from iter_layer."""
    case = next(c for c in build_corpus(tmp_path) if c.id == case_id)
    with pytest.raises(case.error) as info, open_layer(io.BytesIO(case.blob), case.media_type, name="L") as s:
        for entry in iter_layer(s, case.limits, name="L"):
            while entry.read(1 << 16):
                pass
    assert case.names in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case_id", _CLAMPED_IDS)
def test_merged_mode_clamps_symlink_escapes_inside_the_target(
    case_id: str, arena: tuple[Path, Path], tmp_path: Path
) -> None:
    """containerd follows parent symlinks inside the root on a merged view: the layer is accepted, and every write
    lands inside the target (absolute targets and '..' stop at the root). Nothing outside changes."""
    target, outside = arena
    case: ClampedCase = next(c for c in build_clamped_corpus(outside) if c.id == case_id)
    if case.setup:
        case.setup(target)
    before = snapshot(tmp_path, target)
    passwd = Path("/etc/passwd").stat()
    apply_layer(io.BytesIO(case.blob), target, mode="merged", name=f"sha256:{case.id}")
    assert snapshot(tmp_path, target) == before, "something outside the target changed"
    assert Path("/etc/passwd").stat().st_nlink == passwd.st_nlink
    assert not (outside / "pwned").exists() and (outside / "secret").read_text() == "do not touch"
    for rel in case.lands:
        assert os.path.lexists(target / rel), f"{rel} was not written inside the target"
    for rel in case.symlinks:
        assert (target / rel).is_symlink(), f"{rel} is no longer a symlink"


@pytest.mark.parametrize("case_id", [c.id for c in build_clamped_corpus(Path("/nonexistent"))
                                     if c.id.startswith("layer-")])
def test_layer_mode_still_refuses_writing_through_its_symlinks(case_id: str, tmp_path: Path) -> None:
    """The same layers stored on their own (layer mode) are refused, with a message saying why, by apply_layer and
    by iter_layer (the structure check before cvmfs_server ingest)."""
    case = next(c for c in build_clamped_corpus(tmp_path / "outside") if c.id == case_id)
    with pytest.raises(UnsafeLayerError, match="layer mode") as info:
        apply_layer(io.BytesIO(case.blob), tmp_path, mode="layer", name="sha256:L")
    assert "is a symlink" in str(info.value)
    with pytest.raises(UnsafeLayerError, match="layer mode"):
        for _ in iter_layer(io.BytesIO(case.blob), name="L"):
            pass


@pytest.mark.parametrize("case_id", [c.id for c in build_corpus(Path("/nonexistent"))
                                     if c.mode == "layer" and c.setup is None and c.error is UnsafeLayerError])
def test_apply_and_structure_check_refuse_in_the_same_words(case_id: str, tmp_path: Path) -> None:
    """The layer-mode rules exist once (cvmfs_snap.layer.rules): apply_layer and iter_layer give the same message
    for the same layer (apply can also say where a symlink points, the tar-only check cannot)."""
    case = next(c for c in build_corpus(tmp_path / "outside") if c.id == case_id)
    target = tmp_path / "t"
    target.mkdir()
    with pytest.raises(UnsafeLayerError) as applied, open_layer(io.BytesIO(case.blob), case.media_type, name="L") as s:
        apply_layer(s, target, mode="layer", limits=case.limits)
    with pytest.raises(UnsafeLayerError) as checked, open_layer(io.BytesIO(case.blob), case.media_type, name="L") as s:
        for entry in iter_layer(s, case.limits, name="L"):
            while entry.read(1 << 16):
                pass
    assert re.sub(r" \(to '[^']*'\)", "", str(applied.value)) == str(checked.value)
