"""containerd hosts.toml / certs.d and node credentials (cvmfs_snap.oci.hosts), against a real loopback registry."""

from __future__ import annotations

import base64
import json
import ssl
from pathlib import Path

import pytest

from cvmfs_snap.errors import InvalidInputError
from cvmfs_snap.oci import ImageReference
from cvmfs_snap.oci.hostclient import endpoint_client, ssl_context
from cvmfs_snap.oci.hosts import (
    Endpoint,
    RegistryHost,
    credentials_for,
    endpoints,
    host_dirs,
    hosts_for,
    load_credentials,
)
from cvmfs_snap_devenv.images import busybox_layer, image, push_image
from cvmfs_snap_devenv.registry import Registry


def _write(d: Path, text: str) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "hosts.toml").write_text(text)


def test_defaults_without_configuration() -> None:
    assert hosts_for("docker.io", None) == [RegistryHost("registry-1.docker.io")]
    assert hosts_for("127.0.0.1:5000", None) == [RegistryHost("127.0.0.1:5000", "http")]
    assert hosts_for("localhost:5000", None)[0].plain_http
    assert hosts_for("ghcr.io", None) == [RegistryHost("ghcr.io")]


def test_host_dirs_follow_containerd(tmp_path: Path) -> None:
    assert host_dirs(tmp_path, "reg.example.org:5000") == [
        tmp_path / "reg.example.org_5000_", tmp_path / "reg.example.org:5000", tmp_path / "_default"]
    assert host_dirs(tmp_path, "ghcr.io") == [tmp_path / "ghcr.io", tmp_path / "_default"]


def test_mirrors_first_then_server(tmp_path: Path) -> None:
    _write(tmp_path / "docker.io", '''
server = "https://registry-1.docker.io"
[host."http://mirror.site.org:5000"]
  capabilities = ["pull", "resolve"]
[host."https://mirror2.site.org"]
  capabilities = ["pull"]
  ca = "ca.pem"
  skip_verify = true
''')
    hosts = hosts_for("docker.io", tmp_path)
    assert [(h.scheme, h.host) for h in hosts] == [
        ("http", "mirror.site.org:5000"), ("https", "mirror2.site.org"), ("https", "registry-1.docker.io")]
    assert hosts[0].capabilities == {"pull", "resolve"}
    assert hosts[1].ca == (tmp_path / "docker.io" / "ca.pem",) and hosts[1].skip_verify
    assert hosts[2].capabilities == {"pull", "resolve", "push"}
    ref = ImageReference.parse("docker.io/library/busybox:1")
    eps = endpoints(ref, tmp_path, "resolve")
    assert [e.ref.registry for e in eps] == ["mirror.site.org:5000", "registry-1.docker.io"]
    assert eps[0].ref.repository == "library/busybox" and eps[0].ref.tag == "1"


def test_no_server_means_the_registry_itself_with_top_level_settings(tmp_path: Path) -> None:
    _write(tmp_path / "_default", 'ca = "/etc/site-ca.pem"\n[host."https://m.site.org"]\n')
    hosts = hosts_for("quay.io", tmp_path)
    assert [h.host for h in hosts] == ["m.site.org", "quay.io"]
    assert hosts[1].ca == (Path("/etc/site-ca.pem"),)


def test_port_directory_and_cert_files(tmp_path: Path) -> None:
    d = tmp_path / "reg.site.org_5000_"
    d.mkdir()
    (d / "ca.crt").write_text("x")
    (d / "client.cert").write_text("x")
    (d / "client.key").write_text("x")
    (hosts,) = hosts_for("reg.site.org:5000", tmp_path)
    assert hosts.host == "reg.site.org:5000" and hosts.ca == (d / "ca.crt",)
    assert hosts.client_pairs == ((d / "client.cert", d / "client.key"),)


def test_override_path_hosts_are_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _write(tmp_path / "ghcr.io", '[host."https://proxy.site.org/v2/ghcr"]\n[host."https://odd.site.org/api"]\n'
                                 '  override_path = true\n')
    eps = endpoints(ImageReference.parse("ghcr.io/a/b:1"), tmp_path)
    assert [e.ref.registry for e in eps] == ["ghcr.io"]
    assert "not supported" in caplog.text


@pytest.mark.parametrize("text, needle", [
    ("server = 3", "server must be a string"),
    ('[host."https://m"]\ncapabilities = ["fly"]', "unknown capability"),
    ("server = [", "not valid TOML"),
    ('[host."https://m"]\nskip_verify = "yes"', "skip_verify"),
])
def test_malformed_hosts_toml_names_the_file(tmp_path: Path, text: str, needle: str) -> None:
    _write(tmp_path / "ghcr.io", text)
    with pytest.raises(InvalidInputError) as ei:
        hosts_for("ghcr.io", tmp_path)
    assert needle in str(ei.value) and str(tmp_path / "ghcr.io" / "hosts.toml") in str(ei.value)


