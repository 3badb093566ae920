"""How ``cvmfs-snap pull`` reports: a live rich display on a terminal, plain log lines otherwise (journald, CI),
and the same final per-layer table in both cases so admins can see which layers came from CVMFS."""

from __future__ import annotations

import logging
import sys
import threading
from typing import TYPE_CHECKING, TextIO

from cvmfs_snap.containerd.client import Descriptor
from cvmfs_snap.containerd.registry import ResolvedImage
from cvmfs_snap.containerd.unpack import LayerResult, Outcome, PullResult

if TYPE_CHECKING:  # rich is imported only when a RichProgress is made (a terminal): not for --json, journald, CI
    from rich.progress import TaskID

log = logging.getLogger(__name__)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def short(digest: str) -> str:
    return digest.split(":", 1)[-1][:12]


class LogProgress:
    """One log line per event: for non-interactive use."""

    def __init__(self) -> None:
        self.total = 0

    def resolved(self, image: ResolvedImage) -> None:
        self.total = len(image.layers)
        log.info("resolved %s to manifest %s (%s, %d layers, %s)", image.ref, image.manifest.digest,
                 image.platform, len(image.layers), human(sum(lay.size for lay in image.layers)))

    def layer_started(self, index: int, desc: Descriptor) -> None:
        log.debug("layer %d/%d %s: start", index + 1, self.total, desc.digest)

    def layer_bytes(self, index: int, nbytes: int) -> None:
        pass

    def layer_done(self, result: LayerResult) -> None:
        log.info("layer %d/%d %s: %s, %s downloaded in %.2fs", result.index + 1, self.total, result.digest,
                 result.outcome.value, human(result.downloaded), result.seconds)


class RichProgress:
    """A live progress display on a terminal (one bar per layer being downloaded)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        self.console = Console(file=stream or sys.stderr)
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                  TransferSpeedColumn(), console=self.console, transient=False)
        self._tasks: dict[int, TaskID] = {}
        self._layers: list[Descriptor] = []
        self._lock = threading.Lock()
        self.total = 0

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def resolved(self, image: ResolvedImage) -> None:
        self.total = len(image.layers)
        self._layers = list(image.layers)
        self.console.print(f"[bold]{image.ref}[/]: manifest {short(image.manifest.digest)}, {image.platform}, "
                           f"{len(image.layers)} layers")

    def _task(self, index: int, desc: Descriptor) -> TaskID:
        with self._lock:  # downloads ahead report from other threads
            if index not in self._tasks:
                self._tasks[index] = self._progress.add_task(
                    f"layer {index + 1}/{self.total} {short(desc.digest)}", total=desc.size)
            return self._tasks[index]

    def layer_started(self, index: int, desc: Descriptor) -> None:
        self._task(index, desc)

    def layer_bytes(self, index: int, nbytes: int) -> None:
        if 0 <= index < len(self._layers):
            self._progress.advance(self._task(index, self._layers[index]), nbytes)

    def layer_done(self, result: LayerResult) -> None:
        task = self._tasks.get(result.index)
        if task is not None:
            label = {Outcome.REMOTE: "remote (CVMFS)", Outcome.PULLED: "pulled", Outcome.CACHED: "cached",
                     Outcome.PRESENT: "present"}[result.outcome]
            self._progress.update(task, description=f"layer {result.index + 1}/{self.total} "
                                                    f"{short(result.digest)} {label}",
                                  completed=result.size if result.outcome is Outcome.PULLED else 0,
                                  total=result.size)


def summary(result: PullResult) -> str:
    """The final report: one line per layer, then totals."""
    lines = [f"{result.name} ({result.manifest_digest}) on snapshotter {result.snapshotter}"]
    for lay in result.layers:
        lines.append(f"  layer {lay.index + 1}/{len(result.layers)} {lay.digest} {lay.outcome.value:<7} "
                     f"size={human(lay.size)} downloaded={human(lay.downloaded)} time={lay.seconds:.2f}s")
    lines.append(
        f"done in {result.seconds:.2f}s: {len(result.layers)} layers, {result.count(Outcome.REMOTE)} remote, "
        f"{result.count(Outcome.PULLED)} pulled, {result.count(Outcome.CACHED)} cached, "
        f"{result.count(Outcome.PRESENT)} present; {human(result.downloaded)} downloaded "
        f"of {human(sum(lay.size for lay in result.layers))}")
    return "\n".join(lines)
