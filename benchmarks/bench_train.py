"""One vgg6 training epoch streamed from HDF5 through tf.data vs fit on an in-memory array.

    .venv/bin/python benchmarks/bench_train.py [--n 50000] [--batch-size 256] [--repeats 2]

The same simulated store, the same training rows (train_run's 70 % split), the same model
and optimiser, in the same process. "streamed" is the pipeline train_run uses: blocks of
rows read from HDF5, normalised on the fly, shuffled in memory (and, by default, randomly
flipped/rotated), batched by a Python generator behind ``tf.data`` with prefetch.
"in-memory" reads and normalises all training stamps first (timed separately), then calls
``model.fit`` on the numpy arrays. Each variant trains a fresh model for three epochs; the
mean of epochs 2-3 (steady state, no tracing) is its epoch time. The variants run
interleaved (order alternating between repeats) so background load hits them alike, and the
streaming cost is the median over repeats of the ratio streamed / in-memory within each
repeat. The issue requires streaming to cost at most 15 % extra.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import numpy as np  # noqa: E402

from stampbatch import store  # noqa: E402
from stampbatch.train.loop import (  # noqa: E402
    StampStream,
    TrainConfig,
    class_weights,
    compile_model,
    configure_tensorflow,
    split_rows,
)
from stampbatch.train.models import build_model  # noqa: E402
from stampbatch.train.preprocess import normalize_with_mask  # noqa: E402

EPOCHS = 3  # per fit; the first (tracing) is not timed


def make_store(path: Path, n: int) -> Path:
    try:
        from stampbatch.sim.simulate import write_simulated
    except ImportError:  # simulate.py not available: Gaussian sources in unit noise
        rng = np.random.default_rng(0)
        labels = (rng.random(n) < 0.5).astype(np.int8)
        stamps = rng.normal(0, 1, (n, 21, 21)).astype(np.float32)
        yy, xx = np.mgrid[:21, :21]
        psf = np.exp(-((yy - 10) ** 2 + (xx - 10) ** 2) / 4.5).astype(np.float32)
        stamps[labels == 1] += rng.uniform(0.5, 10, (int(labels.sum()), 1, 1)) * psf
        store.create_store(path, stamps, labels)
        return path
    write_simulated(path, n, seed=0, progress=False)
    return path


class EpochTimer:
    def __init__(self):
        import keras

        class _CB(keras.callbacks.Callback):
            def on_epoch_begin(cb, epoch, logs=None):
                cb.t0 = time.perf_counter()

            def on_epoch_end(cb, epoch, logs=None):
                self.times.append(time.perf_counter() - cb.t0)

        self.times: list[float] = []
        self.callback = _CB()


def fresh_model(config: TrainConfig):
    import keras

    keras.utils.set_random_seed(0)
    model = build_model("vgg6")
    compile_model(model, config)
    return model


def run_streamed(path: Path, rows: np.ndarray, weights: np.ndarray, config: TrainConfig,
                 augment: bool) -> float:
    model = fresh_model(config)
    stream = StampStream(path, rows, config.batch_size, (21, 21), weights=weights, seed=0,
                         augment=augment)
    steps = int(np.ceil(len(rows) / config.batch_size))
    timer = EpochTimer()
    model.fit(stream.dataset(True), epochs=EPOCHS, steps_per_epoch=steps, verbose=0,
              shuffle=False, callbacks=[timer.callback])
    return float(np.mean(timer.times[1:]))


def run_in_memory(x: np.ndarray, y: np.ndarray, w: np.ndarray, config: TrainConfig) -> float:
    model = fresh_model(config)
    timer = EpochTimer()
    model.fit(x, y, sample_weight=w, batch_size=config.batch_size, epochs=EPOCHS, shuffle=True,
              verbose=0, callbacks=[timer.callback])
    return float(np.mean(timer.times[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50_000, help="stamps in the store")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data", type=Path, help="use this labelled store instead of simulating")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    configure_tensorflow()
    config = TrainConfig(batch_size=args.batch_size)
    with tempfile.TemporaryDirectory(prefix="bench_train.") as tmp:
        path = args.data or make_store(Path(tmp) / "train.h5", args.n)
        labels = store.read_labels(path).astype(np.int64)
        rows = split_rows(labels, config)["train"]
        weights = class_weights(labels[rows], config.class_weight)

        t0 = time.perf_counter()
        raw, lab = store.read_rows(path, rows)
        x, usable = normalize_with_mask(raw)   # stamps masked at the centre: left out
        x, lab = x[usable][..., None], lab[usable]
        y = np.eye(2, dtype=np.float32)[lab.astype(np.int64)]
        w = weights[lab.astype(np.int64)]
        t_load = time.perf_counter() - t0
        del raw

        results: dict[str, list[float]] = {"streamed": [], "streamed_no_augment": [],
                                           "in_memory": []}
        runs = {"streamed": lambda: run_streamed(path, rows, weights, config, True),
                "streamed_no_augment": lambda: run_streamed(path, rows, weights, config, False),
                "in_memory": lambda: run_in_memory(x, y, w, config)}
        for r in range(args.repeats):
            for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                results[name].append(runs[name]())
    n = len(rows)
    med = {k: float(np.median(v)) for k, v in results.items()}
    best = {k: float(np.min(v)) for k, v in results.items()}
    ratios = {k: float(np.median(np.divide(v, results["in_memory"]))) for k, v in results.items()}
    print(f"vgg6, {n:,} training stamps of a {len(labels):,}-stamp store, batch "
          f"{args.batch_size}, {args.repeats} repeats (mean of epochs 2-{EPOCHS} of each fit)")
    print(f"{'pipeline':<36}{'median s':>9}{'best s':>8}{'stamps/s':>10}{'vs in-memory':>14}")
    for name, label in (("in_memory", "in-memory numpy, model.fit"),
                        ("streamed", "HDF5 -> tf.data (augment, default)"),
                        ("streamed_no_augment", "HDF5 -> tf.data (no augment)")):
        print(f"{label:<36}{med[name]:>9.2f}{best[name]:>8.2f}{n / med[name]:>10,.0f}"
              f"{ratios[name]:>13.2f}x")
    print(f"(in-memory also needed {t_load:.2f} s to read and normalise the training stamps "
          f"first, and holds them all in memory: {x.nbytes / 1e6:,.0f} MB here)")
    ratio = ratios["streamed"]
    verdict = "PASS" if ratio <= 1.15 else "FAIL"
    print(f"streaming cost: {100 * (ratio - 1):+.1f} % per epoch (median of per-repeat ratios; "
          f"requirement <= +15 %): {verdict}")
    if args.json:
        args.json.write_text(json.dumps({"n_train": n, "batch_size": args.batch_size,
                                         "epoch_s": results, "median_s": med, "best_s": best,
                                         "ratios": ratios, "load_s": t_load}, indent=1))


if __name__ == "__main__":
    main()
