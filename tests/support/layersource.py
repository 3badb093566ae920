"""An in-test LayerSource: a real implementation of our own seam (sources/base.py), serving directories it is given.

Used by the snapshotter tests to exercise the remote-snapshot path without CVMFS: ``layers`` maps a layer digest to
the lower directories (top-most first) that ``lowerdirs`` returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cvmfs_snap.errors import NotFoundError, UnavailableError
from cvmfs_snap.layout import digest_hex
from cvmfs_snap.snapshotter.sources.base import LABEL_CRI_LAYER_DIGEST, RemoteLayer


@dataclass
class FakeSource:
    name: str = "fake"
    layers: dict[str, list[Path]] = field(default_factory=dict)
    #: raise this from lookup() (simulates a broken source)
    fail_with: Exception | None = None
    lookups: list[dict[str, str]] = field(default_factory=list)

    def lookup(self, labels: Mapping[str, str]) -> RemoteLayer | None:
        self.lookups.append(dict(labels))
        if self.fail_with is not None:
            raise self.fail_with
        digest = labels.get(LABEL_CRI_LAYER_DIGEST)
        if digest is None:
            return None
        digest_hex(digest)  # hostile digests -> InvalidInputError, like the real source
        if digest not in self.layers:
            return None
        return RemoteLayer(self.name, digest, {"fake.example/served": "yes"})

    def lowerdirs(self, digest: str) -> list[Path]:
        if self.fail_with is not None:
            raise UnavailableError(f"fake source down for {digest}")
        try:
            return list(self.layers[digest])
        except KeyError:
            raise NotFoundError(f"layer {digest} not in fake source") from None
