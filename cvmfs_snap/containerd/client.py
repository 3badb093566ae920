"""A small typed client of containerd's own gRPC API (content, images, leases, snapshots, diff).

Why our own and not ``ctr``: ``cvmfs-snap pull`` must pass the CRI snapshot labels to the snapshotter's Prepare and
react to its ``AlreadyExists`` (the layer is served remotely from CVMFS) exactly like containerd's unpacker does; no
CLI exposes that. This module only converts between Python values and containerd's messages, adds the namespace and
lease metadata containerd expects on every call, and maps gRPC status codes to :mod:`cvmfs_snap.errors` kinds. The
pull logic lives in :mod:`cvmfs_snap.containerd.unpack`.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import queue
import secrets
import stat
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from google.protobuf import field_mask_pb2

from cvmfs_snap.api.gen.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from cvmfs_snap.api.gen.containerd.services.diff.v1 import diff_pb2, diff_pb2_grpc
from cvmfs_snap.api.gen.containerd.services.images.v1 import images_pb2, images_pb2_grpc
from cvmfs_snap.api.gen.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc
from cvmfs_snap.api.gen.containerd.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc
from cvmfs_snap.api.gen.containerd.types import descriptor_pb2, mount_pb2
from cvmfs_snap.errors import (
    AlreadyExistsError,
    CvmfsSnapError,
    FailedPreconditionError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    UnavailableError,
)
from cvmfs_snap.labelnames import GC_EXPIRE
from cvmfs_snap.oci.manifest import Descriptor

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
DEFAULT_NAMESPACE = "default"
#: gRPC metadata keys containerd reads (see containerd's namespaces and leases packages)
NAMESPACE_HEADER = "containerd-namespace"
LEASE_HEADER = "containerd-lease"
#: containerd's default gRPC message limit is 16 MiB; stay far below it
WRITE_CHUNK = 1 << 20
#: content writes sent ahead of containerd's answers (bounded memory: WRITE_WINDOW * WRITE_CHUNK)
WRITE_WINDOW = 4


def descriptor_to_pb(desc: Descriptor) -> descriptor_pb2.Descriptor:
    """A content descriptor as containerd's API carries it (no platform: containerd keeps that in the index)."""
    return descriptor_pb2.Descriptor(media_type=desc.media_type, digest=desc.digest, size=desc.size,
                                     annotations=dict(desc.annotations))


def descriptor_from_pb(pb: descriptor_pb2.Descriptor) -> Descriptor:
    return Descriptor(pb.media_type, pb.digest, pb.size, dict(pb.annotations))


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    target: str = ""
    options: tuple[str, ...] = ()

    def to_pb(self) -> mount_pb2.Mount:
        return mount_pb2.Mount(type=self.type, source=self.source, target=self.target, options=list(self.options))

    @classmethod
    def from_pb(cls, pb: mount_pb2.Mount) -> Mount:
        return cls(pb.type, pb.source, pb.target, tuple(pb.options))


@dataclass(frozen=True)
class SnapshotInfo:
    name: str
    parent: str
    kind: int  # snapshots_pb2.Kind: VIEW=1, ACTIVE=2, COMMITTED=3
    labels: Mapping[str, str]


@dataclass(frozen=True)
class ContentInfo:
    digest: str
    size: int
    labels: Mapping[str, str]


@dataclass(frozen=True)
class ImageRecord:
    name: str
    target: Descriptor
    labels: Mapping[str, str]


#: blob data for :meth:`ContainerdClient.write_content`: the chunks, or a function opening them
ChunkSource = Iterable[bytes] | Callable[[], AbstractContextManager[Iterable[bytes]]]

_CODE_TO_ERROR: dict[grpc.StatusCode, type[CvmfsSnapError]] = {
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInputError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: UnavailableError,
    grpc.StatusCode.DATA_LOSS: IntegrityError,
}


def grpc_code(exc: BaseException) -> grpc.StatusCode | None:
    """The status code of a gRPC error, None for anything else."""
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        code = exc.code()
        return code if isinstance(code, grpc.StatusCode) else None
    return None


def grpc_details(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "details"):
        return str(exc.details() or "")
    return str(exc)


