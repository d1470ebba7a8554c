#!/usr/bin/env python3
"""Generate swarm/_proto/*.py from protos/swarm.proto with grpcio-tools.

Usage: python scripts/gen_proto.py [--out DIR]   (DIR defaults to the repository root)

The `-Iswarm/_proto=protos` mapping makes the generated imports package-relative
(`from swarm._proto import swarm_pb2`), so the code works from an installed package.
tests/test_protocol.py regenerates into a temporary folder and fails when the committed files differ.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    (out / "swarm" / "_proto").mkdir(parents=True, exist_ok=True)
    rc = protoc.main([
        "grpc_tools.protoc",
        f"-Iswarm/_proto={ROOT / 'protos'}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        "swarm/_proto/swarm.proto",
    ])
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    return sorted((out / "swarm" / "_proto").glob("swarm_pb2*.py"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT)
    args = parser.parse_args()
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
