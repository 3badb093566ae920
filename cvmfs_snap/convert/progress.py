"""How ``cvmfs-snap convert`` reports: bars on a terminal (rich), plain log lines otherwise (CI, cron, journald)."""

from __future__ import annotations

import logging

from cvmfs_snap.convert.image import ConvertResult, LayerResult
from cvmfs_snap.progressbars import BarDisplay, human_bytes

log = logging.getLogger(__name__)


class LogProgress:
    """A line per image and per layer, and one every 10 % of a large layer."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[int, int, int]] = {}  # key -> (done, total, next report)

    def image(self, ref: str, platform: str, layers: int) -> None:
        log.info("converting %s (%s): %d layers", ref, platform, layers)

    def layer_start(self, key: str, what: str, total: int) -> None:
        log.info("layer %s %s: %s", key, what, human_bytes(total))
        self._seen[key] = (0, total, total // 10)

    def layer_bytes(self, key: str, n: int) -> None:
        done, total, nxt = self._seen.get(key, (0, 0, 0))
        done += n
        if total >= 64 << 20 and done >= nxt > 0:
            log.info("layer %s: %d%% read", key, 100 * done // total)
            nxt += total // 10
        self._seen[key] = (done, total, nxt)

    def layer_done(self, key: str, result: LayerResult) -> None:
        log.info("layer %s %s: %s -> %s %s in %.1fs", key, "kept" if result.kept else "converted",
                 result.source[:19], result.digest[:19], human_bytes(result.size), result.seconds)


class RichProgress(BarDisplay):
    """One bar per layer, by compressed source bytes read."""

    def image(self, ref: str, platform: str, layers: int) -> None:
        self.console.print(f"[bold]{ref}[/] ({platform}): {layers} layers")

    def layer_start(self, key: str, what: str, total: int) -> None:
        self._bars.add(key, f"layer {key} {what}", total)

    def layer_bytes(self, key: str, n: int) -> None:
        self._bars.advance(key, n)

    def layer_done(self, key: str, result: LayerResult) -> None:
        self._bars.update(key, f"layer {key} {'kept' if result.kept else 'converted'} {result.digest[7:19]}",
                          completed=result.size if result.kept else None)


def summary(result: ConvertResult) -> str:
    lines = [f"{result.destination}: {result.media_type} {result.digest}"]
    for lay in result.layers:
        lines.append(f"  {'kept     ' if lay.kept else 'converted'} {lay.source} -> {lay.digest} "
                     f"size={human_bytes(lay.size)} uncompressed={human_bytes(lay.uncompressed_size)} "
                     f"{lay.seconds:.1f}s")
    kept = sum(1 for lay in result.layers if lay.kept)
    lines.append(f"done in {result.seconds:.1f}s: {len(result.layers)} layers, {kept} kept as they were")
    return "\n".join(lines)
