"""How ``cvmfs-snap pull`` reports: a live rich display on a terminal, plain log lines otherwise (journald, CI),
and the same final per-layer table in both cases so admins can see which layers came from CVMFS."""

from __future__ import annotations

import logging
from typing import TextIO

from cvmfs_snap.containerd.registry import ResolvedImage
from cvmfs_snap.containerd.unpack import LayerResult, Outcome, PullResult
from cvmfs_snap.oci import Descriptor
from cvmfs_snap.progressbars import BarDisplay, human_bytes

log = logging.getLogger(__name__)


def short(digest: str) -> str:
    return digest.split(":", 1)[-1][:12]


class LogProgress:
    """One log line per event: for non-interactive use."""

    def __init__(self) -> None:
        self.total = 0

    def resolved(self, image: ResolvedImage) -> None:
        self.total = len(image.layers)
        log.info("resolved %s to manifest %s (%s, %d layers, %s)", image.ref, image.manifest.digest,
                 image.platform, len(image.layers), human_bytes(sum(lay.size for lay in image.layers)))

    def layer_started(self, index: int, desc: Descriptor) -> None:
        log.debug("layer %d/%d %s: start", index + 1, self.total, desc.digest)

    def layer_bytes(self, index: int, nbytes: int) -> None:
        pass

    def layer_done(self, result: LayerResult) -> None:
        log.info("layer %d/%d %s: %s, %s downloaded in %.2fs", result.index + 1, self.total, result.digest,
                 result.outcome.value, human_bytes(result.downloaded), result.seconds)


class RichProgress(BarDisplay):
    """A live progress display on a terminal (one bar per layer being downloaded)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream)
        self._layers: list[Descriptor] = []
        self.total = 0

    def resolved(self, image: ResolvedImage) -> None:
        self.total = len(image.layers)
        self._layers = list(image.layers)
        self.console.print(f"[bold]{image.ref}[/]: manifest {short(image.manifest.digest)}, {image.platform}, "
                           f"{len(image.layers)} layers")

    def layer_started(self, index: int, desc: Descriptor) -> None:
        # downloads ahead report from other threads; Bars adds each bar once
        self._bars.add(index, f"layer {index + 1}/{self.total} {short(desc.digest)}", desc.size)

    def layer_bytes(self, index: int, nbytes: int) -> None:
        if 0 <= index < len(self._layers):
            self.layer_started(index, self._layers[index])
            self._bars.advance(index, nbytes)

    def layer_done(self, result: LayerResult) -> None:
        if self._bars.has(result.index):
            label = {Outcome.REMOTE: "remote (CVMFS)", Outcome.PULLED: "pulled", Outcome.CACHED: "cached",
                     Outcome.PRESENT: "present"}[result.outcome]
            self._bars.update(result.index, f"layer {result.index + 1}/{self.total} {short(result.digest)} {label}",
                              completed=result.size if result.outcome is Outcome.PULLED else 0, total=result.size)


def summary(result: PullResult) -> str:
    """The final report: one line per layer, then totals."""
    lines = [f"{result.name} ({result.manifest_digest}) on snapshotter {result.snapshotter}"]
    for lay in result.layers:
        lines.append(f"  layer {lay.index + 1}/{len(result.layers)} {lay.digest} {lay.outcome.value:<7} "
                     f"size={human_bytes(lay.size)} downloaded={human_bytes(lay.downloaded)} time={lay.seconds:.2f}s")
    lines.append(
        f"done in {result.seconds:.2f}s: {len(result.layers)} layers, {result.count(Outcome.REMOTE)} remote, "
        f"{result.count(Outcome.PULLED)} pulled, {result.count(Outcome.CACHED)} cached, "
        f"{result.count(Outcome.PRESENT)} present; {human_bytes(result.downloaded)} downloaded "
        f"of {human_bytes(sum(lay.size for lay in result.layers))}")
    return "\n".join(lines)
