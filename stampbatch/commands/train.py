"""CLI for training: train, models, report.

TensorFlow is imported only inside the commands that need it.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stampbatch.commands._types import (
    SEED_MAX,
    int_between,
    non_negative_int,
    path_arg,
    positive_float,
    positive_int,
    seed,
)
from stampbatch.errors import UsageError
from stampbatch.train.rundir import CONFIG_FILE, HISTORY_FILE, METRICS_FILE, MODEL_FILE, SPLIT_FILE

# Stamp sides `models` can describe: smaller ones fit no architecture's convolutions, larger
# ones make the dense layers of `simple` too big to build just to count them.
MIN_STAMP_SIZE, MAX_STAMP_SIZE = 5, 256


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train one architecture on a labelled store; write a run directory",
        description="Train a CNN on a labelled HDF5 stamp store (stratified 70/10/20 split, "
                    "streamed batches, a checkpoint every epoch), evaluate it on the test split "
                    f"and write OUT/: {MODEL_FILE}, {CONFIG_FILE}, {HISTORY_FILE}, {SPLIT_FILE}, "
                    f"{METRICS_FILE} and PNG figures. Rerunning on the same OUT resumes an "
                    "interrupted run; a finished run is not retrained. Options override the "
                    "--config file.")
    p.add_argument("--data", type=path_arg, metavar="TRAIN.h5", action="append",
                   help="labelled stamp store; repeat it to train on several (each split by "
                        "itself, stratified by class), or 'data' (a path or a list) in --config")
    p.add_argument("--data-weights", type=_weights, metavar="W1,W2,...",
                   help="share of each training epoch drawn from each --data store (default: "
                        "in proportion to their training stamps); or 'data_weights' in --config")
    p.add_argument("--arch", metavar="NAME",
                   help="architecture (see 'stampbatch models'; or 'architecture' in --config)")
    p.add_argument("--out", type=path_arg, required=True, metavar="DIR", help="run directory")
    p.add_argument("--config", type=path_arg, metavar="FILE.toml",
                   help=f"training settings (keys of TrainConfig; a run's {CONFIG_FILE} works)")
    p.add_argument("--epochs", type=positive_int, help="maximum epochs (default 20)")
    p.add_argument("--batch-size", type=positive_int, help="stamps per batch (default 256)")
    p.add_argument("--learning-rate", type=positive_float,
                   help="initial learning rate, decayed to zero over the run by a cosine "
                        "(default 0.003; 'lr_schedule' in --config)")
    p.add_argument("--optimizer", choices=("sgd", "adam"),
                   help="adam (default) or sgd (momentum 0.9, the notebook's)")
    p.add_argument("--seed", type=seed, help="seed of the split, weights and shuffling: an "
                                               "integer from 0 to 2**32-1 (default 0)")
    p.add_argument("--patience", type=non_negative_int,
                   help="epochs without a better validation loss before stopping (default 5; "
                        "0 never stops early)")
    p.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                   help="no random flips/rotations of training stamps")
    p.add_argument("--train-stamps", type=non_negative_int, metavar="N",
                   help="train on N stamps of the training split (a seeded subset, stratified "
                        "by class), for a quick run of a costly architecture; validation and "
                        "test splits stay whole (default 0: the whole training split)")
    p.add_argument("--quiet", action="store_true", help="no per-epoch progress lines")
    p.set_defaults(func=run_train)

    p = sub.add_parser("models", help="list the architectures with parameters and cost per stamp",
                       description="List the registered architectures: trainable and other "
                                   "parameters, multiply-adds (MACs) and FLOPs per stamp.")
    p.add_argument("--stamp-size", type=int_between(MIN_STAMP_SIZE, MAX_STAMP_SIZE), default=21,
                   metavar="N", help=f"stamp side in pixels, {MIN_STAMP_SIZE} to {MAX_STAMP_SIZE} "
                                     f"(default 21)")
    p.set_defaults(func=run_models)

    p = sub.add_parser("report", help="write RUNS_DIR/report.html comparing every finished run",
                       description=f"Compare the runs (subdirectories with {METRICS_FILE}) of "
                                   "RUNS_DIR side by side in one HTML page.")
    p.add_argument("runs_dir", type=path_arg, metavar="RUNS_DIR")
    p.set_defaults(func=run_report)


def _weights(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if any(not v >= 0 for v in values):
        raise argparse.ArgumentTypeError(f"weights must be >= 0, got {text!r}")
    return values


def _data_paths(data: Any) -> list[Path]:
    """'data' as given: one path, a list of paths, or a run's joined string."""
    from stampbatch.train.loop import DATA_SEPARATOR

    if isinstance(data, (list, tuple)):
        return [Path(d) for d in data]
    if isinstance(data, str):
        return [Path(d) for d in data.split(DATA_SEPARATOR)]
    return [Path(data)]


