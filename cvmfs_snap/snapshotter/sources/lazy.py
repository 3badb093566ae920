"""The lazy eStargz layer source: serve a layer CVMFS does not have by mounting it lazily (range reads from the
registry) through the node's one ``cvmfs-snap lazyfs`` process.

When: a Prepare whose labels carry the layer's eStargz TOC digest (``containerd.io/snapshot/stargz/toc.digest``, the
layer annotation containerd's unpacker passes on) and the CRI image reference, and that no earlier source (CVMFS)
serves. The source then

1. makes sure the lazyfs process runs (it is started on first use, in its own session, so that stopping or
   restarting the snapshotter never touches it nor the running containers reading through it);
2. finds the layer's size in the image manifest (``cri.manifest-digest``, digest-verified), which the process reads
   (``resolve``) from the registry endpoints containerd itself would use (``hosts.toml`` under ``hosts-dir``,
   :mod:`cvmfs_snap.oci.hosts`): the registry client lives in the lazyfs process, this daemon imports no HTTP
   client (issue 9's RSS goal, bench/README.md "Resident memory");
3. asks it over its control socket to ``attach`` the layer (the process checks the TOC against the digest, prefetches
   the landmark files up to its bound, and answers the layer's directory under its one FUSE mount), naming the
   image's other eStargz layers (from the manifest: digest, size, TOC digest; only those the
   ``cri.image-layers`` label lists, when it is given), whose footer and TOC the process then fetches in the
   background, so that their own Prepares make no registry request (stargz-snapshotter's pre-resolve);
4. answers a :class:`~.base.RemoteLayer`: the core commits a remote snapshot, containerd never downloads the blob.

``mount_dirs`` asks the process where the layer is (``check``; re-attaching it, and restarting a dead process, when
needed); ``release`` detaches it; ``restore`` (snapshotter start) makes sure the process runs and every layer a
snapshot uses is attached. Anything that fails at Prepare means "pull normally" (the core logs it); nothing here
raises :class:`~.base.HostileLabelsError`.

Node-local state under ``<root>/lazy/`` (this source's state dir): ``layers/<digest hex>.json`` -- what is needed to
attach the layer again (digest, size, TOC digest, image reference; never credentials) -- and the process's own files
(``mnt/``, ``control.sock``, ``state.json``, ``cache/``, ``unpacked/``), its output ``lazyfs.log`` and the pid of the
last process this source started, ``lazyfs.pid``.

Registry credentials come from a ``cvmfs-snap pull --user`` of the image's repository (handed to the snapshotter over
its credentials socket, kept in memory for a while: :mod:`..credentials`), then from the node's docker
``config.json`` (``docker-config``) and the kubelet's; they are sent to the process over its 0600 socket with each
attach and are never logged, stored or put into errors.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cvmfs_snap.errors import (
    CvmfsSnapError,
    InvalidInputError,
    NotFoundError,
    UnavailableError,
)
from cvmfs_snap.labelnames import SNAPSHOT_LAYER_DIGEST, SNAPSHOT_SOURCE, TOC_DIGEST
from cvmfs_snap.layout import digest_hex
from cvmfs_snap.lazyfs import control
from cvmfs_snap.lazyfs.control import CACHE, LAYERS, LOG, MNT, PID, SOCKET, UNPACKED
from cvmfs_snap.oci import ImageReference
from cvmfs_snap.oci.auth import CredentialStore
from cvmfs_snap.oci.hosts import (
    DEFAULT_HOSTS_DIR,
    credentials_for,
    credentials_to_wire,
    endpoints,
    load_credentials,
)

from ..credentials import PullCredentials
from .base import LayerRequest, RemoteLayer, SourceHealth
from .health import CallBudget, call_with_timeout

log = logging.getLogger(__name__)

GIB = 1 << 30
MIB = 1 << 20
#: seconds after a failed start of the lazyfs process during which it is not started again
START_BACKOFF = 60.0
#: image manifests remembered (their layers' sizes and TOC annotations)
MANIFEST_CACHE = 64
#: neighbouring layers named in one attach (the process takes no more)
MAX_NEIGHBOURS = 256


@dataclass(frozen=True)
class LazySettings:
    """``[cvmfs-snap.lazy]`` of the snapshotter's config (parsed and checked by :mod:`..config`)."""

    enabled: bool = True
    cache_dir: str = ""  # "" = <root>/lazy/cache
    cache_size: int = 4 * GIB
    prefetch: bool = True
    prefetch_bound: int = 64 * MIB
    background_fetch: bool = True
    timeout: float = 30.0  # s: one registry or control call (an attach waits for the prefetch up to this)
    hosts_dir: str = str(DEFAULT_HOSTS_DIR)
    docker_config: str = ""  # "" = $DOCKER_CONFIG/config.json or ~/.docker/config.json, if present
    force_single_range: bool = False
    #: the lazyfs process serves its metrics (bytes fetched per layer, cache, fetch latency, background progress)
    #: on this HOST:PORT; "" = off
    metrics_address: str = ""
    #: how long to wait for a freshly started lazyfs process to answer on its socket
    start_timeout: float = 30.0


