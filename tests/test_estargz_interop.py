"""Interop with Go's estargz library (the go-reference `esgz` tool): we read what it builds, it verifies what we
write, prioritised blobs included; the footer is byte-identical."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from cvmfs_snap.estargz import PREFETCH_LANDMARK, gzip_footer, open_bytes
from cvmfs_snap_devenv.images import compress
from tests.support.estargz import corpus, esgz, to_estargz
from tests.support.trees import sparse_tar
from tests.test_estargz_format import _files

CORPUS = corpus()


def _go_build(tmp: Path, tar: bytes, *extra: str) -> tuple[bytes, dict[str, str]]:
    src, out = tmp / "in.tar", tmp / "out.esgz"
    src.write_bytes(tar)
    r = subprocess.run([esgz(), "build", str(src), str(out), "--json", *extra], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return out.read_bytes(), json.loads(r.stdout)


def _go_verify(tmp: Path, blob: bytes, toc_digest: str, diff_id: str) -> str:
    p = tmp / "ours.esgz"
    p.write_bytes(blob)
    r = subprocess.run([esgz(), "verify", str(p), toc_digest, "--diff-id", diff_id], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.mark.parametrize("case", sorted(set(CORPUS) - {"nothing"}))
def test_we_read_what_go_builds(case: str, tmp_path: Path) -> None:
    tar = CORPUS[case]
    blob, info = _go_build(tmp_path, compress(tar, "gzip"), "--chunk-size", "1000000")
    es = open_bytes(blob, toc_digest=info["tocDigest"])
    read = lambda o, n: blob[o : o + n]  # noqa: E731
    es.verify_all(read)
    for path, data in _files(tar).items():
        assert es.read_file(read, path) == data, path


def test_we_read_go_prioritised_and_parallel_builds(tmp_path: Path) -> None:
    tar = CORPUS["big"]
    blob, _ = _go_build(tmp_path, tar, "--prioritized-files", "small,after", "--parts", "0",
                           "--chunk-size", "300000")
    es = open_bytes(blob)
    assert es.toc.has_prefetch_landmark and es.prefetch == ["small", "after"]
    read = lambda o, n: blob[o : o + n]  # noqa: E731
    es.verify_all(read)
    assert es.read_file(read, "big", 299_990, 20) == _files(tar)["big"][299_990:300_010]


def test_go_footer_is_ours_byte_for_byte(tmp_path: Path) -> None:
    blob, _ = _go_build(tmp_path, CORPUS["hardlinks"])
    es = open_bytes(blob)
    assert blob[-51:] == gzip_footer(es.footer.toc_offset)


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_go_verifies_what_we_write(case: str, tmp_path: Path) -> None:
    blob, res = to_estargz(CORPUS[case], chunk_size=1 << 20)
    out = _go_verify(tmp_path, blob, res.toc_digest, res.diff_id)
    assert out.startswith("ok ")


def test_go_verifies_prioritised_sparse_and_level_9(tmp_path: Path) -> None:
    tar = sparse_tar(tmp_path, ["--format=posix", "--sparse-version=1.0"])
    blob, res = to_estargz(tar, chunk_size=1 << 20, prioritized=["hole-at-end"], compression_level=9)
    assert open_bytes(blob).prefetch == ["hole-at-end"]
    out = _go_verify(tmp_path, blob, res.toc_digest, res.diff_id)
    assert "chunk=" in out
    p = tmp_path / "ours.esgz"
    toc = subprocess.run([esgz(), "toc", str(p)], capture_output=True, text=True, check=True).stdout
    names = [e["name"] for e in json.loads(toc)["entries"]]
    assert names.index("hole-at-end") < names.index(PREFETCH_LANDMARK) < names.index("sparse")


def test_go_rejects_our_blob_with_a_wrong_toc_digest(tmp_path: Path) -> None:
    blob, res = to_estargz(CORPUS["big"])
    p = tmp_path / "x.esgz"
    p.write_bytes(blob)
    r = subprocess.run([esgz(), "verify", str(p), "sha256:" + "2" * 64], capture_output=True, text=True)
    assert r.returncode != 0 and res.toc_digest not in r.stdout
