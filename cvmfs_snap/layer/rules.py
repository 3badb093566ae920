"""The rules a layer's entries must obey, written once for the applier and the structure check.

:func:`place` says what an entry's path means (skipped, a whiteout, or a plain entry, perhaps hidden AUFS
bookkeeping); the ``*_error`` functions are the refusals both :mod:`cvmfs_snap.layer.apply` and
:mod:`cvmfs_snap.layer.structure` raise, so that both refuse the same layers with the same words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cvmfs_snap.errors import UnsafeLayerError
from cvmfs_snap.layer.limits import Limits
from cvmfs_snap.layer.tarstream import TarEntry
from cvmfs_snap.layer.whiteout import META_PREFIX, OPAQUE_MARKER, WHITEOUT_PREFIX, is_aufs_meta


@dataclass(frozen=True)
class Placement:
    """What one entry is.

    ``action`` is ``"skip"`` (AUFS metadata a mode does not keep), ``"whiteout"`` (``deleted`` is the name it
    deletes, None for the opaque marker) or ``"entry"`` (written as the tar has it; ``hidden`` is a path to list in
    ``WhiteoutIndex.hidden``, AUFS bookkeeping kept as plain entries).
    """

    action: Literal["skip", "whiteout", "entry"]
    deleted: str | None = None
    hidden: str | None = None


SKIP = Placement("skip")
ENTRY = Placement("entry")


def place(parts: list[str], where: str, keep_aufs_meta: bool) -> Placement:
    """Classify the entry with path components ``parts`` (not the root). ``keep_aufs_meta``: layer mode (AUFS
    bookkeeping stored as plain entries, as ``cvmfs_server ingest`` does) rather than merged mode (skipped)."""
    base = parts[-1]
    for i, comp in enumerate(parts[:-1]):
        if comp.startswith(META_PREFIX):
            if keep_aufs_meta and comp != OPAQUE_MARKER:
                # below an AUFS metadata directory: stored as it is, nothing interpreted; the directory may come
                # without an entry of its own, so hide it anyway
                return Placement("entry", hidden="/".join(parts[: i + 1]))
            return SKIP
        if comp.startswith(WHITEOUT_PREFIX):
            raise UnsafeLayerError(
                f"{where}: path goes through whiteout {comp!r}, which cannot be a directory; refusing the layer"
            )
    if not base.startswith(WHITEOUT_PREFIX):
        return ENTRY
    if is_aufs_meta(base):
        return Placement("entry", hidden="/".join(parts)) if keep_aufs_meta else SKIP
    if base == OPAQUE_MARKER:
        return Placement("whiteout")
    deleted = base[len(WHITEOUT_PREFIX) :]
    if deleted in ("", ".", ".."):
        raise UnsafeLayerError(
            f"{where}: whiteout of {deleted!r} is not a valid name (path traversal?); refusing the layer"
        )
    return Placement("whiteout", deleted=deleted)


def where_of(name: str, entry: TarEntry) -> str:
    """The prefix of every message about ``entry`` of layer ``name``."""
    return f"{name}: entry {entry.display} (tar offset {entry.offset})"


def own_symlink_error(where: str, sub: str, to: str = "") -> UnsafeLayerError:
    """Layer mode: the parent ``sub`` of an entry is a symlink (``to``: ``" (to 'x')"`` or empty) of the layer."""
    return UnsafeLayerError(
        f"{where}: parent {sub!r} is a symlink{to} of this layer. In layer mode each layer is stored on its own, "
        "where such a symlink may point into a lower layer that is not there, so writing through it is refused. "
        "Rebuild the image so that the layer does not write below its own symlink (merged, flat unpacking follows "
        "symlinks inside the root)"
    )


def not_a_directory_error(where: str, sub: str, kind: str, via: str = "") -> UnsafeLayerError:
    """The parent ``sub`` of an entry is a ``kind`` (e.g. "regular file")."""
    return UnsafeLayerError(f"{where}: parent {sub!r}{via} is a {kind}, not a directory; refusing the layer")


def check_device(where: str, entry: TarEntry, limits: Limits) -> None:
    if entry.kind in ("char", "block") and not limits.allow_devices:
        raise UnsafeLayerError(
            f"{where}: {entry.kind} device {entry.devmajor}:{entry.devminor} refused (Limits.allow_devices is "
            "False)"
        )


def check_total_size(where: str, size_so_far: int, entry: TarEntry, limits: Limits) -> None:
    lim = limits.max_total_size
    if lim is not None and size_so_far + entry.size > lim:
        raise UnsafeLayerError(
            f"{where}: layer content exceeds Limits.max_total_size ({lim} bytes); refusing the layer"
        )


def hardlink_missing_error(where: str, linkname: str) -> UnsafeLayerError:
    return UnsafeLayerError(
        f"{where}: hardlink target {linkname!r} does not exist in the target directory; hardlinks may only point "
        "to files unpacked before them. Refusing the layer"
    )


def check_hardlink_target(where: str, linkname: str, is_dir: bool, is_device: bool, limits: Limits) -> None:
    """A hardlink's target exists and is a directory / a device node: refused (devices unless allowed)."""
    if is_dir:
        raise UnsafeLayerError(f"{where}: hardlink to directory {linkname!r}; refusing the layer")
    if is_device and not limits.allow_devices:
        raise UnsafeLayerError(f"{where}: hardlink to device {linkname!r} refused (Limits.allow_devices is False)")
