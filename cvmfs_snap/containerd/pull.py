"""``cvmfs-snap pull``: pull an image through containerd so that layers published in CVMFS are served by the
cvmfs snapshotter instead of being downloaded.

    cvmfs-snap pull [--address SOCK] [--namespace NS] [--snapshotter NAME] [--platform P] [--plain-http]
                    [--user USER[:PASSWORD] [--password-stdin]] [--docker-config PATH] IMAGE

Afterwards ``ctr run --snapshotter NAME IMAGE ...`` (or a pod using the image) starts without a download of the
published layers. Exit status 0 on success; a failing pull exits with the error kind's status and says what to do.

Credentials (``--user``, or the ``auths`` of ``--docker-config``) are used for the pull's own registry requests and
handed to the snapshotter over its root-only credentials socket (:mod:`cvmfs_snap.snapshotter.credentials`) before
the pull starts, so that it can fetch the lazy layers of this pull; never as labels (containerd stores those).
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import sys
from contextlib import ExitStack
from pathlib import Path

from cvmfs_snap.containerd.client import DEFAULT_ADDRESS, DEFAULT_NAMESPACE, ContainerdClient
from cvmfs_snap.containerd.progress import LogProgress, RichProgress, summary
from cvmfs_snap.containerd.registry import make_registry
from cvmfs_snap.containerd.unpack import Progress, Puller, PullResult
from cvmfs_snap.errors import InvalidInputError, UnavailableError
from cvmfs_snap.oci import CredentialStore, ImageReference, Platform
from cvmfs_snap.oci.auth import Credentials
from cvmfs_snap.snapshotter.credentials import DEFAULT_SOCKET, hand_over
from cvmfs_snap.snapshotter.defaults import PROXY_PLUGIN

log = logging.getLogger(__name__)



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="IMAGE", help="image reference, e.g. docker.io/library/ubuntu:22.04")
    parser.add_argument("--address", "-a", default=DEFAULT_ADDRESS,
                        help=f"containerd's gRPC socket (default {DEFAULT_ADDRESS})")
    parser.add_argument("--namespace", "-n", default=DEFAULT_NAMESPACE,
                        help="containerd namespace (default %(default)s). With k8s.io (Kubernetes') the image "
                             "is recorded under the names CRI uses, so the kubelet finds it")
    parser.add_argument("--snapshotter", default=PROXY_PLUGIN,
                        help="snapshotter to unpack with (default %(default)s)")
    parser.add_argument("--platform", default=None,
                        help="os/arch[/variant] to pull from a multi-platform image (default: this host's)")
    parser.add_argument("--plain-http", action="store_true",
                        help="talk to the registry over plain HTTP, credentials included (loopback registries "
                             "always use it; an http:// image reference without this flag is refused)")
    parser.add_argument("--user", "-u", default=None, metavar="USER[:PASSWORD]",
                        help="registry user name and password (without ':PASSWORD' it is asked for, or read from "
                             "stdin with --password-stdin); also handed to the snapshotter for this pull's lazy "
                             "layers")
    parser.add_argument("--password-stdin", action="store_true",
                        help="read the password of --user from the first line of stdin")
    parser.add_argument("--docker-config", type=Path, default=None, metavar="PATH",
                        help="docker config.json with the registry credentials (default $DOCKER_CONFIG/config.json "
                             "or ~/.docker/config.json, if present); an explicit file's entry for the image's "
                             "registry is handed to the snapshotter too")
    parser.add_argument("--credentials-socket", type=Path, default=DEFAULT_SOCKET, metavar="PATH",
                        help="the snapshotter's credentials socket (default %(default)s: next to its snapshot "
                             "socket, named <stem>-credentials.sock)")
    parser.add_argument("--no-cri-labels", action="store_true",
                        help="do not send the CRI layer labels (then no layer can be served remotely)")
    parser.add_argument("--max-concurrent-downloads", type=int, default=3, metavar="N",
                        help="layer blobs downloaded at once, ahead of unpacking (default %(default)s, as CRI)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds to wait for containerd to answer (default %(default)s)")


def result_json(result: PullResult) -> dict[str, object]:
    return {
        "name": result.name,
        "snapshotter": result.snapshotter,
        "target": {"mediaType": result.target.media_type, "digest": result.target.digest,
                   "size": result.target.size},
        "manifestDigest": result.manifest_digest,
        "configDigest": result.config_digest,
        "chainID": result.chain_id,
        "platform": result.platform,
        "seconds": round(result.seconds, 3),
        "downloaded": result.downloaded,
        "layers": [{"digest": lay.digest, "diffID": lay.diff_id, "chainID": lay.chain_id, "size": lay.size,
                    "outcome": lay.outcome.value, "downloaded": lay.downloaded, "seconds": round(lay.seconds, 3)}
                   for lay in result.layers],
    }


def user_credentials(user: str, password_stdin: bool = False) -> Credentials:
    """``--user USER[:PASSWORD]``: the password after the first ':', else the first line of stdin
    (``--password-stdin``), else asked on the terminal."""
    name, sep, password = user.partition(":")
    if not name:
        raise InvalidInputError("--user needs a user name: --user USER[:PASSWORD]")
    if sep and password_stdin:
        raise InvalidInputError("--password-stdin and a password in --user: give one of them")
    if not sep:
        if password_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
        elif sys.stdin.isatty():
            password = getpass.getpass(f"password for {name}: ")
        else:
            raise InvalidInputError("no password for --user and stdin is not a terminal: give it with "
                                    "--password-stdin or as --user USER:PASSWORD")
    return Credentials(name, password)


def pull_credentials(ref: ImageReference, user: Credentials | None, docker_config: Path | None
                     ) -> tuple[CredentialStore, Credentials | None]:
    """The credentials of the pull's own requests, and those to hand to the snapshotter: ``--user``, or the
    entry of an explicit ``--docker-config`` for the image's registry (None: the snapshotter reads the node's
    docker config itself)."""
    store = CredentialStore.from_docker_config(docker_config)
    if user is None:
        return store, store.get(ref.registry) if docker_config is not None else None
    merged = {h: c for h in store.hosts() if (c := store.get(h)) is not None}
    merged[ref.registry] = user
    return CredentialStore(merged), user


def run_pull(image: str, address: str = DEFAULT_ADDRESS, namespace: str = DEFAULT_NAMESPACE,
             snapshotter: str = PROXY_PLUGIN, platform: str | None = None, plain_http: bool = False,
             cri_labels: bool = True, progress: Progress | None = None, timeout: float = 10.0,
             max_downloads: int = 3, user: Credentials | None = None, docker_config: Path | None = None,
             credentials_socket: Path = DEFAULT_SOCKET) -> PullResult:
    """Library entry point of the pull (the CLI's ``main`` minus the printing)."""
    ref = ImageReference.parse(image)
    plat = Platform.parse(platform) if platform else Platform.host()
    store, handed = pull_credentials(ref, user, docker_config)
    if handed is not None and cri_labels:
        try:
            ttl = hand_over(credentials_socket, str(ref), handed, timeout=timeout)
            log.info("credentials for %s handed to the snapshotter (kept %.0f s)", ref.registry, ttl)
        except UnavailableError as exc:
            log.warning("lazy layers of this pull cannot use its credentials (they are pulled normally unless the "
                        "node's docker config has some): %s", exc)
    registry = make_registry(ref, plain_http=plain_http, credentials=store)
    try:
        with ContainerdClient(address, namespace, timeout=timeout) as client:
            return Puller(client, registry, snapshotter, progress=progress, cri_labels=cri_labels,
                          max_downloads=max_downloads).pull(ref, plat)
    finally:
        registry.close()


def main(args: argparse.Namespace) -> int:
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request is noise here
    with ExitStack() as stack:
        interactive = sys.stderr.isatty() and not args.json
        # RichProgress imports rich when made: only for a terminal (not --json, journald, CI)
        progress: Progress = stack.enter_context(RichProgress()) if interactive else LogProgress()
        if args.password_stdin and not args.user:
            raise InvalidInputError("--password-stdin needs --user USER")
        user = user_credentials(args.user, args.password_stdin) if args.user else None
        result = run_pull(args.image, address=args.address, namespace=args.namespace, snapshotter=args.snapshotter,
                          platform=args.platform, plain_http=args.plain_http, cri_labels=not args.no_cri_labels,
                          progress=progress, timeout=args.timeout, max_downloads=args.max_concurrent_downloads,
                          user=user, docker_config=args.docker_config, credentials_socket=args.credentials_socket)
    if args.json:
        print(json.dumps(result_json(result), indent=2))
    else:
        print(summary(result))
    return 0
