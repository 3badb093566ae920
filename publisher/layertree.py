"""Read a published layer tree back as a tar stream, so flat trees need no second download.

Why: a flat root filesystem is all layers applied bottom-first in merged mode. Fetching the blobs again for it
doubles registry traffic (20 GB images, rate-limited registries), and spooling every blob locally until the flat
is built costs a compressed image of disk per image in flight. Every layer the flat needs is already complete in
the repository when the flat is built (new ones were just published, the others were skipped *because* they are
there), and its ``layerfs`` keeps ``.wh.*`` whiteouts as plain files -- exactly the tar form. So the tree is
archived again (GNU ``tar``, streaming through a pipe: no memory or disk growth; holes of sparse files skipped with
``SEEK_HOLE``, so they stay holes) and fed to the same hardened
merged-mode applier as a registry tar, which applies the whiteouts and opaque markers; nothing is re-implemented.

What is left out on the way: the ``.cvmfscatalog`` marker at the layer root (a CVMFS artefact, not image content),
``security.selinux`` (the stratum-0's own label, not the image's) and, when the tree is read through a CVMFS mount,
every ``user.*`` xattr, because the CVMFS client lists its magic attributes (``user.hash``, ``user.pid``...) there
and they cannot be told apart from an image's own.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from cvmfs_snap.errors import CommandError
from cvmfs_snap.layout import CVMFS_MARKER_FILES

log = logging.getLogger(__name__)

TAR = shutil.which("tar") or "/bin/tar"

#: tar writes records of this size and the pipe holds one: a file-heavy tree then crosses the pipe in a few large
#: writes instead of one 10 KiB record (and two context switches) per few small files, which made the applier wait
#: on ``tar`` most of the time
_PIPE_BYTES = 1 << 20

#: an empty tar: two zero blocks (for a layer whose tree holds nothing but the catalog marker)
_EMPTY_TAR = bytes(1024)


def tar_command(layerfs: Path, names: list[str], *, user_xattrs: bool) -> list[str]:
    """The ``tar`` invocation archiving ``names`` (top-level entries of ``layerfs``) with numeric owners, modes,
    nanosecond mtimes, hard links and xattrs, in a stable (sorted) order.

    Holes stay holes: ``--sparse`` finds them with ``SEEK_DATA``/``SEEK_HOLE`` and writes PAX sparse 1.0 members,
    which the applier writes back with ``lseek``; a 100 GiB sparse file thus costs its data, not 100 GiB of zeros
    through the pipe."""
    cmd = [
        TAR, "--create", "--file=-", f"--directory={layerfs}", "--format=pax", "--numeric-owner", "--sort=name",
        f"--blocking-factor={_PIPE_BYTES // 512}",
        "--sparse", "--sparse-version=1.0", "--hole-detection=seek",
        "--xattrs", "--xattrs-include=*", "--xattrs-exclude=security.selinux",
    ]
    if not user_xattrs:
        cmd.append("--xattrs-exclude=user.*")
    return [*cmd, "--", *names]


@contextmanager
def open_layer_tree(layerfs: str | os.PathLike[str], *, user_xattrs: bool = True,
                    name: str = "") -> Iterator[IO[bytes]]:
    """A readable tar stream of a published layer tree (whiteouts as ``.wh.*`` entries), for ``apply_layer``.

    ``tar`` failing (an unreadable file, the tree vanishing) raises :class:`CommandError` naming the tree when the
    block ends; a block that raises kills ``tar`` first.
    """
    root = Path(layerfs)
    what = name or str(root)
    try:
        names = sorted(n for n in os.listdir(root) if n not in CVMFS_MARKER_FILES)
    except OSError as exc:
        raise CommandError(f"{what}: cannot read the published layer tree {root}: {exc.strerror}") from exc
    if not names:
        yield io.BytesIO(_EMPTY_TAR)
        return
    with tempfile.TemporaryFile() as errf:
        proc = subprocess.Popen(tar_command(root, names, user_xattrs=user_xattrs), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=errf, bufsize=_PIPE_BYTES)
        assert proc.stdout is not None
        with contextlib.suppress(OSError):  # above /proc/sys/fs/pipe-max-size the default size works too
            fcntl.fcntl(proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
        ok = False
        try:
            yield proc.stdout
            while proc.stdout.read(1 << 20):  # the applier stops at the end-of-archive blocks; drain the padding
                pass
            ok = True
        finally:
            if not ok:
                proc.kill()
            proc.stdout.close()
            rc = proc.wait()
        if rc != 0:
            errf.seek(0)
            tail = errf.read()[-1000:].decode(errors="replace").strip()
            raise CommandError(
                f"{what}: archiving the published layer tree {root} failed (tar exit status {rc}): "
                f"{tail or '(no output)'}; check that the repository is mounted and readable"
            )