def test_no_pull_host_left_is_an_error(tmp_path: Path) -> None:
    _write(tmp_path / "ghcr.io", 'server = "https://ghcr.io"\ncapabilities = ["push"]\n')
    with pytest.raises(InvalidInputError, match="no usable pull host"):
        endpoints(ImageReference.parse("ghcr.io/a/b:1"), tmp_path)


def test_skip_verify_context() -> None:
    ep = Endpoint(RegistryHost("r.site.org", skip_verify=True), ImageReference.parse("r.site.org/a:1"))
    ctx = ssl_context(ep)
    assert ctx.verify_mode == ssl.CERT_NONE and not ctx.check_hostname
    strict = ssl_context(Endpoint(RegistryHost("r.site.org"), ImageReference.parse("r.site.org/a:1")))
    assert strict.verify_mode == ssl.CERT_REQUIRED


def test_bad_ca_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    ep = Endpoint(RegistryHost("r.site.org", ca=(bad,)), ImageReference.parse("r.site.org/a:1"))
    with pytest.raises(InvalidInputError, match="cannot load a certificate"):
        endpoint_client(ep)


def test_mirror_serves_the_blobs(tmp_path: Path, registry: Registry) -> None:
    """A mirror on loopback configured for a registry that does not exist: the blobs come from the mirror."""
    lay = busybox_layer()
    img = image([lay])
    push_image(registry.url, "hostsmirror/busybox", "1", img)
    _write(tmp_path / "registry.invalid", f'server = "https://registry.invalid"\n[host."http://{registry.host}"]\n'
                                          '  capabilities = ["pull", "resolve"]\n')
    eps = endpoints(ImageReference.parse("registry.invalid/hostsmirror/busybox:1"), tmp_path)
    assert eps[0].ref.registry == registry.host
    with endpoint_client(eps[0]) as client:
        manifest, _ = client.resolve(eps[0].ref)
        assert manifest.layers[0].digest == lay.digest
        assert client.read_range(eps[0].ref, lay.digest, 0, 2) == lay.blob[:2]


def test_credentials_docker_then_kubelet(tmp_path: Path) -> None:
    def cfg(path: Path, auths: dict[str, tuple[str, str]]) -> Path:
        path.write_text(json.dumps({"auths": {h: {"auth": base64.b64encode(f"{u}:{p}".encode()).decode()}
                                              for h, (u, p) in auths.items()}}))
        return path
    docker = cfg(tmp_path / "docker.json", {"https://index.docker.io/v1/": ("alice", "s3cret-a"),
                                            "m.site.org": ("mirror", "s3cret-m")})
    kubelet = cfg(tmp_path / "kubelet.json", {"m.site.org": ("other", "s3cret-o"), "ghcr.io": ("bob", "s3cret-b")})
    store = load_credentials(docker, kubelet_config=kubelet)
    assert store.get("docker.io") is not None and store.get("docker.io").username == "alice"  # type: ignore[union-attr]
    assert store.get("m.site.org").username == "mirror"  # type: ignore[union-attr]
    assert store.get("ghcr.io").username == "bob"  # type: ignore[union-attr]
    assert "s3cret" not in repr(store)
    eps = [Endpoint(RegistryHost("m.site.org"), ImageReference.parse("m.site.org/a:1")),
           Endpoint(RegistryHost("q.site.org"), ImageReference.parse("q.site.org/a:1"))]
    creds = credentials_for(store, eps)
    assert list(creds) == ["m.site.org"] and "s3cret" not in repr(creds)
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_credentials(tmp_path / "missing.json", kubelet_config=None)


def test_credentials_wire_form_round_trip(tmp_path: Path, registry: Registry) -> None:
    from cvmfs_snap.oci.auth import Credentials
    from cvmfs_snap.oci.hostclient import endpoint_client
    from cvmfs_snap.oci.hosts import credentials_from_wire, credentials_to_wire, endpoints
    wire = credentials_to_wire({"m.site.org": Credentials("u", "s3cret-w")})
    assert wire == {"m.site.org": {"username": "u", "secret": "s3cret-w"}}
    store = credentials_from_wire(wire)
    assert store.get("m.site.org") == Credentials("u", "s3cret-w")
    assert credentials_to_wire({}) is None and credentials_from_wire(None).hosts() == []
    with pytest.raises(InvalidInputError) as ei:
        credentials_from_wire({"h": {"username": "u", "secret": 5}})
    assert "5" not in str(ei.value).replace("{username, secret}", "")
    _write(tmp_path / "registry.invalid", f'[host."http://{registry.host}"]\n')
    ep = endpoints(ImageReference.parse("registry.invalid/a/b:1"), tmp_path, "pull")[0]  # as the lazyfs ClientPool
    client, ref = endpoint_client(ep, store), ep.ref
    with client:
        assert ref.registry == registry.host and client.base_url(ref) == f"http://{registry.host}"
