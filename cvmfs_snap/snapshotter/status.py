"""``cvmfs-snap status``: what the node snapshotter holds, and where each layer comes from.

Reads the snapshotter's sqlite metadata read-only (safe while the daemon runs: WAL lets readers in), so an admin can
see at a glance which layers are served from CVMFS (with their digest) and which were downloaded (local). For layers
served lazily it asks the lazyfs process (its control socket's ``list``) how much of each is fetched; when the process
does not answer, those layers show "?" and the reason is printed once.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..errors import CvmfsSnapError
from ..lazyfs.control import SOCKET
from ..lazyfs.control import call as control_call
from .defaults import DEFAULT_ROOT
from .store import DB_NAME, Store

#: the lazy source's name and state dir under the root (sources/registry.py builds it as <root>/<name>)
LAZY = "lazy"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT,
                        help=f"the snapshotter's root directory (default {DEFAULT_ROOT})")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")



def _when(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def lazy_layers(root: Path, timeout: float = 5.0) -> tuple[dict[str, dict[str, Any]], str]:
    """Per digest the lazyfs process's ``list`` entry (fetched fraction, bytes fetched, complete), and "" or why
    it could not be asked."""
    sock = Path(root) / LAZY / SOCKET
    if not sock.exists():
        return {}, f"the lazyfs process is not running (no {sock})"
    try:
        answer = control_call(sock, {"op": "list"}, timeout)
    except CvmfsSnapError as exc:
        return {}, str(exc)
    layers = answer.get("layers")
    out: dict[str, dict[str, Any]] = {}
    for x in layers if isinstance(layers, list) else []:
        if isinstance(x, dict) and isinstance(x.get("digest"), str):
            out[x["digest"]] = x
    return out, ""


def _lazy_info(entry: dict[str, Any] | None) -> dict[str, Any]:
    if entry is None:
        return {"attached": False}
    try:
        fraction = max(0.0, min(1.0, float(entry.get("fetched_fraction", entry.get("fraction", 0.0)))))
    except (TypeError, ValueError):
        fraction = 0.0
    return {"attached": True, "fetched_percent": round(100.0 * fraction, 1),
            "bytes_fetched": int(entry.get("bytes_fetched", 0) or 0), "complete": bool(entry.get("complete"))}


def collect(root: Path) -> dict[str, Any]:
    store = Store(Path(root) / DB_NAME, readonly=True)
    try:
        recs = store.all()
    finally:
        store.close()
    lazy: dict[str, dict[str, Any]] = {}
    lazy_error = ""
    if any(r.remote and r.source == LAZY for r in recs):
        lazy, lazy_error = lazy_layers(Path(root))
    kinds = Counter(r.kind for r in recs)
    origins = Counter(r.source if r.remote else "local" for r in recs if r.kind == "committed")
    return {
        "root": str(root),
        "snapshots": [
            {"name": r.key, "kind": r.kind, "parent": r.parent, "source": r.source or "local",
             "digest": r.digest, "created": _when(r.created), "size": r.size, "inodes": r.inodes,
             **({"lazy": _lazy_info(lazy.get(r.digest))} if r.remote and r.source == LAZY and not lazy_error
                else {})}
            for r in recs
        ],
        "lazy_error": lazy_error,
        "counts": {"total": len(recs), "by_kind": dict(sorted(kinds.items())),
                   "committed_by_source": dict(sorted(origins.items()))},
    }


def main(args: argparse.Namespace) -> int:
    data = collect(Path(args.root))
    if args.json:
        json.dump(data, sys.stdout, indent=1, sort_keys=True)
        sys.stdout.write("\n")
        return 0
    out = sys.stdout
    snaps = data["snapshots"]
    if snaps:
        wn = min(max(len(s["name"]) for s in snaps), 60)
        wp = min(max([len(s["parent"]) for s in snaps] + [6]), 60)
        out.write(f"{'NAME':<{wn}}  {'KIND':<9}  {'PARENT':<{wp}}  ORIGIN\n")
        for s in snaps:
            origin = f"{s['source']} {s['digest']}" if s["source"] != "local" else "local"
            if s["source"] == LAZY:
                info = s.get("lazy")
                origin += (" ?" if info is None else " not attached" if not info["attached"]
                           else f" {info['fetched_percent']:.1f}% fetched" + (" (complete)" if info["complete"]
                                                                              else ""))
            out.write(f"{s['name']:<{wn}}  {s['kind']:<9}  {s['parent'] or '-':<{wp}}  {origin}\n")
    if data["lazy_error"]:
        out.write(f"lazy layers: fetch progress unknown: {data['lazy_error']}\n")
    c = data["counts"]
    kinds = ", ".join(f"{v} {k}" for k, v in c["by_kind"].items()) or "none"
    out.write(f"{c['total']} snapshot(s): {kinds}\n")
    if c["committed_by_source"]:
        out.write("committed layers by origin: "
                  + ", ".join(f"{k}: {v}" for k, v in c["committed_by_source"].items()) + "\n")
    return 0
