"""Helpers for the publisher tests: test images, the cvmfs_server stand-in environment, repository invariants."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cvmfs_snap.fsutil import walk
from cvmfs_snap.layout import IMAGE_JSON, ImageRecord, RepositoryLayout, link_resolves
from cvmfs_snap_devenv import images as im
from tests.support import fake_cvmfs_server

FAKE_CVMFS_SERVER = Path(__file__).with_name("fake_cvmfs_server.py")


def base_layer(tag: str = "") -> im.BuiltLayer:
    return im.layer(
        [
            "etc/",
            ("etc/os-release", b"NAME=test\n"),
            ("etc/motd", f"hello {tag}\n".encode()),
            "opt/",
            "opt/app/",
            ("opt/app/old.txt", b"old\n"),
            ("opt/app/keep.txt", b"keep\n"),
            im.Entry("bin", type="dir"),
            im.Entry("bin/tool", data=b"#!/bin/sh\necho tool\n", mode=0o755, uid=1000, gid=1000),
            im.Entry("bin/sh-link", type="symlink", linkname="tool"),
        ]
    )


def top_layer(codec: str = "zstd", marker: bytes = b"new\n") -> im.BuiltLayer:
    """Deletes etc/motd (whiteout), makes opt/app opaque, adds files."""
    return im.layer(
        [
            "etc/",
            im.Entry("etc/.wh.motd"),
            "opt/",
            "opt/app/",
            im.Entry("opt/app/.wh..wh..opq"),
            ("opt/app/new.txt", marker),
        ],
        codec=codec,
    )


@dataclass
class FakeCvmfs:
    exe: str
    repos: Path
    state: Path
    repo: str

    @property
    def root(self) -> Path:
        return self.repos / self.repo

    @property
    def etc(self) -> Path:
        """Stands in for /etc/cvmfs."""
        return self.state.parent / "fake-etc"

    @property
    def server_conf(self) -> Path:
        return self.etc / "repositories.d" / self.repo / "server.conf"

    def env(self, fail: str = "") -> dict[str, str]:
        f = fake_cvmfs_server
        return {f.ENV_REPOS: str(self.repos), f.ENV_STATE: str(self.state), f.ENV_FAIL: fail, f.ENV_ETC: str(self.etc)}

    def apply_env(self, monkeypatch: object, fail: str = "") -> None:
        for k, v in self.env(fail).items():
            monkeypatch.setenv(k, v)  # type: ignore[attr-defined]

    def log(self) -> list[dict[str, Any]]:
        p = self.state / "log.jsonl"
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text().splitlines()]

    def commands(self) -> list[list[str]]:
        return [list(e["argv"]) for e in self.log()]

    def unknown_owner(self) -> set[str]:
        """Paths the stand-in recorded with the unknown owner (4294967295 on the real server)."""
        p = self.state / f"{self.repo}.unknown-owner"
        return set(p.read_text().splitlines()) if p.exists() else set()

    def violations(self) -> str:
        p = self.state / "violations"
        return p.read_text() if p.exists() else ""


def make_fake_cvmfs(tmp: Path, repo: str = "unpacked.test.ch") -> FakeCvmfs:
    repos = tmp / "cvmfs"
    (repos / repo).mkdir(parents=True)
    exe = tmp / "cvmfs_server"
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE_CVMFS_SERVER} \"$@\"\n")
    exe.chmod(0o755)
    return FakeCvmfs(str(exe), repos, tmp / "fake-state", repo)


def check_invariants(root: Path, *, allow_ducc_layers: bool = False) -> list[str]:
    """What must hold after any interruption: no layer visible without its complete content, no image whose
    layers (or flat tree) are missing, public links point at existing flat trees."""
    layout = RepositoryLayout(root)
    problems: list[str] = []
    for digest in layout.iter_layer_digests():
        ldir = layout.layer_dir(digest)
        has_fs = layout.layerfs(digest).is_dir()
        has_json = layout.layer_json(digest).is_file()
        if has_json:
            rec = layout.read_layer_record(digest)
            if rec is None or not has_fs:
                problems.append(f"{ldir}: layer.json without layerfs")
        elif has_fs and not allow_ducc_layers:
            problems.append(f"{ldir}: layerfs visible without layer.json")
    meta = layout.metadata_root
    if meta.is_dir():
        for dirpath, _dirs, files in walk(meta):
            if IMAGE_JSON in files:
                img = ImageRecord.from_json((Path(dirpath) / IMAGE_JSON).read_bytes())
                for d in img.layers:
                    if not layout.is_layer_complete(d):
                        problems.append(f"{dirpath}: image uses incomplete layer {d}")
    for dirpath, dirs, files in walk(root):
        if "/." in dirpath[len(str(root)):]:
            continue
        for name in dirs + files:
            p = Path(dirpath) / name
            if p.is_symlink() and not p.exists() and not link_resolves(p):
                problems.append(f"{p}: dangling public link -> {os.readlink(p)}")
    return problems
