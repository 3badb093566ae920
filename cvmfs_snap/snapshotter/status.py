"""``cvmfs-snap status``: what the node snapshotter holds, and where each layer comes from.

Reads the snapshotter's sqlite metadata read-only (safe while the daemon runs: WAL lets readers in), so an admin can
see at a glance which layers are served from CVMFS (with their digest) and which were downloaded (local).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .config import DEFAULT_ROOT
from .store import DB_NAME, Store


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT,
                        help=f"the snapshotter's root directory (default {DEFAULT_ROOT})")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")



def _when(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def collect(root: Path) -> dict[str, Any]:
    store = Store(Path(root) / DB_NAME, readonly=True)
    try:
        recs = store.all()
    finally:
        store.close()
    kinds = Counter(r.kind for r in recs)
    origins = Counter(r.source if r.remote else "local" for r in recs if r.kind == "committed")
    return {
        "root": str(root),
        "snapshots": [
            {"name": r.key, "kind": r.kind, "parent": r.parent, "source": r.source or "local",
             "digest": r.digest, "created": _when(r.created), "size": r.size, "inodes": r.inodes}
            for r in recs
        ],
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
            out.write(f"{s['name']:<{wn}}  {s['kind']:<9}  {s['parent'] or '-':<{wp}}  {origin}\n")
    c = data["counts"]
    kinds = ", ".join(f"{v} {k}" for k, v in c["by_kind"].items()) or "none"
    out.write(f"{c['total']} snapshot(s): {kinds}\n")
    if c["committed_by_source"]:
        out.write("committed layers by origin: "
                  + ", ".join(f"{k}: {v}" for k, v in c["committed_by_source"].items()) + "\n")
    return 0
