#!/usr/bin/env python3
"""A recording stand-in for ``cvmfs_server`` (which cannot be installed here), for the publisher's cvmfs backends.

It performs the commands on a plain directory the way /work/shared/CVMFS-FACTS.md describes the real one:

- ``ingest [--catalog] [-k] -t - -b BASE REPO`` reads a tar from stdin and publishes it at BASE in its own
  transaction: whiteouts (``.wh.*``) become plain files; ``-k`` keeps the tar's uid/gid, without it everything is
  owned by 0; parent directories of BASE that did not exist get uid/gid 65534 (the real one records 4294967295);
  ``--catalog`` adds ``BASE/.cvmfscatalog``; like the real script it prints ``[[: not found`` on stderr.
- ``ingest -d PATH REPO`` deletes PATH.
- ``transaction REPO[/SUBPATH]`` / ``publish REPO`` / ``abort -f REPO``: a second transaction is refused; abort
  restores the tree as it was; the tree is *read-only outside a transaction*: any change made to it since the last
  publish/abort/ingest (i.e. written outside a transaction) makes the next command fail loudly.

Environment:
  FAKE_CVMFS_REPOS   directory holding one tree per repository (``$FAKE_CVMFS_REPOS/<repo>``), like /cvmfs
  FAKE_CVMFS_STATE   directory for the log (``log.jsonl``: argv, stdin byte count, exit status) and bookkeeping
  FAKE_CVMFS_FAIL    comma-separated failures to inject: ``ingest``, ``publish``, ``transaction``, or ``ingest@N``
                     (only the N-th ingest call, 1-based); a failing ingest leaves a partial tree behind first
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

NOBODY = 65534


def _state() -> Path:
    p = Path(os.environ["FAKE_CVMFS_STATE"])
    p.mkdir(parents=True, exist_ok=True)
    return p


def _repo_dir(repo: str) -> Path:
    name = repo.split("/", 1)[0]
    d = Path(os.environ["FAKE_CVMFS_REPOS"]) / name
    if not d.is_dir():
        print(f"Repository {name} does not exist", file=sys.stderr)
        raise SystemExit(1)
    return d


def _tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = p.lstat()
            h.update(f"{p.relative_to(root)}\0{st.st_mode}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_uid}\n".encode())
            if p.is_symlink():
                h.update(os.readlink(p).encode())
    return h.hexdigest()


def _snapshot_path(repo: str) -> Path:
    return _state() / f"{repo.split('/', 1)[0]}.snapshot"


def _take_snapshot(repo: str) -> None:
    _snapshot_path(repo).write_text(_tree_hash(_repo_dir(repo)))


def _check_untouched(repo: str) -> None:
    """Read-only outside transactions: the tree must be as the last publish/abort/ingest left it."""
    snap = _snapshot_path(repo)
    if snap.exists() and snap.read_text() != _tree_hash(_repo_dir(repo)):
        print(f"FATAL: /cvmfs/{repo} was modified outside a transaction (it is read-only then)", file=sys.stderr)
        _record_violation()
        raise SystemExit(3)


def _record_violation() -> None:
    with open(_state() / "violations", "a") as f:
        f.write(" ".join(sys.argv[1:]) + "\n")


def _txn_marker(repo: str) -> Path:
    return _state() / f"{repo.split('/', 1)[0]}.txn"


def _count(kind: str) -> int:
    p = _state() / f"count-{kind}"
    n = int(p.read_text()) + 1 if p.exists() else 1
    p.write_text(str(n))
    return n


def _should_fail(kind: str, n: int) -> bool:
    for item in filter(None, os.environ.get("FAKE_CVMFS_FAIL", "").split(",")):
        name, _, at = item.partition("@")
        if name == kind and (not at or int(at) == n):
            return True
    return False


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


def cmd_ingest(args: list[str], stdin: _CountingStdin) -> int:
    print("/usr/bin/cvmfs_server: 1: [[: not found", file=sys.stderr)  # as the real script under dash
    if "-d" in args:
        path, repo = args[args.index("-d") + 1], args[-1]
        if _txn_marker(repo).exists():
            print("another transaction is open", file=sys.stderr)
            return 1
        _check_untouched(repo)
        target = _repo_dir(repo) / path
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        _take_snapshot(repo)
        return 0
    if "-t" not in args or "-b" not in args:
        print("usage: ingest -t TAR -b BASE REPO", file=sys.stderr)
        return 2
    tar_arg, base, repo = args[args.index("-t") + 1], args[args.index("-b") + 1], args[-1]
    keep = "-k" in args
    if _txn_marker(repo).exists():
        print("another transaction is open", file=sys.stderr)
        return 1
    _check_untouched(repo)
    root = _repo_dir(repo)
    target = root / base
    # parents that do not exist yet get the 'unknown' owner, as the real ingest does
    missing = []
    p = target.parent
    while not p.exists():
        missing.append(p)
        p = p.parent
    target.mkdir(parents=True, exist_ok=True)
    for m in missing:
        os.chown(m, NOBODY, NOBODY)
    n = _count("ingest")
    fail = _should_fail("ingest", n)
    src = sys.stdin.buffer if tar_arg == "-" else open(tar_arg, "rb")  # noqa: SIM115
    reader = stdin if tar_arg == "-" else src
    with tarfile.open(fileobj=reader, mode="r|") as tf:  # type: ignore[call-overload]
        for i, member in enumerate(tf):
            if fail and i >= 1:
                break
            tf.extract(member, target, numeric_owner=True, filter="fully_trusted")
            dest = target / member.name
            if not keep and not dest.is_symlink():
                os.lchown(dest, 0, 0)
    if fail:
        while stdin.read(1 << 20):
            pass
        print("ingest: injected failure (FAKE_CVMFS_FAIL)", file=sys.stderr)
        _take_snapshot(repo)  # the partial tree is the stand-in's own doing, not a write outside a transaction
        return 1
    if "--catalog" in args:
        (target / ".cvmfscatalog").touch()
    _take_snapshot(repo)
    return 0


def cmd_transaction(args: list[str]) -> int:
    repo = args[-1]
    _repo_dir(repo)
    if _txn_marker(repo).exists():
        print(f"Repository {repo.split('/')[0]} is already in a transaction", file=sys.stderr)
        return 1
    _check_untouched(repo)
    if _should_fail("transaction", _count("transaction")):
        print("transaction: injected failure", file=sys.stderr)
        return 1
    backup = _state() / f"{repo.split('/')[0]}.backup"
    shutil.rmtree(backup, ignore_errors=True)
    # a hard-linked copy: the publisher replaces files by rename, never in place, so the backup stays intact
    subprocess.run(["cp", "-al", str(_repo_dir(repo)), str(backup)], check=True)
    _txn_marker(repo).write_text(repo)
    return 0


def cmd_publish(args: list[str]) -> int:
    repo = args[-1]
    if not _txn_marker(repo).exists():
        print(f"Repository {repo} is not in a transaction", file=sys.stderr)
        return 1
    if _should_fail("publish", _count("publish")):
        print("publish: injected failure (FAKE_CVMFS_FAIL)", file=sys.stderr)
        return 1
    _txn_marker(repo).unlink()
    shutil.rmtree(_state() / f"{repo}.backup", ignore_errors=True)
    _take_snapshot(repo)
    return 0


def cmd_abort(args: list[str]) -> int:
    repo = args[-1]
    if not _txn_marker(repo).exists():
        print(f"Repository {repo} is not in a transaction", file=sys.stderr)
        return 1
    root = _repo_dir(repo)
    backup = _state() / f"{repo}.backup"
    for child in list(root.iterdir()):
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    for child in backup.iterdir():
        os.rename(child, root / child.name)
    shutil.rmtree(backup, ignore_errors=True)
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
