"""A flat tree's directory: every layer of an image applied bottom-first in merged mode, carrying no privilege.

A flat tree is what users run unprivileged (Apptainer/Singularity), world-readable under the public links, on the
stratum-0 as on every node: a block device there would give every local user the host's disk, a setuid-root or
``cap_setuid`` binary root. Those users never get device nodes or privilege from an image anyway (Apptainer binds
the host's ``/dev`` and mounts images nosuid, CVMFS clients mount nosuid,nodev, and nosuid also disables file
capabilities). Containers started through the snapshotter use the layer trees, which keep all of it, as containerd
does. So the entries applied to a flat are made inert on the way (:class:`Defuser`): character and block devices
are left out (and hard links to them), setuid/setgid bits and file capabilities (``security.capability``) are
dropped from files; FIFOs stay, directories keep their setgid bit (it only passes the group on). The applier sets a
mode, an xattr or a device only from an entry, so nothing privileged can reach the tree otherwise, and no walk of
the finished tree is needed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from cvmfs_snap.layer.apply import apply_entries
from cvmfs_snap.layer.digesting import HashingReader
from cvmfs_snap.layer.limits import Limits
from cvmfs_snap.layer.paths import CAPABILITY_XATTR
from cvmfs_snap.layer.tarstream import TarEntry, TarReader
from cvmfs_snap.layout import CATALOG_MARKER

from ..layertree import LayerTreeEntries
from .base import FlatOpener

log = logging.getLogger(__name__)

#: mode bits a flat tree never keeps (setuid, setgid)
SETID_BITS = 0o6000


class Defuser:
    """Makes the entries applied to one flat tree inert (see the module); counts what it changed."""

    def __init__(self) -> None:
        self.devices = 0
        self.files = 0
        #: paths of left-out devices (a later hard link to one is left out too)
        self._dropped: set[str] = set()

    def __call__(self, entries: Iterable[TarEntry]) -> Iterator[TarEntry]:
        for e in entries:
            if e.kind in ("char", "block"):
                self._dropped.add(e.path)
                self.devices += 1
                continue
            if e.kind == "hardlink" and e.linkname in self._dropped:
                self._dropped.add(e.path)
                continue
            self._dropped.discard(e.path)
            if e.kind in ("file", "hardlink") and (e.mode & SETID_BITS or CAPABILITY_XATTR in e.xattrs):
                e.mode &= ~SETID_BITS
                e.xattrs = {k: v for k, v in e.xattrs.items() if k != CAPABILITY_XATTR}
                self.files += 1
            yield e


def build_flat_dir(target: Path, layers: Sequence[FlatOpener], limits: Limits | None = None) -> Defuser:
    """Apply the layers (tars or published layer trees) bottom-first in merged mode (whiteouts applied) into
    ``target``, made inert on the way; ``target`` must be in a private staging directory until it is complete.
    Returns what was left out or changed."""
    target.mkdir(parents=True, exist_ok=True)
    defuse = Defuser()
    for i, opener in enumerate(layers):
        with opener() as layer:
            name = f"layer {i} of flat tree {target.name}"
            entries: Iterable[TarEntry]
            if isinstance(layer, LayerTreeEntries):  # a published layer tree, read as entries (no tar in between)
                entries = layer
            else:  # a tar made from a verified blob or tree: not hashed again
                entries = TarReader(HashingReader(layer, hash=False), limits, name)
            apply_entries(defuse(entries), target, mode="merged", limits=limits, name=name)
    if defuse.devices or defuse.files:
        log.info("flat tree %s: %d device node(s) left out, setuid/setgid/capabilities cleared on %d file(s) (layer "
                 "trees keep them)", target.name, defuse.devices, defuse.files)
    (target / CATALOG_MARKER).touch()
    return defuse
