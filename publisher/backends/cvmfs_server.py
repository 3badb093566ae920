"""Running ``cvmfs_server`` for one repository: exit statuses, timeouts and the abort path, ``server.conf``.

Every call has a deadline (``timeout`` seconds, plus ``bytes / min_rate`` for the bytes it is fed on stdin, so a
tens-of-GB ingest is not cut short while a hung one is still noticed). A call past its deadline is killed with its
whole process group (``cvmfs_server`` runs ``cvmfs_swissknife`` below a shell), then the documented abort path
runs: ``cvmfs_server abort -f <repo>`` throws away whatever transaction the killed command had open (an ``ingest``
opens its own; see /work/shared/CVMFS-FACTS.md), and callers of ``ingest`` then remove its target with
``cvmfs_server ingest -d``. All of this happens under the caller's repository lock, so nothing else publishes into
the half-done state. Exit statuses decide success; known stderr noise (dash's ``[[: not found``) is only logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from cvmfs_snap.errors import CommandError

log = logging.getLogger(__name__)

_STDERR_NOISE = ("[[: not found", "eval: -q: not found")

#: default deadline of one ``cvmfs_server`` call without stdin payload (a publish of a big flat tree included)
DEFAULT_TIMEOUT = 3600.0
#: bytes per second an ingest is granted on top of ``timeout`` (a 20 GB layer: +2.8 h at 2 MiB/s)
DEFAULT_MIN_RATE = 2 << 20
#: where a stratum-0 keeps each repository's settings
SERVER_CONF = "/etc/cvmfs/repositories.d/{repo}/server.conf"

#: one piece of an ``ingest`` stdin: bytes as they are, or a file streamed from its start
StdinPart = bytes | Path


class _TimedOut(Exception):
    pass


class CvmfsServer:
    """Runs ``cvmfs_server`` for one repository and turns failures into :class:`CommandError`."""

    def __init__(self, exe: str, repo: str, *, timeout: float = DEFAULT_TIMEOUT,
                 min_rate: float = DEFAULT_MIN_RATE, server_conf: str | os.PathLike[str] | None = None) -> None:
        self.exe = exe
        self.repo = repo
        self.timeout = float(timeout)
        self.min_rate = float(min_rate)
        self.server_conf = Path(server_conf) if server_conf else Path(SERVER_CONF.format(repo=repo))
        #: how many publishes (``publish`` and ``ingest`` calls that succeeded) this object made; for metrics/bench
        self.publishes = 0
        #: the caller's repository lock descriptor, passed on to every command (see ``RepoLock.held_fd``)
        self.lock_fd: Callable[[], int | None] = lambda: None

    # -- the repository's settings -------------------------------------------------------------------------------
    def setting(self, key: str) -> str | None:
        """A ``KEY=value`` of the repository's ``server.conf`` (quotes stripped), None when unset or unreadable."""
        try:
            text = self.server_conf.read_text(errors="replace")
        except OSError:
            return None
        value: str | None = None
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("export "):
                line = line[len("export "):].strip()
            k, sep, v = line.partition("=")
            if sep and k.strip() == key:
                value = v.split("#", 1)[0].strip().strip("'\"")
        return value

    def includes_xattrs(self) -> bool:
        """True when ``publish`` keeps extended attributes (``CVMFS_INCLUDE_XATTRS=true``); ingest never does."""
        return (self.setting("CVMFS_INCLUDE_XATTRS") or "").lower() in ("true", "yes", "1", "on")

    # -- running ---------------------------------------------------------------------------------------------------
    def deadline(self, payload: int = 0) -> float:
        return self.timeout + (payload / self.min_rate if self.min_rate > 0 else 0.0)

    def run(self, *args: str, stdin: Sequence[StdinPart] = (), abort_on_timeout: bool = True) -> None:
        argv = [self.exe, *args]
        shown = " ".join(argv)
        payload = sum(len(p) if isinstance(p, bytes) else _size(p) for p in stdin)
        deadline = self.deadline(payload)
        log.debug("running %s (deadline %.0f s)", shown, deadline)
        try:
            rc, err = self._spawn(argv, stdin, deadline)
        except _TimedOut:
            aborted = abort_on_timeout and self._abort_after_timeout()
            raise CommandError(
                f"`{shown}` did not finish within {deadline:.0f} s and was killed"
                + (f"; its transaction was thrown away with `cvmfs_server abort -f {self.repo}`" if aborted else "")
                + f"; check the stratum-0 (`cvmfs_server check {self.repo}`, its logs) and raise the cvmfs_server "
                "timeout in the publisher configuration if such calls are expected to take that long"
            ) from None
        noise = [ln for ln in err.splitlines() if ln.strip() and not any(n in ln for n in _STDERR_NOISE)]
        if rc != 0:
            tail = "\n".join(noise[-10:]) or err.strip()[-1000:]
            raise CommandError(
                f"`{shown}` failed with exit status {rc}: {tail or '(no output)'}; "
                f"check the repository with `cvmfs_server check {self.repo}` and the stratum-0 logs"
            )
        if args and args[0] in ("publish", "ingest"):
            self.publishes += 1
        if noise:
            log.debug("%s: %s", args[0] if args else "", "; ".join(noise[-5:]))

    def _spawn(self, argv: list[str], stdin: Sequence[StdinPart], deadline: float) -> tuple[int, str]:
        with tempfile.TemporaryFile() as errf, tempfile.TemporaryFile() as outf:
            try:
                fd = self.lock_fd()
                proc = subprocess.Popen(
                    argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, stdout=outf, stderr=errf,
                    start_new_session=True, pass_fds=() if fd is None else (fd,),
                )
            except FileNotFoundError as exc:
                raise CommandError(
                    f"cannot run {self.exe!r}: not found; install the CernVM-FS server tools or set cvmfs_server "
                    "(--cvmfs-server) to its path"
                ) from exc
            except OSError as exc:
                raise CommandError(f"cannot run {self.exe!r}: {exc}") from exc
            feeder: threading.Thread | None = None
            feed_error: list[BaseException] = []
            if stdin:
                assert proc.stdin is not None
                feeder = threading.Thread(target=_feed, args=(proc.stdin, stdin, feed_error), daemon=True,
                                          name="cvmfs-server-stdin")
                feeder.start()
            try:
                rc = proc.wait(timeout=deadline)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                raise _TimedOut() from None
            finally:
                if feeder is not None:
                    feeder.join(timeout=30)
            if feed_error and rc == 0:
                raise CommandError(f"feeding `{argv[1] if len(argv) > 1 else argv[0]}` failed: {feed_error[0]}")
            errf.seek(0)
            return rc, errf.read()[-20000:].decode(errors="replace")

    def _abort_after_timeout(self) -> bool:
        try:
            self.run("abort", "-f", self.repo, abort_on_timeout=False)
        except CommandError as exc:
            log.info("after the timeout: %s (no transaction was open, or see the message)", exc)
            return False
        return True

    # -- the commands ---------------------------------------------------------------------------------------------
    def transaction(self, lease_path: str | None = None) -> None:
        self.run("transaction", f"{self.repo}/{lease_path}" if lease_path else self.repo)

    def publish(self) -> None:
        self.run("publish", self.repo)

    def abort(self) -> None:
        self.run("abort", "-f", self.repo, abort_on_timeout=False)

    def ingest(self, base_dir: str, stdin: Sequence[StdinPart], *, catalog: bool = True,
               delete: Sequence[str] = ()) -> None:
        """``ingest [-d PATH]... [--catalog] -k -t - -b BASE``: one publish; ``-k`` keeps the tar's owners."""
        args = ["ingest"]
        for path in delete:
            args += ["-d", path]
        if catalog:
            args.append("--catalog")
        self.run(*args, "-k", "-t", "-", "-b", base_dir, self.repo, stdin=stdin)

    def ingest_delete(self, paths: Sequence[str]) -> None:
        """``ingest -d PATH [-d PATH]...``: removes the trees (nested catalogs included) in one publish."""
        args: list[str] = ["ingest"]
        for path in paths:
            args += ["-d", path]
        self.run(*args, self.repo)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _feed(out: IO[bytes], parts: Sequence[StdinPart], errors: list[BaseException]) -> None:
    try:
        for part in parts:
            if isinstance(part, bytes):
                out.write(part)
                continue
            with open(part, "rb") as f:
                while chunk := f.read(1 << 20):
                    out.write(chunk)
    except BrokenPipeError:
        pass  # the command stopped reading: its exit status says why
    except OSError as exc:
        errors.append(exc)
    finally:
        with contextlib.suppress(OSError):
            out.close()


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the command's process group, SIGKILL to what is left of it after 10 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
