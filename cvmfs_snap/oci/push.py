"""Pushing to a registry: blobs (streamed in chunks, or mounted from another repository) and manifests.

Built on :class:`~cvmfs_snap.oci.session.Session`, the client's one request path (auth with a ``pull,push`` scope,
credentials never sent to another origin, plain HTTP only to hosts configured insecure, retries, deadlines).
Uploads follow the distribution spec's chunked flow (``POST``, ``PATCH``es, ``PUT ?digest=``) so a layer of any size
streams through bounded memory; its digest is only needed at the end, when the whole blob has been written.
"""

from __future__ import annotations

import logging

import httpx

from cvmfs_snap.errors import InvalidInputError, NotFoundError
from cvmfs_snap.oci.client import RegistryClient
from cvmfs_snap.oci.manifest import compute_digest
from cvmfs_snap.oci.reference import ImageReference, validate_digest

log = logging.getLogger(__name__)

#: bytes sent per PATCH of a streamed upload
UPLOAD_CHUNK = 8 << 20


PUSH = "pull,push"


class BlobUpload:
    """A blob upload in progress: ``write`` bytes, then ``commit(digest)``; ``abort`` drops it."""

    def __init__(self, pusher: Pusher, ref: ImageReference, location: str, chunk_size: int = UPLOAD_CHUNK) -> None:
        self._p = pusher
        self._ref = ref
        self._location = location
        self._chunk = chunk_size
        self._buf = bytearray()
        self.size = 0
        self._done = False

    def write(self, data: bytes) -> int:
        self._buf += data
        self.size += len(data)
        while len(self._buf) >= self._chunk:
            with memoryview(self._buf) as mv:
                piece = bytes(mv[: self._chunk])
            self._patch(piece)
            del self._buf[: self._chunk]
        return len(data)

    def _patch(self, data: bytes) -> None:
        start = self.size - len(self._buf)
        what = f"upload to {self._ref.name}"
        resp = self._p.session.request(
            self._ref, "PATCH", self._location, what, ok=(202, 204),
            headers={"Content-Type": "application/octet-stream", "Content-Range": f"{start}-{start + len(data) - 1}",
                     "Content-Length": str(len(data))},
            deadline=self._p.session.deadline(self._ref, what, len(data)), content=data, actions=PUSH,
        )
        resp.close()
        self._location = self._p._next_location(resp, self._location)

    def commit(self, digest: str) -> str:
        """Finish the upload as ``digest``; the registry checks the digest and refuses a mismatch."""
        validate_digest(digest)
        data = bytes(self._buf)
        self._buf.clear()
        url = httpx.URL(self._location)
        url = url.copy_merge_params({"digest": digest})
        what = f"blob {digest} of {self._ref.name}"
        resp = self._p.session.request(
            self._ref, "PUT", url, what, ok=(201, 204),
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(data))},
            deadline=self._p.session.deadline(self._ref, what, len(data)), content=data, actions=PUSH,
        )
        resp.close()
        self._done = True
        return digest

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            self._p.session.request(self._ref, "DELETE", self._location, f"upload to {self._ref.name}",
                                    ok=(200, 202, 204, 404), actions=PUSH).close()
        except Exception as e:  # best effort: the registry expires abandoned uploads itself
            log.debug("cancelling an upload to %s failed: %s", self._ref.name, e)


class Pusher:
    """Blob and manifest pushes to the repository of ``ref`` (any tag/digest in ``ref`` is ignored for blobs)."""

    def __init__(self, client: RegistryClient) -> None:
        self.client = client
        self.session = client.session

    @staticmethod
    def _next_location(resp: httpx.Response, current: str) -> str:
        loc = resp.headers.get("location")
        if not loc:
            return current
        return str(resp.url.join(loc))

    def blob_exists(self, ref: ImageReference, digest: str) -> bool:
        validate_digest(digest)
        try:
            self.session.request(ref, "HEAD", self.session.url(ref, f"blobs/{digest}"), f"blob {digest}",
                                 actions=PUSH).close()
        except NotFoundError:
            return False
        return True

    def start_upload(self, ref: ImageReference, chunk_size: int = UPLOAD_CHUNK) -> BlobUpload:
        resp = self.session.request(ref, "POST", self.session.url(ref, "blobs/uploads/"),
                                    f"new upload to {ref.name}", ok=(202,), actions=PUSH,
                                    headers={"Content-Length": "0"})
        resp.close()
        if "location" not in resp.headers:
            raise InvalidInputError(f"registry {ref.api_host} started an upload without a Location header")
        return BlobUpload(self, ref, str(resp.url.join(resp.headers["location"])), chunk_size)

    def mount(self, ref: ImageReference, digest: str, source: ImageReference) -> bool:
        """Cross-repository mount of ``digest`` from ``source`` (same registry); False if the registry did not."""
        if source.api_host != ref.api_host or source.repository == ref.repository:
            return False
        url = httpx.URL(self.session.url(ref, "blobs/uploads/")).copy_merge_params(
            {"mount": digest, "from": source.repository})
        resp = self.session.request(ref, "POST", url, f"mount of {digest} into {ref.name}", ok=(201, 202),
                                    actions=PUSH, headers={"Content-Length": "0"})
        resp.close()
        if resp.status_code == 201:
            return True
        if "location" in resp.headers:  # an upload was opened instead: drop it
            BlobUpload(self, ref, str(resp.url.join(resp.headers["location"]))).abort()
        return False

    def push_blob(self, ref: ImageReference, data: bytes) -> str:
        """Upload a small blob held in memory (config); skipped if the registry has it."""
        digest = compute_digest(data)
        if self.blob_exists(ref, digest):
            return digest
        up = self.start_upload(ref)
        up.write(data)
        return up.commit(digest)

    def push_manifest(self, ref: ImageReference, body: bytes, media_type: str, reference: str | None = None) -> str:
        """PUT a manifest or index under ``reference`` (default: ``ref``'s tag or digest); returns its digest."""
        digest = compute_digest(body)
        target = reference or ref.reference
        resp = self.session.request(ref, "PUT", self.session.url(ref, f"manifests/{target}"),
                                    f"manifest {target} of {ref.name}", ok=(201, 202, 204),
                                    headers={"Content-Type": media_type}, content=body, actions=PUSH)
        resp.close()
        got = resp.headers.get("docker-content-digest")
        if got and got != digest:
            log.warning("registry %s reports digest %s for a manifest we computed as %s", ref.api_host, got, digest)
        return digest
