"""CLI for scoring: score (Dask, local or Slurm) and plot-occlusion."""

from __future__ import annotations

import argparse
from pathlib import Path

from stampbatch.commands import _kbmod
from stampbatch.commands._types import (
    non_negative_int,
    path_arg,
    positive_float,
    positive_int,
)
from stampbatch.errors import UsageError


def _occlusion(text: str) -> str:
    from stampbatch.errors import StampbatchError
    from stampbatch.score.tasks import OcclusionMode

    try:
        return str(OcclusionMode.parse(text))
    except StampbatchError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _walltime(text: str) -> str:
    """A Slurm time limit, read as Slurm reads it: a bare number is minutes."""
    from stampbatch.errors import StampbatchError
    from stampbatch.score.cluster import walltime_seconds

    try:
        seconds = walltime_seconds(text)
    except StampbatchError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"the time limit must be positive, got {text!r}")
    return text


MAX_PANELS = 50  # stamps per occlusion figure: 3 panels each, ~3 inches tall per stamp
MAX_NAME = 100  # characters in /scores/NAME


def _rows(text: str) -> list[int]:
    try:
        rows = [int(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected row numbers like 1,2,3, got {text!r}") from None
    if not rows or min(rows) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative row numbers, got {text!r}")
    if len(set(rows)) > MAX_PANELS:
        raise argparse.ArgumentTypeError(f"at most {MAX_PANELS} rows per figure, got "
                                         f"{len(set(rows))}; draw several figures")
    return rows


def _top(text: str) -> int:
    value = positive_int(text)
    if value > MAX_PANELS:
        raise argparse.ArgumentTypeError(f"at most {MAX_PANELS} stamps per figure, got {value}; "
                                         f"use --rows for the ones you need")
    return value


def _score_name(text: str) -> str:
    """A /scores/NAME: 1-100 printable characters, no '/' (HDF5 would nest groups)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a non-empty name")
    if len(text) > MAX_NAME:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_NAME} characters, got {len(text)}")
    if not text.isprintable() or "/" in text or text != text.strip():
        raise argparse.ArgumentTypeError(f"expected printable characters without '/' or "
                                         f"surrounding spaces, got {text!r}")
    return text


def register(sub: argparse._SubParsersAction) -> None:  # long: argparse declarations only
    p = sub.add_parser(
        "score", help="score candidate files with trained models (Dask; local or Slurm)",
        description="Score candidate stamp files with one or more trained models: P(source) for "
                    "every stamp and occlusion maps for the rows asked for, written to "
                    "/scores/<model> in each file (or a side file with --out). Crash-safe: "
                    "finished chunks are journaled, so a killed run resumes where it stopped.")
    p.add_argument("candidates", nargs="+", metavar="CANDIDATES",
                   help="candidate .h5 files, globs ('survey/*.h5') or @list.txt (one path a line, "
                        "# comments; relative paths are relative to the list file's directory)")
    p.add_argument("--model", action="append", required=True, metavar="RUN_DIR_OR_FILE",
                   help="a training run directory or a .keras file (repeat for several models)")
    p.add_argument("--name", type=_score_name, help="store the scores as /scores/NAME (one model only; default: "
                                  "the run directory's name or the .keras file's stem)")
    p.add_argument("--occlusion", type=_occlusion, default="none", metavar="none|all|above:P",
                   help="which stamps get an occlusion map (default none)")
    p.add_argument("--occlusion-patch", type=positive_int, default=5, metavar="K",
                   help="side of the square occluding patch in pixels (default 5)")
    p.add_argument("--chunk-size", type=positive_int, default=4096, metavar="ROWS",
                   help="stamps per task, rounded to the files' HDF5 chunking (default 4096)")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="write scores to DIR/<file stem>.scores.h5 instead of into the candidate "
                        "files (for read-only inputs)")
    p.add_argument("--backend", choices=("auto", "onnx", "tf"), default="auto",
                   help="inference backend (default auto: ONNX Runtime, the faster one here)")
    # plan.PRECISIONS and "auto", spelled out: importing plan here would load h5py and ONNX
    # Runtime for every command line
    p.add_argument("--precision", choices=("fp32", "auto"), default="auto",
                   help="numeric precision of inference (default auto = fp32). Only FP32 is "
                        "offered: int8 and bf16 were tried and none was 1.3x faster end to end "
                        "and as accurate on the run's held-out stamps (BENCHMARKS.md). The "
                        "precision is recorded with the scores and in the resume journal")
    p.add_argument("--force", action="store_true",
                   help="rescore files already scored by this model, replace scores of another "
                        "model file under the same name, discard a journal with other settings")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip unusable candidate files (listed at the end) instead of stopping")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    kb = p.add_argument_group("KBMOD Results files (.parquet, .parq, .ecsv, .hdf5): written to "
                              "DIR/<stem>.scored<suffix> with prob_real, prob_bogus, cnn_class "
                              "(--force replaces an existing one and discards a killed "
                              "run's journal)")
    kb.add_argument("--column",
                    help="the co-add image column to score, centre-cropped to the model's input "
                         f"(default coadd_mean); {_kbmod.NAN_HELP}")
    kb.add_argument("--threshold", metavar="P|fpr:F",
                    help="cnn_class is prob_real >= P (default 0.5), or fpr:0.01 for the run's "
                         "stored threshold at 1%% false positives")
    where = p.add_argument_group("where to run (default: threads of this process for up to "
                                 "4 M stamp evaluations, else a local Dask cluster; --workers "
                                 "or --dashboard always starts one)")
    where.add_argument("--scheduler", metavar="ADDRESS",
                       help="join a running Dask scheduler (e.g. tcp://host:8786)")
    where.add_argument("--workers", type=positive_int, metavar="N",
                       help="worker processes (local) or Slurm jobs (--slurm without --gpus)")
    where.add_argument("--threads-per-worker", type=positive_int, metavar="N",
                       help="threads per local worker process (default: all cores, up to 4; "
                            "with --workers N, the cores shared among the N)")
    where.add_argument("--slurm", action="store_true",
                       help="start Dask workers as Slurm jobs (dask-jobqueue)")
    where.add_argument("--gpus", type=non_negative_int, default=0, metavar="N",
                       help="with --slurm: N jobs of one GPU each (--gres=gpu:1)")
    where.add_argument("--partition", help="Slurm partition")
    where.add_argument("--account", help="Slurm account")
    where.add_argument("--walltime", type=_walltime, metavar="TIME",
                       help="Slurm time limit per worker job, as Slurm reads it: 30 is 30 "
                            "minutes, also MM:SS, HH:MM:SS, D-HH[:MM[:SS]] (default 01:00:00)")
    where.add_argument("--start-timeout", type=positive_float, metavar="S",
                       help="seconds to wait for the --scheduler to answer or the first Slurm "
                            "worker to start, before giving up with the cause in one line and "
                            "nothing left behind (default 120)")
    where.add_argument("--dashboard", metavar="ADDRESS",
                       help="serve the Dask dashboard of a local cluster here (e.g. :8787; "
                            "default: no dashboard)")
    where.add_argument("--cores", type=positive_int,
                       help="CPU cores per Slurm worker job (default 4)")
    where.add_argument("--memory", help="memory per Slurm worker job (default 4GB)")
    where.add_argument("--slurm-log-dir", type=Path, metavar="DIR",
                       help="where the Slurm worker jobs write their logs")
    p.set_defaults(func=run_score)

    p = sub.add_parser(
        "plot-occlusion", help="draw stamps with their occlusion maps overlaid (PNG)",
        description="Draw scored stamps with their occlusion maps overlaid, pixel for pixel.")
    p.add_argument("file", type=path_arg, metavar="FILE.h5",
                   help="a scored candidate file, or a side file written with --out")
    p.add_argument("--model", required=True, metavar="NAME", help="the /scores/NAME to show")
    sel = p.add_mutually_exclusive_group(required=True)
    sel.add_argument("--rows", type=_rows, metavar="1,2,3",
                     help=f"stamp rows (with maps; at most {MAX_PANELS})")
    sel.add_argument("--top", type=_top, metavar="K",
                     help=f"the K mapped stamps with the highest P(source) (at most {MAX_PANELS})")
    p.add_argument("--candidates", type=path_arg, metavar="CANDIDATES.h5",
                   help="the candidate file holding the stamps (default: FILE itself, or the "
                        "source recorded in a side file)")
    p.add_argument("--out", type=path_arg, required=True, metavar="FIG.png")
    p.set_defaults(func=run_plot_occlusion)


def _check_list_files(items: list[str]) -> None:
    """An @list.txt must be a text file of paths (a binary file would give NUL-byte paths)."""
    for item in items:
        if not item.startswith("@") or not Path(item[1:]).is_file():
            continue  # the scorer names missing list files itself
        try:
            text = Path(item[1:]).read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"{item[1:]}: not a readable UTF-8 list of paths ({exc})") from exc
        if "\0" in text:
            raise UsageError(f"{item[1:]}: not a text list of paths (it holds NUL bytes)")


def _refuse_ignored_options(args: argparse.Namespace) -> None:
    """An option the run would not use is refused, not silently dropped: Slurm job options
    without --slurm, local-cluster options with --slurm or --scheduler, KBMOD table options
    on HDF5 candidate files."""
    given = lambda *pairs: [flag for flag, value in pairs if value]  # noqa: E731
    slurm_only = given(("--gpus", args.gpus), ("--partition", args.partition),
                       ("--account", args.account), ("--walltime", args.walltime),
                       ("--cores", args.cores), ("--memory", args.memory),
                       ("--slurm-log-dir", args.slurm_log_dir))
    if slurm_only and not args.slurm:
        raise UsageError(f"{', '.join(slurm_only)} need --slurm (without it they would be "
                         "ignored)")
    local_only = given(("--threads-per-worker", args.threads_per_worker),
                       ("--dashboard", args.dashboard))
    if local_only and (args.slurm or args.scheduler):
        raise UsageError(f"{', '.join(local_only)} apply to a local cluster, not to "
                         f"{'--slurm' if args.slurm else '--scheduler'} (they would be ignored)")
    if args.start_timeout and not (args.slurm or args.scheduler):
        raise UsageError("--start-timeout limits the wait for --slurm workers or a --scheduler; "
                         "a local run starts its own (it would be ignored)")
    if args.scheduler and args.workers:
        raise UsageError("--workers starts local workers or Slurm jobs; a --scheduler brings "
                         "its own (it would be ignored)")
    tables = [_kbmod.is_results_table(c) for c in args.candidates]
    kbmod_only = given(("--threshold", args.threshold), ("--column", args.column))
    if kbmod_only and not any(tables):
        raise UsageError(f"{', '.join(kbmod_only)} apply to KBMOD Results tables (.parquet, "
                         ".parq, .ecsv, .hdf5) only; HDF5 candidate files get P(source) "
                         "in /scores (they would be ignored)")


def run_score(args: argparse.Namespace) -> int:
    from stampbatch.score import run as score
    from stampbatch.score.cluster import START_TIMEOUT

    _check_list_files(args.candidates)
    _refuse_ignored_options(args)
    slurm = None
    if args.slurm:
        slurm = score.SlurmOptions(
            workers=args.workers or 1, gpus=args.gpus, cores=args.cores or 4,
            memory=args.memory or "4GB", partition=args.partition, account=args.account,
            walltime=args.walltime or "01:00:00",
            log_directory=str(args.slurm_log_dir) if args.slurm_log_dir else None,
            start_timeout=args.start_timeout or START_TIMEOUT)
    where = score.ClusterOptions(
        scheduler=args.scheduler, slurm=slurm, n_workers=None if args.slurm else args.workers,
        threads_per_worker=args.threads_per_worker, dashboard=args.dashboard,
        start_timeout=args.start_timeout or START_TIMEOUT)
    options = score.ScoreOptions(
        name=args.name, occlusion=args.occlusion, patch=args.occlusion_patch,
        chunk_size=args.chunk_size, out_dir=args.out, backend=args.backend,
        precision=args.precision, force=args.force, skip_bad=args.skip_bad, cluster=where,
        progress=not args.quiet)
    tables = [c for c in args.candidates if _kbmod.is_results_table(c)]
    if tables:
        if len(tables) != len(args.candidates):
            raise UsageError("score KBMOD Results files and HDF5 candidate files in separate runs")
        args.column = args.column or "coadd_mean"
        args.threshold = args.threshold or "0.5"
        return _kbmod.run_score(args, options)
    summary = score.score_files(args.candidates, args.model, options)
    print(format_summary(summary))
    return 0


def format_summary(summary) -> str:  # noqa: ANN001 - score.ScoreSummary
    """The end-of-run report: stamps, per-model counts, unscorable rows, time, rate."""
    from stampbatch.train.preprocess import UNUSABLE

    lines = []
    if summary.stamps_scored:
        lines.append(f"scored {summary.stamps_scored:,} stamps from {len(summary.files)} file(s) "
                     f"in {summary.wall_s:,.1f} s ({summary.stamps_per_s:,.0f} stamps/s) on "
                     f"{summary.scheduler}")
    elif summary.targets:
        lines.append(f"wrote journaled scores of {len(summary.targets)} file(s) "
                     f"in {summary.wall_s:,.1f} s")
    else:
        lines.append("nothing to score")
    for m in summary.models.values():
        if m.stamps:
            lines.append(f"  {m.name} ({m.backend}, sha256 {m.sha256[:12]}): {m.stamps:,} stamps, "
                         f"{m.above_half:,} with P(source) >= 0.5, {m.maps:,} occlusion maps")
    if summary.unscorable:
        lines.append(f"  {summary.unscorable:,} stamps unscorable ({UNUSABLE}): probability "
                     "NaN, no map; masked pixels elsewhere are filled with the stamp's sky")
    for target in summary.targets:
        lines.append(f"  results: {target}")
    for target, model in summary.up_to_date:
        lines.append(f"  up to date: {target} /scores/{model}")
    if summary.skipped:
        lines.append(f"skipped {len(summary.skipped)} file(s):")
        lines.extend(f"  {path}: {reason}" for path, reason in summary.skipped)
    return "\n".join(lines)


def run_plot_occlusion(args: argparse.Namespace) -> int:
    import numpy as np

    from stampbatch import store
    from stampbatch.errors import StampbatchError
    from stampbatch.report import plots

    scores = store.read_scores(args.file, args.model, with_maps=False)
    index = scores.occlusion_index
    if len(index) == 0:
        raise StampbatchError(f"{args.file}: /scores/{args.model} has no occlusion maps (score "
                              "with --occlusion all or above:P)")
    if args.rows is not None:
        missing = sorted(set(args.rows) - set(index.tolist()))
        if missing:
            raise StampbatchError(f"{args.file}: rows {missing[:10]} have no occlusion map for "
                                  f"{args.model} ({len(index):,} rows have one)")
        rows = list(dict.fromkeys(args.rows))
    else:
        p = scores.probability[index]
        order = np.argsort(-np.nan_to_num(p, nan=-1.0), kind="stable")[: args.top]
        rows = [int(r) for r in index[order]]
    source = args.candidates
    if source is None:
        info = store.open_store(args.file)
        source = Path(store.read_attrs(args.file)["source_file"]) if info.is_score_file \
            else args.file
    n_source = store.open_store(source).n_stamps
    if n_source != len(scores.probability):
        raise StampbatchError(f"{source}: holds {n_source:,} stamps but /scores/{args.model} of "
                              f"{args.file} scored {len(scores.probability):,}; give the candidate "
                              f"file that was scored")
    made_from = scores.attrs.get("source_fingerprint")
    if made_from is not None and store.stamps_fingerprint(source) != made_from:
        raise StampbatchError(f"{source}: holds other stamps than the ones /scores/{args.model} "
                              f"of {args.file} was made from; pass the scored candidate file "
                              "with --candidates, or rescore")
    stamps, _ = store.read_rows(source, np.asarray(rows))
    by_row = store.read_occlusion(args.file, args.model, rows)
    maps = np.stack([by_row[r] for r in rows])
    probs = scores.probability[np.asarray(rows)]
    shown = ", ".join(str(r) for r in rows[:12]) + (" …" if len(rows) > 12 else "")
    title = f"{args.file.name}: /scores/{args.model}, rows {shown} (panels in this order)"
    path = plots.plot_occlusion(stamps, maps, probs, list(range(len(rows))), args.out, title=title,
                                labels=rows)
    print(f"wrote {path} ({len(rows)} stamps)")
    return 0
