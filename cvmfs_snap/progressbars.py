"""The one byte formatter and the one terminal progress-bar helper (``cvmfs-snap pull``, the publisher CLI)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Hashable
from typing import TYPE_CHECKING, Self, TextIO

if TYPE_CHECKING:  # rich is imported only when bars are made (a terminal): not for --json, journald, CI
    from rich.console import Console
    from rich.progress import TaskID


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"`` (binary units, whole bytes below 1 KiB, GiB at most)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover - the loop returns at GiB


class Bars:
    """Download bars (size, speed; ``eta``: time left) keyed by anything hashable, safe to feed from threads."""

    def __init__(self, stream: TextIO | None = None, *, transient: bool = False, eta: bool = False) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            ProgressColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        columns: list[ProgressColumn] = [TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                         TransferSpeedColumn()]
        if eta:
            columns.append(TimeRemainingColumn())
        self.console: Console = Console(file=stream or sys.stderr)
        self._progress = Progress(*columns, console=self.console, transient=transient)
        self._tasks: dict[Hashable, TaskID] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        self._progress.start()

    def stop(self) -> None:
        self._progress.stop()

    def add(self, key: Hashable, description: str, total: int | None) -> None:
        """A bar for ``key`` unless it has one."""
        with self._lock:
            if key not in self._tasks:
                self._tasks[key] = self._progress.add_task(description, total=total)

    def has(self, key: Hashable) -> bool:
        return key in self._tasks

    def advance(self, key: Hashable, nbytes: int) -> None:
        task = self._tasks.get(key)
        if task is not None:
            self._progress.advance(task, nbytes)

    def update(self, key: Hashable, description: str, completed: int | None = None, total: int | None = None) -> None:
        """New description; ``completed`` / ``total`` (bytes) when given, else unchanged."""
        task = self._tasks.get(key)
        if task is not None:
            self._progress.update(task, description=description, completed=completed, total=total)

    def remove(self, key: Hashable) -> None:
        with self._lock:
            task = self._tasks.pop(key, None)
        if task is not None:
            self._progress.remove_task(task)


class BarDisplay:
    """Base of the commands' live displays: one :class:`Bars`, started and stopped as a context manager."""

    def __init__(self, stream: TextIO | None = None, *, transient: bool = False, eta: bool = False) -> None:
        self._bars = Bars(stream, transient=transient, eta=eta)
        self.console = self._bars.console

    def __enter__(self) -> Self:
        self._bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bars.stop()
