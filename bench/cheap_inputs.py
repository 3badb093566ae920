#!/usr/bin/env python3
"""Benchmark: what cheap hostile inputs cost the publisher (issue 7.16), with the default limits.

- a 100 GiB sparse file in a tiny blob: layers + flat tree must take seconds and no disk (holes stay holes);
- a ~655 KB zstd blob expanding to 20 GiB of zeros: refused by ``max_expansion_ratio`` after about 1 GiB, and by
  ``max_expanded_size`` when a site turns the ratio off and sets a 1 GiB size;
- a manifest of 10,000 layers and an index of 3,000 platforms: refused before anything is fetched.

    python bench/cheap_inputs.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cvmfs_snap.fsutil import remove_tree  # noqa: E402
from cvmfs_snap.layer.limits import Limits  # noqa: E402
from cvmfs_snap.oci import RegistryClient  # noqa: E402
from cvmfs_snap_devenv.images import OCI_INDEX, Pusher, image, layer  # noqa: E402
from cvmfs_snap_devenv.registry import start_registry  # noqa: E402
from publisher.backends.local import LocalBackend  # noqa: E402
from publisher.pipeline import Publisher  # noqa: E402
from tests.support.bombs import sparse_layer, zstd_bomb  # noqa: E402


def timed(root: Path, ref: str, limits: Limits | None = None) -> tuple[float, str]:
    with RegistryClient(timeout=60, retries=0) as client, Publisher(LocalBackend(root, limits=limits), client) as pub:
        t0 = time.monotonic()
        res = pub.publish_image(ref)
        return time.monotonic() - t0, "ok" if res.ok else res.error[-90:]


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-cheap-") as tmp_s:
        tmp = Path(tmp_s)
        with start_registry(tmp / "registry") as reg:
            p = Pusher(reg.url)
            sparse = sparse_layer(tmp)
            p.image("bench/sparse", "v1", image([sparse]))
            bomb = zstd_bomb(20 << 30)
            p.image("bench/bomb", "v1", image([bomb]))
            one = image([layer([("etc/x", b"x\n")])])
            p.image("bench/many", "one", one)
            many = json.loads(one.manifest)
            many["layers"] = many["layers"] * 10_000
            p.manifest("bench/many", "layers", json.dumps(many).encode(), one.manifest_media_type)
            entry = {"mediaType": one.manifest_media_type, "digest": one.manifest_digest, "size": len(one.manifest)}
            idx = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
                {**entry, "platform": {"os": "linux", "architecture": f"a{i}"}} for i in range(3000)]}
            p.manifest("bench/many", "platforms", json.dumps(idx).encode(), OCI_INDEX)
            p.close()
            rows = [
                (f"100 GiB sparse file ({len(sparse.blob)} B blob), layers + flat", reg.ref("bench/sparse", "v1"),
                 None),
                (f"zstd bomb ({len(bomb.blob) // 1000} KB -> 20 GiB), default limits", reg.ref("bench/bomb", "v1"),
                 None),
                ("zstd bomb, ratio off, max_expanded_size 1 GiB", reg.ref("bench/bomb", "v1"),
                 Limits(max_expansion_ratio=None, max_expanded_size=1 << 30)),
                ("manifest of 10,000 layers", reg.ref("bench/many", "layers"), None),
                ("index of 3,000 platforms", reg.ref("bench/many", "platforms"), None),
            ]
            print(f"{'input':60} {'seconds':>8}  outcome")
            for i, (what, ref, lim) in enumerate(rows):
                root = tmp / f"repo{i}"
                secs, outcome = timed(root, ref, lim)
                print(f"{what:60} {secs:8.2f}  {outcome}", flush=True)
                remove_tree(root)


if __name__ == "__main__":
    main()
