"""The KBMOD paths of ``ingest --kbmod`` and ``score RESULTS.parquet`` (dispatched from
``commands.data`` and ``commands.score``; not a command group of its own)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from stampbatch.errors import UsageError

if TYPE_CHECKING:
    from stampbatch.score.plan import ScoreOptions

NAN_HELP = ("masked pixels (NaN/Inf/fill) are filled with the stamp's sky; rows that cannot be "
            "classified honestly (a masked pixel in the central 3x3, over half masked, or no "
            "noise to measure) are not scored: prob_real and prob_bogus are NaN, cnn_class is "
            "False, and the summary counts them")


def is_results_table(path: str | Path) -> bool:
    """A KBMOD Results file by its suffix (.parquet, .parq, .ecsv, .hdf5) — except a
    stampbatch store that happens to be named .hdf5, which stays on the HDF5 path."""
    from stampbatch import store
    from stampbatch.errors import StampbatchError
    from stampbatch.kbmod import results_format

    fmt = results_format(path)
    if fmt == "hdf5" and Path(path).is_file():
        try:
            store.open_store(path)
        except StampbatchError:
            return True
        return False
    return fmt is not None


def run_ingest(args: argparse.Namespace) -> int:
    from stampbatch import kbmod

    if args.sources or args.noise or args.candidates:
        raise UsageError("--kbmod cannot be combined with --sources/--noise/--candidates")
    info = kbmod.ingest_results(
        args.out, args.kbmod, column=args.column, label_column=args.label_column,
        chunk_rows=args.chunk_rows, compression=args.compression, overwrite=args.overwrite)
    kind = "labelled" if info.labelled else "candidate"
    print(f"wrote {info.n_stamps:,} {kind} stamps ({args.column}, centre "
          f"{info.stamp_shape[0]}x{info.stamp_shape[1]}) from {args.kbmod} to {info.path}")
    return 0


def run_score(args: argparse.Namespace, options: ScoreOptions) -> int:
    """Score each KBMOD Results file given with ``options`` (the command's, ``--out`` the
    directory of the scored tables); one summary block per file."""
    from stampbatch import kbmod
    from stampbatch.train.preprocess import UNUSABLE

    if len(args.model) != 1:
        raise UsageError("a KBMOD Results file is scored by one --model at a time "
                         "(its prob_real column holds one model's probabilities)")
    if args.out is not None:
        if args.out.exists() and not args.out.is_dir():
            raise UsageError(f"--out {args.out}: is a file; give the directory the scored "
                             "tables are written to (DIR/<stem>.scored<suffix>)")
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--out {args.out}: cannot create the directory "
                             f"({exc.strerror})") from None
    for results in args.candidates:
        s = kbmod.score_results(results, args.model[0], options, column=args.column,
                                threshold=args.threshold)
        print(f"scored {s.rows:,} KBMOD results ({s.column}) from {s.results} with {s.model} "
              f"(sha256 {s.sha256[:12]}) in {s.wall_s:,.1f} s ({s.rows_per_s:,.0f} rows/s) on "
              f"{s.scheduler}")
        print("  " + ", ".join(f"{k} {v:,.1f} s" for k, v in s.phases_s.items()))
        print(f"  cnn_class True for {s.positives:,} rows (prob_real >= {s.threshold:.4g}, "
              f"{s.threshold_from}), {s.maps:,} occlusion maps")
        if s.unscorable:
            print(f"  {s.unscorable:,} rows unscorable ({UNUSABLE}, in {s.column}): "
                  "prob_real NaN, cnn_class False")
        print(f"  results: {s.output}")
    return 0
