"""The repository layout contract: every path and metadata file cvmfs-snap reads or writes in a CVMFS repository.

Both the publisher (which writes the tree) and the node snapshotter (which reads it) import this module; nothing else
spells a repository path. Paths are those of DUCC on unpacked.cern.ch, so a repository DUCC filled can be served by our
snapshotter and extended by our publisher without change.

With ``d`` the compressed layer digest hex (no ``sha256:``) and ``cfg`` the image config digest hex::

    <root>/                                   the repository (/cvmfs/<repo>, or a local directory)
      .layers/.cvmfscatalog                   nested catalog for all layers
      .layers/<d[0:2]>/.cvmfscatalog          one catalog per bucket
      .layers/<d[0:2]>/<d>/layerfs/           layer content as `cvmfs_server ingest` stores it: whiteout files
                                              (.wh.NAME, .wh..wh..opq) stay plain empty files
      .layers/<d[0:2]>/<d>/layerfs/.cvmfscatalog   one nested catalog per layer
      .layers/<d[0:2]>/<d>/.metadata/origin.json   {"origin": [config digests of images using the layer]}
      .layers/<d[0:2]>/<d>/.metadata/layers.json   DUCC's podman-style record (id = diffID, ...)
      .layers/<d[0:2]>/<d>/.metadata/layer.json    ours (LayerRecord); written LAST: its presence marks the layer
                                                   complete
      .metadata/<registry>/<repository>:<tag>/manifest.json   the image manifest (for multi-arch: per platform,
                                                              see image_metadata_dir)
      .metadata/<registry>/<repository>:<tag>/config.json     the image config
      .metadata/<registry>/<repository>:<tag>/index.json      the index / manifest list of a multi-arch image
      .metadata/<registry>/<repository>:<tag>/image.json      ours (ImageRecord): digests, layers, when published
      .flat/<cfg[0:2]>/<cfg>/                 flattened root filesystem (whiteouts applied), own catalog
      <registry>/<repository>:<tag>           relative symlink -> .flat/<cfg[0:2]>/<cfg>
      .multiarch/<arch>/<registry>/<repository>:<tag>   per-architecture symlinks of a multi-arch image; <arch> as
                                              DUCC spells it: amd64, arm64:v8 (``<arch>[:<variant>]``)
      .multiarch/<alias> -> <arch>            DUCC's aliases for the ``uname -m`` spellings a node's CVMFS_ARCH holds
                                              (x86_64 -> amd64, aarch64 -> arm64 or arm64:v8, ...), see
                                              MULTIARCH_ALIASES
    With the cvmfs backends the public name of a multi-arch image is a CVMFS variant symlink (DUCC since 2025):
      <registry>/<repository>:<tag> -> ../../.multiarch/$(CVMFS_ARCH:-amd64)/<registry>/<repository>:<tag>
    (as many ``../`` as the name has directory levels; the default is the image's default platform). Where
    variant symlinks do not resolve (the local backend), it points at the default platform's flat instead.

A layer is *complete* when its ``layer.json`` exists and parses, or, for layers DUCC published (no ``layer.json``),
when its ``layerfs`` directory exists. The publisher must make ``layerfs`` visible only together with ``layer.json``
(the local backend stages the whole layer directory and renames it into place; the cvmfs backends publish
``layerfs`` and ``.metadata`` of all new layers of an image in one ``cvmfs_server ingest``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .digests import SHA256_HEX
from .errors import InvalidInputError
from .validation import load_as

#: version of the metadata files we write (layer.json, image.json)
LAYOUT_VERSION = 1
#: where CVMFS clients (and a stratum-0) mount repositories: ``/cvmfs/<repository>``
CVMFS_MOUNT_ROOT = Path("/cvmfs")

LAYERS_DIR = ".layers"
METADATA_DIR = ".metadata"
FLAT_DIR = ".flat"
MULTIARCH_DIR = ".multiarch"
LAYERFS = "layerfs"
CATALOG_MARKER = ".cvmfscatalog"
ORIGIN_JSON = "origin.json"
LAYERS_JSON = "layers.json"
LAYER_JSON = "layer.json"
MANIFEST_JSON = "manifest.json"
CONFIG_JSON = "config.json"
INDEX_JSON = "index.json"
IMAGE_JSON = "image.json"
#: DUCC's list of manifests to garbage-collect (moved tags, images dropped from the recipe), relative to the root
REMOVE_SCHEDULE = ".metadata/remove-schedule.json"
#: our key inside a remove-schedule entry (DUCC ignores unknown keys): reference, digests, when and why scheduled
SCHEDULE_KEY = "x-cvmfs-snap"

#: files CVMFS itself places in a tree that a container must never see
CVMFS_MARKER_FILES = frozenset({CATALOG_MARKER, ".cvmfsdirtab"})

#: DUCC's ``.multiarch/<alias>`` links (cvmfs/cvmfs PR #4170): a node's ``$(CVMFS_ARCH)`` is ``uname -m``
#: (x86_64, aarch64), OCI platforms use Go's names (amd64, arm64); the first candidate present is the target
MULTIARCH_ALIASES: dict[str, tuple[str, ...]] = {
    "aarch64": ("arm64", "arm64:v8"),
    "arm64": ("arm64:v8",),
    "armhf": ("arm",),
    "armel": ("arm:v6",),
    "i386": ("386",),
    "x86_64": ("amd64",),
    "x86-64": ("amd64",),
}

#: the CVMFS variant-symlink expression of a node's architecture, with its default
_VARIANT_ARCH = re.compile(r"\$\(CVMFS_ARCH(?::-([^)]*))?\)")

_SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9._-][A-Za-z0-9._:@+-]*$")


def digest_hex(digest: str) -> str:
    """Return the hex part of a ``sha256:<64 hex>`` digest, rejecting anything else.

    This is the one gate between untrusted digests (registry manifests, containerd labels) and repository paths:
    ``../``, other algorithms, upper case and wrong lengths are refused with :class:`InvalidInputError`.
    """
    if not isinstance(digest, str):
        raise InvalidInputError(f"layer digest must be a string, got {type(digest).__name__}")
    algo, sep, hexpart = digest.partition(":")
    if not sep:
        raise InvalidInputError(f"invalid digest {digest[:100]!r}: expected 'sha256:<64 hex digits>'")
    if algo != "sha256":
        raise InvalidInputError(
            f"unsupported digest algorithm {algo[:20]!r} in {digest[:100]!r}: only sha256 layers can be served"
        )
    if not SHA256_HEX.fullmatch(hexpart):
        raise InvalidInputError(f"invalid sha256 digest {digest[:100]!r}: expected 64 lower-case hex digits")
    return hexpart


def _check_component(value: str, what: str) -> str:
    """Refuse path components that could leave the metadata tree."""
    for part in value.split("/"):
        if part in ("", ".", "..") or not _SAFE_COMPONENT.match(part):
            raise InvalidInputError(f"{what} {value!r} cannot be used as a repository path")
    return value


@dataclass
class LayerRecord:
    """Our ``layer.json``: everything the snapshotter needs to serve a layer, written last by the publisher."""

    digest: str
    diff_id: str
    media_type: str
    compressed_size: int
    uncompressed_size: int
    entries: int
    #: paths (relative, no leading '/') that this layer deletes from lower layers (from ``.wh.NAME`` files)
    whiteouts: list[str] = field(default_factory=list)
    #: directories (relative) made opaque by this layer (``.wh..wh..opq``)
    opaque_dirs: list[str] = field(default_factory=list)
    #: AUFS metadata entries (relative) the layerfs keeps as plain files/dirs (``.wh..wh.plnk``, ``.wh..wh.aufs``)
    #: that containers must not see; absent in records written before it existed (= none)
    hidden: list[str] = field(default_factory=list)
    #: extended attributes of the layer's tar that its ``layerfs`` does not carry (``cvmfs_server ingest`` drops
    #: them all): relative path -> {xattr name: base64 value}; ``security.selinux`` is never recorded. A node
    #: restores them for containers (docs/layout.md). Absent in older records (= none recorded)
    xattrs: dict[str, dict[str, str]] = field(default_factory=dict)
    #: hard links of the tar that the ``layerfs`` stores as separate copies (ingest): [path, target] pairs, in tar
    #: order (the content is identical; only the link count and the shared inode are lost)
    hardlinks: list[list[str]] = field(default_factory=list)
    publisher_version: str = ""
    created: float = 0.0
    version: int = LAYOUT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> LayerRecord:
        data = _parse(text, "layer.json")
        if isinstance(data, dict):
            try:
                version = int(data.get("version", 0))
            except (TypeError, ValueError):
                version = 0  # load_as names the key
            if version > LAYOUT_VERSION:
                raise InvalidInputError(
                    f"layer.json version {version} is newer than this cvmfs-snap understands ({LAYOUT_VERSION}); "
                    "upgrade cvmfs-snap on this node"
                )
        rec = load_as(cls, data, "malformed layer.json")
        digest_hex(rec.digest)
        return rec


@dataclass
class ImageRecord:
    """Our ``image.json`` beside manifest.json: what was published for one tag (one platform)."""

    reference: str
    manifest_digest: str
    config_digest: str
    layers: list[str]
    platform: str = ""
    index_digest: str = ""
    published: float = 0.0
    version: int = LAYOUT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> ImageRecord:
        return load_as(cls, _parse(text, "image.json"), "malformed image.json")


def _parse(text: str | bytes, what: str) -> object:
    try:
        data: object = json.loads(text)
    except ValueError as exc:
        raise InvalidInputError(f"malformed {what}: {exc}") from None
    return data


class RepositoryLayout:
    """Paths inside one repository root. Pure path arithmetic plus small read helpers; writes belong to backends."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    # -- layers -------------------------------------------------------------------------------------------------
    @property
    def layers_root(self) -> Path:
        return self.root / LAYERS_DIR

    def layer_bucket(self, digest: str) -> Path:
        return self.layers_root / digest_hex(digest)[:2]

    def layer_dir(self, digest: str) -> Path:
        d = digest_hex(digest)
        return self.layers_root / d[:2] / d

    def layerfs(self, digest: str) -> Path:
        return self.layer_dir(digest) / LAYERFS

    def layer_metadata_dir(self, digest: str) -> Path:
        return self.layer_dir(digest) / METADATA_DIR

    def origin_json(self, digest: str) -> Path:
        return self.layer_metadata_dir(digest) / ORIGIN_JSON

    def layers_json(self, digest: str) -> Path:
        return self.layer_metadata_dir(digest) / LAYERS_JSON

    def layer_json(self, digest: str) -> Path:
        return self.layer_metadata_dir(digest) / LAYER_JSON

    def read_layer_record(self, digest: str) -> LayerRecord | None:
        """Our record of a layer, or None when there is none (absent, or a DUCC-made layer)."""
        try:
            text = self.layer_json(digest).read_bytes()
        except FileNotFoundError:
            return None
        rec = LayerRecord.from_json(text)
        if rec.digest != digest:
            raise InvalidInputError(f"{self.layer_json(digest)} describes {rec.digest}, not {digest}")
        return rec

    def is_layer_complete(self, digest: str) -> bool:
        """True when the layer can be served: complete layer.json, or (DUCC) an existing layerfs directory."""
        if self.layer_json(digest).is_file():
            try:
                self.read_layer_record(digest)
            except InvalidInputError:
                return False
            return self.layerfs(digest).is_dir()
        return self.layerfs(digest).is_dir()

    def iter_layer_digests(self) -> list[str]:
        """All layer digests present under .layers (complete or not), as ``sha256:<hex>``."""
        out: list[str] = []
        try:
            buckets = sorted(os.listdir(self.layers_root))
        except FileNotFoundError:
            return out
        for b in buckets:
            if len(b) != 2:
                continue
            try:
                names = sorted(os.listdir(self.layers_root / b))
            except (NotADirectoryError, FileNotFoundError):
                continue
            out.extend(f"sha256:{n}" for n in names if SHA256_HEX.fullmatch(n) and n[:2] == b)
        return out

    # -- images ---------------------------------------------------------------------------------------------------
    @staticmethod
    def image_name(registry: str, repository: str, tag: str) -> str:
        """``<registry>/<repository>:<tag>``, the relative name used under .metadata and for public links."""
        _check_component(registry, "registry")
        _check_component(repository, "repository")
        _check_component(tag, "tag")
        return f"{registry}/{repository}:{tag}"

    @property
    def metadata_root(self) -> Path:
        return self.root / METADATA_DIR

    def image_metadata_dir(self, registry: str, repository: str, tag: str, arch: str | None = None) -> Path:
        """Metadata of one tag; for one platform of a multi-arch image, ``arch`` (e.g. ``arm64``) adds a level."""
        base = self.metadata_root / self.image_name(registry, repository, tag)
        if arch:
            return base / _check_component(arch.replace("/", "-"), "architecture")
        return base

    def flat_dir(self, config_digest: str) -> Path:
        c = digest_hex(config_digest)
        return self.root / FLAT_DIR / c[:2] / c

    def public_link(self, registry: str, repository: str, tag: str) -> Path:
        return self.root / self.image_name(registry, repository, tag)

    def multiarch_link(self, arch: str, registry: str, repository: str, tag: str) -> Path:
        return self.root / MULTIARCH_DIR / _check_component(arch.replace("/", "-"), "architecture") / (
            self.image_name(registry, repository, tag)
        )

    def flat_link_target(self, link: Path, config_digest: str) -> str:
        """The relative symlink text from ``link`` to the flat tree of ``config_digest``."""
        return os.path.relpath(self.flat_dir(config_digest), link.parent)

    def variant_link_target(self, registry: str, repository: str, tag: str, default_arch: str) -> str:
        """DUCC's variant symlink text for the public name of a multi-arch image:
        ``../../.multiarch/$(CVMFS_ARCH:-<default_arch>)/<registry>/<repository>:<tag>``."""
        name = self.image_name(registry, repository, tag)
        arch = _check_component(default_arch, "architecture")
        return "../" * name.count("/") + f"{MULTIARCH_DIR}/$(CVMFS_ARCH:-{arch})/{name}"

    def multiarch_alias_links(self, new_arches: set[str]) -> list[tuple[Path, str]]:
        """The ``.multiarch/<alias>`` links (path, target) to create or re-point so that every alias whose
        candidate exists (already, or in ``new_arches``) resolves; aliases that are real directories are left."""
        base = self.root / MULTIARCH_DIR
        try:
            names = os.listdir(base)
        except FileNotFoundError:
            names = []
        real = {n for n in names if (base / n).is_dir() and not (base / n).is_symlink()} | set(new_arches)
        out: list[tuple[Path, str]] = []
        for alias, candidates in MULTIARCH_ALIASES.items():
            if alias in real:
                continue
            target = next((c for c in candidates if c in real), None)
            link = base / alias
            if target is not None and not (link.is_symlink() and os.readlink(link) == target):
                out.append((link, target))
        return out


def link_resolves(link: Path) -> bool:
    """True when ``link`` is a symlink to a directory; a CVMFS variant symlink (``$(CVMFS_ARCH:-amd64)``), which
    only a CVMFS client resolves, is checked with its default value."""
    if not link.is_symlink():
        return False
    if link.is_dir():
        return True
    target = os.readlink(link)
    m = _VARIANT_ARCH.search(target)
    if m is None or not m.group(1):
        return False
    return (link.parent / (target[: m.start()] + m.group(1) + target[m.end():])).is_dir()


def read_json(path: Path) -> Any:
    """Read a metadata JSON file; malformed content is an InvalidInputError naming the file."""
    try:
        return json.loads(path.read_bytes())
    except ValueError as exc:
        raise InvalidInputError(f"malformed JSON in {path}: {exc}") from exc
