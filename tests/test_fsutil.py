"""Tree walks and removals that do not depend on recursion depth (5,000 levels) and never follow symlinks."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from cvmfs_snap.fsutil import disk_usage, make_deep_tree, remove_tree, remove_tree_at, walk, walk_fd

DEPTH = 5000


def test_stdlib_rmtree_fails_where_ours_does_not(tmp_path: Path) -> None:
    make_deep_tree(tmp_path / "deep", DEPTH)
    with pytest.raises(RecursionError):
        shutil.rmtree(tmp_path / "deep")
    remove_tree(tmp_path / "deep")
    assert not (tmp_path / "deep").exists()


def test_walk_fd_reaches_every_level_and_prunes(tmp_path: Path) -> None:
    make_deep_tree(tmp_path / "t", DEPTH)
    (tmp_path / "t" / "side").mkdir()
    (tmp_path / "t" / "side" / "f").write_text("x")
    depths = []
    for rel, fd, dirs, files in walk_fd(tmp_path / "t"):
        depths.append(rel.count("/") + (1 if rel else 0))
        if "leaf" in files:
            assert os.stat("leaf", dir_fd=fd).st_size == 1
        if rel == "":
            dirs.remove("side")
    assert max(depths) == DEPTH
    assert len(depths) == DEPTH + 1  # "side" was pruned


def test_symlinks_are_removed_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("precious")
    tree = tmp_path / "tree"
    (tree / "a").mkdir(parents=True)
    (tree / "a" / "to-outside").symlink_to(outside)
    (tree / "file-link").symlink_to(outside / "keep")
    seen = {rel: (sorted(d), sorted(f)) for rel, _fd, d, f in walk_fd(tree)}
    assert seen == {"": (["a"], ["file-link"]), "a": ([], ["to-outside"])}
    assert [p for p, _d, _f in walk(tree)] == [str(tree), str(tree / "a")]
    remove_tree(tree)
    assert not tree.exists()
    assert (outside / "keep").read_text() == "precious"


def test_remove_tree_at_relative_and_missing(tmp_path: Path) -> None:
    (tmp_path / "x" / "y").mkdir(parents=True)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        remove_tree_at(fd, "x")
        remove_tree_at(fd, "x")  # missing is fine by default
        with pytest.raises(FileNotFoundError):
            remove_tree_at(fd, "x", missing_ok=False)
    finally:
        os.close(fd)
    assert os.listdir(tmp_path) == []


def test_disk_usage_counts_hard_links_once_at_any_depth(tmp_path: Path) -> None:
    make_deep_tree(tmp_path / "t", DEPTH)  # DEPTH directories below t, a one-byte "leaf" at the bottom
    (tmp_path / "t" / "big").write_bytes(b"x" * 100_000)
    before = disk_usage(tmp_path / "t")
    assert before.inodes == (DEPTH + 1) + 2  # the directories (t included), leaf and big
    assert before.size >= 100_000 + (DEPTH + 1) * 512
    os.link(tmp_path / "t" / "big", tmp_path / "t" / "alias")
    assert disk_usage(tmp_path / "t") == before  # a second name of big adds nothing
    assert disk_usage(tmp_path / "gone").inodes == 0  # a missing tree is empty, not an error
