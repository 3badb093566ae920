"""An in-test LayerSource: a real implementation of our own seam (sources/base.py), serving directories it is given.

Used by the snapshotter tests to exercise the remote-snapshot path without CVMFS: ``layers`` maps a layer digest to
the lower directories (top-most first) that ``mount_dirs`` returns. It records what the core asked (lookups,
releases, restores) so tests can check the core drives the seam as documented.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cvmfs_snap.errors import NotFoundError, UnavailableError
from cvmfs_snap.snapshotter.sources.base import LayerRequest, LayerSource, RemoteLayer, SourceHealth


@dataclass
class FakeSource:
    name: str = "fake"
    layers: dict[str, list[Path]] = field(default_factory=dict)
    #: raise this from lookup() (simulates a broken source)
    fail_with: Exception | None = None
    lookups: list[LayerRequest] = field(default_factory=list)
    mounted: list[LayerRequest] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    restored: list[LayerRequest] = field(default_factory=list)
    #: digests it keeps "state" for (what held() answers): every layer it served and has not released
    state: set[str] = field(default_factory=set)

    def lookup(self, request: LayerRequest) -> RemoteLayer | None:
        self.lookups.append(request)
        if self.fail_with is not None:
            raise self.fail_with
        if request.digest not in self.layers:
            return None
        self.state.add(request.digest)
        return RemoteLayer(self.name, request.digest, {"fake.example/served": "yes"})

    def mount_dirs(self, request: LayerRequest) -> list[Path]:
        if self.fail_with is not None:
            raise UnavailableError(f"fake source down for {request.digest}")
        self.mounted.append(request)
        try:
            return list(self.layers[request.digest])
        except KeyError:
            raise NotFoundError(f"layer {request.digest} not in fake source") from None

    def check(self, request: LayerRequest) -> None:
        if request.digest not in self.layers:
            raise NotFoundError(f"layer {request.digest} not in fake source")

    def release(self, digest: str) -> None:
        self.released.append(digest)
        self.state.discard(digest)

    def held(self) -> list[str]:
        return sorted(self.state)

    def state_paths(self, digest: str) -> list[Path]:
        return list(self.layers.get(digest, [])) if digest in self.state else []

    def restore(self, requests: Sequence[LayerRequest]) -> None:
        self.restored.extend(requests)
        self.state.update(r.digest for r in requests)

    def health(self) -> SourceHealth:
        return SourceHealth(self.fail_with is None, str(self.fail_with or ""))


def lookup(source: LayerSource, labels: Mapping[str, str]) -> RemoteLayer | None:
    """What the core does at Prepare: parse the labels once (HostileLabelsError), then ask the source."""
    request = LayerRequest.from_labels(labels)
    return None if request is None else source.lookup(request)
