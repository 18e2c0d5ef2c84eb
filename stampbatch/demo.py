"""The main job end to end, as ``make demo`` runs it.

simulated training stamps → every architecture trained through submitit (Slurm when the
machine has it, the local executor otherwise) → a simulated candidate set of 100,000
trajectory stamps scored by every model with the Dask scorer (occlusion maps for the
candidates a person would look at: P ≥ 0.99, about 24 for resnet50) → HDF5 scores, the
training report and occlusion figures; the stage times close the summary.

    python -m stampbatch.demo --out demo-output [--train-stamps 30000] [--candidates 100000]

Sized to finish in about ten minutes on two CPU cores (BENCHMARKS.md has the stage table):
resnet50, ~65x vgg6's multiply-adds per stamp, trains on 3,000 of the training stamps for
two epochs (``jobs/demo.toml``), and the longest jobs start first so the job array keeps
both cores busy. On a GPU node give it the whole store (drop its ``train_stamps``).

Each step is the same ``stampbatch`` command a user would type, so the demo doubles as a
worked example; it prints each command before running it. Rerunning resumes: finished
stores, trained runs and complete scores are kept.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from stampbatch import cli, store
from stampbatch.train import rundir

REPO = Path(__file__).resolve().parents[1]
DEMO_SPEC = REPO / "jobs" / "demo.toml"
DEMO_CANDIDATES = REPO / "jobs" / "demo_candidates.toml"
COSTLY_MACS = 10_000_000  # models above this get --costly-occlusion instead of above:0.5


class Stages:
    """Wall time of each stage of the demo, printed at the end so a user sees where it went."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def table(self) -> str:
        total = sum(self.seconds.values())
        width = max([len("total"), *map(len, self.seconds)])
        lines = [f"  {stage:<{width}}  {sec:>7,.1f} s" for stage, sec in self.seconds.items()]
        return "\n".join([*lines, f"  {'total':<{width}}  {total:>7,.1f} s"])


def run(args: list[str], stages: Stages | None = None, stage: str | None = None) -> None:
    """Run one stampbatch command, echoing it; stop the demo if it fails. Its wall time
    counts towards ``stage`` (default: the command's name)."""
    print(f"\n$ stampbatch {shlex.join(args)}", flush=True)
    t0 = time.monotonic()
    code = cli.main(args)
    if code != 0:
        raise SystemExit(f"demo: 'stampbatch {args[0]}' failed (exit {code})")
    seconds = time.monotonic() - t0
    print(f"  ({seconds:,.1f} s)", flush=True)
    if stages is not None:
        stages.add(stage or args[0], seconds)


def macs_per_stamp(run_dir: Path) -> int:
    """Multiply-adds per stamp of a trained run (from its metrics.json)."""
    return int(json.loads((run_dir / rundir.METRICS_FILE).read_text()).get("macs_per_stamp", 0))


def completeness_table(candidates: Path, models: list[str]) -> str:
    """Recall and false-positive rate of each model against the candidates' hidden truth."""
    truth = store.read_meta(candidates, [store.META_TRUE_LABEL, store.META_SNR])
    label = truth[store.META_TRUE_LABEL].astype(bool)
    snr = truth[store.META_SNR]
    lines = [f"{'model':<12}{'P>=0.5':>10}{'completeness':>14}{'SNR>=7':>9}{'FPR':>10}"]
    for model in models:
        p = store.read_scores(candidates, model, with_maps=False).probability
        hit = p >= 0.5
        bright = label & (snr >= 7)
        lines.append(
            f"{model:<12}{int(hit.sum()):>10,}{hit[label].mean():>14.3f}"
            f"{hit[bright].mean():>9.3f}{hit[~label].mean():>10.5f}"
        )
    return "\n".join(lines)


