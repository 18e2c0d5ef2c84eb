"""Train every architecture on a simulated store and report test-split quality.

    .venv/bin/python benchmarks/bench_quality.py [--n 50000] [--out DIR] [--arch vgg6 ...]

Each architecture goes through ``train_run`` (the real path: streamed HDF5, default
TrainConfig: SGD lr 0.01 momentum 0.9, batch 256, up to 20 epochs, early stopping with
patience 5, balanced class weights, flips/rotations) on a store written by
``stampbatch.simulate.write_simulated`` with the default SimConfig (SNR 3-100, Gaussian and
Moffat PSFs, correlated noise, hot pixels, cosmic rays, streaks, off-centre sources).

resnet50 costs ~0.4 GFLOP per stamp, ~100 training stamps/s on 2 CPU cores (~6 minutes
per epoch of 35,000 stamps), so by default it trains on the first ``--resnet-n`` (10,000)
stamps of the same simulation for at most ``--resnet-epochs`` (3) epochs: its numbers are
not directly comparable with the others and are labelled so.

Reported per architecture: stamps, epochs run, wall time, test ROC AUC, completeness of the
test sources with SNR >= 7 at the threshold giving 1 % FPR on the test negatives. The issue
requires vgg6 ROC AUC >= 0.97 and that completeness >= 0.9. The runs stay in DIR/runs/ and
``stampbatch report DIR/runs`` compares them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

from stampbatch.models import architecture_names  # noqa: E402
from stampbatch.train import TrainConfig, train_run  # noqa: E402


def simulated(path: Path, n: int) -> Path:
    from stampbatch.simulate import write_simulated

    if not path.exists():
        write_simulated(path, n, seed=0, progress=False)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50_000, help="stamps in the simulated store")
    parser.add_argument("--out", type=Path, default=Path("bench-quality"),
                        help="directory for the stores and runs (reused: finished runs are "
                             "not retrained)")
    parser.add_argument("--arch", action="append", choices=architecture_names(),
                        help="architecture(s) to train (default: all)")
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--resnet-n", type=int, default=10_000,
                        help="stamps for resnet50 (0: the full store)")
    parser.add_argument("--resnet-epochs", type=int, default=3)
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    main_store = simulated(args.out / f"sim{args.n}.h5", args.n)
    rows = []
    for arch in args.arch or architecture_names():
        config = TrainConfig(epochs=args.epochs)
        path = main_store
        if arch == "resnet50":
            config = TrainConfig(epochs=args.resnet_epochs)
            if args.resnet_n and args.resnet_n < args.n:
                path = simulated(args.out / f"sim{args.resnet_n}.h5", args.resnet_n)
        print(f"== {arch} on {path.name}", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        m = train_run(path, arch, args.out / "runs" / arch, config)
        above = m["completeness_vs_snr"]["above_snr"]
        rows.append({
            "architecture": arch, "n_stamps": m["n_train"] + m["n_val"] + m["n_test"],
            "n_test": m["n_test"], "epochs_run": m["epochs_run"], "epochs": m["epochs"],
            "wall_time_s": m["wall_time_s"], "this_call_s": time.monotonic() - t0,
            "accuracy": m["accuracy"], "roc_auc": m["roc_auc"],
            "threshold_at_1pct_fpr": m["operating_point"]["threshold"],
            "fpr": m["operating_point"]["fpr"],
            "completeness_at_1pct_fpr": m["operating_point"]["completeness"],
            "completeness_snr7_at_1pct_fpr": above["completeness_at_operating_point"],
            "completeness_snr7_at_p05": above["completeness"],
            "fpr_by_kind": m.get("fpr_by_kind"),
        })
    print(f"\n{'arch':<10}{'stamps':>8}{'epochs':>8}{'wall s':>9}{'ROC AUC':>9}"
          f"{'C(SNR>=7)@1%FPR':>17}{'C(all)@1%FPR':>14}{'accuracy':>10}")
    for r in rows:
        print(f"{r['architecture']:<10}{r['n_stamps']:>8,}{r['epochs_run']:>5}/{r['epochs']:<2}"
              f"{r['wall_time_s']:>9.0f}{r['roc_auc']:>9.4f}"
              f"{r['completeness_snr7_at_1pct_fpr']:>17.3f}{r['completeness_at_1pct_fpr']:>14.3f}"
              f"{r['accuracy']:>10.4f}")
    (args.out / "quality.json").write_text(json.dumps(rows, indent=1))
    status = 0
    for r in rows:
        if r["architecture"] == "vgg6":
            ok = r["roc_auc"] >= 0.97 and r["completeness_snr7_at_1pct_fpr"] >= 0.9
            print(f"vgg6 requirement (ROC AUC >= 0.97, completeness >= 0.9 above SNR 7 at 1 % "
                  f"FPR): {'PASS' if ok else 'FAIL'}")
            status = 0 if ok else 1
    try:
        from stampbatch.report import write_report

        print(f"report: {write_report(args.out / 'runs')}")
    except Exception as exc:  # the report is a convenience here, not the benchmark
        print(f"(no report: {exc})", file=sys.stderr)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
