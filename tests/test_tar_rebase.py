"""Rebasing a layer tar under ``<xx>/<d>/layerfs/`` for one batched ingest: names move, nothing else changes."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from cvmfs_snap.layer import iter_layer
from publisher.backends.ingest_tar import END_OF_ARCHIVE
from publisher.backends.tar_rebase import rebase

PREFIX = "ab/cdef/layerfs/"


def _tree(root: Path) -> None:
    long_dir = root / "d" / ("L" * 120)
    long_dir.mkdir(parents=True)
    (root / "d/f").write_text("hi\n")
    os.link(root / "d/f", root / "d/hl")
    os.symlink("../d/f", root / "d/sl")
    os.symlink("T" * 150, root / "d/longsl")
    (long_dir / ("n" * 110)).write_text("long\n")
    os.link(root / "d/f", long_dir / "hardlong")
    with open(root / "d/sparse", "wb") as f:
        f.truncate(64 << 20)
        f.seek(32 << 20)
        f.write(b"x")
    os.chown(root / "d/f", 1000, 1001)


@pytest.mark.parametrize("fmt", ["pax", "gnu", "ustar"])
def test_rebase_moves_names_and_copies_the_rest(fmt: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _tree(src)
    names = ["d"] if fmt != "ustar" else ["d/f", "d/hl", "d/sl"]  # ustar cannot hold the long names
    tar = tmp_path / "in.tar"
    sparse = ["--sparse"] if fmt != "ustar" else []
    subprocess.run(["tar", *sparse, f"--format={fmt}", "--numeric-owner", "-cf", str(tar), "-C", str(src),
                    *names], check=True)
    out = io.BytesIO()
    with open(tar, "rb") as f:
        rebase(f, out, PREFIX)
    rebased = out.getvalue()
    assert len(rebased) < 64 << 20  # the sparse file stayed sparse
    with tarfile.open(tar) as orig_tf, tarfile.open(fileobj=io.BytesIO(rebased + END_OF_ARCHIVE)) as tf:
        orig = {m.name.rstrip("/"): m for m in orig_tf}
        seen = []
        for m in tf:
            assert m.name.startswith(PREFIX), m.name
            o = orig[m.name[len(PREFIX):]]
            seen.append(o.name.rstrip("/"))
            assert (m.type, m.mode, m.uid, m.gid, m.size, m.mtime) == (o.type, o.mode, o.uid, o.gid, o.size, o.mtime)
            if m.islnk():
                assert m.linkname == PREFIX + o.linkname  # hard link targets are members: moved too
            elif m.issym():
                assert m.linkname == o.linkname  # symlink targets are content: untouched
            elif m.isreg():
                data, want = tf.extractfile(m), orig_tf.extractfile(o)
                assert data is not None and want is not None and data.read() == want.read()
        assert sorted(seen) == sorted(orig)
    # the project's own reader accepts it too, with the same entries under the prefix
    entries = {e.path: e for e in iter_layer(io.BytesIO(rebased + END_OF_ARCHIVE), check_structure=False)}
    assert f"{PREFIX}d/f" in entries and entries[f"{PREFIX}d/f"].uid == 1000