def _train_settings(args: argparse.Namespace) -> tuple[list[Path], str, Any, Any]:
    from stampbatch.config import from_mapping, load_toml
    from stampbatch.train.config import TrainConfig

    settings: dict[str, Any] = {}
    source = "command line"
    if args.config is not None:
        settings = dict(load_toml(args.config))
        source = f"{args.config} (with command-line options)"
    data = settings.pop("data", None)
    weights = settings.pop("data_weights", None)
    arch = settings.pop("architecture", None)
    if args.data is not None:
        data = args.data
    if args.data_weights is not None:
        weights = args.data_weights
    if args.arch is not None:
        arch = args.arch
    if data is None:
        raise UsageError("give --data TRAIN.h5 (or 'data' in --config)")
    if arch is None:
        raise UsageError("give --arch NAME (or 'architecture' in --config); "
                         "see 'stampbatch models'")
    where = args.config if args.config is not None else "command line"
    paths = data if isinstance(data, (list, tuple)) else [data]
    if not paths or not all(isinstance(p, (str, Path)) and str(p) for p in paths):
        raise UsageError(f"{where}: 'data' must be a non-empty path or list of paths, got {data!r}")
    if not isinstance(arch, str) or not arch:
        raise UsageError(f"{where}: 'architecture' must be a non-empty string, got {arch!r}")
    for option in ("epochs", "batch_size", "learning_rate", "optimizer", "seed", "patience",
                   "augment", "train_stamps"):
        value = getattr(args, option)
        if value is not None:
            settings[option] = value
    config = from_mapping(TrainConfig, settings, source)
    if not 0 <= config.seed <= SEED_MAX:
        raise UsageError(f"{source}: seed must be an integer from 0 to {SEED_MAX}, got {config.seed}")
    return _data_paths(data), str(arch), config, weights


def training_split_size(n_stamps: int, config: Any) -> int:
    """Stamps in the training split of ``n_stamps`` (scikit-learn's rounding, as in the split)."""
    n_test = math.ceil(config.test_fraction * n_stamps)
    rest = n_stamps - n_test
    n_val = math.ceil(config.val_fraction / (1.0 - config.test_fraction) * rest)
    return rest - n_val


def _check_batch_size(data: Sequence[Path], config: Any) -> None:
    """A batch larger than the training split would cycle the split many times per epoch."""
    from stampbatch import store

    infos = [store.open_store(path) for path in data]
    if not all(info.labelled for info in infos):
        return  # training itself says which store has no labels
    n = sum(info.n_stamps for info in infos)
    n_train = sum(training_split_size(info.n_stamps, config) for info in infos)
    if config.train_stamps:
        n_train = min(n_train, config.train_stamps)
    if config.batch_size > n_train:
        names = ", ".join(str(path) for path in data)
        raise UsageError(f"--batch-size {config.batch_size} is larger than the training split of "
                         f"{names} ({n_train:,} of {n:,} stamps); use at most {n_train:,}")


def run_train(args: argparse.Namespace) -> int:
    from stampbatch.train.models import check_architecture

    data, arch, config, weights = _train_settings(args)
    check_architecture(arch)
    _check_batch_size(data, config)
    from stampbatch.train.loop import train_run

    metrics = train_run(data, arch, args.out, config, data_weights=weights,
                        progress=not args.quiet)
    op = metrics["operating_point"]
    line = (f"{arch}: {metrics['epochs_run']} epochs, test accuracy {metrics['accuracy']:.4f}, "
            f"ROC AUC {metrics['roc_auc']:.4f}, completeness {op['completeness']:.3f} at FPR "
            f"{op['fpr']:.4f} (P >= {op['threshold']:.3g})")
    above = (metrics.get("completeness_vs_snr") or {}).get("above_snr") or {}
    if above.get("completeness_at_operating_point") is not None:
        line += (f", {above['completeness_at_operating_point']:.3f} above SNR "
                 f"{above['snr_min']:g}")
    print(line)
    print(f"run directory: {args.out}")
    return 0


def run_models(args: argparse.Namespace) -> int:
    from stampbatch.errors import StampbatchError
    from stampbatch.train.models import architecture_names, describe

    try:
        rows = [describe(name, (args.stamp_size, args.stamp_size)) for name in architecture_names()]
    except StampbatchError as exc:
        raise UsageError(f"--stamp-size {args.stamp_size}: {exc}") from exc
    print(f"{'architecture':<12} {'parameters':>12} {'MACs/stamp':>14} {'MFLOP/stamp':>12}")
    for r in rows:
        print(f"{r['name']:<12} {r['parameters']:>12,} {r['macs_per_stamp']:>14,} "
              f"{2 * r['macs_per_stamp'] / 1e6:>12.2f}")
    print(f"(stamps of {args.stamp_size}x{args.stamp_size}; MACs counted from the Conv and Dense "
          f"layer shapes, 1 MAC = 2 FLOP)")
    return 0


def run_report(args: argparse.Namespace) -> int:
    from stampbatch.report.html import write_report

    path = write_report(args.runs_dir)
    print(path)
    return 0
