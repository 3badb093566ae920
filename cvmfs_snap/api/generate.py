"""Regenerate the Python gRPC stubs in ``cvmfs_snap/api/gen`` from ``cvmfs_snap/api/proto``.

Reproducible: the output depends only on the .proto files and the grpcio-tools version. protoc writes absolute
imports (``from containerd.types import mount_pb2``); they are rewritten to package imports
(``from cvmfs_snap.api.gen.containerd.types import mount_pb2``) so the stubs live inside our package.

    python -m cvmfs_snap.api.generate [--check]
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_DIR = HERE / "proto"
GEN_DIR = HERE / "gen"
PACKAGE = "cvmfs_snap.api.gen"


def _generate(out: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    tops = {p.relative_to(PROTO_DIR).parts[0] for p in PROTO_DIR.rglob("*.proto")}
    pattern = re.compile(r"^(from|import) (" + "|".join(map(re.escape, sorted(tops))) + r")(\.| )", re.M)
    for f in out.rglob("*.py*"):
        text = f.read_text()
        text = pattern.sub(lambda m: f"{m.group(1)} {PACKAGE}.{m.group(2)}{m.group(3)}", text)
        f.write_text(text)
    for d in [out, *[p for p in out.rglob("*") if p.is_dir()]]:
        (d / "__init__.py").touch()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only check that gen/ is current; exit 1 if not")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "gen"
        out.mkdir()
        _generate(out)
        if args.check:
            cmp = filecmp.dircmp(out, GEN_DIR)
            stale: list[str] = []

            def walk(c: filecmp.dircmp[str], prefix: str) -> None:
                stale.extend(prefix + n for n in c.left_only + c.right_only + c.diff_files if n != "__pycache__")
                for name, sub in c.subdirs.items():
                    walk(sub, prefix + name + "/")

            walk(cmp, "")
            if stale:
                print("stale generated stubs: " + ", ".join(sorted(stale)), file=sys.stderr)
                return 1
            return 0
        shutil.rmtree(GEN_DIR, ignore_errors=True)
        shutil.copytree(out, GEN_DIR)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
