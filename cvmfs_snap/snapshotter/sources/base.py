"""The seam between the snapshot core and the places remote layers come from (CVMFS now, lazy eStargz next).

Modelled on stargz-snapshotter's ``FileSystem{Mount, Check, Unmount}`` with restore-on-start, and its ``fs/source``
that turns labels into "where is this blob". The life of a remote layer, as the core drives it:

1. **request**: containerd's Prepare labels are parsed once, by the core, into a typed :class:`LayerRequest` (layer
   digest, image reference, manifest digest, neighbouring layers, the layer's annotations). Hostile or contradictory
   labels raise :class:`HostileLabelsError`, the *only* error the core lets through to containerd (InvalidArgument).
   The request is stored with the snapshot, so every later call gets it again, also after a restart.
2. **lookup(request)**: can this source serve the layer? A :class:`RemoteLayer`, or None. *Any* other exception of a
   source (its registry answered 400, its mount is down, a bug) means "pull normally": the core logs it and asks the
   next source, then falls back to a local snapshot.
3. **mount_dirs(request)**: at Mounts, the directories to stack for the layer as overlay lowerdirs, top-most first.
   Raises (UnavailableError, NotFoundError, ...) when the layer cannot be served now; the core answers that error.
4. **check(request)**: cheap "can you still serve it?" (containerd Prepares a layer whose snapshot exists already).
5. **release(digest)**: no snapshot uses the layer any more (the core counts the snapshots of each source and layer:
   layers are shared between chains) and no mount uses its :meth:`LayerSource.state_paths`. The source may drop its
   node-local state for it. Called on Remove of the last user and by Cleanup for every layer
   :meth:`LayerSource.held` names that no snapshot uses.
6. **restore(requests)**: at start, the requests of every snapshot the source serves (e.g. to re-attach mounts).
7. **health()**: is the source usable right now (cached, bounded)? Used by status and the publish-on-miss reporter.

Each source gets its own :class:`SourceContext` from the registry (:mod:`.registry`): a node-local state directory
nobody else writes, and its own :class:`~.health.CallBudget` of stuck calls, so one hung source cannot use up
another's. Calls must never block for long: a source bounds its own file-system and network calls.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cvmfs_snap.errors import InvalidInputError
from cvmfs_snap.labelnames import (
    CRI_IMAGE_LAYERS,
    CRI_IMAGE_REF,
    CRI_LAYER_DIGEST,
    CRI_MANIFEST_DIGEST,
    CRI_PREFIX,
    SNAPSHOT_LAYER_DIGEST,
    SNAPSHOT_PREFIX,
    SNAPSHOT_REF,
    SNAPSHOT_REMOTE,
    TOC_DIGEST,
)
from cvmfs_snap.layout import digest_hex

from .health import CallBudget

#: version of the stored request's JSON form
REQUEST_VERSION = 1


class HostileLabelsError(InvalidInputError):
    """Labels that no honest containerd sends (a digest with ``../``, contradictory digests): the Prepare fails."""


def _digest(labels: Mapping[str, str], key: str) -> str:
    value = labels.get(key, "")
    if value == "" and key not in labels:
        return ""
    try:
        digest_hex(value)
    except InvalidInputError as exc:
        raise HostileLabelsError(f"label {key}: {exc}") from None
    return value


@dataclass(frozen=True)
class LayerRequest:
    """What a Prepare's labels say about the layer it unpacks, parsed and checked once."""

    target: str  # the chain ID (containerd.io/snapshot.ref)
    digest: str  # compressed layer digest ("" when the labels do not name one)
    image_ref: str = ""
    manifest_digest: str = ""
    #: the image's other layers as CRI lists them (neighbours, for prefetching sources)
    image_layers: tuple[str, ...] = ()
    #: the layer's ``containerd.io/snapshot/*`` annotations as the Prepare's labels carry them (full label names, the
    #: CRI labels and ``containerd.io/snapshot/remote`` left out), e.g. :data:`TOC_DIGEST`
    annotations: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_labels(cls, labels: Mapping[str, str]) -> LayerRequest | None:
        """The request of a Prepare that unpacks into a target (None without ``snapshot.ref``).

        Raises HostileLabelsError for a malformed or contradictory digest label."""
        target = labels.get(SNAPSHOT_REF, "")
        cri = _digest(labels, CRI_LAYER_DIGEST)
        ours = _digest(labels, SNAPSHOT_LAYER_DIGEST)
        if cri and ours and cri != ours:
            raise HostileLabelsError(
                f"contradictory layer digest labels: {CRI_LAYER_DIGEST}={cri} but {SNAPSHOT_LAYER_DIGEST}={ours}"
            )
        if not target:
            return None
        manifest = labels.get(CRI_MANIFEST_DIGEST, "")
        try:
            digest_hex(manifest)
        except InvalidInputError:
            manifest = ""  # informational only: never a reason to fail a Prepare
        layers = tuple(x.strip() for x in labels.get(CRI_IMAGE_LAYERS, "").split(",") if x.strip())
        annotations = {k: v for k, v in labels.items()
                       if k.startswith(SNAPSHOT_PREFIX) and not k.startswith(CRI_PREFIX)
                       and k != SNAPSHOT_REMOTE}
        return cls(target, cri or ours, labels.get(CRI_IMAGE_REF, ""), manifest, layers, annotations)

    @property
    def toc_digest(self) -> str:
        """The eStargz TOC digest the layer's annotations name, "" when none or malformed (never a reason to fail
        a Prepare: the layer is then simply not served lazily)."""
        value = self.annotations.get(TOC_DIGEST, "")
        try:
            digest_hex(value)
        except InvalidInputError:
            return ""
        return value

    def to_json(self) -> str:
        return json.dumps({"version": REQUEST_VERSION, "target": self.target, "digest": self.digest,
                           "image_ref": self.image_ref, "manifest_digest": self.manifest_digest,
                           "image_layers": list(self.image_layers), "annotations": dict(self.annotations)},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str, digest: str, target: str) -> LayerRequest:
        """The stored request; a missing or unreadable one (snapshots of older versions) becomes the bare request
        of ``digest`` and ``target``, which is all the CVMFS source needs."""
        try:
            d = json.loads(text) if text else {}
            if not isinstance(d, dict) or d.get("version") != REQUEST_VERSION:
                raise ValueError("unknown form")
            return cls(str(d["target"]), str(d["digest"]), str(d.get("image_ref", "")),
                       str(d.get("manifest_digest", "")), tuple(str(x) for x in d.get("image_layers", [])),
                       {str(k): str(v) for k, v in dict(d.get("annotations", {})).items()})
        except (ValueError, KeyError, TypeError, AttributeError):
            return cls(target, digest)