def write_kbmod_results(path: Path, candidates: Path, n: int, seed: int = 3) -> None:
    """The first ``n`` candidates as a KBMOD Results table, written as KBMOD's write_table
    writes it (astropy Table.write; trajectory columns, uuid, 21x21 coadd_mean flattened in
    Parquet with its shape in the meta ``image_column_shapes``)."""
    from astropy.table import Table

    rng = np.random.default_rng(seed)
    t = Table({"x": rng.integers(0, 4000, n), "y": rng.integers(0, 4000, n),
               "vx": rng.normal(0, 50, n), "vy": rng.normal(0, 50, n),
               "likelihood": rng.uniform(5, 50, n), "flux": rng.uniform(100, 1000, n),
               "obs_count": rng.integers(10, 20, n),
               "uuid": [f"{v:032x}" for v in rng.integers(0, 2**62, n)],
               "coadd_mean": store.read_stamps(candidates, 0, n)})
    t.meta["image_column_shapes"] = {"coadd_mean": [21, 21]}
    t.meta["mjd_mid"] = np.linspace(60370.1, 60372.1, 20)
    t.write(path)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo-output"), help="where everything goes")
    parser.add_argument("--train-stamps", type=int, default=30_000, help="labelled training stamps")
    parser.add_argument("--candidates", type=int, default=100_000, help="candidate stamps to score")
    parser.add_argument("--epochs", type=int, default=None, help="override every architecture's epochs")
    parser.add_argument("--executor", choices=("auto", "slurm", "local"), default="auto")
    parser.add_argument("--occlusion", default="above:0.99", metavar="above:P",
                        help="occlusion selection for the models up to 10 M multiply-adds per "
                             "stamp (default above:0.99: the candidates a person would look at)")
    parser.add_argument("--costly-maps", type=int, default=24, metavar="K",
                        help="occlusion maps to aim at for each model above 10 M multiply-adds "
                             "per stamp (resnet50): its threshold is set from the run's own test "
                             "predictions (default 24)")
    return parser


def costly_occlusion(run_dir: Path, n_candidates: int, maps: int) -> str:
    """``above:P`` with P such that about ``maps`` of ``n_candidates`` noise candidates pass,
    judged by the run's own test split: P is the (1 - maps / n) quantile of the P(source)
    its test negatives got (never below 0.5).

    A fixed P cannot bound the cost: an undertrained or overconfident model puts a fifth of
    the noise above 0.999 (seen with one epoch of resnet50), and each map of resnet50 costs
    289 of its forward passes (~40 GFLOP).
    """
    with np.load(run_dir / rundir.PREDICTIONS_FILE) as pred:
        noise = pred["probability"][(pred["labels"] == 0) & pred["finite"]]
    q = 1.0 - maps / max(n_candidates, 1)
    if not len(noise) or q <= 0:
        return "above:0.5"
    p = max(float(np.quantile(noise, q, method="higher")), 0.5)
    if (noise >= p).mean() * n_candidates > 2 * maps:   # ties at the top: P = 1.0 for many
        print(f"(no occlusion maps for {run_dir.name}: {(noise >= p).mean():.1%} of its test "
              f"noise has P(source) >= {p:.6g}; no threshold picks about {maps} candidates)")
        return "none"
    return f"above:{p:.6g}"


