"""The gRPC servicer of ``containerd.services.snapshots.v1.Snapshots`` over the snapshot core.

It only converts messages and maps errors: containerd's proxy client turns gRPC codes back into its errdefs
(NotFound, AlreadyExists, FailedPrecondition, InvalidArgument, Unavailable), and containerd relies on them (an
AlreadyExists from Prepare means "a remote snapshot is ready"). Any :class:`CvmfsSnapError` of another kind becomes
UNKNOWN with its message; an unexpected exception is logged with its traceback and answered INTERNAL.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2

from ..api.gen.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from ..api.gen.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from ..api.gen.containerd.types import mount_pb2
from ..errors import (
    AlreadyExistsError,
    CvmfsSnapError,
    FailedPreconditionError,
    InvalidInputError,
    NotFoundError,
    UnavailableError,
)
from .core import Info, Mount, Snapshotter
from .metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")

#: snapshots per List response message (containerd's own service batches too)
LIST_BATCH = 100

_KIND_TO_PB = {"view": pb.VIEW, "active": pb.ACTIVE, "committed": pb.COMMITTED}
_CODES: list[tuple[type[CvmfsSnapError], grpc.StatusCode]] = [
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
]


_LOG_LEVEL = {
    grpc.StatusCode.NOT_FOUND: logging.DEBUG,
    grpc.StatusCode.ALREADY_EXISTS: logging.DEBUG,
    grpc.StatusCode.FAILED_PRECONDITION: logging.INFO,
    grpc.StatusCode.INVALID_ARGUMENT: logging.INFO,
}


def status_code(exc: CvmfsSnapError) -> grpc.StatusCode:
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.UNKNOWN


def mounts_to_pb(mounts: list[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options)) for m in mounts]


def info_to_pb(info: Info) -> pb.Info:
    msg = pb.Info(name=info.name, parent=info.parent, kind=_KIND_TO_PB[info.kind], labels=info.labels)
    msg.created_at.FromNanoseconds(info.created)
    msg.updated_at.FromNanoseconds(info.updated)
    return msg


def info_from_pb(msg: pb.Info) -> Info:
    return Info(name=msg.name, parent=msg.parent, kind="", created=0, updated=0, labels=dict(msg.labels))


class SnapshotsServicer(pb_grpc.SnapshotsServicer):
    def __init__(self, core: Snapshotter, metrics: Metrics | None = None) -> None:
        self.core = core
        self.metrics = metrics

    def _call(self, rpc: str, context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
        start = time.monotonic()
        code: grpc.StatusCode | None = None
        message = ""
        try:
            return fn()
        except CvmfsSnapError as exc:
            code, message = status_code(exc), str(exc)
            # answers about the caller's request are routine (containerd probes with Stat, GC removes parents
            # before children); failures of ours are what an admin must see
            level = _LOG_LEVEL.get(code, logging.WARNING)
            log.log(level, "%s: %s: %s", rpc, code.name, message)
        except Exception as exc:
            log.exception("%s failed unexpectedly", rpc)
            code, message = grpc.StatusCode.INTERNAL, f"internal error in cvmfs-snap snapshotter {rpc}: {exc}"
        finally:
            if self.metrics is not None:
                self.metrics.observe(rpc, time.monotonic() - start)
                if code is not None:
                    self.metrics.error(rpc, code.name)
        context.abort(code, message)
        raise AssertionError("unreachable")  # abort raises

    def Prepare(self, request: pb.PrepareSnapshotRequest, context: grpc.ServicerContext) -> Any:
        return self._call("Prepare", context, lambda: pb.PrepareSnapshotResponse(
            mounts=mounts_to_pb(self.core.prepare(request.key, request.parent, dict(request.labels)))))

    def View(self, request: pb.ViewSnapshotRequest, context: grpc.ServicerContext) -> Any:
        return self._call("View", context, lambda: pb.ViewSnapshotResponse(
            mounts=mounts_to_pb(self.core.view(request.key, request.parent, dict(request.labels)))))

    def Mounts(self, request: pb.MountsRequest, context: grpc.ServicerContext) -> Any:
        return self._call("Mounts", context, lambda: pb.MountsResponse(
            mounts=mounts_to_pb(self.core.mounts(request.key))))

    def Commit(self, request: pb.CommitSnapshotRequest, context: grpc.ServicerContext) -> Any:
        def do() -> empty_pb2.Empty:
            self.core.commit(request.name, request.key, dict(request.labels))
            return empty_pb2.Empty()

        return self._call("Commit", context, do)

    def Remove(self, request: pb.RemoveSnapshotRequest, context: grpc.ServicerContext) -> Any:
        def do() -> empty_pb2.Empty:
            self.core.remove(request.key)
            return empty_pb2.Empty()

        return self._call("Remove", context, do)

    def Stat(self, request: pb.StatSnapshotRequest, context: grpc.ServicerContext) -> Any:
        return self._call("Stat", context, lambda: pb.StatSnapshotResponse(
            info=info_to_pb(self.core.stat(request.key))))

    def Update(self, request: pb.UpdateSnapshotRequest, context: grpc.ServicerContext) -> Any:
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        return self._call("Update", context, lambda: pb.UpdateSnapshotResponse(
            info=info_to_pb(self.core.update(info_from_pb(request.info), paths))))

    def List(self, request: pb.ListSnapshotsRequest, context: grpc.ServicerContext) -> Iterator[Any]:
        infos = self._call("List", context, lambda: self.core.walk(list(request.filters)))
        for i in range(0, len(infos), LIST_BATCH):
            yield pb.ListSnapshotsResponse(info=[info_to_pb(x) for x in infos[i : i + LIST_BATCH]])

    def Usage(self, request: pb.UsageRequest, context: grpc.ServicerContext) -> Any:
        def do() -> pb.UsageResponse:
            u = self.core.usage(request.key)
            return pb.UsageResponse(size=u.size, inodes=u.inodes)

        return self._call("Usage", context, do)

    def Cleanup(self, request: pb.CleanupRequest, context: grpc.ServicerContext) -> Any:
        def do() -> empty_pb2.Empty:
            self.core.cleanup()
            return empty_pb2.Empty()

        return self._call("Cleanup", context, do)


def add_to_server(server: grpc.Server, core: Snapshotter, metrics: Metrics | None = None) -> SnapshotsServicer:
    servicer = SnapshotsServicer(core, metrics)
    pb_grpc.add_SnapshotsServicer_to_server(servicer, server)
    return servicer
