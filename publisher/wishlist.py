"""What the expanded recipe names (and the publish-on-miss allow-list keeps): the input that schedules images
dropped from the recipe for removal. Built by ``gc --recipe`` (:mod:`publisher.gccommand`) and by the daemon."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from cvmfs_snap.oci import ImageReference
from publisher.inventory import image_name_of
from publisher.policy import allowed_by

#: (registry, repository) -> wanted although the recipe does not name it
KeepFn = Callable[[str, str], bool]


@dataclass
class Wishlist:
    """What the expanded recipe names, and whether it may be trusted to schedule removals.

    ``problems`` (recipe unreadable, a line that did not parse or expand) make scheduling all or nothing: an image
    the recipe names is still unscheduled, but nothing new is scheduled and no dropped image is removed."""

    names: set[str]
    problems: list[str] = field(default_factory=list)
    #: (registry, repository) -> also wanted although not in the recipe (the publish-on-miss allow-list)
    keep: KeepFn | None = None

    @classmethod
    def from_refs(cls, refs: Iterable[ImageReference | str], problems: Iterable[str] = (),
                  keep: KeepFn | None = None) -> Wishlist:
        names = {n for n in (image_name_of(r) for r in refs) if n is not None}
        return cls(names, list(problems), keep)

    def wants(self, registry: str, repository: str, tag: str) -> bool:
        if f"{registry}/{repository}:{tag}" in self.names:
            return True
        return self.keep is not None and self.keep(registry, repository)


def publish_on_miss_keep(allow: Iterable[str] | None) -> KeepFn | None:
    """Images the publish-on-miss allow-list (``daemon.publish_on_miss_allow``) admits are wanted by nodes, not
    by the recipe: they are never scheduled (else they would go, be missed, be published again, go again...)."""
    globs = list(allow or [])
    if not globs:
        return None
    return lambda registry, repository: allowed_by(globs, ImageReference(registry, repository, "latest"))


__all__ = ["KeepFn", "Wishlist", "publish_on_miss_keep"]
