"""A stand-in for the ``cvmfs-snap lazyfs`` process's control socket, for the lazy source's tests while the real
process (branch ``lazyfs``) is not on this branch: it speaks the control protocol of lazy-design.md (one JSON line
each way, socket mode 0600), keeps its attached layers in ``state.json`` (re-attached at its start, as the real
process does) and serves each layer as a plain directory ``<root>/mnt/<id>`` holding one file, ``ATTACHED``.

It records every request (credentials included, so tests can check they arrive) in ``<root>/requests.jsonl`` -- a
test file, never a pattern for the real process, which must not write credentials anywhere.

Run as a process: ``python -m tests.support.lazyfs_standin --root DIR [ignored lazyfs options...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

FRACTION = 0.25


class Standin:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.mnt = self.root / "mnt"
        self.state = self.root / "state.json"
        self.layers: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.mnt.mkdir(parents=True, exist_ok=True)
        if self.state.exists():
            for lid, rec in json.loads(self.state.read_text()).items():
                self._attach(lid, rec)

    def _attach(self, lid: str, rec: dict[str, Any]) -> Path:
        d = self.mnt / lid
        d.mkdir(exist_ok=True)
        (d / "ATTACHED").write_text(rec["digest"])
        self.layers[lid] = rec
        return d

    def _save(self) -> None:
        tmp = self.state.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.layers))
        os.replace(tmp, self.state)

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        with open(self.root / "requests.jsonl", "a") as f:
            f.write(json.dumps(req) + "\n")
        op = req.get("op")
        with self.lock:
            if op == "health":
                return {"ok": True}
            if op == "list":
                return {"ok": True, "layers": [
                    {"id": lid, "digest": r["digest"], "fetched_fraction": FRACTION,
                     "bytes_fetched": int(r["size"] * FRACTION), "complete": False}
                    for lid, r in sorted(self.layers.items())]}
            lid = str(req.get("id", ""))
            if not lid or "/" in lid or lid.startswith("."):
                return {"ok": False, "kind": "invalid", "error": f"bad layer id {lid!r}"}
            if op == "attach":
                missing = [k for k in ("digest", "size", "toc_digest", "image_ref") if k not in req]
                if missing:
                    return {"ok": False, "kind": "invalid", "error": f"attach without {missing}"}
                path = self._attach(lid, {k: req[k] for k in ("digest", "size", "toc_digest", "image_ref")})
                self._save()
                return {"ok": True, "path": str(path)}
            if lid not in self.layers:
                return {"ok": False, "kind": "notfound", "error": f"layer {lid} is not attached"}
            if op == "check":
                return {"ok": True, "path": str(self.mnt / lid)}
            if op == "detach":
                del self.layers[lid]
                (self.mnt / lid / "ATTACHED").unlink(missing_ok=True)
                (self.mnt / lid).rmdir()
                self._save()
                return {"ok": True}
        return {"ok": False, "kind": "invalid", "error": f"unknown op {op!r}"}

    def serve(self, ready: threading.Event | None = None) -> None:
        sock_path = self.root / "control.sock"
        sock_path.unlink(missing_ok=True)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            srv.bind(str(sock_path))
        finally:
            os.umask(old)
        srv.listen(16)
        if ready is not None:
            ready.set()
        while True:
            conn, _ = srv.accept()
            with conn:
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                try:
                    answer = self.handle(json.loads(buf))
                except (ValueError, KeyError, TypeError) as exc:
                    answer = {"ok": False, "kind": "invalid", "error": str(exc)}
                conn.sendall(json.dumps(answer).encode() + b"\n")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--root", type=Path, required=True)
    args, _ = p.parse_known_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    Standin(args.root).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
