"""A test certificate authority made at test time (``cryptography``), and docker-registry over TLS on loopback."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cvmfs_snap_devenv.registry import Registry, start_registry


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@dataclass(frozen=True)
class TestCA:
    """A CA (``ca.crt``) in ``directory`` that issues server and client certificates there."""

    __test__ = False  # not a pytest class
    directory: Path
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def cert_path(self) -> Path:
        return self.directory / "ca.crt"

    def issue(self, name: str, *, ip: str | None = None, client: bool = False) -> tuple[Path, Path]:
        """``<name>.crt`` and ``<name>.key`` signed by this CA: a server certificate for ``ip`` (SAN), or a
        client certificate."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
             .issuer_name(self.cert.subject).public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client
                                                   else ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
        if ip is not None:
            b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
                                critical=False)
        cert = b.sign(self.key, hashes.SHA256())
        return _write_cert(cert, self.directory / f"{name}.crt"), _write_key(key, self.directory / f"{name}.key")


def make_ca(directory: Path, name: str = "cvmfs-snap test CA") -> TestCA:
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    ca = TestCA(directory, key, cert)
    _write_cert(cert, ca.cert_path)
    return ca


@contextmanager
def start_tls_registry(root: Path, ca: TestCA, port: int, *, client_ca: TestCA | None = None) -> Iterator[Registry]:
    """docker-registry on ``https://127.0.0.1:port`` with a server certificate of ``ca`` (storage under ``root``,
    so it serves what a plain registry on the same root was given); with ``client_ca`` it requires client
    certificates signed by that CA."""
    cert, key = ca.issue(f"registry-{port}", ip="127.0.0.1")
    tls: dict[str, object] = {"certificate": str(cert), "key": str(key)}
    if client_ca is not None:
        tls["clientcas"] = [str(client_ca.cert_path)]
    http = {"addr": f"127.0.0.1:{port}", "secret": "cvmfs-snap-test", "tls": tls}
    with start_registry(root, {"http": http}, port=port) as reg:
        yield reg
