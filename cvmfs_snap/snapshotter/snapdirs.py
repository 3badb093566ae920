"""The on-disk half of the snapshot core: snapshot directories, short links, usage, and collecting what the metadata
does not know.

Layout under the snapshotter root (like containerd's overlayfs snapshotter, plus podman-style short links)::

    <root>/snapshots/<id>/fs       a local snapshot's files (upperdir of active snapshots), mode 0755
    <root>/snapshots/<id>/work     overlay workdir of an active snapshot
    <root>/snapshots/.tmp-*        a snapshot directory being prepared (renamed to <id> when its row commits)
    <root>/l/<b36 id>[-<n>]        short symlinks to every lowerdir we hand out (local fs dirs and remote dirs)

Rules: a directory is made complete under a temporary name and renamed to its id inside the transaction that inserts
its row (:meth:`SnapshotDirs.place`); an id whose directory or link exists is never handed out
(:meth:`SnapshotDirs.taken`); nothing the metadata does not know is removed while a mount uses it (:mod:`.mountinfo`),
and every removal is iterative (:mod:`cvmfs_snap.fsutil`), whatever depth a container made.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
import uuid
from pathlib import Path

from ..errors import CvmfsSnapError, UnavailableError
from ..fsutil import remove_tree
from .mountinfo import is_pinned, pinned_paths

log = logging.getLogger(__name__)

LINKS_DIR = "l"
SNAPSHOTS_DIR = "snapshots"
#: prefix of a snapshot directory being prepared
TMP_PREFIX = ".tmp-"
#: a temporary directory younger than this may belong to a Prepare running right now: Cleanup leaves it
TMP_GRACE = 60.0


def b36(n: int) -> str:
    """Short lower-case base-36 text of a non-negative integer (snapshot ids in link names)."""
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def _younger_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - os.lstat(path).st_mtime < seconds
    except FileNotFoundError:
        return False


class SnapshotDirs:
    """Directories and short links under one snapshotter root."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.snapshots = self.root / SNAPSHOTS_DIR
        self.links = self.root / LINKS_DIR
        self.snapshots.mkdir(parents=True, exist_ok=True)
        self.links.mkdir(parents=True, exist_ok=True)

    def snapshot_dir(self, sid: int) -> Path:
        return self.snapshots / str(sid)

    # -- create ---------------------------------------------------------------------------------------------------
    def taken(self, sid: int) -> bool:
        """An id whose directory or short link exists is never handed out again (lost metadata, crashes)."""
        return os.path.lexists(self.snapshot_dir(sid)) or os.path.lexists(self.links / b36(sid))

    def make_tmp(self, key: str, *, work: bool, owner_like: Path | None) -> Path:
        """A complete snapshot directory (``fs``, and ``work`` if asked) under a temporary name; ``fs`` is owned
        like ``owner_like`` when given (containerd's overlayfs does so for user namespaces)."""
        try:
            d = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=self.snapshots))
        except OSError as exc:
            raise UnavailableError(f"cannot create a snapshot directory in {self.snapshots} for {key!r}: "
                                   f"{exc}") from exc
        try:
            fs = d / "fs"
            fs.mkdir()
            os.chmod(fs, 0o755)
            if work:
                (d / "work").mkdir(mode=0o711)
            if owner_like is not None:
                st = os.stat(owner_like)
                os.lchown(fs, st.st_uid, st.st_gid)
        except OSError as exc:
            remove_tree(d)
            raise UnavailableError(f"cannot create snapshot directory {d} for {key!r}: {exc}") from exc
        except BaseException:
            remove_tree(d)
            raise
        return d

    def place(self, tmp: Path, sid: int, key: str) -> None:
        """Inside the row's transaction: the prepared directory becomes ``snapshots/<id>`` (never over another)."""
        final = self.snapshot_dir(sid)
        if os.path.lexists(final):  # taken() said no, so someone raced us: fail, the transaction rolls back
            raise UnavailableError(f"snapshot directory {final} appeared while preparing {key!r}; retry")
        try:
            os.rename(tmp, final)
        except OSError as exc:
            raise UnavailableError(f"cannot move snapshot directory {tmp} to {final} for {key!r}: {exc}") from exc

    # -- links ----------------------------------------------------------------------------------------------------
    def link(self, name: str, target: Path) -> str:
        """Make ``<root>/l/<name>`` point at ``target`` (atomically replaced if it pointed elsewhere)."""
        link = self.links / name
        t = str(target)
        try:
            if os.readlink(link) == t:
                return str(link)
        except FileNotFoundError:
            pass
        except OSError as exc:  # not a link: someone put something else there
            raise UnavailableError(
                f"{link} is not a symlink ({exc}): remove it so the snapshotter can recreate it"
            ) from exc
        tmp = link.with_name(f".{name}.{uuid.uuid4().hex[:8]}")
        os.symlink(t, tmp)
        os.replace(tmp, link)
        return str(link)

    def drop_links(self, sid: int) -> None:
        base = b36(sid)
        for name in [base, *(n for n in _listdir(self.links) if n.startswith(base + "-"))]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.links / name)

    # -- remove ---------------------------------------------------------------------------------------------------
    def remove(self, sid: int, key: str) -> None:
        d = self.snapshot_dir(sid)
        try:
            remove_tree(d)
        except (OSError, CvmfsSnapError) as exc:
            log.warning("snapshot %r removed, but its directory %s could not be deleted (%s): Cleanup will "
                        "retry", key, d, exc)

    def list_names(self) -> tuple[list[str], list[str]]:
        """(directory names under snapshots/, link names under l/), for :meth:`collect`."""
        return _listdir(self.snapshots), _listdir(self.links)

    def collect(self, dir_names: list[str], link_names: list[str], ids: set[int]) -> list[str]:
        """Remove the listed directories and links whose ids are not in ``ids`` and that no mount uses."""
        known = {b36(i) for i in ids}
        unknown = [n for n in dir_names if not (n.isdigit() and int(n) in ids)]
        unknown_links = [n for n in link_names if n.startswith(".") or n.split("-", 1)[0] not in known]
        pinned = self.pinned() if unknown or unknown_links else set()
        removed: list[str] = []
        for name in unknown:
            path = self.snapshots / name
            if name.startswith(TMP_PREFIX) and _younger_than(path, TMP_GRACE):
                continue  # a Prepare may be filling it right now
            if pinned is None or is_pinned(path, pinned):
                log.warning("cleanup: %s is not in the metadata but %s; it is kept", path,
                            "mountinfo is unreadable" if pinned is None else "a mount uses it")
                continue
            try:
                remove_tree(path)
                removed.append(str(path))
            except (OSError, CvmfsSnapError) as exc:
                log.warning("cleanup: cannot delete %s: %s", path, exc)
        for name in unknown_links:
            if pinned is None or is_pinned(self.links / name, pinned):
                continue  # a mount names its lowerdir through this link: keep it, so we still see who uses what
            try:
                os.unlink(self.links / name)
                removed.append(str(self.links / name))
            except OSError as exc:
                log.warning("cleanup: cannot delete %s: %s", self.links / name, exc)
        return removed

    def pinned(self) -> set[str] | None:
        """Paths the current mounts use, with our short links resolved; None if mountinfo cannot be read."""
        try:
            return pinned_paths(relative_to=[self.links, self.root], link_dirs=[self.links])
        except OSError as exc:
            log.warning("cleanup: cannot read the mount table (%s): unknown directories are kept", exc)
            return None
