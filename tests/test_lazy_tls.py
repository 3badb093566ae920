"""containerd's ``certs.d/<host>/hosts.toml`` TLS settings for real (cvmfs_snap/oci/hosts.py): docker-registry over
TLS on loopback with a CA and server certificate made at test time, read by the lazy source and the real lazyfs
process (FUSE).

* ``ca`` in hosts.toml: the layer is served lazily and its files read; without it the certificate does not verify,
  the Prepare falls back to a normal pull and the log says why;
* a registry that requires client certificates (``clientcas``): ``client = [[cert, key]]`` works, none fails;
* ``skip_verify = true`` talks TLS without verifying.

The registry is ``https://127.0.0.1:PORT``: loopback, which means plain HTTP by default, but a hosts.toml that says
``https://`` is the site's word and keeps TLS.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cvmfs_snap.errors import AlreadyExistsError, CvmfsSnapError
from cvmfs_snap.fsutil import remove_tree
from cvmfs_snap.oci.hostclient import endpoint_client
from cvmfs_snap.oci.hosts import endpoints
from cvmfs_snap.oci.reference import ImageReference
from cvmfs_snap.snapshotter.core import Snapshotter
from cvmfs_snap_devenv.images import BuiltImage, estargz_layer, image, push_image
from cvmfs_snap_devenv.registry import free_port, start_registry
from tests.support.tls import TestCA, make_ca, start_tls_registry
from tests.test_lazy_source import labels_for, make_source, stop

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0, reason="needs /dev/fuse, root")


@dataclass
class TlsSetup:
    ca: TestCA
    img: BuiltImage
    host: str  # 127.0.0.1:PORT, TLS, server certificate of ca
    mtls_host: str  # the same storage, client certificates of ca required

    def ref(self, host: str) -> str:
        return f"{host}/tls/app:1"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsSetup]:
    root = tmp_path_factory.mktemp("tls-registry")
    ca = make_ca(root / "pki")
    lay = estargz_layer(["etc/", ("etc/motd", b"over TLS\n"), ("big", os.urandom(100_000))])
    img = image([lay])
    with start_registry(root / "reg") as plain:  # push in plain HTTP; the TLS registries serve the same storage
        push_image(plain.url, "tls/app", "1", img)
    port, mport = free_port(), free_port()
    with start_tls_registry(root / "reg", ca, port) as reg, \
            start_tls_registry(root / "reg", ca, mport, client_ca=ca) as mreg:
        yield TlsSetup(ca, img, reg.host, mreg.host)


def hosts_toml(certs_d: Path, host: str, body: str, *files: Path) -> None:
    d = certs_d / host
    if d.exists():
        remove_tree(d)
    d.mkdir(parents=True)
    for f in files:
        shutil.copy(f, d / f.name)
    (d / "hosts.toml").write_text(f'server = "https://{host}"\n{body}')


def test_hosts_toml_ca_serves_the_layer_lazily_over_tls(tls: TlsSetup, tmp_path: Path, short_tmp: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    hosts_toml(tmp_path / "certs.d", tls.host, 'ca = "ca.crt"\n', tls.ca.cert_path)
    lay = tls.img.layers[0]
    src = make_source(short_tmp / "lazy", tmp_path)
    sn = Snapshotter(tmp_path / "root", sources=[src])
    try:
        with pytest.raises(AlreadyExistsError):
            sn.prepare("extract-1", "", labels_for(tls.img, tls.ref(tls.host)))
        # the process fetched the TOC and now the file's chunks over TLS, verified against the CA
        assert (short_tmp / "lazy" / "mnt" / lay.digest[7:] / "etc/motd").read_bytes() == b"over TLS\n"
        assert len((short_tmp / "lazy" / "mnt" / lay.digest[7:] / "big").read_bytes()) == 100_000
        # without the CA the certificate does not verify: a normal pull, and the log says why
        hosts_toml(tmp_path / "certs.d", tls.host, "")
        src2 = make_source(short_tmp / "lazy2", tmp_path)
        sn2 = Snapshotter(tmp_path / "root2", sources=[src2])
        try:
            assert sn2.prepare("extract-2", "", labels_for(tls.img, tls.ref(tls.host), chain="sha256:" + "e" * 64))
            assert src2.layers() == [] and src2.held() == []  # it never got as far as attaching
            assert f"the TLS certificate of registry {tls.host} did not verify" in caplog.text
            # not retried (the process, which read the manifest, logs retries)
            assert "hosts.toml (ca = " in caplog.text and "retry 1/" not in caplog.text
            assert "retry 1/" not in (short_tmp / "lazy2" / "lazyfs.log").read_text()
        finally:
            sn2.close()
            stop(src2)
    finally:
        sn.close()
        stop(src)


def test_client_certificates_and_skip_verify(tls: TlsSetup, tmp_path: Path) -> None:
    certs_d = tmp_path / "certs.d"
    ref = ImageReference.parse(tls.ref(tls.mtls_host))
    digest = tls.img.manifest_digest

    def resolve() -> str:
        [ep] = endpoints(ref, certs_d)
        with endpoint_client(ep, timeout=10, retries=0) as client:
            manifest, _ = client.resolve(ep.ref)
        return manifest.digest

    cert, key = tls.ca.issue("node-client", client=True)
    hosts_toml(certs_d, tls.mtls_host, 'ca = "ca.crt"\nclient = [["node-client.crt", "node-client.key"]]\n',
               tls.ca.cert_path, cert, key)
    assert resolve() == digest
    hosts_toml(certs_d, tls.mtls_host, 'ca = "ca.crt"\n', tls.ca.cert_path)  # no client certificate: refused
    with pytest.raises(CvmfsSnapError) as e:
        resolve()
    assert tls.mtls_host in str(e.value) and "client certificate" in str(e.value), e.value
    # skip_verify: TLS without verifying the server (no CA given), still with the client certificate
    hosts_toml(certs_d, tls.mtls_host, 'skip_verify = true\nclient = [["node-client.crt", "node-client.key"]]\n',
               cert, key)
    assert resolve() == digest