@dataclass(frozen=True)
class RemoteLayer:
    """A layer a source can serve without a download."""

    source: str  # the source's name, stored with the snapshot so Mounts can ask the same source
    digest: str  # compressed layer digest, sha256:...
    labels: Mapping[str, str] = field(default_factory=dict)  # extra labels to store on the snapshot


@dataclass(frozen=True)
class SourceHealth:
    """One observation of a source: usable now, and if not why (for logs and errors)."""

    available: bool
    reason: str = ""


@dataclass(frozen=True)
class SourceContext:
    """What the registry gives each source: its own node-local state dir and its own stuck-call budget."""

    name: str
    state_dir: Path
    budget: CallBudget


class LayerSource(Protocol):
    """See the module doc for when the core calls what."""

    name: str

    def lookup(self, request: LayerRequest) -> RemoteLayer | None: ...

    def mount_dirs(self, request: LayerRequest) -> list[Path]: ...

    def check(self, request: LayerRequest) -> None: ...

    def release(self, digest: str) -> None: ...

    def held(self) -> list[str]:
        """Digests of the layers the source keeps node-local state for (Cleanup releases the unused ones)."""
        ...

    def state_paths(self, digest: str) -> list[Path]:
        """The node-local paths of a layer's state that mounts may use: the core never releases a layer while a
        mount in /proc/self/mountinfo uses one of them."""
        ...

    def restore(self, requests: Sequence[LayerRequest]) -> None: ...

    def health(self) -> SourceHealth: ...
