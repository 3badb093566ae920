#!/usr/bin/env python3
"""A recording stand-in for ``cvmfs_server``, for the publisher's cvmfs backends where no real one is installed.

It performs the commands on a plain directory the way /work/shared/CVMFS-FACTS.md describes the real 2.12 one:

- ``ingest [-d PATH]... [--catalog] [-k] -t - -b BASE REPO`` deletes the PATHs, then reads a tar from stdin and
  publishes it at BASE in its own transaction. Whiteouts (``.wh.*``) stay plain files; extended attributes are
  dropped; hard links become separate copies; char 0/0 entries are not stored; ``-k`` keeps the tar's uid/gid,
  without it everything is owned by 0. Directories the ingest creates without a tar entry (missing parents of
  BASE, parents the tar implies) and BASE itself -- unless the tar has a ``./`` entry, and even when BASE exists
  if ``--catalog`` is given -- are recorded with the *unknown* owner: the real server records 4294967295 (65534
  on a client); here they are chowned to 65534 and listed in ``<state>/<repo>.unknown-owner``. ``--catalog`` adds
  ``BASE/.cvmfscatalog``. Like the real script it prints ``[[: not found`` on stderr.
- ``ingest -d PATH [-d PATH]... REPO`` deletes the PATHs (nested catalogs included) in one publish; a missing path
  prints the real server's warning and still succeeds.
- ``transaction REPO[/SUBPATH]`` / ``publish REPO`` / ``abort -f REPO``: a second transaction is refused (exit 17);
  abort restores the tree as it was; the tree is *read-only outside a transaction*: any change made to it since the
  last publish/abort/ingest makes the next command fail loudly. At ``publish``, as the real server does:
  every ``.wh.NAME`` entry written in the transaction is applied as a whiteout (NAME deleted, the ``.wh.`` entry
  not stored; ``.wh..wh..opq`` empties what the directory held before); extended attributes are dropped unless
  ``server.conf`` (``$FAKE_CVMFS_ETC/repositories.d/<repo>/server.conf``) sets ``CVMFS_INCLUDE_XATTRS=true``; and
  a change below a directory with the unknown owner fails (the real overlay union refuses it earlier, at the
  ``rm``/``mkdir``, with ``Permission denied``: the stand-in cannot intercept syscalls, so it refuses the publish).

Environment:
  FAKE_CVMFS_REPOS   directory holding one tree per repository (``$FAKE_CVMFS_REPOS/<repo>``), like /cvmfs
  FAKE_CVMFS_STATE   directory for the log (``log.jsonl``: argv, stdin byte count, exit status) and bookkeeping
  FAKE_CVMFS_ETC     like /etc/cvmfs (optional)
  FAKE_CVMFS_HANG_SECONDS  how long a ``hang-*`` failure sleeps (default 3600)
  FAKE_CVMFS_FAIL    comma-separated failures to inject: ``ingest``, ``publish``, ``transaction``, or ``ingest@N``
                     (only the N-th ingest call, 1-based); a failing ingest leaves a partial tree behind first;
                     ``hang-ingest[@N]``/``hang-publish[@N]``: that command sleeps for an hour (to test timeouts)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cvmfs_snap.fsutil import remove_tree, walk
from cvmfs_snap.layer.whiteout import OPAQUE_MARKER, WHITEOUT_PREFIX

NOBODY = 65534
#: the environment the stand-in reads (see the module doc); tests.support.publisher_env sets it
ENV_REPOS, ENV_STATE, ENV_ETC = "FAKE_CVMFS_REPOS", "FAKE_CVMFS_STATE", "FAKE_CVMFS_ETC"
ENV_FAIL, ENV_HANG_SECONDS = "FAKE_CVMFS_FAIL", "FAKE_CVMFS_HANG_SECONDS"


def _state() -> Path:
    p = Path(os.environ[ENV_STATE])
    p.mkdir(parents=True, exist_ok=True)
    return p


def _name(repo: str) -> str:
    return repo.split("/", 1)[0]


def _repo_dir(repo: str) -> Path:
    d = Path(os.environ[ENV_REPOS]) / _name(repo)
    if not d.is_dir():
        print(f"Repository {_name(repo)} does not exist", file=sys.stderr)
        raise SystemExit(1)
    return d


def _entries(root: Path) -> dict[str, os.stat_result]:
    out: dict[str, os.stat_result] = {}
    if not root.is_dir():
        return out
    for dirpath, dirnames, filenames in walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, root)] = os.lstat(p)
    return out


def _tree_hash(root: Path, below: str = "") -> str:
    h = hashlib.sha256()
    top = root / below if below else root
    for rel, st in sorted(_entries(top).items()):
        ino = 0 if stat.S_ISDIR(st.st_mode) else st.st_ino  # the transaction backup copies directories
        h.update(f"{rel}\0{st.st_mode}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_uid}\0{ino}\n".encode())
        if os.path.islink(top / rel):
            h.update(os.readlink(top / rel).encode())
    return h.hexdigest()


def _snapshot_path(repo: str) -> Path:
    return _state() / f"{_name(repo)}.snapshot"


def _take_snapshot(repo: str) -> None:
    _snapshot_path(repo).write_text(_tree_hash(_repo_dir(repo)))


def _check_untouched(repo: str) -> None:
    """Read-only outside transactions: the tree must be as the last publish/abort/ingest left it."""
    snap = _snapshot_path(repo)
    if snap.exists() and snap.read_text() != _tree_hash(_repo_dir(repo)):
        print(f"FATAL: /cvmfs/{repo} was modified outside a transaction (it is read-only then)", file=sys.stderr)
        with open(_state() / "violations", "a") as f:
            f.write(" ".join(sys.argv[1:]) + "\n")
        raise SystemExit(3)


def _unknown_path(repo: str) -> Path:
    return _state() / f"{_name(repo)}.unknown-owner"


def _unknown(repo: str) -> set[str]:
    p = _unknown_path(repo)
    return set(p.read_text().splitlines()) if p.exists() else set()


def _set_unknown(repo: str, paths: set[str]) -> None:
    _unknown_path(repo).write_text("".join(f"{p}\n" for p in sorted(paths)))


def _mark_unknown(repo: str, root: Path, rel: str) -> None:
    os.lchown(root / rel, NOBODY, NOBODY)
    _set_unknown(repo, _unknown(repo) | {rel})


def _txn_marker(repo: str) -> Path:
    return _state() / f"{_name(repo)}.txn"


def _count(kind: str) -> int:
    p = _state() / f"count-{kind}"
    n = int(p.read_text()) + 1 if p.exists() else 1
    p.write_text(str(n))
    return n


def _should_fail(kind: str, n: int) -> bool:
    for item in filter(None, os.environ.get(ENV_FAIL, "").split(",")):
        name, _, at = item.partition("@")
        if name == kind and (not at or int(at) == n):
            return True
    return False


def _maybe_hang(kind: str) -> None:
    """``hang-<kind>`` (every call) or ``hang-<kind>@N`` (the N-th call) sleeps for an hour."""
    if not any(i.startswith(f"hang-{kind}") for i in os.environ.get(ENV_FAIL, "").split(",")):
        return
    if _should_fail(f"hang-{kind}", _count(f"hang-{kind}")):
        with open(_state() / f"hung-{kind}", "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(float(os.environ.get(ENV_HANG_SECONDS, "3600")))


def _log(argv: list[str], stdin_bytes: int, status: int) -> None:
    with open(_state() / "log.jsonl", "a") as f:
        f.write(json.dumps({"argv": argv, "stdin_bytes": stdin_bytes, "status": status}) + "\n")


class _CountingStdin:
    def __init__(self) -> None:
        self.n = 0

    def read(self, n: int = -1) -> bytes:
        data = sys.stdin.buffer.read(n)
        self.n += len(data)
        return data


def _delete(repo: str, root: Path, path: str) -> None:
    target = root / path.strip("/")
    if target.is_dir() and not target.is_symlink():
        remove_tree(target)
    elif os.path.lexists(target):
        target.unlink()
    else:
        print(f"[WARNING] '{path}' cannot be deleted. Unrecognized file type.", file=sys.stdout)
    norm = path.strip("/")
    _set_unknown(repo, {u for u in _unknown(repo) if u != norm and not u.startswith(norm + "/")})


def _parse_ingest(args: list[str]) -> dict[str, object]:
    opts: dict[str, object] = {"delete": [], "catalog": False, "keep": False, "tar": None, "base": None}
    i = 0
    while i < len(args) - 1:
        a = args[i]
        if a in ("-d", "--delete"):
            opts["delete"].append(args[i + 1])  # type: ignore[attr-defined]
            i += 2
        elif a in ("-t", "--tar_file"):
            opts["tar"] = args[i + 1]
            i += 2
        elif a in ("-b", "--base_dir"):
            opts["base"] = args[i + 1]
            i += 2
        elif a in ("-c", "--catalog"):
            opts["catalog"] = True
            i += 1
        elif a in ("-k", "--keep-ownership"):
            opts["keep"] = True
            i += 1
        else:
            i += 1
    opts["repo"] = args[-1]
    return opts


def cmd_ingest(args: list[str], stdin: _CountingStdin) -> int:
    print("/usr/bin/cvmfs_server: 1: [[: not found", file=sys.stderr)  # as the real script under dash
    o = _parse_ingest(args)
    repo = str(o["repo"])
    if _txn_marker(repo).exists():
        print("another transaction is already open", file=sys.stderr)
        return 17
    _check_untouched(repo)
    root = _repo_dir(repo)
    for path in o["delete"]:  # type: ignore[attr-defined]
        _delete(repo, root, str(path))
    if o["tar"] is None:
        _take_snapshot(repo)
        return 0
    base = str(o["base"]).strip("/")
    keep = bool(o["keep"])
    target = root / base
    # parents that do not exist yet get the unknown owner
    missing = []
    p = target
    while not p.exists():
        missing.append(p)
        p = p.parent
    target.mkdir(parents=True, exist_ok=True)
    for m in missing:
        _mark_unknown(repo, root, str(m.relative_to(root)))
    if missing:
        _take_snapshot(repo)  # (a hang leaves the target behind, as a half-done ingest of the stand-in)
    _maybe_hang("ingest")
    n = _count("ingest")
    fail = _should_fail("ingest", n)
    tar_arg = str(o["tar"])
    reader = stdin if tar_arg == "-" else open(tar_arg, "rb")  # noqa: SIM115
    has_root_entry = False
    with tarfile.open(fileobj=reader, mode="r|") as tf:  # type: ignore[call-overload]
        for i, member in enumerate(tf):
            if fail and i >= 1:
                break
            name = member.name.strip("/")
            if name in ("", "."):
                has_root_entry = True
                os.chmod(target, member.mode & 0o7777)
                os.lchown(target, member.uid if keep else 0, member.gid if keep else 0)
                _set_unknown(repo, _unknown(repo) - {base})
                continue
            if member.ischr() and member.devmajor == 0 and member.devminor == 0:
                continue  # char 0/0: not stored
            dest = target / name
            new_parents = []
            q = dest.parent
            while not q.exists():
                new_parents.append(q)
                q = q.parent
            if dest.is_dir() and not dest.is_symlink() and member.isdir():
                os.chmod(dest, member.mode & 0o7777)
                os.lchown(dest, member.uid if keep else 0, member.gid if keep else 0)
                _set_unknown(repo, _unknown(repo) - {str(dest.relative_to(root))})
                continue
            if member.islnk():  # hard links become separate files: a copy of the target, with its metadata
                source = target / member.linkname.strip("/")
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_name(dest.name + ".fake-cvmfs-copy")
                shutil.copy2(source, tmp)
                st = os.lstat(source)
                os.lchown(tmp, st.st_uid, st.st_gid)
                os.replace(tmp, dest)
            else:
                tf.extract(member, target, numeric_owner=True, filter="fully_trusted")
            for parent in new_parents:
                _mark_unknown(repo, root, str(parent.relative_to(root)))
            for attr in os.listxattr(dest, follow_symlinks=False):  # xattrs are all dropped
                os.removexattr(dest, attr, follow_symlinks=False)
            if not keep and not dest.is_symlink():
                os.lchown(dest, 0, 0)
    while reader.read(1 << 20):  # to the end of the pipe, padding included
        pass
    if fail:
        print("ingest: injected failure (FAKE_CVMFS_FAIL)", file=sys.stderr)
        _take_snapshot(repo)  # the partial tree is the stand-in's own doing, not a write outside a transaction
        return 1
    if o["catalog"]:
        (target / ".cvmfscatalog").touch()
        if not has_root_entry:  # the catalog marking records BASE with the unknown owner, even when it existed
            _mark_unknown(repo, root, base)
    _take_snapshot(repo)
    return 0


def _backup(repo: str) -> Path:
    return _state() / f"{_name(repo)}.backup"


def cmd_transaction(args: list[str]) -> int:
    repo = args[-1]
    _repo_dir(repo)
    if _txn_marker(repo).exists():
        print(f"Repository {_name(repo)} is already in a transaction: another transaction is already open",
              file=sys.stderr)
        return 17
    _check_untouched(repo)
    if _should_fail("transaction", _count("transaction")):
        print("transaction: injected failure", file=sys.stderr)
        return 1
    backup = _backup(repo)
    if backup.exists():
        remove_tree(backup)
    # a hard-linked copy: the publisher replaces files by rename, never in place, so the backup stays intact
    subprocess.run(["cp", "-al", str(_repo_dir(repo)), str(backup)], check=True)
    _txn_marker(repo).write_text(repo)
    return 0


def _include_xattrs(repo: str) -> bool:
    etc = os.environ.get(ENV_ETC)
    if not etc:
        return False
    conf = Path(etc) / "repositories.d" / _name(repo) / "server.conf"
    try:
        lines = conf.read_text().splitlines()
    except OSError:
        return False
    return any(line.strip().replace('"', "") == "CVMFS_INCLUDE_XATTRS=true" for line in lines)


def _apply_whiteouts(root: Path, backup: Path) -> None:
    """The real publish takes every new ``.wh.*`` entry as an AUFS whiteout: applied, not stored."""
    before = _entries(backup)
    for rel in sorted(_entries(root), key=lambda r: (-r.count("/"), r)):
        name = os.path.basename(rel)
        if not name.startswith(WHITEOUT_PREFIX) or rel in before:
            continue
        parent = os.path.dirname(rel)
        p = root / rel
        if p.is_dir() and not p.is_symlink():
            remove_tree(p)
        elif os.path.lexists(p):
            p.unlink()
        if name == OPAQUE_MARKER:
            for old in sorted((r for r in before if os.path.dirname(r) == parent), reverse=True):
                _delete_quiet(root / old)
        else:
            _delete_quiet(root / parent / name[len(WHITEOUT_PREFIX):])


def _delete_quiet(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        remove_tree(p)
    elif os.path.lexists(p):
        p.unlink()


def cmd_publish(args: list[str]) -> int:
    repo = args[-1]
    if not _txn_marker(repo).exists():
        print(f"Repository {repo} is not in a transaction", file=sys.stderr)
        return 1
    _maybe_hang("publish")
    if _should_fail("publish", _count("publish")):
        print("publish: injected failure (FAKE_CVMFS_FAIL)", file=sys.stderr)
        return 1
    root, backup = _repo_dir(repo), _backup(repo)
    for rel in sorted(_unknown(repo)):
        if (root / rel).is_dir() and _tree_hash(root, rel) != _tree_hash(backup, rel):
            print(f"cannot publish: {rel} was changed, but it is recorded with owner 4294967295 (made by ingest); "
                  "the real overlay union refuses that with 'Permission denied'", file=sys.stderr)
            return 1
    _apply_whiteouts(root, backup)
    if not _include_xattrs(repo):
        for rel in _entries(root):
            p = root / rel
            for attr in os.listxattr(p, follow_symlinks=False):
                os.removexattr(p, attr, follow_symlinks=False)
    _txn_marker(repo).unlink()
    remove_tree(backup)
    _take_snapshot(repo)
    return 0


def cmd_abort(args: list[str]) -> int:
    repo = args[-1]
    if not _txn_marker(repo).exists():
        print(f"Repository {repo} is not in a transaction", file=sys.stderr)
        return 1
    root = _repo_dir(repo)
    backup = _backup(repo)
    for child in list(root.iterdir()):
        _delete_quiet(child)
    for child in backup.iterdir():
        os.rename(child, root / child.name)
    remove_tree(backup)
    _txn_marker(repo).unlink()
    _take_snapshot(repo)
    return 0


def main() -> int:
    argv = sys.argv[1:]
    stdin = _CountingStdin()
    if not argv:
        print("usage: cvmfs_server COMMAND ...", file=sys.stderr)
        return 2
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "ingest":
            status = cmd_ingest(rest, stdin)
        elif cmd == "transaction":
            status = cmd_transaction(rest)
        elif cmd == "publish":
            status = cmd_publish(rest)
        elif cmd == "abort":
            status = cmd_abort(rest)
        else:
            print(f"unknown command {cmd}", file=sys.stderr)
            status = 2
    except SystemExit as exc:
        status = int(exc.code or 0)
    _log(argv, stdin.n, status)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
