"""Path rules and per-entry limit checks shared by every reader of layer content.

One copy of "what a member name may be": the tar reader (``tarstream``), the structure checker and the eStargz TOC
validator (``cvmfs_snap.estargz``) all call these, so a name refused in a tar is refused in a TOC too.
"""

from __future__ import annotations

from cvmfs_snap.errors import UnsafeLayerError
from cvmfs_snap.layer.limits import Limits

#: xattr namespaces that would change how overlayfs interprets the tree (opaque dirs, redirects, metacopy)
FORBIDDEN_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")
#: file capabilities: kept in layers, dropped (with set-id bits) in flat trees
CAPABILITY_XATTR = "security.capability"


def show(name: str, limit: int = 160) -> str:
    """A member name as it appears in messages: quoted, escapes visible, long names shortened."""
    r = repr(name)
    return r if len(r) <= limit else r[: limit - 5] + "...'"


def normalize_path(raw: str, limits: Limits, where: str) -> str:
    """A member path relative to the layer root: leading ``/`` and ``.`` components dropped, ``..`` refused.

    containerd joins absolute member names under the root (``/etc/x`` is ``etc/x``); we do the same. Any ``..``
    component is refused, even one that would stay inside the root, since no legitimate layer writer emits one.
    """
    if "\0" in raw:
        raise UnsafeLayerError(f"{where}: NUL byte in path; refusing the layer")
    parts = [p for p in raw.split("/") if p and p != "."]
    for p in parts:
        if p == "..":
            raise UnsafeLayerError(f"{where}: path has a '..' component (path traversal); refusing the layer")
        if len(p.encode("utf-8", "surrogateescape")) > limits.max_name_len:
            raise UnsafeLayerError(
                f"{where}: path component of {len(p.encode('utf-8', 'surrogateescape'))} bytes exceeds "
                f"Limits.max_name_len ({limits.max_name_len}); refusing the layer"
            )
    path = "/".join(parts)
    if len(path.encode("utf-8", "surrogateescape")) > limits.max_path_len:
        raise UnsafeLayerError(
            f"{where}: path of {len(path.encode('utf-8', 'surrogateescape'))} bytes exceeds Limits.max_path_len "
            f"({limits.max_path_len}); refusing the layer"
        )
    if len(parts) > limits.max_depth:
        raise UnsafeLayerError(
            f"{where}: path is {len(parts)} levels deep, more than Limits.max_depth ({limits.max_depth}); refusing "
            "the layer (a site can raise limits.max_depth in the publisher configuration)"
        )
    return path


def check_xattr(name: str, value: bytes, limits: Limits, where: str) -> None:
    """UnsafeLayerError unless ``name``/``value`` is an extended attribute a layer may carry."""
    if not name or "\0" in name or len(name.encode("utf-8", "surrogateescape")) > 255:
        raise UnsafeLayerError(f"{where}: invalid extended attribute name {show(name, 80)}; refusing the layer")
    if name.startswith(FORBIDDEN_XATTR_PREFIXES):
        raise UnsafeLayerError(
            f"{where}: extended attribute {name!r} would change overlayfs semantics of the unpacked tree; "
            "refusing the layer"
        )
    if len(value) > limits.max_xattr_size:
        raise UnsafeLayerError(
            f"{where}: extended attribute {name!r} of {len(value)} bytes exceeds Limits.max_xattr_size "
            f"({limits.max_xattr_size}); refusing the layer"
        )
