"""Runnable test images: a layer with Debian's static busybox (package ``busybox-static``) and its applet symlinks,
plus small data layers, built in the test and pushed to the test registry. Nothing is downloaded."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import pytest

from cvmfs_snap_devenv.images import BuiltImage, BuiltLayer, Pusher, image, layer
from cvmfs_snap_devenv.images import busybox_layer as busybox_layer  # re-exported for the tests
from tests.support.paths import shared_dir

BUSYBOX = "/bin/busybox"


def busybox_available() -> bool:
    """True if /bin/busybox is the static one (a dynamic binary would not run inside an empty image)."""
    if not os.path.isfile(BUSYBOX):
        return False
    with open(BUSYBOX, "rb") as f:
        head = f.read(1 << 16)
    return b"/lib64/ld-linux" not in head and b"ld-linux" not in head


def require_busybox() -> None:
    if not busybox_available():
        pytest.skip("static /bin/busybox missing: apt-get install busybox-static")


@dataclass
class PushedImage:
    ref: str  # host:port/repo:tag
    img: BuiltImage
    digest: str  # what the tag points to (manifest or index digest)


def data_layer(name: str, payload: bytes, codec: str = "gzip") -> BuiltLayer:
    return layer(["data/", (f"data/{name}", payload)], codec)


def push_runnable(registry_url: str, host: str, repo: str, tag: str = "v1", extra: int = 1,
                  codec: str = "gzip") -> PushedImage:
    """busybox layer + ``extra`` data layers (``/data/fileN`` = ``content N of <repo>``)."""
    layers = [busybox_layer(codec)]
    layers += [data_layer(f"file{i}", f"content {i} of {repo}\n".encode() * 50, codec) for i in range(extra)]
    img = image(layers, cmd=("/bin/sh",))
    p = Pusher(registry_url)
    try:
        digest = p.image(repo, tag, img)
    finally:
        p.close()
    return PushedImage(ref=f"{host}/{repo}:{tag}", img=img, digest=digest)


def goref_bin(tool: str) -> str | None:
    """A go-reference tool (shared/tools/go-reference) if built: $GOREF_BIN, its bin/, /tmp/go-reference/bin."""
    shared = shared_dir()
    in_shared = str(shared / "tools/go-reference/bin") if shared else ""
    for d in (os.environ.get("GOREF_BIN", ""), in_shared, "/tmp/go-reference/bin"):
        if d and os.access(os.path.join(d, tool), os.X_OK):
            return os.path.join(d, tool)
    return shutil.which(tool)
