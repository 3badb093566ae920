"""Node-local directories that make a CVMFS layer tree look, under overlayfs, exactly like a containerd layer.

A layer in CVMFS keeps the tar's whiteouts as plain files (``.wh.NAME``, ``.wh..wh..opq``) because a stratum-0 cannot
store overlay whiteouts, and carries CVMFS's own ``.cvmfscatalog`` markers. containerd's overlayfs snapshotter instead
turns ``.wh.NAME`` into a char 0/0 device at ``NAME`` and ``.wh..wh..opq`` into ``trusted.overlay.opaque=y`` on the
directory. To show a container the same tree, every layer is served as (top-most first)::

    upper mask   char 0/0 whiteouts at the paths of the .wh.* files, AUFS metadata entries (.wh..wh.plnk/, ...)
                 and CVMFS markers (hides them in the layerfs), and at the paths the layer deletes in lower layers
    layerfs      the read-only CVMFS tree itself
    lower        only if the layer has opaque dirs: those dirs, marked opaque

Why it is right, by overlay's lookup rules (top to bottom, a whiteout stops the lookup of its name, an opaque dir
stops the merge of the dir with layers below, a non-directory stops everything below it):

* a whiteout in the *mask* shadows a ``.wh.*`` file of the layerfs just below it; since containerd never shows
  ``.wh.*`` names either, hiding that name in layers further down changes nothing;
* a deletion ``NAME`` is a whiteout in the mask only when the layerfs has nothing at ``NAME`` (checked with
  ``lstat``), so it cannot hide this layer's own content, only the layers below: exactly what containerd's char
  device in the layer dir does. Layers above are found first, so a path deleted by layer N and re-created by layer
  N+1 is visible again. When the layer has ``.wh.NAME`` *and* ``NAME``, containerd applies it as "replace": a file
  hides the lower ones anyway, and a directory merges with the lower directory (it is not made opaque), which is
  what skipping the whiteout gives;
* an opaque directory must stop the lookup *below* this layer's content, so it lives in the *lower* dir, under the
  layerfs; it cannot go into the mask, where it would hide the layerfs's own entries;
* directories in the mask and the lower dir are never opaque (except the lower dir's opaque dirs), so they merge
  with the layerfs; each one exists in the layerfs too, and copies its mode, owner, times and xattrs, because the
  top-most layer holding a directory decides what the container sees of it. Entries whose directory is not a real
  directory of the layerfs (missing, or a symlink) are ignored, so we never add or replace a directory.

Directories that would be empty are omitted, so a layer costs 1 to 3 overlay lowerdirs, usually 2 (overlay
allows 500: a 128-layer image fits). Everything is built once per layer digest into a temporary directory and
renamed into place, so a crash mid-build never leaves a half-built directory that a later mount would use.

Directories that were handed out are never changed, renamed or removed while a snapshot uses their layer: running
containers have them as lowerdirs. A new format version is built *beside* the old one (``v<N>/<digest hex>``; the
unversioned ``<digest hex>`` of earlier releases is reused when its ``meta.json`` has the current version), and every
version of a layer is removed only by :meth:`OverlayDirCache.remove`, which the snapshot core calls when no snapshot
uses the layer (on Remove of its last snapshot, and in Cleanup).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cvmfs_snap.errors import CvmfsSnapError, IntegrityError, UnavailableError
from cvmfs_snap.estargz.toc import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_TAR_NAME
from cvmfs_snap.fsutil import remove_tree, remove_tree_quietly
from cvmfs_snap.layer.paths import FORBIDDEN_XATTR_PREFIXES
from cvmfs_snap.layer.whiteout import OPAQUE_MARKER, OPAQUE_XATTR, WHITEOUT_PREFIX
from cvmfs_snap.layout import CVMFS_MARKER_FILES, digest_hex

from .copyup import DEFAULT_COPY_LIMIT, restore_lost, set_xattrs

log = logging.getLogger(__name__)

#: version of the node-local directory format; a layer whose directory has another version gets a new one beside it
#: (2: AUFS metadata hidden, so indexes scanned by version 1, which did not list it, are not reused either;
#: 3: eStargz's own entries hidden in layers published from eStargz blobs;
#: 4: the mask carries copy-ups of files with recorded xattrs and restored hard links, :mod:`.copyup`)
FORMAT_VERSION = 4
UPPER = "upper"
LOWER = "lower"
META_JSON = "meta.json"
INDEX_JSON = "index.json"

#: extended attributes the CVMFS client makes up on every entry ("magic xattrs", cvmfs/magic_xattr.cc). They
#: describe the client, not the image, so they are never copied onto our directories.
CVMFS_MAGIC_XATTRS = frozenset({
    "user.authz", "user.catalog_counters", "user.chunk_list", "user.chunks", "user.compression",
    "user.direct_io", "user.external_file", "user.external_host", "user.external_timeout", "user.external_url",
    "user.fqrn", "user.hash", "user.hitrate", "user.host", "user.host_list", "user.lhash", "user.logbuffer",
    "user.ncleanup24", "user.nclg", "user.ndiropen", "user.ndownload", "user.nioerr", "user.nopen", "user.pid",
    "user.proxy", "user.proxy_list", "user.proxy_list_external", "user.pubkeys", "user.rawlink",
    "user.repo_counters", "user.repo_metainfo", "user.revision", "user.root_hash", "user.rx", "user.speed",
    "user.tag", "user.timeout", "user.timeout_direct", "user.timestamp_last_ioerr", "user.uptime",
    "user.usedfd", "user.useddirp", "user.version", "xfsroot.rawlink",
})


@dataclass(frozen=True)
class LayerIndex:
    """What a layer deletes and what of its tree must stay hidden; paths relative to the layerfs, '' is its root."""

    #: paths this layer deletes from the layers below it (``.wh.NAME`` -> ``NAME``)
    whiteouts: tuple[str, ...]
    #: directories this layer makes opaque (``.wh..wh..opq`` in them)
    opaque_dirs: tuple[str, ...]
    #: entries of the layerfs the container must not see: the ``.wh.*`` files themselves, AUFS metadata entries
    #: (``.wh..wh.plnk``...) and CVMFS markers
    hidden: tuple[str, ...]
    #: where the index came from: "layer.json" or "scan"
    origin: str = ""
    #: xattrs CVMFS lost (layer.json ``xattrs``): path -> name -> base64 value
    xattrs: dict[str, dict[str, str]] = field(default_factory=dict)
    #: hard links CVMFS stores as copies (layer.json ``hardlinks``): (path, target) pairs in tar order
    hardlinks: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> str:
        return json.dumps({"whiteouts": list(self.whiteouts), "opaque_dirs": list(self.opaque_dirs),
                           "hidden": list(self.hidden), "origin": self.origin, "version": FORMAT_VERSION,
                           "xattrs": self.xattrs, "hardlinks": [list(h) for h in self.hardlinks]},
                          indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> LayerIndex:
        try:
            data = json.loads(text)
            if data.get("version") != FORMAT_VERSION:
                raise ValueError(f"index format {data.get('version')}, expected {FORMAT_VERSION}")
            return cls(tuple(str(p) for p in data["whiteouts"]), tuple(str(p) for p in data["opaque_dirs"]),
                       tuple(str(p) for p in data["hidden"]), str(data.get("origin", "")),
                       {str(p): {str(k): str(v) for k, v in x.items()} for p, x in data.get("xattrs", {}).items()},
                       tuple((str(a), str(b)) for a, b in data.get("hardlinks", [])))
        except (ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"malformed whiteout index {where}: {exc}; delete it to have it rebuilt") from exc

    @classmethod
    def from_record(cls, whiteouts: Iterable[str], opaque_dirs: Iterable[str], markers: Iterable[str] = (),
                    origin: str = "layer.json", aufs_meta: Iterable[str] = (),
                    xattrs: dict[str, dict[str, str]] | None = None,
                    hardlinks: Iterable[Iterable[str]] = ()) -> LayerIndex:
        """The index from a layer's recorded whiteouts (layer.json, or a scan of a DUCC layer's tree): the names of
        the ``.wh.*`` files to hide follow from the paths they delete. ``markers`` are the CVMFS marker files found
        in the layerfs, ``aufs_meta`` the AUFS metadata entries it keeps (``hidden`` of the record or scan).

        Whiteouts and opaque dirs at or below an AUFS metadata entry are dropped: that whole subtree is hidden, and a
        whiteout below it would need a directory where the mask has a whiteout."""
        meta = tuple(_normalize(p) for p in aufs_meta)
        meta = tuple(p for p in meta if p)

        def visible(path: str) -> bool:
            return not any(path == m or path.startswith(m + "/") for m in meta)

        wh = tuple(p for p in (_normalize(p) for p in whiteouts) if visible(p))
        op = tuple(p for p in (_normalize(p) for p in opaque_dirs) if visible(p))
        hidden = [_join(_parent(p), WHITEOUT_PREFIX + _base(p)) for p in wh if p]
        hidden += [_join(d, OPAQUE_MARKER) for d in op]
        hidden += list(meta)
        hidden += list(markers)
        links = tuple((_normalize(a), _normalize(b)) for a, b in (tuple(h) for h in hardlinks))
        xa = {_normalize(p): dict(v) for p, v in (xattrs or {}).items() if visible(_normalize(p))}
        return cls(wh, op, tuple(dict.fromkeys(hidden)), origin, xa, tuple(h for h in links if visible(h[0])))


#: builds a layer's index when no cached one exists (reads layer.json or scans the layerfs)
IndexFactory = Callable[[], LayerIndex]


def _normalize(path: object) -> str:
    """An index path as the publisher writes it (relative, no leading '/'); tolerate '/x' and './x'."""
    if not isinstance(path, str):
        raise IntegrityError(f"whiteout index entry {path!r} is not a path string; republish the layer")
    path = path.strip("/")
    while path.startswith("./"):
        path = path[2:].lstrip("/")
    return "" if path == "." else path


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _parent(path: str) -> str:
    return path.rpartition("/")[0]


def _base(path: str) -> str:
    return path.rpartition("/")[2]


def root_markers(layerfs: Path) -> list[str]:
    """Entries at the top of a layerfs no container may see: CVMFS marker files (the nested catalog
    ``cvmfs_server ingest --catalog`` makes) and, for a layer published from an eStargz blob, eStargz's own entries
    (:func:`estargz_entries`)."""
    found = []
    for name in sorted(CVMFS_MARKER_FILES):
        try:
            os.lstat(layerfs / name)
        except FileNotFoundError:
            continue
        found.append(name)
    return found + estargz_entries(layerfs)


def estargz_entries(layerfs: Path) -> list[str]:
    """eStargz's own top-level entries (``stargz.index.json`` and the landmark files) when the layerfs holds a
    regular ``stargz.index.json`` *and* a regular landmark file: every eStargz writer (ours, Go's) adds one, and the
    lazy path hides them, so a layer that moves from lazy to CVMFS (publish-on-miss) looks the same to the next
    container. A plain layer that merely has a file of one of these names keeps it."""
    present = []
    for name in (TOC_TAR_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK):
        try:
            if stat.S_ISREG(os.lstat(layerfs / name).st_mode):
                present.append(name)
        except OSError:
            continue
    if TOC_TAR_NAME not in present or len(present) < 2:
        return []
    return present


def _components(path: str, digest: str) -> tuple[str, ...]:
    """Split an index path, refusing anything that could leave the directory we build (the index is data)."""
    if path == "":
        return ()
    parts = tuple(path.split("/"))
    for p in parts:
        if p in ("", ".", "..") or "\x00" in p:
            raise IntegrityError(
                f"the whiteout index of layer {digest} contains the unsafe path {path[:200]!r}; the layer's "
                "metadata is corrupt: republish the layer (or delete the node-local index to rebuild it)"
            )
    return parts


def _copy_xattrs(src: Path, dst: Path) -> None:
    try:
        names = os.listxattr(src, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.ENOTSUP, errno.ENODATA):
            log.debug("cannot list xattrs of %s: %s", src, exc)
        return
    for name in names:
        if name in CVMFS_MAGIC_XATTRS or name.startswith(FORBIDDEN_XATTR_PREFIXES):
            continue
        try:
            os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=False), follow_symlinks=False)
        except OSError as exc:
            log.debug("cannot copy xattr %s from %s to %s: %s", name, src, dst, exc)


def _copy_dir_meta(src: Path, dst: Path) -> None:
    """Make ``dst`` look like the layerfs directory ``src``: owner, mode (with set-id/sticky bits), xattrs, times."""
    st = os.lstat(src)
    os.lchown(dst, st.st_uid, st.st_gid)
    os.chmod(dst, stat.S_IMODE(st.st_mode))  # after chown, which may clear set-id bits
    _copy_xattrs(src, dst)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


class _TreeBuilder:
    """Creates whiteouts and directories under one root, mirroring the layerfs directories they sit in."""

    def __init__(self, root: Path, layerfs: Path, digest: str, dir_cache: dict[tuple[str, ...], bool]) -> None:
        self.root = root
        self.layerfs = layerfs
        self.digest = digest
        self.dirs: set[tuple[str, ...]] = set()  # directories made (relative), metadata copied at the end
        self.entries = 0  # whiteouts made + opaque dirs marked
        self._dir_cache = dir_cache  # shared: is this path a real directory in the layerfs?
        self.dir_xattrs: dict[tuple[str, ...], dict[str, bytes]] = {}  # recorded xattrs of directories made

    def layerfs_is_dir(self, parts: tuple[str, ...]) -> bool:
        """True if every component of ``parts`` is a real directory (no symlink) in the layerfs."""
        for i in range(len(parts) + 1):
            key = parts[:i]
            known = self._dir_cache.get(key)
            if known is None:
                try:
                    known = stat.S_ISDIR(os.lstat(self.layerfs.joinpath(*key)).st_mode)
                except (FileNotFoundError, NotADirectoryError):
                    known = False
                self._dir_cache[key] = known
            if not known:
                return False
        return True

    def ensure_dir(self, parts: tuple[str, ...]) -> bool:
        """Create ``parts`` (and parents) here if it is a real directory in the layerfs; False if it is not."""
        if not self.layerfs_is_dir(parts):
            return False
        for i in range(len(parts) + 1):
            key = parts[:i]
            if key not in self.dirs:
                if key:
                    os.mkdir(self.root.joinpath(*key), 0o700)
                self.dirs.add(key)
        return True

    def whiteout(self, parts: tuple[str, ...]) -> bool:
        if not parts or not self.ensure_dir(parts[:-1]):
            return False
        path = self.root.joinpath(*parts)
        try:
            os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))
        except FileExistsError:
            return False
        self.entries += 1
        return True

    def opaque(self, parts: tuple[str, ...]) -> bool:
        if not self.ensure_dir(parts):
            return False
        os.setxattr(self.root.joinpath(*parts), OPAQUE_XATTR, b"y")
        self.entries += 1
        return True

    def finish(self) -> None:
        """Copy the layerfs metadata onto every directory made, deepest first (children change a dir's mtime)."""
        for parts in sorted(self.dirs, key=len, reverse=True):
            _copy_dir_meta(self.layerfs.joinpath(*parts), self.root.joinpath(*parts))
            set_xattrs(self.root.joinpath(*parts), self.dir_xattrs.get(parts, {}))


@dataclass(frozen=True)
class OverlayDirs:
    """The node-local directories of one layer; None where a directory would be empty (and is not stacked)."""

    upper: Path | None
    lower: Path | None


def build_overlay_dirs(layerfs: Path, index: LayerIndex, dest: Path, digest: str,
                       copy_limit: int = DEFAULT_COPY_LIMIT) -> OverlayDirs:
    """Build ``dest/upper`` (the mask) and ``dest/lower`` (opaque dirs) from ``index``; ``dest`` must be empty.

    Entries whose directory is not a real directory of the layerfs are skipped with a warning: the mask or lower dir
    would otherwise add a directory the layer does not have (or hide a symlink behind a directory).
    """
    dir_cache: dict[tuple[str, ...], bool] = {}
    upper = _TreeBuilder(dest / UPPER, layerfs, digest, dir_cache)
    lower = _TreeBuilder(dest / LOWER, layerfs, digest, dir_cache)
    upper.root.mkdir(0o700)
    lower.root.mkdir(0o700)
    skipped: list[str] = []

    for path in index.hidden:
        parts = _components(path, digest)
        if parts and not upper.whiteout(parts) and not upper.ensure_dir(parts[:-1]):
            skipped.append(path)
    for path in index.whiteouts:
        parts = _components(path, digest)
        if not parts:
            continue
        if not upper.layerfs_is_dir(parts[:-1]):
            skipped.append(path)
            continue
        try:
            os.lstat(layerfs.joinpath(*parts))
            continue  # the layer itself has something here: see the module docstring
        except FileNotFoundError:
            pass
        upper.whiteout(parts)
    for path in index.opaque_dirs:
        parts = _components(path, digest)
        if not lower.opaque(parts):
            skipped.append(path + "/" + OPAQUE_MARKER)
    restore_lost(upper, index.xattrs, index.hardlinks, lambda p: _components(p, digest), copy_limit)
    if skipped:
        log.warning("layer %s: %d whiteout index entries name paths whose directory is not in the layer tree %s "
                    "and were ignored (first: %s)", digest, len(skipped), layerfs, skipped[:3])

    result: list[Path | None] = []
    for b in (upper, lower):
        if b.entries:
            b.finish()
            result.append(b.root)
        else:
            remove_tree(b.root)
            result.append(None)
    return OverlayDirs(result[0], result[1])


class OverlayDirCache:
    """Node-local overlay directories per layer digest under ``state_dir/v<version>/<digest hex>/``, built once.

    A finished layer directory holds ``meta.json`` (format version, what was built), ``index.json`` (the whiteout
    index, the expensive part for scanned DUCC layers) and the ``upper``/``lower`` dirs that are not empty. It is
    built in ``state_dir/.tmp-*`` and renamed into place, so its existence means it is complete. Threads asking for
    the same digest wait for one build (a lock per digest); another process racing us loses the rename and uses the
    winner's directory. Nothing here removes a finished directory except :meth:`remove` (see the module doc).
    """

    def __init__(self, state_dir: Path, copy_limit: int = DEFAULT_COPY_LIMIT) -> None:
        self.state_dir = state_dir
        self.copy_limit = copy_limit
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    def _lock(self, hexd: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(hexd, threading.Lock())

    def layer_dir(self, hexd: str) -> Path:
        """Where this format version builds a layer's directories."""
        return self.state_dir / f"v{FORMAT_VERSION}" / hexd

    def legacy_dir(self, hexd: str) -> Path:
        """Where releases before versioned directories built them (reused if their format is the current one)."""
        return self.state_dir / hexd

    @staticmethod
    def _finished(d: Path) -> OverlayDirs | None:
        try:
            meta = json.loads((d / META_JSON).read_bytes())
        except (FileNotFoundError, NotADirectoryError):
            return None
        except ValueError:
            meta = {}
        if not isinstance(meta, dict) or meta.get("version") != FORMAT_VERSION:
            return None
        return OverlayDirs(d / UPPER if meta.get("upper") else None, d / LOWER if meta.get("lower") else None)

    def cached(self, hexd: str) -> OverlayDirs | None:
        """The finished directories of a layer in the current format, or None if not built yet."""
        return self._finished(self.layer_dir(hexd)) or self._finished(self.legacy_dir(hexd))

    def cached_index(self, hexd: str) -> LayerIndex | None:
        for d in (self.layer_dir(hexd), self.legacy_dir(hexd)):
            p = d / INDEX_JSON
            try:
                return LayerIndex.from_json(p.read_bytes(), str(p))
            except (FileNotFoundError, NotADirectoryError, IntegrityError):
                continue
        return None

    def get(self, digest: str, hexd: str, layerfs: Path, make_index: IndexFactory) -> OverlayDirs:
        """The layer's directories, building them (with the index ``make_index()`` returns) on first use."""
        found = self.cached(hexd)
        if found is not None:
            return found
        with self._lock(hexd):
            found = self.cached(hexd)
            if found is not None:
                return found
            return self._build(digest, hexd, layerfs, make_index)

    def _build(self, digest: str, hexd: str, layerfs: Path, make_index: IndexFactory) -> OverlayDirs:
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        final = self.layer_dir(hexd)
        index = self.cached_index(hexd) or make_index()
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{hexd[:16]}-", dir=self.state_dir))
        try:
            try:
                dirs = build_overlay_dirs(layerfs, index, tmp, digest, self.copy_limit)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EPERM, errno.EACCES):
                    raise UnavailableError(
                        f"cannot build the node-local whiteout directories of layer {digest} in {self.state_dir}: "
                        f"{exc}; free space or fix permissions there (the snapshotter must run as root)"
                    ) from exc
                raise
            (tmp / INDEX_JSON).write_text(index.to_json())
            meta = {"version": FORMAT_VERSION, "digest": digest, "layerfs": str(layerfs),
                    "upper": dirs.upper is not None, "lower": dirs.lower is not None, "index": index.origin}
            (tmp / META_JSON).write_text(json.dumps(meta, indent=1) + "\n")
            os.chmod(tmp, 0o700)
            final.parent.mkdir(mode=0o700, exist_ok=True)
            try:
                os.rename(tmp, final)  # fails if anything is at `final`: never replace what may be in use
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                    raise
                other = self._finished(final)
                if other is None:
                    raise UnavailableError(
                        f"layer {digest}: {final} exists but is not a finished build of this version; it is left "
                        "alone (it may be in use): the snapshotter's Cleanup collects it when no snapshot uses the "
                        "layer, or remove it by hand when no container runs"
                    ) from exc
                log.debug("layer %s: another process built %s first", digest, final)
                remove_tree_quietly(tmp)
                return other
        except BaseException:
            remove_tree_quietly(tmp)
            raise
        log.info("layer %s: built node-local overlay dirs in %s (mask: %s, lower: %s, index from %s: %d whiteouts, "
                 "%d opaque dirs, %d hidden entries)", digest, final, dirs.upper is not None,
                 dirs.lower is not None, index.origin, len(index.whiteouts), len(index.opaque_dirs),
                 len(index.hidden))
        return OverlayDirs(final / UPPER if dirs.upper else None, final / LOWER if dirs.lower else None)

    def held(self) -> list[str]:
        """Digest hexes that have directories here, in any version (what :meth:`remove` can collect)."""
        found: set[str] = set()
        for e in _scandir(self.state_dir):
            if _is_hex(e.name):
                found.add(e.name)
            elif e.name.startswith("v") and e.name[1:].isdigit() and e.is_dir(follow_symlinks=False):
                found.update(x.name for x in _scandir(Path(e.path)) if _is_hex(x.name))
        return sorted(found)

    def paths(self, hexd: str) -> list[Path]:
        """Every existing version of a layer's directories."""
        versions = [Path(e.path) / hexd for e in _scandir(self.state_dir)
                    if e.name.startswith("v") and e.name[1:].isdigit()]
        return [d for d in [self.legacy_dir(hexd), *versions] if os.path.lexists(d)]

    def remove(self, hexd: str) -> None:
        """Remove every version of a layer's directories. Only for layers no snapshot uses (the core's refcount):
        a running container with them as lowerdirs would lose its deletions."""
        with self._lock(hexd):
            for d in self.paths(hexd):
                stale = Path(tempfile.mkdtemp(prefix=f".old-{hexd[:16]}-", dir=self.state_dir))
                os.rename(d, stale / "d")
                if not remove_tree_quietly(stale):
                    log.warning("cannot delete %s; it is retried at the next start", stale)

    def cleanup_temporaries(self) -> None:
        """Remove half-built and released directories a crash left behind (call once at start, before any build)."""
        for e in _scandir(self.state_dir):
            if e.name.startswith((".tmp-", ".old-")) and e.is_dir(follow_symlinks=False):
                remove_tree_quietly(e.path)


def _scandir(path: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _is_hex(name: str) -> bool:
    try:
        return digest_hex("sha256:" + name) == name
    except CvmfsSnapError:
        return False
