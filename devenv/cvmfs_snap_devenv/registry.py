"""A real distribution registry (`docker-registry`) on loopback, started per test session or per test.

Use :func:`start_registry` directly for special configurations (htpasswd, token auth, notifications); the
``registry`` fixture in conftest.py gives a plain anonymous one.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from .procs import stop_process

REGISTRY_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"


#: a blob GET in the registry's access log (combined log format): digest, status, response bytes
_BLOB_GET = re.compile(r'"GET /v2/[^ "]+/blobs/(sha256:[0-9a-f]{64}) HTTP/[0-9.]+" (\d{3}) (\d+)')


@dataclass(frozen=True)
class BlobGet:
    """One blob download the registry answered."""

    digest: str
    status: int
    size: int


def blob_gets(log: Path, since: int = 0) -> list[BlobGet]:
    """The blob GETs a docker-registry access log shows after byte offset ``since`` (see :func:`log_mark`).

    This is how the demo, benchmarks and tests prove what was (not) downloaded."""
    with open(log, "rb") as f:
        f.seek(since)
        text = f.read().decode(errors="replace")
    return [BlobGet(m.group(1), int(m.group(2)), int(m.group(3))) for m in _BLOB_GET.finditer(text)]


def log_mark(log: Path) -> int:
    """The current end of an access log: count what happens after it with ``blob_gets(log, since=mark)``."""
    return log.stat().st_size


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Registry:
    host: str  # "127.0.0.1:PORT"
    root: Path
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def ref(self, repo: str, tag: str = "latest") -> str:
        return f"{self.host}/{repo}:{tag}"


def registry_config(root: Path, port: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "info", "accesslog": {"disabled": False}},
        "storage": {
            "filesystem": {"rootdirectory": str(root / "data")},
            "delete": {"enabled": True},
            "cache": {"blobdescriptor": "inmemory"},
        },
        "http": {"addr": f"127.0.0.1:{port}", "secret": "cvmfs-snap-test"},
    }
    for k, v in (extra or {}).items():
        cfg[k] = v
    return cfg


def htpasswd_auth(root: Path, user: str, password: str) -> dict[str, Any]:
    """Registry config (``extra_config`` of :func:`start_registry`) asking for HTTP Basic auth of ``user``:
    writes ``root/htpasswd`` with ``htpasswd -B`` (apache2-utils)."""
    out = subprocess.run(["htpasswd", "-Bbn", user, password], check=True, capture_output=True, text=True)
    root.mkdir(parents=True, exist_ok=True)
    (root / "htpasswd").write_text(out.stdout)
    return {"auth": {"htpasswd": {"realm": "cvmfs-snap-test", "path": str(root / "htpasswd")}}}


def webhook_notifications(url: str, secret: str) -> dict[str, Any]:
    """Registry config (``extra_config`` of :func:`start_registry`) posting push notifications to ``url`` with a
    bearer ``secret``, one attempt per event (threshold 1), blob pushes left out."""
    return {"notifications": {"endpoints": [{
        "name": "cvmfs-snap", "url": url,
        "headers": {"Authorization": [f"Bearer {secret}"]},
        "timeout": "2s", "threshold": 1, "backoff": "1s",
        "ignoredmediatypes": ["application/octet-stream"],
    }]}}


@contextmanager
def start_registry(root: Path, extra_config: dict[str, Any] | None = None, port: int = 0) -> Iterator[Registry]:
    """Start docker-registry with its storage under ``root``; ``extra_config`` keys (auth, notifications, ...)
    are merged into the top level of its config.yml."""
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    cfg_path = root / "config.yml"
    cfg_path.write_text(yaml.safe_dump(registry_config(root, port, extra_config)))
    log = root / "registry.log"
    with open(log, "ab") as logf:
        proc = subprocess.Popen(
            [REGISTRY_BIN, "serve", str(cfg_path)],
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "OTEL_TRACES_EXPORTER": "none"},
        )
    reg = Registry(host=f"127.0.0.1:{port}", root=root, proc=proc, log=log)
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {log.read_text()[-2000:]}")
            try:
                httpx.get(f"{reg.url}/v2/", timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"docker-registry did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.05)
        yield reg
    finally:
        stop_process(proc)
