"""CLI for the data stages: simulate, ingest, fetch, inspect."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from stampbatch.commands._types import (
    int_between,
    non_negative_int,
    path_arg,
    positive_float,
    positive_int,
    seed,
)
from stampbatch.errors import UsageError

MAX_STAMPS = 10**10  # --n: ~17 TB of 21x21 float32 stamps; more is a typo


def _compression(text: str) -> str | None:
    if text in ("none", ""):
        return None
    if text not in ("lzf", "gzip"):
        raise argparse.ArgumentTypeError("choose none, lzf or gzip")
    return text


def _add_store_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chunk-rows", type=positive_int, default=4096,
                   help="stamps per HDF5 chunk (default 4096)")
    p.add_argument("--compression", type=_compression, default=None, metavar="none|lzf|gzip",
                   help="HDF5 compression of /stamps (default none: noisy stamps barely compress)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def register(sub: argparse._SubParsersAction) -> None:  # long: argparse declarations only
    p = sub.add_parser("simulate", help="write simulated stamps (labelled, or unlabelled candidates)",
                       description="Simulate 21x21 survey stamps: a source (point, compact galaxy "
                                   "or saturated star, SNR 3-100) at the centre or not, in fields of "
                                   "other stars and galaxies, on science, sky-subtracted and "
                                   "difference-image backgrounds, with hard negatives; written to an "
                                   "HDF5 store.")
    p.add_argument("out", type=path_arg, metavar="OUT.h5")
    p.add_argument("--n", type=int_between(1, MAX_STAMPS), default=None,
                   help="number of stamps (default 30000; with --backgrounds: backgrounds used, "
                        "default all)")
    p.add_argument("--backgrounds", type=path_arg, metavar="REAL.h5",
                   help="inject point sources into these real stamps (a labelled store's "
                        "negatives or a candidate file) instead of simulating: positives, the "
                        "untouched backgrounds as negatives, off-centre injections as hard "
                        "negatives; stamps whose /meta/true_label is 1, and stamps with no "
                        "finite pixel or no noise, are left out (counted)")
    p.add_argument("--seed", type=seed, default=0, help="random seed, 0 to 2**32-1 (default 0)")
    p.add_argument("--candidates", action="store_true",
                   help="write an unlabelled candidate file (truth kept in /meta for evaluation)")
    p.add_argument("--config", type=path_arg, metavar="SIM.toml",
                   help="simulator settings (TOML, keys of SimConfig)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    _add_store_options(p)
    p.set_defaults(func=run_simulate)

    p = sub.add_parser("ingest", help="convert .npy/.npz stamp arrays into an HDF5 store",
                       description="Ingest the reference layout: stamps_sources.npy (positives) and "
                                   "stamps_noise.npy (negatives), each (N, 441) or (N, 21, 21); or "
                                   "unlabelled candidate arrays. Pickled arrays are refused.")
    p.add_argument("out", type=path_arg, metavar="OUT.h5")
    p.add_argument("--sources", type=path_arg, metavar="A.npy", help="stamps with a source (label 1)")
    p.add_argument("--noise", type=path_arg, metavar="B.npy", help="stamps without a source (label 0)")
    p.add_argument("--candidates", type=path_arg, metavar="C.npy", help="unlabelled candidate stamps")
    p.add_argument("--key", default=None,
                   help="array name inside an .npz (default: its only 2-D or 3-D array); the .npz's other "
                        "1-D keys with one value per stamp become /meta columns")
    p.add_argument("--meta", type=path_arg, metavar="TABLE.csv",
                   help="per-stamp metadata: a CSV with a header and one row per stamp in store "
                        "order (--sources rows, then --noise rows); numeric and short-text "
                        "columns become /meta/<column>")
    p.add_argument("--kbmod", type=path_arg, metavar="RESULTS",
                   help="a KBMOD Results file (.parquet, .parq, .ecsv, .hdf5): stamps from --column, "
                        "centre-cropped to 21x21; uuid and scalar columns kept in /meta")
    p.add_argument("--column", default="coadd_mean", help="with --kbmod: the co-add image column")
    p.add_argument("--label-column", metavar="COL",
                   help="with --kbmod: labels from this column (0/1, bool, real/bogus), e.g. user_class")
    _add_store_options(p)
    p.set_defaults(func=run_ingest)

    p = sub.add_parser("fetch", help="download a file, resumable, verified by sha256",
                       description="Download URL to DEST: streamed to a temporary file, resumed with "
                                   "HTTP Range after an interruption, retried with backoff, and moved "
                                   "into place only when its sha256 matches.")
    p.add_argument("url")
    p.add_argument("dest", type=path_arg)
    p.add_argument("--sha256", required=True, metavar="HEX", help="expected sha256 (64 hex digits)")
    p.add_argument("--retries", type=non_negative_int, default=5,
                   help="retries after a failed attempt (no new bytes) before giving up: at most "
                        "N + 1 failed attempts in a row (default 5)")
    p.add_argument("--timeout", type=positive_float, default=30.0,
                   help="seconds without data before retrying (default 30)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DEST")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=run_fetch)

    p = sub.add_parser("inspect", help="summarise a store: schema, counts, balance, SNR, scores",
                       description="Validate an HDF5 store and summarise it.")
    p.add_argument("files", type=path_arg, nargs="+", metavar="FILE.h5")
    p.set_defaults(func=run_inspect)


def run_simulate(args: argparse.Namespace) -> int:
    from stampbatch.config import from_mapping, load_toml
    from stampbatch.sim import simulate

    config = simulate.SimConfig()
    if args.config is not None:
        config = from_mapping(simulate.SimConfig, load_toml(args.config), str(args.config))
    if args.backgrounds is not None:
        if args.candidates:
            raise UsageError("--backgrounds writes a labelled store; drop --candidates")
        from stampbatch.sim.inject import write_injected

        info = write_injected(args.out, args.backgrounds, config=config, seed=args.seed,
                              n=args.n, chunk_rows=args.chunk_rows,
                              compression=args.compression, overwrite=args.overwrite,
                              progress=not args.quiet, log=print)
        print(f"wrote {info.n_stamps:,} stamps injected into {args.backgrounds} to {info.path}")
        return 0
    info = simulate.write_simulated(
        args.out, args.n or 30_000, config=config, seed=args.seed, candidates=args.candidates,
        chunk_rows=args.chunk_rows, compression=args.compression, overwrite=args.overwrite,
        progress=not args.quiet,
    )
    kind = "candidate" if args.candidates else "labelled"
    print(f"wrote {info.n_stamps:,} {kind} stamps to {info.path}")
    return 0


def run_ingest(args: argparse.Namespace) -> int:
    from stampbatch.ingest import arrays as fetch

    if args.kbmod is not None:
        from stampbatch.commands import _kbmod

        if args.meta is not None or args.sources or args.noise or args.candidates:
            raise UsageError("--kbmod takes its stamps and metadata from the Results table; give "
                             "it without --sources/--noise/--candidates/--meta")
        return _kbmod.run_ingest(args)
    if args.candidates is None and (args.sources is None or args.noise is None):
        raise UsageError("give --sources and --noise (a labelled store) or --candidates")
    if args.candidates is not None and (args.sources or args.noise):
        raise UsageError("--candidates cannot be combined with --sources/--noise")
    info = fetch.ingest(
        args.out, sources=args.sources, noise=args.noise, candidates=args.candidates,
        key=args.key, meta=args.meta, chunk_rows=args.chunk_rows, compression=args.compression,
        overwrite=args.overwrite,
    )
    print(f"wrote {info.n_stamps:,} stamps to {info.path}")
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    from stampbatch.ingest.download import fetch_url, redact_url

    got = fetch_url(args.url, args.dest, args.sha256, retries=args.retries, timeout=args.timeout,
                    overwrite=args.overwrite, progress=not args.quiet)
    if got.downloaded:
        print(f"downloaded {redact_url(args.url)} to {got.path} (sha256 verified)")
    else:
        print(f"{got.path} already holds this file (sha256 verified); nothing downloaded")
    return 0


def describe_store(path: Path) -> str:
    """A human summary of one store (used by ``inspect``)."""
    from stampbatch import store
    from stampbatch.train.preprocess import UNUSABLE

    info = store.open_store(path, check_labels_values=True)
    lines = [f"{path}"]
    if info.is_score_file:
        attrs = store.read_attrs(path)
        lines.append(f"  score side file for {attrs.get('source_file')} ({info.n_stamps:,} stamps)")
    else:
        lines.append(f"  schema {store.SCHEMA_VERSION}, {info.n_stamps:,} stamps of "
                     f"{info.stamp_shape[0]}x{info.stamp_shape[1]}, chunks of {info.chunk_rows}, "
                     f"compression {info.compression or 'none'}")
        if info.labelled:
            labels = store.read_labels(path)
            n_pos = int((labels == 1).sum())
            lines.append(f"  labels: {n_pos:,} source / {len(labels) - n_pos:,} no source "
                         f"({100.0 * n_pos / len(labels):.1f}% sources)")
        else:
            lines.append("  unlabelled (candidate file)")
        if info.meta_columns:
            lines.append(f"  meta: {', '.join(info.meta_columns)}")
            wanted = (store.META_SNR, store.META_KIND, store.META_TRUE_LABEL)
            meta = store.read_meta(path, [c for c in wanted if c in info.meta_columns])
            if store.META_SNR in meta:
                # Only real sources: hard negatives (hot pixels, streaks …) carry an SNR too.
                if info.labelled:
                    is_source = store.read_labels(path) == 1
                elif store.META_TRUE_LABEL in meta:
                    is_source = meta[store.META_TRUE_LABEL] == 1
                elif store.META_KIND in meta:
                    is_source = meta[store.META_KIND] == "source"
                else:
                    is_source = np.ones(len(meta[store.META_SNR]), dtype=bool)
                snr = meta[store.META_SNR]
                snr = snr[is_source & np.isfinite(snr) & (snr > 0)]
                if len(snr):
                    lines.append(f"  SNR of sources: {snr.min():.1f} to {snr.max():.1f} "
                                 f"(median {np.median(snr):.1f})")
            if store.META_KIND in meta:
                kinds, counts = np.unique(meta[store.META_KIND], return_counts=True)
                lines.append("  kinds: " + ", ".join(f"{k} {c:,}" for k, c in zip(kinds, counts)))
    report = store.check_scores(path)
    if not info.scored_models and not report.problems:
        lines.append("  scores: none")
    for model, problem in report.problems.items():
        lines.append(f"  scores/{model}: NOT SHOWN: {problem}" if model
                     else f"  scores: BROKEN: {problem}")
    for model in info.scored_models:
        if model in report.incomplete:
            lines.append(f"  scores/{model}: INCOMPLETE (interrupted run; rerun score)")
            continue
        status = store.score_status(path, model)
        if status is None:
            continue
        s = store.read_scores(path, model, with_maps=False)
        p = s.probability
        finite = np.isfinite(p)
        lines.append(
            f"  scores/{model}: {int(finite.sum()):,} scored, {int((p[finite] >= 0.5).sum()):,} "
            f"with P(source) >= 0.5, {len(s.occlusion_index):,} occlusion maps"
            + (f", {int((~finite).sum()):,} unscorable ({UNUSABLE})" if (~finite).any() else "")
            + f"; arch {status.get('architecture', '?')}, model sha256 "
              f"{str(status.get('model_sha256', '?'))[:12]}, scored {status.get('scored_at', '?')}"
        )
    return "\n".join(lines)


def run_inspect(args: argparse.Namespace) -> int:
    """Describe each file; exit 1 when a file's scores folder is broken, missing or holds
    scores of other stamps (each named, with what to run)."""
    from stampbatch import store
    from stampbatch.errors import StampbatchError
    from stampbatch.fileio import one_line

    rc = 0
    for path in args.files:
        try:                    # one bad file among many: say so, describe the others
            print(describe_store(path))
        except StampbatchError as exc:
            print(f"stampbatch inspect: error: {one_line(exc, limit=None)}", file=sys.stderr)
            rc = rc or exc.exit_code
            continue
        problems = store.check_scores(path).problems
        for problem in problems.values():
            print(problem, file=sys.stderr)
        rc = rc or (1 if problems else 0)
    return rc
