"""The one exception family of cvmfs-snap.

Every error raised on purpose by cvmfs-snap is a :class:`CvmfsSnapError`. The subclasses say what *kind* of problem it
is, so that the gRPC layer can map them to the codes containerd's errdefs expects and the CLIs to exit statuses.
Messages are written for a site admin: say what failed, on what (image, layer digest, path), and what to do about it.
Never put credentials in a message.
"""

from __future__ import annotations


class CvmfsSnapError(Exception):
    """Base of every error cvmfs-snap raises on purpose."""

    #: exit status a CLI uses when this error ends it
    exit_code = 1


class NotFoundError(CvmfsSnapError):
    """Something asked for does not exist (image, tag, blob, snapshot, layer in the repository)."""


class AlreadyExistsError(CvmfsSnapError):
    """Something to be created exists already (snapshot key, published layer)."""


class InvalidInputError(CvmfsSnapError):
    """Input is malformed: image reference, recipe, manifest, label, configuration."""

    exit_code = 2


class FailedPreconditionError(CvmfsSnapError):
    """The operation is not allowed in the current state (e.g. removing a snapshot that has children)."""


class UnavailableError(CvmfsSnapError):
    """A service we depend on cannot be reached now (registry, CVMFS repository, containerd); retrying may help."""


class IntegrityError(CvmfsSnapError):
    """Content does not match its digest or its table of contents: tampered, truncated or corrupted data."""


class AuthError(CvmfsSnapError):
    """A registry refused our credentials, or needs credentials we do not have."""


class UnsafeLayerError(InvalidInputError):
    """A layer tar tries something hostile or unsupported (path traversal, symlink escape, device tricks, limits)."""


class CommandError(CvmfsSnapError):
    """An external command (``cvmfs_server``, ``mount``) failed."""
