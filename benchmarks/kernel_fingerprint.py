#!/usr/bin/env python3
"""sha256 of every file a build writes: checks that a refactor leaves the generated kernels unchanged.

Builds are reproducible byte for byte, so equal library hashes before and after a change mean equal
kernels (and equal VM code). Run it on both trees and diff the output::

    python benchmarks/kernel_fingerprint.py --target cuda --dtype float16 --set size=tiny > after.txt

The manifest itself is left out: it records package versions and the database note.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

from mlcweb.cli import main as mlcweb_main


def fingerprint(out: Path) -> list[str]:
    manifest = json.loads((out / "manifest.json").read_text())
    lines = []
    for entry in sorted(manifest["files"], key=lambda e: e["path"]):
        digest = hashlib.sha256((out / entry["path"]).read_bytes()).hexdigest()
        lines.append(f"{digest}  {entry['path']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="stable-diffusion")
    parser.add_argument("--target", default="cuda")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--set", action="append", default=[], help="plugin config KEY=VALUE (repeatable)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "build"
        cmd = ["build", args.model, "--target", args.target, "--dtype", args.dtype, "--out", str(out)]
        for item in args.set:
            cmd += ["--set", item]
        rc = mlcweb_main(cmd)
        if rc:
            return rc
        print("\n".join(fingerprint(out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
