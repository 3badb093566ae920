"""Heavy work shares ``concurrency`` slots, a flat's next layer first (publisher.slots).

With 2 cores and 2 workers, a flat applied beside two layer unpacks got two thirds of a core while it was the
image's critical path; now at most ``concurrency`` heavy units run at once and the flat goes first.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from cvmfs_snap.layout import LayerRecord
from cvmfs_snap.oci import RegistryClient
from cvmfs_snap_devenv import images as im
from cvmfs_snap_devenv.registry import Registry
from publisher.backends.base import FlatLayer, FlatOpener, LayerInfo, TarStream
from publisher.backends.local import LocalBackend
from publisher.pipeline import Publisher
from publisher.slots import FLAT, LAYER, WorkSlots


def _until(cond: Callable[[], bool]) -> None:
    """Wait (up to 10 s) until ``cond()`` holds: the threads of a test have reached their wait, whatever the load."""
    deadline = time.monotonic() + 10
    while not cond():
        assert time.monotonic() < deadline, "the test's threads did not reach their wait within 10 s"
        time.sleep(0.002)


def _queued(slots: WorkSlots, n: int) -> Callable[[], bool]:
    return lambda: len(slots._waiting) == n



def test_flat_goes_before_waiting_layers_and_layers_in_order() -> None:
    slots = WorkSlots(1)
    got: list[str] = []
    holder = slots.hold(LAYER, 0)
    holder.__enter__()

    def wait(name: str, priority: int, order: int | None) -> None:
        with slots.hold(priority, order):
            got.append(name)
            time.sleep(0.01)

    threads = []
    for i, (name, prio, order) in enumerate((("layer 7", LAYER, 7), ("layer 3", LAYER, 3), ("flat", FLAT, None))):
        t = threading.Thread(target=wait, args=(name, prio, order))
        t.start()
        threads.append(t)
        _until(_queued(slots, i + 1))  # all three are waiting before the slot is free
    holder.__exit__(None, None, None)
    for t in threads:
        t.join(5)
    assert got == ["flat", "layer 3", "layer 7"]
    assert slots.peak == 1


def test_a_waiter_that_gives_up_does_not_block_the_others() -> None:
    slots = WorkSlots(1)
    holder = slots.hold(LAYER, 0)
    holder.__enter__()
    first = slots.hold(FLAT)
    done: list[str] = []

    def later() -> None:
        with slots.hold(LAYER, 5):
            done.append("later")

    class Stop(Exception):
        pass

    def give_up() -> None:
        try:
            with first:
                raise AssertionError("never granted")
        except Stop:
            done.append("gave up")

    t = threading.Thread(target=later)
    t.start()
    _until(_queued(slots, 1))
    # a waiter interrupted while it waits (here: by an exception from its condition wait) leaves the queue
    original = slots._cond.wait
    calls = {"n": 0}

    def interrupting_wait(timeout: float | None = None) -> bool:
        if threading.current_thread().name == "giver":
            calls["n"] += 1
            raise Stop
        return original(timeout)

    slots._cond.wait = interrupting_wait  # type: ignore[method-assign]
    g = threading.Thread(target=give_up, name="giver")
    g.start()
    g.join(5)
    slots._cond.wait = original  # type: ignore[method-assign]
    holder.__exit__(None, None, None)
    t.join(5)
    assert done == ["gave up", "later"]
    assert calls["n"] == 1


def _flat_and_next_layer(slots: WorkSlots, unit: AbstractContextManager[None], flat: Callable[[], None], got: list[str]
                         ) -> list[threading.Thread]:
    """Start ``flat`` (waiting for layer ``sha256:a``) and the next layer's thread (wanting the one slot), wait
    until both wait, then end ``unit`` (the layer holding the slot); the two threads."""
    def next_layer() -> None:
        with slots.hold(LAYER, 1):
            got.append("next layer")

    threads = [threading.Thread(target=flat), threading.Thread(target=next_layer)]
    for t in threads:
        t.start()
    _until(lambda: slots._wanted["sha256:a"] == 1 and len(slots._waiting) == 1)
    unit.__exit__(None, None, None)
    return threads


def test_a_layer_hands_its_slot_to_the_flat_waiting_for_it() -> None:
    """The layer's thread (or any other waiter) cannot take the slot between the layer's end and the moment the
    flat learns of it (its future is set after the slot is released)."""
    slots = WorkSlots(1)
    got: list[str] = []
    published = threading.Event()
    unit = slots.hold(LAYER, 0, key="sha256:a")
    unit.__enter__()

    def flat() -> None:
        with slots.after("sha256:a", published.wait):
            got.append("flat")

    threads = _flat_and_next_layer(slots, unit, flat, got)
    time.sleep(0.05)  # the next layer waited before and the slot is not in use: it still must not get it
    assert got == []
    published.set()
    for t in threads:
        t.join(5)
    assert got == ["flat", "next layer"]
    assert slots.handovers == 1


def test_a_handed_slot_is_freed_when_the_flat_gives_up() -> None:
    slots = WorkSlots(1)
    got: list[str] = []
    failed = threading.Event()
    unit = slots.hold(LAYER, 0, key="sha256:a")
    unit.__enter__()

    def ready() -> None:
        failed.wait()
        raise RuntimeError("the layer failed")

    def flat() -> None:
        try:
            with slots.after("sha256:a", ready):
                got.append("flat")
        except RuntimeError:
            got.append("flat gave up")

    threads = _flat_and_next_layer(slots, unit, flat, got)
    failed.set()
    for t in threads:
        t.join(5)
    assert got == ["flat gave up", "next layer"]
    with slots.hold(FLAT):  # and nothing leaked: the one slot is free
        pass


class _CountingBackend(LocalBackend):
    """Counts heavy units running at once: a layer's publish (slowed down a little) and a flat's layer apply."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.running = 0
        self.peak = 0
        self.flat_applies = 0
        self._mu = threading.Lock()

    @contextmanager
    def _unit(self) -> Iterator[None]:
        with self._mu:
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            time.sleep(0.05)
            yield
        finally:
            with self._mu:
                self.running -= 1

    def publish_layer(self, info: LayerInfo, tar_stream: TarStream) -> LayerRecord:
        with self._unit():
            return super().publish_layer(info, tar_stream)

    def publish_flat(self, config_digest: str, layers: Sequence[FlatOpener]) -> None:
        def counted(opener: FlatOpener) -> FlatOpener:
            @contextmanager
            def opened() -> Iterator[FlatLayer]:
                with opener() as layer, self._unit():
                    self.flat_applies += 1
                    yield layer

            return opened

        super().publish_flat(config_digest, [counted(o) for o in layers])


def test_layers_and_flat_never_run_more_than_concurrency_units(tmp_path: Path, registry: Registry) -> None:
    layers = [im.layer([(f"l{i}/f{j}", b"x" * 100) for j in range(20)]) for i in range(6)]
    im.push_image(registry.url, "slots/six", "v1", im.image(layers))
    backend = _CountingBackend(tmp_path / "repo")
    with RegistryClient(insecure_registries=[registry.host], retries=0) as client, \
            Publisher(backend, client, concurrency=2, unpack_in_processes=False) as pub:
        result = pub.publish_image(registry.ref("slots/six", "v1"))
    assert result.ok, result.error
    assert backend.flat_applies == 6
    assert backend.peak == 2  # before: the flat ran beside two layers (3)
    flat = next((tmp_path / "repo/.flat").glob("*/*"))
    assert sorted(p.name for p in flat.iterdir() if p.is_dir()) == [f"l{i}" for i in range(6)]
