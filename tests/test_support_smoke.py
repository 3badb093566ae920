"""The test support itself works against the real registry."""

import httpx

from cvmfs_snap_devenv import images as im
from cvmfs_snap_devenv.registry import Registry


def test_push_and_fetch_manifest(registry: Registry) -> None:
    lay = im.layer([("etc/hello", b"hi\n")])
    img = im.image([lay])
    digest = im.push_image(registry.url, "smoke/one", "v1", img)
    r = httpx.get(f"{registry.url}/v2/smoke/one/manifests/v1", headers={"Accept": im.OCI_MANIFEST})
    assert r.status_code == 200
    assert im.sha256(r.content) == digest
    r = httpx.get(f"{registry.url}/v2/smoke/one/blobs/{lay.digest}")
    assert r.content == lay.blob


def test_containerd_pulls_from_registry(registry: Registry, short_tmp) -> None:  # type: ignore[no-untyped-def]
    from cvmfs_snap_devenv.containerd import start_containerd

    lay = im.layer([("etc/hello", b"hi\n")])
    im.push_image(registry.url, "smoke/ctd", "v1", im.image([lay]))
    with start_containerd(short_tmp / "ctd") as cd:
        cd.ctr("images", "pull", "--plain-http", registry.ref("smoke/ctd", "v1"))
        out = cd.ctr("images", "ls", "-q").stdout
        assert registry.ref("smoke/ctd", "v1") in out