def _score_all(candidates: Path, run_dirs: list[Path], occlusion: str, costly_maps: int,
               n_candidates: int, stages: Stages) -> None:
    """Score the candidates with every run, occlusion maps for the candidates worth a look.

    An occlusion map costs 289 forward passes, so maps for every candidate above 0.5 (some
    6 % of the noise passes 0.5 at the calibrated models' even-class prior) cost more than
    the scoring itself; a person looks at the most probable ones. For a model like resnet50
    (~65x vgg6's multiply-adds) even those would take minutes on two CPU cores, so its maps
    are limited to about ``costly_maps`` each (:func:`costly_occlusion`; on a GPU node use
    --occlusion above:0.5 for every model). Two Dask workers of one thread each: every
    model call single-threaded, the two cores busy with two chunks.
    """
    cheap = [d for d in run_dirs if macs_per_stamp(d) <= COSTLY_MACS]
    groups = [(cheap, occlusion)] if cheap else []
    groups += [([d], costly_occlusion(d, n_candidates, costly_maps))
               for d in run_dirs if macs_per_stamp(d) > COSTLY_MACS]
    for group, selection in groups:
        score = ["score", str(candidates), "--occlusion", selection, "--workers", "2"]
        for run_dir in group:
            score += ["--model", str(run_dir)]
        run(score, stages, "score " + " + ".join(d.name for d in group))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    train, candidates, runs = out / "train.h5", out / "candidates.h5", out / "runs"
    t_start = time.monotonic()
    stages = Stages()

    if not train.exists():
        run(["simulate", str(train), "--n", str(args.train_stamps), "--seed", "1"], stages,
            "simulate")
    if not candidates.exists():
        run(["simulate", str(candidates), "--n", str(args.candidates), "--seed", "2", "--candidates",
             "--config", str(DEMO_CANDIDATES)], stages, "simulate")
    run(["inspect", str(train), str(candidates)], stages, "simulate")

    launch = ["launch", str(DEMO_SPEC), "--data", str(train), "--runs", str(runs), "--executor",
              args.executor, "--wait"]
    if args.epochs:
        launch += ["--epochs", str(args.epochs)]
    run(launch, stages, "train every architecture (launch --wait)")

    run_dirs = sorted(p.parent for p in runs.glob(f"*/{rundir.MODEL_FILE}"))
    if not run_dirs:
        raise SystemExit(f"demo: no trained model under {runs}")
    _score_all(candidates, run_dirs, args.occlusion, args.costly_maps,
               store.open_store(candidates).n_stamps, stages)

    models = [p.name for p in run_dirs]
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    for model in models:
        if not len(store.read_scores(candidates, model, with_maps=False).occlusion_index):
            print(f"(no occlusion figure for {model}: no candidate was given an occlusion "
                  f"map)")
            continue
        run(["plot-occlusion", str(candidates), "--model", model, "--top", "6",
             "--out", str(figures / f"occlusion_{model}.png")], stages, "inspect, figures")
    run(["inspect", str(candidates)], stages, "inspect, figures")

    # A KBMOD search's Results file among the candidates: scored into results.scored.parquet
    kbmod_results = out / "kbmod_results.parquet"
    t0 = time.monotonic()
    if not kbmod_results.exists():
        write_kbmod_results(kbmod_results, candidates, min(20_000, args.candidates))
    stages.add("KBMOD table", time.monotonic() - t0)
    best = next((d for d in run_dirs if d.name == "vgg6"), run_dirs[0])
    if not (out / "kbmod_results.scored.parquet").exists():
        # maps for the rows a person would look at, as for the HDF5 candidates: above 0.5 a
        # well-trained vgg6 passes every source and ~6 % of the noise, at 289 passes a map
        run(["score", str(kbmod_results), "--model", str(best), "--occlusion", args.occlusion,
             "--threshold", "fpr:0.01"], stages, "KBMOD table")

    print("\nAgainst the candidates' hidden truth (kept in /meta for evaluation):")
    print(completeness_table(candidates, models))
    report = runs / "report.html"
    print(f"\nDemo finished in {time.monotonic() - t_start:,.0f} s.")
    print(f"  scores (HDF5):      {candidates}  (/scores/<model>/probability, occlusion, occlusion_index)")
    print(f"  training report:    {report}")
    print(f"  run directories:    {runs}/<arch>/ ({rundir.MODEL_FILE}, {rundir.METRICS_FILE}, figures)")
    print(f"  occlusion figures:  {figures}/")
    print(f"  KBMOD results:      {out / 'kbmod_results.scored.parquet'}  (prob_real, prob_bogus, "
          "cnn_class, occlusion_<model>)")
    print("\nWhere the time went (a stage done by an earlier run counts 0 here):")
    print(stages.table())
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
