"""Registry clients for the endpoints of :mod:`cvmfs_snap.oci.hosts` (containerd's ``hosts.toml``): the host's TLS
settings (CAs added to the system ones, client certificates, ``skip_verify``), plain HTTP for ``http://`` hosts, and
the layer sizes of an image manifest read from the first endpoint that answers.

Apart from hosts.py so that a process which only parses hosts and hands credentials on (the snapshotter daemon,
which leaves registry reads to the lazyfs process) imports neither httpx nor ssl.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import httpx

from cvmfs_snap.errors import CvmfsSnapError, InvalidInputError, UnavailableError
from cvmfs_snap.oci.auth import CredentialStore
from cvmfs_snap.oci.client import RegistryClient
from cvmfs_snap.oci.hosts import Endpoint, endpoints
from cvmfs_snap.oci.reference import ImageReference


def endpoint_client(ep: Endpoint, credentials: CredentialStore | None = None, **kwargs: Any) -> RegistryClient:
    """A RegistryClient for ``ep``: plain HTTP when the host is ``http://``, the host's CAs (added to the system
    ones), client certificates and ``skip_verify`` through an httpx transport."""
    insecure = [ep.host.host] if ep.host.plain_http else []
    # an https host stays https even on loopback (a site's local TLS mirror; loopback defaults to plain HTTP)
    tls = [] if ep.host.plain_http else [ep.host.host]
    transport: httpx.BaseTransport | None = None
    if ep.host.ca or ep.host.client_pairs or ep.host.skip_verify:
        transport = httpx.HTTPTransport(verify=ssl_context(ep))
    return RegistryClient(credentials=credentials, insecure_registries=insecure, transport=transport,
                          tls_registries=tls, **kwargs)


def ssl_context(ep: Endpoint) -> ssl.SSLContext:
    ctx = httpx.create_ssl_context(trust_env=True)
    try:
        for ca in ep.host.ca:
            ctx.load_verify_locations(cafile=str(ca))
        for cert, key in ep.host.client_pairs:
            ctx.load_cert_chain(str(cert), str(key) if key is not None else None)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidInputError(f"registry host {ep.host.host}: cannot load a certificate of its hosts.toml: "
                                f"{exc}") from None
    if ep.host.skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def manifest_layers(target: ImageReference, hosts_dir: Path | None, credentials: CredentialStore, *,
                    timeout: float, annotation: str) -> dict[str, tuple[int, str]]:
    """{layer digest: (size, its ``annotation``)} of the image manifest ``target`` (by digest: verified), from the
    first of its pull endpoints that answers; UnavailableError naming each endpoint's failure when none does."""
    errors: list[str] = []
    for ep in endpoints(target, hosts_dir, "pull"):
        try:
            with endpoint_client(ep, credentials, timeout=timeout, retries=1, transfer_deadline=timeout) as client:
                manifest, _ = client.resolve(ep.ref)
        except CvmfsSnapError as exc:
            errors.append(f"{ep.ref.registry}: {exc}")
            continue
        return {d.digest: (int(d.size), d.annotations.get(annotation, "")) for d in manifest.layers}
    raise UnavailableError(f"cannot read the manifest of {target}: " + "; ".join(errors))