def layer_id(digest: str) -> str:
    """The layer's directory name under the mount (and its id in the control protocol): the digest's hex."""
    return digest_hex(digest)


class LazyProcess:
    """The node's ``cvmfs-snap lazyfs`` process as the snapshotter sees it: its paths, its control socket, and
    starting it when nobody answers there."""

    def __init__(self, root: Path, settings: LazySettings, command: Sequence[str] | None = None) -> None:
        self.root = Path(root)
        self.settings = settings
        self.mount = self.root / MNT
        self.socket = self.root / SOCKET
        self.command = list(command) if command is not None else self.default_command()
        self._lock = threading.Lock()
        self.started: subprocess.Popen[bytes] | None = None
        self._failed: tuple[str, float] | None = None  # (why, when) of the last failed start

    def default_command(self) -> list[str]:
        s = self.settings
        cmd = [sys.executable, "-m", "cvmfs_snap.cli", "lazyfs", "--root", str(self.root),
               "--cache-dir", s.cache_dir or str(self.root / CACHE), "--cache-size", str(s.cache_size),
               "--prefetch-bound", str(s.prefetch_bound if s.prefetch else 0), "--timeout", str(s.timeout)]
        if not s.background_fetch:
            cmd.append("--no-background-fetch")
        if s.force_single_range:
            cmd.append("--force-single-range")
        if s.metrics_address:
            cmd += ["--metrics-address", s.metrics_address]
        return cmd

    def call(self, request: Mapping[str, Any], timeout: float | None = None) -> dict[str, Any]:
        return control.call(self.socket, request, timeout or self.settings.timeout)

    def call_started(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """``call``, starting the process first when nobody listens on its socket (no ``health`` round trip
        before every call: the process normally runs)."""
        try:
            return self.call(request)
        except control.NotRunningError:
            self.ensure()
            return self.call(request)

    def alive(self) -> bool:
        try:
            self.call({"op": "health"}, timeout=min(5.0, self.settings.timeout))
        except (UnavailableError, control.ControlError):
            return False
        return True

    def ensure(self) -> None:
        """Make sure the process answers; start it (once, whoever asks first) when it does not. After a failed
        start, for :data:`START_BACKOFF` seconds every call fails at once (layers are pulled normally) instead of
        each Prepare waiting for another start that would fail the same way (no /dev/fuse, a broken install)."""
        if self.alive():
            return
        with self._lock:
            if self.alive():
                return
            if self._failed is not None and time.monotonic() - self._failed[1] < START_BACKOFF:
                raise UnavailableError(f"{self._failed[0]} (not retried for {START_BACKOFF:.0f} s)")
            try:
                self._start()
            except UnavailableError as exc:
                self._failed = (str(exc), time.monotonic())
                log.error("lazy layers are pulled normally: %s", exc)
                raise
            self._failed = None

    def _start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        log.info("starting the lazyfs process: %s", " ".join(self.command))
        with open(self.root / LOG, "ab") as logf:
            # its own session: signals to the snapshotter (Ctrl-C, systemd stop) never reach it
            self.started = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=logf,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            close_fds=True)
        (self.root / PID).write_text(f"{self.started.pid}\n")  # for admins and tests: it outlives us
        deadline = time.monotonic() + self.settings.start_timeout
        while time.monotonic() < deadline:
            if self.alive():
                log.info("lazyfs process %d serves %s", self.started.pid, self.mount)
                return
            if self.started.poll() is not None:
                raise UnavailableError(f"the lazyfs process exited with status {self.started.returncode} at "
                                       f"start; see {self.root / LOG}")
            time.sleep(0.05)
        self.started.kill()  # ours, by its pid: a process that never answers would only get in the way
        self.started.wait(10)
        raise UnavailableError(f"the lazyfs process did not answer on {self.socket} within "
                               f"{self.settings.start_timeout:.0f} s; see {self.root / LOG}")