def raise_from_grpc(exc: grpc.RpcError, what: str) -> NoReturn:
    """Re-raise a gRPC error from containerd as the matching cvmfs-snap error kind; ``what`` says what we tried."""
    code = grpc_code(exc)
    kind = _CODE_TO_ERROR.get(code, CvmfsSnapError) if code is not None else CvmfsSnapError
    name = code.name if code is not None else "error"
    raise kind(f"containerd: {what}: {grpc_details(exc)} ({name})") from exc


class ContainerdClient:
    """Connection to one containerd daemon in one namespace.

    ``lease`` (set by :meth:`lease`) is sent with every call so that content and snapshots created meanwhile are
    protected from containerd's garbage collector until the lease is deleted.
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, namespace: str = DEFAULT_NAMESPACE,
                 timeout: float = 10.0) -> None:
        self.address = address
        self.namespace = namespace
        self.lease_id: str | None = None
        self._check_socket(address)
        self.channel = grpc.insecure_channel(
            f"unix://{os.path.abspath(address)}",
            options=[("grpc.max_receive_message_length", 16 << 20), ("grpc.max_send_message_length", 16 << 20)],
        )
        # No channel_ready_future here: its connectivity-polling thread makes close() wait ~0.2 s, most of a
        # remote-layer pull. A dead socket surfaces on the first call instead (see _call).
        self.timeout = timeout  # deadline of the first call (creating the lease)
        self.content = content_pb2_grpc.ContentStub(self.channel)
        self.images = images_pb2_grpc.ImagesStub(self.channel)
        self.leases = leases_pb2_grpc.LeasesStub(self.channel)
        self.snapshots = snapshots_pb2_grpc.SnapshotsStub(self.channel)
        self.diff = diff_pb2_grpc.DiffStub(self.channel)

    @staticmethod
    def _check_socket(address: str) -> None:
        try:
            st = os.stat(address)
        except FileNotFoundError:
            raise UnavailableError(
                f"containerd is not running at {address}: the socket does not exist. Start containerd "
                "(systemctl start containerd) or pass --address with its gRPC socket") from None
        except PermissionError:
            raise UnavailableError(
                f"no permission to reach containerd at {address}: run as root or as a user allowed to use "
                "the socket") from None
        if not stat.S_ISSOCK(st.st_mode):
            raise InvalidInputError(f"{address} is not a unix socket: pass --address with containerd's gRPC socket")

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> ContainerdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing -----------------------------------------------------------------------------------------------

    def metadata(self) -> list[tuple[str, str]]:
        md = [(NAMESPACE_HEADER, self.namespace)]
        if self.lease_id:
            md.append((LEASE_HEADER, self.lease_id))
        return md

    def _call(self, method: Any, request: Any, what: str, timeout: float | None = 120.0) -> Any:
        try:
            return method(request, metadata=self.metadata(), timeout=timeout)
        except grpc.RpcError as exc:
            if grpc_code(exc) == grpc.StatusCode.UNAVAILABLE and \
                    "failed to connect to all addresses" in grpc_details(exc).lower():
                raise UnavailableError(
                    f"containerd is not answering at {self.address} ({what}: {grpc_details(exc)}): check that "
                    "containerd is running (systemctl status containerd) and that --address names its gRPC socket"
                ) from exc
            raise_from_grpc(exc, what)

    # -- leases -------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lease(self, expire_after: float = 24 * 3600) -> Iterator[str]:
        """Create a lease (like containerd's client.WithLease) and send it on every call until the block ends;
        then delete it, which hands the content/snapshots to the image record's GC references."""
        expire = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=expire_after)
        lease_id = f"cvmfs-snap-pull-{secrets.token_hex(8)}"
        resp = self._call(self.leases.Create, leases_pb2.CreateRequest(
            id=lease_id, labels={GC_EXPIRE: expire.strftime("%Y-%m-%dT%H:%M:%SZ")}), "create lease",
            timeout=self.timeout)  # the first call of a pull: a hung containerd fails here, within --timeout
        self.lease_id = resp.lease.id
        try:
            yield self.lease_id
        finally:
            lid, self.lease_id = self.lease_id, None
            try:
                self._call(self.leases.Delete, leases_pb2.DeleteRequest(id=lid), f"delete lease {lid}")
            except CvmfsSnapError as exc:  # the expire label collects it later
                log.warning("could not delete lease %s (it expires by itself): %s", lid, exc)

    # -- content ------------------------------------------------------------------------------------------------

    def content_info(self, digest: str) -> ContentInfo | None:
        """Info of a blob in the content store, None if absent."""
        try:
            resp = self._call(self.content.Info, content_pb2.InfoRequest(digest=digest), f"content info {digest}")
        except NotFoundError:
            return None
        return ContentInfo(resp.info.digest, resp.info.size, dict(resp.info.labels))

    def list_content(self) -> list[ContentInfo]:
        out: list[ContentInfo] = []
        try:
            for resp in self.content.List(content_pb2.ListContentRequest(), metadata=self.metadata(), timeout=60):
                out += [ContentInfo(i.digest, i.size, dict(i.labels)) for i in resp.info]
        except grpc.RpcError as exc:
            raise_from_grpc(exc, "list content")
        return out

    def update_content_labels(self, digest: str, labels: Mapping[str, str]) -> None:
        """Set (only) the given labels on a blob, leaving its other labels alone."""
        if not labels:
            return
        req = content_pb2.UpdateRequest(
            info=content_pb2.Info(digest=digest, labels=dict(labels)),
            update_mask=field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels]),
        )
        self._call(self.content.Update, req, f"label content {digest}")

    def read_content(self, digest: str) -> bytes:
        chunks: list[bytes] = []
        try:
            for resp in self.content.Read(content_pb2.ReadContentRequest(digest=digest), metadata=self.metadata(),
                                          timeout=120):
                chunks.append(resp.data)
        except grpc.RpcError as exc:
            raise_from_grpc(exc, f"read content {digest}")
        return b"".join(chunks)

    def write_content(self, ref: str, desc: Descriptor, chunks: ChunkSource,
                      labels: Mapping[str, str] | None = None, lock_wait: float = 60.0) -> bool:
        """Stream a blob into the content store with containerd's Write protocol and commit it, verified against
        ``desc`` (containerd checks size and digest at commit). Returns False when the blob was already there.

        ``chunks`` is the data, or a function opening it (a context manager of chunks), called only once containerd
        has said it does not have the blob: with containerd's shared content policy a blob pulled in another
        namespace is taken from there, and the registry must not even be asked. ``ref`` is the ingest name
        (containerd uses ``layer-<digest>`` etc.); a concurrent writer of the same ref is waited for up to
        ``lock_wait`` seconds."""
        deadline = time.monotonic() + lock_wait
        delay = 0.1
        retried_complete = False
        while True:
            session = _WriteSession(self, ref)
            try:
                try:
                    stat_resp = session.send(content_pb2.WriteContentRequest(
                        action=content_pb2.STAT, ref=ref, total=desc.size, expected=desc.digest))
                except grpc.RpcError as exc:
                    code = grpc_code(exc)
                    if code == grpc.StatusCode.ALREADY_EXISTS:
                        return False
                    if code == grpc.StatusCode.UNAVAILABLE and "locked" in grpc_details(exc) \
                            and time.monotonic() < deadline:
                        log.debug("content ingest %s is locked by another writer; waiting", ref)
                        time.sleep(delay)
                        delay = min(delay * 2, 2.0)
                        continue
                    raise_from_grpc(exc, f"open content writer {ref}")
                if desc.size > 0 and stat_resp.offset == desc.size and not retried_complete:
                    # containerd has the data already (blob of another namespace under the shared content
                    # policy, or a finished ingest): commit it as containerd's fetch does, verified by digest
                    if self._commit_existing(session, desc, labels):
                        return False
                    retried_complete = True  # it did not verify: start over, writing from offset 0
                    self.abort_ingest(ref)
                    continue
                try:
                    if callable(chunks):
                        with chunks() as opened:
                            return self._stream(session, desc, opened, labels)
                    return self._stream(session, desc, chunks, labels)
                except BaseException:
                    # we own the ingest: drop the partial data (a retry starts at offset 0 anyway)
                    session.close()
                    self.abort_ingest(ref)
                    raise
            finally:
                session.close()

    @staticmethod
    def _commit_existing(session: _WriteSession, desc: Descriptor, labels: Mapping[str, str] | None) -> bool:
        """Commit an ingest that already holds all of ``desc``'s bytes; False if containerd refuses them."""
        try:
            session.send(content_pb2.WriteContentRequest(
                action=content_pb2.COMMIT, offset=desc.size, total=desc.size, expected=desc.digest,
                labels=dict(labels or {})))
        except grpc.RpcError as exc:
            if grpc_code(exc) == grpc.StatusCode.ALREADY_EXISTS:
                return True
            log.warning("content ingest for %s looked complete but did not commit (%s); downloading it again",
                        desc.digest, grpc_details(exc))
            return False
        return True

    @staticmethod
    def _stream(session: _WriteSession, desc: Descriptor, chunks: Iterable[bytes],
                labels: Mapping[str, str] | None) -> bool:
        """Send the data with up to WRITE_WINDOW writes in flight (containerd answers each in order), so reading
        the registry and containerd's disk writes overlap; then commit."""
        offset = 0
        pending: deque[int] = deque()  # the offset containerd must report after each outstanding write

        def settle(limit: int) -> None:
            while len(pending) > limit:
                expect = pending.popleft()
                resp = session.receive()
                if resp.offset != expect:
                    raise IntegrityError(f"containerd is at offset {resp.offset} of {desc.digest}, expected {expect}")

        try:
            for chunk in _rechunk(chunks, WRITE_CHUNK):
                session.submit(content_pb2.WriteContentRequest(action=content_pb2.WRITE, offset=offset, data=chunk))
                offset += len(chunk)
                pending.append(offset)
                settle(WRITE_WINDOW)
            settle(0)
            if offset != desc.size:
                raise IntegrityError(f"blob {desc.digest} has {offset} bytes, its descriptor says {desc.size}: "
                                     "the registry sent truncated or wrong content")
            resp = session.send(content_pb2.WriteContentRequest(
                action=content_pb2.COMMIT, offset=offset, total=desc.size, expected=desc.digest,
                labels=dict(labels or {})))
        except grpc.RpcError as exc:
            code = grpc_code(exc)
            if code == grpc.StatusCode.ALREADY_EXISTS:
                return False
            if code == grpc.StatusCode.FAILED_PRECONDITION:
                raise IntegrityError(f"containerd refused blob {desc.digest}: {grpc_details(exc)}: the registry "
                                     "sent content that does not match its digest") from exc
            raise_from_grpc(exc, f"write content {desc.digest}")
        if resp.digest and resp.digest != desc.digest:
            raise IntegrityError(f"containerd committed {resp.digest}, expected {desc.digest}")
        return True

    def abort_ingest(self, ref: str) -> None:
        with contextlib.suppress(CvmfsSnapError):
            self._call(self.content.Abort, content_pb2.AbortRequest(ref=ref), f"abort ingest {ref}")

    # -- snapshots ----------------------------------------------------------------------------------------------

    def snapshot_stat(self, snapshotter: str, key: str) -> SnapshotInfo | None:
        try:
            resp = self._call(self.snapshots.Stat, snapshots_pb2.StatSnapshotRequest(snapshotter=snapshotter,
                                                                                     key=key),
                              f"stat snapshot {key} on snapshotter {snapshotter}")
        except NotFoundError:
            return None
        i = resp.info
        return SnapshotInfo(i.name, i.parent, int(i.kind), dict(i.labels))

    def list_snapshots(self, snapshotter: str) -> list[SnapshotInfo]:
        out: list[SnapshotInfo] = []
        try:
            for resp in self.snapshots.List(snapshots_pb2.ListSnapshotsRequest(snapshotter=snapshotter),
                                            metadata=self.metadata(), timeout=60):
                out += [SnapshotInfo(i.name, i.parent, int(i.kind), dict(i.labels)) for i in resp.info]
        except grpc.RpcError as exc:
            raise_from_grpc(exc, f"list snapshots of snapshotter {snapshotter}")
        return out

    def prepare(self, snapshotter: str, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        resp = self._call(self.snapshots.Prepare, snapshots_pb2.PrepareSnapshotRequest(
            snapshotter=snapshotter, key=key, parent=parent, labels=dict(labels)),
            f"prepare snapshot {key!r} (parent {parent or 'none'}) on snapshotter {snapshotter}")
        return [Mount.from_pb(m) for m in resp.mounts]

    def commit(self, snapshotter: str, name: str, key: str, labels: Mapping[str, str]) -> None:
        self._call(self.snapshots.Commit, snapshots_pb2.CommitSnapshotRequest(
            snapshotter=snapshotter, name=name, key=key, labels=dict(labels)),
            f"commit snapshot {key!r} as {name} on snapshotter {snapshotter}")

    def remove_snapshot(self, snapshotter: str, key: str) -> None:
        self._call(self.snapshots.Remove, snapshots_pb2.RemoveSnapshotRequest(snapshotter=snapshotter, key=key),
                   f"remove snapshot {key!r} on snapshotter {snapshotter}")

    # -- diff ---------------------------------------------------------------------------------------------------

    def apply(self, desc: Descriptor, mounts: list[Mount]) -> Descriptor:
        """Let containerd decompress and apply a layer blob (already in its content store) onto ``mounts``;
        returns the uncompressed descriptor (its digest is the layer's diffID)."""
        resp = self._call(self.diff.Apply, diff_pb2.ApplyRequest(diff=descriptor_to_pb(desc),
                                                                 mounts=[m.to_pb() for m in mounts]),
                          f"apply layer {desc.digest}", timeout=3600)
        return descriptor_from_pb(resp.applied)

    # -- images -------------------------------------------------------------------------------------------------

    def get_image(self, name: str) -> ImageRecord | None:
        try:
            resp = self._call(self.images.Get, images_pb2.GetImageRequest(name=name), f"get image {name}")
        except NotFoundError:
            return None
        im = resp.image
        return ImageRecord(im.name, descriptor_from_pb(im.target), dict(im.labels))

    def list_images(self, *filters: str) -> list[ImageRecord]:
        resp = self._call(self.images.List, images_pb2.ListImagesRequest(filters=list(filters)), "list images")
        return [ImageRecord(im.name, descriptor_from_pb(im.target), dict(im.labels)) for im in resp.images]

    def put_image(self, name: str, target: Descriptor, labels: Mapping[str, str] | None = None) -> ImageRecord:
        """Create the image record, or point an existing one at ``target`` (like containerd's createNewImage)."""
        image = images_pb2.Image(name=name, target=descriptor_to_pb(target), labels=dict(labels or {}))
        for _ in range(3):
            try:
                resp = self._call(self.images.Create, images_pb2.CreateImageRequest(image=image),
                                  f"create image {name}")
            except AlreadyExistsError:
                try:
                    resp = self._call(self.images.Update, images_pb2.UpdateImageRequest(image=image),
                                      f"update image {name}")
                except NotFoundError:  # deleted in between: create again
                    continue
            im = resp.image
            return ImageRecord(im.name, descriptor_from_pb(im.target), dict(im.labels))
        raise FailedPreconditionError(f"image {name} keeps disappearing while it is recorded: is another client "
                                      "deleting it? Retry the pull")


def _rechunk(chunks: Iterable[bytes], size: int) -> Iterator[bytes]:
    """Pieces of exactly ``size`` bytes (the last may be shorter), never empty: registry streams come in small
    reads, and every Write message costs containerd a round trip, so they are coalesced; gRPC messages must also
    stay well below containerd's 16 MiB limit."""
    buf = bytearray()
    for chunk in chunks:
        buf += chunk
        while len(buf) >= size:
            yield bytes(buf[:size])
            del buf[:size]
    if buf:
        yield bytes(buf)


class _WriteSession:
    """One content Write stream driven in lock-step: containerd answers every request with one response."""

    _END = object()

    def __init__(self, client: ContainerdClient, ref: str) -> None:
        self.ref = ref
        self._closed = False
        self._q: queue.Queue[object] = queue.Queue()
        self._responses = client.content.Write(self._requests(), metadata=client.metadata(), timeout=3600)

    def _requests(self) -> Iterator[content_pb2.WriteContentRequest]:
        while True:
            item = self._q.get()
            if item is self._END:
                return
            assert isinstance(item, content_pb2.WriteContentRequest)
            yield item

    def submit(self, req: content_pb2.WriteContentRequest) -> None:
        """Queue a request without waiting for its response (see :meth:`receive`)."""
        self._q.put(req)

    def receive(self) -> content_pb2.WriteContentResponse:
        """The next response, in request order."""
        try:
            resp = next(self._responses)
        except StopIteration:
            raise UnavailableError(f"containerd closed the content write stream for {self.ref} early") from None
        assert isinstance(resp, content_pb2.WriteContentResponse)
        return resp

    def send(self, req: content_pb2.WriteContentRequest) -> content_pb2.WriteContentResponse:
        self.submit(req)
        return self.receive()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._q.put(self._END)
            self._responses.cancel()
