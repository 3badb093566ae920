"""Building one image's flat root filesystem while its layers are being published.

Layer k is applied (merged mode, bottom first) as soon as its publish future says it is published and layers < k
are applied, so the flat is ready soon after the last layer; the backend makes it visible only once complete.
Each layer is read back from its published tree (``publisher.layertree``: no second download) when this host can
read it, else from the registry. Should reading or applying a published tree fail, the flat is rebuilt from the
registry alone: a flat must not depend on a tree that may be damaged."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from cvmfs_snap.errors import CvmfsSnapError
from cvmfs_snap.layer.limits import Limits
from cvmfs_snap.oci import Descriptor, ImageReference

from .backends.base import Backend, FlatLayer, FlatOpener, LayerOpener
from .layertree import open_layer_tree
from .platforms import ImagePlatform

log = logging.getLogger(__name__)

#: opens one layer's decoded tar from the registry
RegistryOpener = Callable[[Descriptor], LayerOpener]
#: held while one layer (digest) is applied to the flat, once the callable (which waits for the layer) returned
Claim = Callable[[str, Callable[[], object]], AbstractContextManager[object]]


def build_flat(backend: Backend, ref: ImageReference, p: ImagePlatform, layers: Mapping[str, Future[str]],
               flushed: Future[None], from_registry: RegistryOpener, *, from_tree: bool = True,
               claim: Claim | None = None) -> None:
    """Build and publish the flat tree of ``p`` through ``backend`` as the futures in ``layers`` (digest ->
    publish outcome) complete; an error there aborts the flat. ``flushed`` is done once the image's layers are
    flushed (a batching backend makes them visible then). ``from_tree=False``: every layer from the registry.
    ``claim(digest, ready)`` is held while one layer is applied, once ``ready`` returned (``WorkSlots.after``)."""
    layout = backend.layout
    failed: list[BaseException] = []
    read_from_tree: list[str] = []

    def opener(desc: Descriptor) -> FlatOpener:
        def published() -> None:
            layers[desc.digest].result()  # published (or raises the layer's error: no flat without it)

        @contextmanager
        def slot() -> Iterator[None]:
            with (claim or _unclaimed)(desc.digest, published):
                if layout.is_layer_complete(desc.digest):
                    yield
                    return
            # accepted into a batch: visible once the image's layers are flushed, which needs the slot given back
            flushed.result()
            with (claim or _unclaimed)(desc.digest, _nothing):
                yield

        @contextmanager
        def opened() -> Iterator[FlatLayer]:
            with slot():
                tree = backend.layer_tree(desc.digest) if from_tree else None
                cm: AbstractContextManager[FlatLayer]
                if tree is None:
                    cm = from_registry(desc)()
                else:
                    read_from_tree.append(desc.digest)
                    cm = _tree_opener(tree, desc.digest, not backend.reads_through_cvmfs, backend.limits, failed)()
                with cm as tar:
                    yield tar

        return opened

    log.info("%s: building flat root filesystem %s as its %d layers are published", ref, p.config_digest,
             len(p.manifest.layers))
    try:
        backend.publish_flat(p.config_digest, [opener(d) for d in p.manifest.layers])
        log.debug("%s: flat %s built (%d of %d layers read from the repository, the others from the registry)",
                  ref, p.config_digest, len(read_from_tree), len(p.manifest.layers))
        return
    except (CvmfsSnapError, OSError) as exc:
        if not failed:
            raise
        log.warning("%s: building flat %s from the published layer trees failed (%s); fetching its layers from the "
                    "registry instead", ref, p.config_digest, exc)
    backend.publish_flat(p.config_digest, [from_registry(d) for d in p.manifest.layers])


def _tree_opener(tree: Path, digest: str, user_xattrs: bool, limits: Limits,
                 failed: list[BaseException]) -> FlatOpener:
    @contextmanager
    def opened() -> Iterator[FlatLayer]:
        try:
            with open_layer_tree(tree, user_xattrs=user_xattrs, name=f"layer {digest}", limits=limits) as entries:
                yield entries
        except BaseException as exc:
            failed.append(exc)
            raise

    return opened


def _nothing() -> None:
    pass


@contextmanager
def _unclaimed(digest: str, ready: Callable[[], object]) -> Iterator[None]:
    ready()
    yield
