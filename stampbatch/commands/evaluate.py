"""CLI: evaluate a trained run on a labelled store, by group."""

from __future__ import annotations

import argparse
from pathlib import Path

from stampbatch.train.rundir import MODEL_FILE


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="score a labelled store with a run's model: AUC, completeness, by group",
        description=f"Evaluate RUN/{MODEL_FILE} on a labelled store (or a candidate file with "
                    "/meta/true_label): ROC AUC, completeness and false-positive rate at the "
                    "run's 1 %% and 0.1 %% FPR thresholds, completeness by SNR bin, per-group "
                    "AUC and FPR for /meta columns, confusion matrix, reliability diagram. "
                    "Writes RUN/eval/<store>/evaluation.json and figures; 'stampbatch report' "
                    "shows them.")
    p.add_argument("run", type=Path, metavar="RUN", help="a finished run directory")
    p.add_argument("--data", type=Path, required=True, metavar="LABELLED.h5")
    p.add_argument("--by", nargs="+", metavar="COLUMN", default=None,
                   help="/meta columns to group by (default: every text or true/false column with "
                        "at most 30 values, and binned nn_distance, snr, half_light_radius; "
                        "a numeric column is grouped only when named here)")
    p.add_argument("--no-figures", dest="figures", action="store_false",
                   help="write evaluation.json only")
    p.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    from stampbatch.report.evaluate import (
        EVAL_DIR,
        EVALUATION_FILE,
        evaluate_run,
        store_dir_name,
        summary_lines,
    )

    result = evaluate_run(args.run, args.data, args.by, figures=args.figures)
    print("\n".join(summary_lines(result, args.by or ())))
    print(f"wrote {args.run / EVAL_DIR / store_dir_name(args.data) / EVALUATION_FILE}")
    return 0
