"""The one byte formatter and the one progress-bar helper, as both CLIs use them."""

from __future__ import annotations

import io
from dataclasses import dataclass

from cvmfs_snap.progressbars import Bars, human_bytes
from publisher.cli import RichProgress


def test_human_bytes() -> None:
    assert human_bytes(0) == "0 B"
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(5 * (1 << 20)) == "5.0 MiB"
    assert human_bytes(3 * (1 << 40)) == "3072.0 GiB"


def test_bars_add_once_advance_update_remove() -> None:
    out = io.StringIO()
    bars = Bars(out)
    bars.start()
    bars.add("a", "layer a", 100)
    bars.add("a", "layer a again", 100)  # a second start of the same key keeps its bar
    bars.advance("a", 40)
    bars.advance("missing", 5)  # unknown keys are ignored
    bars.update("a", "layer a done", completed=100, total=100)
    assert bars.has("a")
    bars.stop()
    text = out.getvalue()
    assert "layer a done" in text and "again" not in text
    bars.remove("a")
    assert not bars.has("a")


@dataclass
class _Result:
    ok: bool
    ref: str


def test_publisher_progress_uses_the_shared_bars() -> None:
    prog = RichProgress()
    buf = io.StringIO()
    prog.console.file = buf
    with prog:
        prog.layer_started("sha256:" + "ab" * 32, 1000)
        prog.layer_advanced("sha256:" + "ab" * 32, 1000)
        prog.layer_finished("sha256:" + "ab" * 32, True)
        prog.image_finished(_Result(True, "example.org/a:1"))
    assert "ok" in buf.getvalue() and "example.org/a:1" in buf.getvalue()
    assert not prog._bars.has("sha256:" + "ab" * 32)
