"""CLI for pack: one self-contained HDF5 file per scored store, to move, archive or share."""

from __future__ import annotations

import argparse
from pathlib import Path

from stampbatch.commands._types import path_arg
from stampbatch.errors import UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pack", help="write a scored store and its scores as one self-contained file",
        description="Write each FILE with the scores of its sidecar folder (<file>.scores/) "
                    "embedded as ordinary /scores/<model> groups: one HDF5 file that keeps its "
                    "scores when moved, archived or sent alone. The original is not changed. "
                    "Crash-safe: written under a temporary name, fsynced, then renamed.")
    p.add_argument("files", type=path_arg, nargs="+", metavar="FILE.h5",
                   help="scored candidate or labelled stores")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", type=path_arg, metavar="NEW.h5",
                       help="the packed file (one FILE only; default <stem>.packed.h5 beside FILE)")
    where.add_argument("--out-dir", type=path_arg, metavar="DIR",
                       help="write DIR/<FILE's name> for each FILE (a folder to ship as is)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=run_pack)


def run_pack(args: argparse.Namespace) -> int:
    from stampbatch import store

    if args.out is not None and len(args.files) > 1:
        raise UsageError(f"--out names one file; {len(args.files)} inputs given (use --out-dir)")
    if args.out_dir is not None and not args.out_dir.is_dir():
        raise UsageError(f"--out-dir {args.out_dir}: not a directory")
    outs = [args.out if args.out is not None else store.packed_path(f, args.out_dir)
            for f in args.files]
    seen: dict[Path, Path] = {}
    for path, out in zip(args.files, outs):
        key = out.resolve()
        if key in seen:
            raise UsageError(f"{seen[key]} and {path} would both be packed to {out}")
        seen[key] = path
    # every input and output checked before the first file is written
    for path, out in zip(args.files, outs):
        store.check_packable(path, out, overwrite=args.overwrite)
    for path, out in zip(args.files, outs):
        packed = store.pack(path, out, overwrite=args.overwrite)
        note = (f"; left out, incomplete (rerun score): {', '.join(packed.skipped)}"
                if packed.skipped else "")
        print(f"packed {path} -> {packed.path} (scores: {', '.join(packed.models)}){note}")
    return 0
