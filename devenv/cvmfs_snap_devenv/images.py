"""Build container images inside the tests (tarfile) and push them to a registry over its HTTP API.

Nothing is downloaded: every layer is made here. For images built with umoci/skopeo see the tests that use them.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import zstandard

from cvmfs_snap.estargz import BuildOptions, build
from cvmfs_snap.labelnames import TOC_DIGEST, UNCOMPRESSED_SIZE
from cvmfs_snap.mediatypes import (
    DOCKER_CONFIG,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_LAYER_TAR,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Entry:
    """One tar entry. type: file, dir, symlink, hardlink, char, block, fifo."""

    name: str
    type: str = "file"
    data: bytes = b""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    linkname: str = ""
    mtime: int = 1_700_000_000
    devmajor: int = 0
    devminor: int = 0
    pax: dict[str, str] = field(default_factory=dict)


_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def make_tar(entries: Iterable[Entry | tuple[str, bytes] | str], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """A tar from entries; a tuple (name, data) is a file, a str ending in '/' a dir, else an empty file."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for e in entries:
            if isinstance(e, tuple):
                e = Entry(e[0], data=e[1])
            elif isinstance(e, str):
                e = Entry(e.rstrip("/"), type="dir") if e.endswith("/") else Entry(e)
            ti = tarfile.TarInfo(e.name)
            ti.type = _TYPES[e.type]
            ti.mode = e.mode if e.mode is not None else (0o755 if e.type == "dir" else 0o644)
            ti.uid, ti.gid, ti.mtime = e.uid, e.gid, e.mtime
            ti.linkname = e.linkname
            ti.devmajor, ti.devminor = e.devmajor, e.devminor
            if e.pax:
                ti.pax_headers = dict(e.pax)
            if e.type == "file":
                ti.size = len(e.data)
                tf.addfile(ti, io.BytesIO(e.data))
            else:
                tf.addfile(ti)
    return buf.getvalue()


def compress(tar: bytes, codec: str) -> bytes:
    if codec == "gzip":
        return gzip.compress(tar, compresslevel=1, mtime=0)
    if codec == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(tar)
    if codec == "plain":
        return tar
    raise ValueError(codec)


LAYER_MEDIA = {"gzip": OCI_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD, "plain": OCI_LAYER_TAR}


@dataclass
class BuiltLayer:
    tar: bytes
    blob: bytes
    media_type: str
    #: the descriptor's annotations (eStargz layers: the TOC digest and uncompressed size)
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return sha256(self.blob)

    @property
    def diff_id(self) -> str:
        return sha256(self.tar)

    def descriptor(self) -> dict[str, object]:
        d: dict[str, object] = {"mediaType": self.media_type, "digest": self.digest, "size": len(self.blob)}
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        return d


def layer(entries: Iterable[Entry | tuple[str, bytes] | str], codec: str = "gzip") -> BuiltLayer:
    tar = make_tar(entries)
    return BuiltLayer(tar=tar, blob=compress(tar, codec), media_type=LAYER_MEDIA[codec])


def estargz_layer(entries: Iterable[Entry | tuple[str, bytes] | str], prioritized: Sequence[str] = (),
                  chunk_size: int | None = None) -> BuiltLayer:
    """The layer as an eStargz blob made by our writer, with the TOC digest and uncompressed-size annotations
    (what ``cvmfs-snap convert`` puts on the descriptor); ``tar`` is the blob's own (uncompressed) tar."""
    opts = BuildOptions(prioritized=prioritized, workers=1) if chunk_size is None else \
        BuildOptions(prioritized=prioritized, workers=1, chunk_size=chunk_size)
    out = io.BytesIO()
    res = build(io.BytesIO(make_tar(entries)), out, opts)
    blob = out.getvalue()
    return BuiltLayer(tar=gzip.decompress(blob), blob=blob, media_type=LAYER_MEDIA["gzip"],
                      annotations={TOC_DIGEST: res.toc_digest,
                                   UNCOMPRESSED_SIZE: str(res.uncompressed_size)})


@dataclass
class BuiltImage:
    layers: list[BuiltLayer]
    config: bytes
    manifest: bytes
    manifest_media_type: str

    @property
    def manifest_digest(self) -> str:
        return sha256(self.manifest)

    @property
    def config_digest(self) -> str:
        return sha256(self.config)


