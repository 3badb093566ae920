"""Which layers use which chunk of the lazy chunk cache, kept in memory and in one append-only file per layer.

``layers/<64 hex>.refs`` lists the chunk keys a layer uses, one a line. A reference is appended to the file
*before* the chunk it names is stored (so a crash leaves at worst a line without a chunk, never a chunk no layer
owns), and the file is read back when the cache starts. Not thread-safe: :class:`~cvmfs_snap.lazyfs.cache.
ChunkCache` calls it under its lock.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Container, Iterable, Iterator
from pathlib import Path

from cvmfs_snap.digests import SHA256_HEX

SUFFIX = ".refs"


class LayerRefs:
    """References of chunk keys (bare hex) by layers (bare hex), under ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        #: key -> the layer using it, or the set of layers when several do (most chunks have one: a set each would
        #: cost ~200 bytes per chunk); layer names are shared objects (:meth:`_intern`)
        self._refs: dict[str, str | set[str]] = {}
        self._layers: dict[str, str] = {}

    def _path(self, layer: str) -> Path:
        return self.directory / f"{layer}{SUFFIX}"

    def _intern(self, layer: str) -> str:
        return self._layers.setdefault(layer, layer)

    def load(self) -> None:
        """Read every layer's file (a line cut short by a crash is skipped)."""
        for e in os.scandir(self.directory):
            name = e.name
            if not name.endswith(SUFFIX) or not SHA256_HEX.fullmatch(name[:-len(SUFFIX)]):
                continue
            layer = self._intern(name[:-len(SUFFIX)])
            with open(e.path, "rb") as f:
                for line in f:
                    key = line.strip().decode("ascii", "replace")
                    if SHA256_HEX.fullmatch(key):
                        self._add(key, layer)

    def __contains__(self, key: str) -> bool:
        return key in self._refs

    def __iter__(self) -> Iterator[str]:
        return iter(self._refs)

    def known(self, layer: str) -> str | None:
        """``layer`` if it is a (bare) layer name seen already, else None."""
        return self._layers.get(layer)

    def has(self, key: str, layer: str) -> bool:
        layers = self._refs.get(key)
        return layers == layer if isinstance(layers, str) else layers is not None and layer in layers

    def add(self, keys: Iterable[str], layer: str) -> None:
        """``layer`` references ``keys``: the new ones are appended to its file first (one write)."""
        new = [k for k in keys if not self.has(k, layer)]
        if not new:
            return
        layer = self._intern(layer)
        with open(self._path(layer), "ab") as f:
            f.write("".join(f"{k}\n" for k in new).encode())
        for k in new:
            self._add(k, layer)

    def _add(self, key: str, layer: str) -> None:
        layers = self._refs.get(key)
        if layers is None:
            self._refs[key] = layer
        elif isinstance(layers, str):
            if layers != layer:
                self._refs[key] = {layers, layer}
        else:
            layers.add(layer)

    def _discard(self, key: str, layer: str) -> bool:
        """Drop ``layer``'s reference; True when no layer references ``key`` any more (and it is forgotten)."""
        layers = self._refs.get(key)
        if isinstance(layers, set):
            layers.discard(layer)
            if len(layers) == 1:
                self._refs[key] = next(iter(layers))
            elif not layers:
                del self._refs[key]
                return True
            return False
        if layers == layer:
            del self._refs[key]
            return True
        return False

    def release(self, layer: str) -> list[str]:
        """Drop ``layer``'s references (its file stays until :meth:`forget_layer`); the keys no layer references
        any more. Every reference is in the layer's file before it is in memory: only that file is read."""
        try:
            with open(self._path(layer), "rb") as f:
                keys = {line.strip().decode("ascii", "replace") for line in f}
        except FileNotFoundError:
            keys = set()
        return [k for k in keys if self.has(k, layer) and self._discard(k, layer)]

    def forget_layer(self, layer: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(layer))
        self._layers.pop(layer, None)

    def keep_only(self, stored: Container[str]) -> None:
        """Forget the references to chunks not in ``stored`` (at start: the lines whose chunk never arrived)."""
        for key in [k for k in self._refs if k not in stored]:
            del self._refs[key]