class LazySource:
    """A :class:`~.base.LayerSource` for eStargz layers served by the lazyfs process (see the module doc)."""

    def __init__(self, state_dir: Path, settings: LazySettings | None = None, *, name: str = "lazy",
                 budget: CallBudget | None = None, command: Sequence[str] | None = None,
                 pull_credentials: PullCredentials | None = None) -> None:
        self.name = name
        #: what ``cvmfs-snap pull`` handed over (..credentials): looked up before the node's docker config
        self.pull_credentials = pull_credentials if pull_credentials is not None else PullCredentials()
        self.settings = settings or LazySettings()
        self.root = Path(state_dir)
        self.budget = budget if budget is not None else CallBudget(name)
        self.process = LazyProcess(self.root, self.settings, command)
        self.layers_dir = self.root / LAYERS
        self._health: tuple[SourceHealth, float] | None = None
        #: manifest digest -> {layer digest: (size, TOC annotation)}: manifests by digest never change, and an
        #: image's layers are Prepared one after the other (one manifest read per image, not per layer)
        self._manifests: OrderedDict[str, dict[str, tuple[int, str]]] = OrderedDict()
        self._manifests_lock = threading.Lock()

    # -- LayerSource ----------------------------------------------------------------------------------------------
    def lookup(self, request: LayerRequest) -> RemoteLayer | None:
        toc = request.toc_digest
        if not (self.settings.enabled and toc and request.digest and request.image_ref and request.target):
            return None
        ref = ImageReference.parse(request.image_ref)

        def find_and_attach() -> None:  # one thread hand-off for the whole Prepare
            layers = self._layers(ref, request)
            size = self._checked(layers, request)
            record = {"digest": request.digest, "size": size, "toc_digest": toc, "image_ref": str(ref)}
            self._attach_now(record, self._neighbours(layers, request))

        self._call(find_and_attach, f"serving layer {request.digest} of {ref} lazily")
        log.info("layer %s (%s) is served lazily from %s", request.digest, ref, ref.registry)
        return RemoteLayer(source=self.name, digest=request.digest,
                           labels={SNAPSHOT_SOURCE: self.name, SNAPSHOT_LAYER_DIGEST: request.digest,
                                   TOC_DIGEST: toc})

    def mount_dirs(self, request: LayerRequest) -> list[Path]:
        return [self._path(request.digest, reattach=True)]

    def check(self, request: LayerRequest) -> None:
        self._path(request.digest, reattach=False)

    def release(self, digest: str) -> None:
        lid = layer_id(digest)
        try:
            self._call(lambda: self.process.call({"op": "detach", "id": lid}), f"detaching layer {digest}")
        except control.ControlError as exc:
            if exc.kind != "notfound":
                raise control.as_error(exc, f"detaching lazy layer {digest}") from None
        except UnavailableError:
            if self._record(digest) is not None and self.process.socket.exists():
                raise
            # no process: nothing is attached; its state.json re-attaches only what it had, so drop our record
        self._record_path(digest).unlink(missing_ok=True)

    def held(self) -> list[str]:
        try:
            names = os.listdir(self.layers_dir)
        except FileNotFoundError:
            return []
        return sorted("sha256:" + n[:-5] for n in names if n.endswith(".json") and len(n) == 69)

    def state_paths(self, digest: str) -> list[Path]:
        lid = layer_id(digest)
        return [self.process.mount / lid, self.root / UNPACKED / lid]

    def restore(self, requests: Sequence[LayerRequest]) -> None:
        """At start: the process runs (started if needed; it re-attaches its layers itself) and every layer a
        snapshot uses is attached."""
        if not requests:  # records no snapshot uses: Cleanup releases them, no process needed for that
            return
        self._call(self.process.ensure, "starting the lazyfs process")
        for r in requests:
            try:
                self._path(r.digest, reattach=True)
            except CvmfsSnapError as exc:
                log.warning("lazy layer %s (snapshot %s) cannot be attached again: %s", r.digest, r.target, exc)

    def health(self) -> SourceHealth:
        if self._health is not None and time.monotonic() - self._health[1] < 5.0:
            return self._health[0]
        if not self.process.socket.exists():
            h = SourceHealth(True, "lazyfs process not started yet (starts on the first lazy layer)")
        else:
            try:
                self.process.call({"op": "health"}, timeout=min(5.0, self.settings.timeout))
                h = SourceHealth(True)
            except CvmfsSnapError as exc:
                h = SourceHealth(False, str(exc))
        self._health = (h, time.monotonic())
        return h

    # -- extras ---------------------------------------------------------------------------------------------------
    def layers(self) -> list[dict[str, Any]]:
        """The process's ``list``: per attached layer its digest, fetched fraction, bytes fetched, completeness."""
        answer = self.process.call({"op": "list"})
        layers = answer.get("layers", [])
        return [x for x in layers if isinstance(x, dict)] if isinstance(layers, list) else []

    # -- internals ------------------------------------------------------------------------------------------------
    def _call(self, fn: Any, what: str) -> Any:
        return call_with_timeout(fn, self.settings.timeout + self.settings.start_timeout, what, self.budget)

    def _layers(self, ref: ImageReference, request: LayerRequest) -> Mapping[str, tuple[int, str]]:
        """The image's layers (digest -> size, TOC annotation) from its manifest (fetched by digest, so verified),
        which the lazyfs process reads from the first endpoint of ``hosts-dir`` that answers (``resolve``: the
        registry client lives there, this daemon loads no HTTP client); NotFoundError when the layer is not among
        them."""
        if request.manifest_digest:
            with self._manifests_lock:
                known = self._manifests.get(request.manifest_digest)
            if known is not None and request.digest in known:
                return known
        hosts_dir = self.settings.hosts_dir or None
        target = ref.with_digest(request.manifest_digest) if request.manifest_digest else ref
        creds = credentials_for(self._credentials(ref), endpoints(target, Path(hosts_dir) if hosts_dir else None))
        try:
            answer = self.process.call_started({"op": "resolve", "image_ref": str(target), "hosts_dir": hosts_dir,
                                                "credentials": credentials_to_wire(creds)})
        except control.ControlError as exc:
            raise control.as_error(exc, f"reading the manifest of {target}") from None
        layers = _manifest_layers(answer.get("layers"), target)
        if request.manifest_digest:
            with self._manifests_lock:
                self._manifests[request.manifest_digest] = layers
                while len(self._manifests) > MANIFEST_CACHE:
                    self._manifests.popitem(last=False)
        if request.digest not in layers:
            raise NotFoundError(f"layer {request.digest} is not in the manifest of {target}")
        return layers

    @staticmethod
    def _checked(layers: Mapping[str, tuple[int, str]], request: LayerRequest) -> int:
        """The layer's size; InvalidInputError when its TOC label contradicts the manifest."""
        size, toc = layers[request.digest]
        if toc and toc != request.toc_digest:
            raise InvalidInputError(f"layer {request.digest}: the TOC digest label differs from the manifest's "
                                    "annotation; pulling normally")
        return size

    @staticmethod
    def _neighbours(layers: Mapping[str, tuple[int, str]], request: LayerRequest) -> list[dict[str, Any]]:
        """The image's other eStargz layers for the process to resolve ahead: those of the (verified) manifest
        with a TOC annotation, and when the ``cri.image-layers`` label is given only those it lists (so a hostile
        label can only make the list shorter)."""
        listed = set(request.image_layers)
        return [{"id": layer_id(d), "digest": d, "size": size, "toc_digest": toc}
                for d, (size, toc) in layers.items()
                if d != request.digest and toc and (not listed or d in listed)][:MAX_NEIGHBOURS]

    def _credentials(self, ref: ImageReference) -> CredentialStore:
        """The credentials for ``ref``: those a ``cvmfs-snap pull`` of its repository handed over (for its
        registry host, while they last), then the node's docker config and the kubelet's."""
        node = load_credentials(Path(self.settings.docker_config) if self.settings.docker_config else None)
        handed = self.pull_credentials.get(str(ref))
        if handed is None:
            return node
        merged = {h: c for h in node.hosts() if (c := node.get(h)) is not None}
        merged[ref.registry] = handed
        return CredentialStore(merged)

    def _record_path(self, digest: str) -> Path:
        return self.layers_dir / f"{layer_id(digest)}.json"

    def _record(self, digest: str) -> dict[str, Any] | None:
        try:
            d = json.loads(self._record_path(digest).read_text())
        except (OSError, ValueError):
            return None
        return d if isinstance(d, dict) else None

    def _save(self, record: Mapping[str, Any]) -> None:
        self.layers_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        p = self._record_path(str(record["digest"]))
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(dict(record), sort_keys=True))
        os.replace(tmp, p)

    def _attach(self, record: Mapping[str, Any]) -> Path:
        """Attach (idempotent in the process) and remember how; the process is started when it is not running."""
        return self._call(lambda: self._attach_now(record), f"attaching lazy layer {record['digest']}")

    def _attach_now(self, record: Mapping[str, Any], neighbours: Sequence[Mapping[str, Any]] = ()) -> Path:
        """:meth:`_attach` in the calling thread (already under :meth:`_call`); ``neighbours``: the image's other
        layers for the process to resolve ahead."""
        digest = str(record["digest"])
        self._save(record)  # before the attach: a crash in between leaves a record Cleanup releases
        ref = ImageReference.parse(str(record["image_ref"]))
        hosts_dir = self.settings.hosts_dir or None
        creds = credentials_for(self._credentials(ref), endpoints(ref, Path(hosts_dir) if hosts_dir else None))
        req = {"op": "attach", "id": layer_id(digest), "digest": digest, "size": int(record["size"]),
               "toc_digest": str(record["toc_digest"]), "image_ref": str(ref), "hosts_dir": hosts_dir,
               "credentials": credentials_to_wire(creds)}
        if neighbours:
            req["neighbours"] = [dict(n) for n in neighbours]
        try:
            answer = self.process.call_started(req)
        except control.ControlError as exc:
            raise control.as_error(exc, f"attaching lazy layer {digest} of {ref}") from None
        return Path(str(answer["path"]))

    def _path(self, digest: str, *, reattach: bool) -> Path:
        lid = layer_id(digest)
        try:
            answer = self._call(lambda: self.process.call({"op": "check", "id": lid}), f"checking layer {digest}")
            return Path(str(answer.get("path") or self.process.mount / lid))
        except control.ControlError as exc:
            if exc.kind != "notfound" or not reattach:
                raise control.as_error(exc, f"lazy layer {digest}") from None
        except UnavailableError:
            if not reattach:
                raise
        record = self._record(digest)
        if record is None:
            raise NotFoundError(f"lazy layer {digest} is not attached and this node has no record of it: remove "
                                "the image from containerd and pull it again")
        log.info("lazy layer %s: attaching it again", digest)
        return self._attach(record)


def _manifest_layers(value: object, target: ImageReference) -> dict[str, tuple[int, str]]:
    """The ``layers`` of a ``resolve`` answer, checked: {digest: (size >= 0, TOC annotation)}."""
    if not isinstance(value, dict):
        raise UnavailableError(f"the lazyfs process answered no layers for the manifest of {target}")
    out: dict[str, tuple[int, str]] = {}
    for digest, entry in value.items():
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], int) and entry[0] >= 0
                and isinstance(entry[1], str)):
            raise UnavailableError(f"the lazyfs process answered a malformed layer entry for {target}")
        out[str(digest)] = (entry[0], entry[1])
    return out