def image(
    layers: Sequence[BuiltLayer],
    *,
    architecture: str = "amd64",
    os_name: str = "linux",
    variant: str | None = None,
    docker: bool = False,
    cmd: Sequence[str] = ("/bin/sh",),
) -> BuiltImage:
    cfg: dict[str, object] = {
        "architecture": architecture,
        "os": os_name,
        "config": {"Cmd": list(cmd), "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [lay.diff_id for lay in layers]},
        "history": [{"created_by": "cvmfs-snap tests"} for _ in layers],
    }
    if variant:
        cfg["variant"] = variant
    config = json.dumps(cfg, sort_keys=True).encode()
    mt = DOCKER_MANIFEST if docker else OCI_MANIFEST
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mt,
            "config": {"mediaType": DOCKER_CONFIG if docker else OCI_CONFIG, "digest": sha256(config),
                       "size": len(config)},
            "layers": [lay.descriptor() for lay in layers],
        },
        sort_keys=True,
    ).encode()
    return BuiltImage(list(layers), config, manifest, mt)


def index(images: Sequence[tuple[BuiltImage, dict[str, str]]], docker: bool = False) -> bytes:
    """A manifest list / OCI index from (image, platform) pairs."""
    mt = DOCKER_LIST if docker else OCI_INDEX
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mt,
            "manifests": [
                {"mediaType": img.manifest_media_type, "digest": img.manifest_digest, "size": len(img.manifest),
                 "platform": plat}
                for img, plat in images
            ],
        },
        sort_keys=True,
    ).encode()


class Pusher:
    """Push blobs and manifests with the registry HTTP API (monolithic upload)."""

    def __init__(self, base_url: str, auth: httpx.Auth | tuple[str, str] | None = None) -> None:
        self.client = httpx.Client(base_url=base_url, auth=auth, timeout=60)

    def close(self) -> None:
        self.client.close()

    def blob(self, repo: str, data: bytes) -> str:
        digest = sha256(data)
        if self.client.head(f"/v2/{repo}/blobs/{digest}").status_code == 200:
            return digest
        self.upload(repo, digest, data)
        return digest

    def upload(self, repo: str, digest: str, content: bytes | Path) -> None:
        """Monolithic upload of one blob; a Path is streamed from disk (large generated layers)."""
        r = self.client.post(f"/v2/{repo}/blobs/uploads/")
        r.raise_for_status()
        loc = r.headers["Location"]
        sep = "&" if "?" in loc else "?"
        headers = {"Content-Type": "application/octet-stream"}
        if isinstance(content, Path):
            headers["Content-Length"] = str(content.stat().st_size)
            with open(content, "rb") as f:
                r = self.client.put(f"{loc}{sep}digest={digest}", content=f, headers=headers)
        else:
            r = self.client.put(f"{loc}{sep}digest={digest}", content=content, headers=headers)
        r.raise_for_status()

    def manifest(self, repo: str, ref: str, body: bytes, media_type: str) -> str:
        r = self.client.put(f"/v2/{repo}/manifests/{ref}", content=body, headers={"Content-Type": media_type})
        r.raise_for_status()
        return sha256(body)

    def image(self, repo: str, tag: str, img: BuiltImage) -> str:
        for lay in img.layers:
            self.blob(repo, lay.blob)
        self.blob(repo, img.config)
        return self.manifest(repo, tag, img.manifest, img.manifest_media_type)

    def multiarch(self, repo: str, tag: str, images: Sequence[tuple[BuiltImage, dict[str, str]]],
                  docker: bool = False) -> str:
        for img, _ in images:
            self.image(repo, img.manifest_digest, img)
        body = index(images, docker=docker)
        return self.manifest(repo, tag, body, DOCKER_LIST if docker else OCI_INDEX)


def push_image(registry_url: str, repo: str, tag: str, img: BuiltImage) -> str:
    p = Pusher(registry_url)
    try:
        return p.image(repo, tag, img)
    finally:
        p.close()


BUSYBOX = "/bin/busybox"
BUSYBOX_APPLETS = ("sh", "ls", "cat", "echo", "test", "stat", "find", "wc", "sleep", "true", "false", "id", "touch",
                   "mkdir", "rm", "sha256sum", "readlink", "env", "head", "du")


def busybox_entries(path: str = BUSYBOX) -> list[Entry]:
    """Entries for a minimal runnable userland: Debian's static busybox plus applet symlinks in /bin.

    Needs the busybox-static package on the host (installed by scripts/install-deps); nothing is downloaded."""
    with open(path, "rb") as f:
        data = f.read()
    entries = [Entry("bin", type="dir"), Entry("bin/busybox", data=data, mode=0o755)]
    entries += [Entry(f"bin/{a}", type="symlink", linkname="busybox") for a in BUSYBOX_APPLETS]
    entries += [Entry("etc", type="dir"), Entry("etc/hostname", data=b"cvmfs-snap-test\n"),
                Entry("tmp", type="dir", mode=0o1777), Entry("proc", type="dir"),
                Entry("sys", type="dir"), Entry("dev", type="dir")]
    return entries


def busybox_layer(codec: str = "gzip") -> BuiltLayer:
    """A gzip layer with a static busybox, so images built here can run under runc."""
    return layer(busybox_entries(), codec)
