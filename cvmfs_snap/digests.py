"""The sha256 digest form every untrusted digest is checked against, spelt once (imports nothing but ``re``).

Always ``fullmatch``: ``$`` would accept a trailing newline. :func:`cvmfs_snap.layout.digest_hex` (the gate to
repository paths, with errors a site admin can act on) and :func:`cvmfs_snap.oci.reference.validate_digest` (any
algorithm a registry may use) build on it or on the same rule.
"""

from __future__ import annotations

import re

SHA256_PREFIX = "sha256:"
#: the hex part of a sha256 digest: 64 lower-case hex digits
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def is_sha256(digest: object) -> bool:
    """``sha256:<64 lower-case hex digits>``, nothing before or after."""
    return (isinstance(digest, str) and digest.startswith(SHA256_PREFIX)
            and SHA256_HEX.fullmatch(digest, len(SHA256_PREFIX)) is not None)
