"""``cvmfs-snap pull``: pull an image through containerd so that layers published in CVMFS are served by the
cvmfs snapshotter instead of being downloaded.

    cvmfs-snap pull [--address SOCK] [--namespace NS] [--snapshotter NAME] [--platform P] [--plain-http] IMAGE

Afterwards ``ctr run --snapshotter NAME IMAGE ...`` (or a pod using the image) starts without a download of the
published layers. Exit status 0 on success; a failing pull exits with the error kind's status and says what to do.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from contextlib import ExitStack

from cvmfs_snap.containerd.client import DEFAULT_ADDRESS, DEFAULT_NAMESPACE, ContainerdClient
from cvmfs_snap.containerd.progress import LogProgress, RichProgress, summary
from cvmfs_snap.containerd.registry import make_registry
from cvmfs_snap.containerd.unpack import Progress, Puller, PullResult
from cvmfs_snap.oci import ImageReference, Platform

log = logging.getLogger(__name__)

DEFAULT_SNAPSHOTTER = "cvmfs-snapshotter"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="IMAGE", help="image reference, e.g. docker.io/library/ubuntu:22.04")
    parser.add_argument("--address", "-a", default=DEFAULT_ADDRESS,
                        help=f"containerd's gRPC socket (default {DEFAULT_ADDRESS})")
    parser.add_argument("--namespace", "-n", default=DEFAULT_NAMESPACE,
                        help="containerd namespace (default %(default)s). With k8s.io (Kubernetes') the image "
                             "is recorded under the names CRI uses, so the kubelet finds it")
    parser.add_argument("--snapshotter", default=DEFAULT_SNAPSHOTTER,
                        help="snapshotter to unpack with (default %(default)s)")
    parser.add_argument("--platform", default=None,
                        help="os/arch[/variant] to pull from a multi-platform image (default: this host's)")
    parser.add_argument("--plain-http", action="store_true",
                        help="talk to the registry over plain HTTP, credentials included (loopback registries "
                             "always use it; an http:// image reference without this flag is refused)")
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


def run_pull(image: str, address: str = DEFAULT_ADDRESS, namespace: str = DEFAULT_NAMESPACE,
             snapshotter: str = DEFAULT_SNAPSHOTTER, platform: str | None = None, plain_http: bool = False,
             cri_labels: bool = True, progress: Progress | None = None, timeout: float = 10.0,
             max_downloads: int = 3) -> PullResult:
    """Library entry point of the pull (the CLI's ``main`` minus the printing)."""
    ref = ImageReference.parse(image)
    plat = Platform.parse(platform) if platform else Platform.host()
    registry = make_registry(ref, plain_http=plain_http)
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
        result = run_pull(args.image, address=args.address, namespace=args.namespace, snapshotter=args.snapshotter,
                          platform=args.platform, plain_http=args.plain_http, cri_labels=not args.no_cri_labels,
                          progress=progress, timeout=args.timeout, max_downloads=args.max_concurrent_downloads)
    if args.json:
        print(json.dumps(result_json(result), indent=2))
    else:
        print(summary(result))
    return 0
