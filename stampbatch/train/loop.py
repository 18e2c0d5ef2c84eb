"""Train one architecture on a labelled stamp store, evaluate it, and write a run directory.

The stages of :func:`train_run`:

1. split each store's rows 70/10/20 (by default) into train/validation/test, stratified by
   class and reproducible from the seed (scikit-learn ``train_test_split`` twice), and pool
   the stores (:mod:`stampbatch.train.dataset`); the row indices are kept in ``split.npz`` and
   the stores with each split's class counts in ``data.json``, so a resumed run never
   trains on its test stamps;
2. stream training batches from the HDF5 stores through ``tf.data``
   (:class:`stampbatch.train.dataset.StampStream`): each epoch a random permutation of all the
   training rows (a pure function of seed and epoch), read in sorted windows, normalised
   (vectorised, :func:`stampbatch.train.preprocess.normalize_with_mask`), randomly
   flipped/rotated by multiples of 90 degrees, and batched while the model trains on the
   previous batch. Memory is bounded by the window, not the store size. Stamps with NaN/Inf
   pixels carry weight 0;
3. ``keras.Model.fit`` with categorical cross-entropy on one-hot labels (as the reference),
   Adam with cosine decay by default (or SGD with momentum), "balanced" class weights, early stopping on the
   validation loss; after every epoch a checkpoint (model + optimizer state, history, best
   weights) is written atomically, and a rerun on the same directory resumes from it — a
   preempted Slurm job that is requeued simply carries on;
4. restore the best weights, fit temperature scaling on the validation split and fold it
   into the final layer (:mod:`stampbatch.train.calibration`), predict the test split, compute the
   metrics (:mod:`stampbatch.report.metrics`: ROC AUC, completeness against SNR, thresholds for 1 %
   and 0.1 % FPR, expected calibration error, false positives by kind of negative) and draw
   the figures.

Every file is written under a temporary name and renamed into place, and ``metrics.json``
comes last: a directory holding ``metrics.json`` is a finished run.
"""

from __future__ import annotations

import gc
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stampbatch import fileio, store
from stampbatch.errors import TrainError, UsageError
from stampbatch.train.config import TrainConfig
from stampbatch.train.dataset import (  # names marked noqa: re-exported, the training API
    StampStream,
    Stores,
    augment_dihedral,  # noqa: F401
    class_weights,
    predict_rows,  # noqa: F401
    split_rows,  # noqa: F401
    split_stores,
    split_summary,
)
from stampbatch.train.export import export_for_scoring
from stampbatch.train.finish import calibrate_model, write_evaluation
from stampbatch.train.models import build_model, check_architecture
from stampbatch.train.preprocess import UNUSABLE
from stampbatch.train.rundir import (  # names marked noqa: re-exported, the run directory's API
    CHECKPOINT_DIR,
    CONFIG_FILE,
    DATA_FILE,
    DATA_SEPARATOR,
    FAILED_FILE,
    FIGURES,  # noqa: F401
    HISTORY_FILE,
    HISTORY_KEYS,
    LOCK_FILE,  # noqa: F401
    METRICS_FILE,
    MODEL_FILE,
    PREDICTIONS_FILE,  # noqa: F401
    RESUMABLE_CHANGES,  # noqa: F401
    SPLIT_FILE,
    STATE_FILE,
    atomic_model_path,
    check_data_record,
    check_run_dir,
    clear_attempt,
    clear_partials,
    config_text,
    load_split,
    read_json,
    read_run_config,  # noqa: F401
    run_lock,
    run_state,  # noqa: F401
    save_split,
)


def configure_tensorflow() -> None:
    """oneDNN on, quiet logs, and one intra-op thread per available core (before TF starts)."""
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    cores = fileio.cores()
    try:
        tf.config.threading.set_intra_op_parallelism_threads(cores)
        tf.config.threading.set_inter_op_parallelism_threads(min(2, cores))
    except RuntimeError:  # TensorFlow already running in this process: keep its pools
        pass


# --------------------------------------------------------------------------- training loop


def reseed(model: Any, seed: int, epoch: int) -> None:
    """Make epoch ``epoch``'s randomness (dropout masks, any Keras/TF draw) a function of
    (seed, epoch) alone, so a run resumed at this epoch draws what an uninterrupted one
    does. Keras does not save its layers' seed-generator state in a ``.keras`` file (a
    reloaded Dropout layer starts from a fresh random seed), so each generator is set here."""
    import keras

    keras.utils.set_random_seed((int(seed) * 100_003 + int(epoch)) % 2**32)
    for i, layer in enumerate(model.layers):
        gen = getattr(layer, "seed_generator", None)
        if gen is not None and getattr(gen, "state", None) is not None:
            base = (int(seed) * 7919 + 104_729 * (i + 1)) % 2**31
            gen.state.assign(np.array([base, int(epoch) << 24], dtype=gen.state.dtype))


def _make_callbacks(out_dir: Path, state: dict[str, Any],
                    config: TrainConfig, steps: int, arch: str, progress: bool) -> list[Any]:
    import keras

    from stampbatch.progress import Progress

    ckpt_dir = out_dir / CHECKPOINT_DIR

    class Checkpoint(keras.callbacks.Callback):  # type: ignore[misc]  # keras is untyped
        """History, early stopping and an atomic checkpoint after every epoch."""

        def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            self._t0 = time.monotonic()
            reseed(self.model, config.seed, epoch)
            self._bar = Progress(steps, f"{arch} epoch {epoch + 1}/{config.epochs}", "batches",
                                 enabled=progress and sys.stderr.isatty())

        def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            self._bar.update(1)

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            logs = dict(logs or {})
            elapsed = time.monotonic() - self._t0
            improved = _record_epoch(state, logs, epoch, elapsed, config, out_dir)
            if improved:
                with atomic_model_path(ckpt_dir / state["best_file"]) as tmp:
                    self.model.save_weights(tmp)
            if state.get("stopped_early"):
                self.model.stop_training = True
            _commit_epoch(self.model, out_dir, state, epoch)
            if progress:
                self._bar.enabled = False
                if sys.stderr.isatty():
                    sys.stderr.write("\r\033[K")
                print(_epoch_line(arch, epoch, config, logs, steps, elapsed, improved,
                                  bool(state.get("stopped_early"))), file=sys.stderr, flush=True)

    return [Checkpoint()]


def _record_epoch(state: dict[str, Any], logs: dict[str, Any], epoch: int, elapsed: float,
                  config: TrainConfig, out_dir: Path) -> bool:
    """Check the epoch's losses, append them to the history, and update the best epoch and
    early stopping in ``state``; True when the validation loss improved (``best_file`` then
    names the weights to save)."""
    if "val_loss" not in logs:
        raise TrainError(f"{out_dir}: the validation split yielded no finite stamps")
    if not math.isfinite(float(logs.get("loss", math.nan))):
        raise TrainError(f"{out_dir}: training diverged (loss {logs.get('loss')} at epoch "
                         f"{epoch + 1}); lower the learning rate")
    for key in HISTORY_KEYS:
        state["history"].setdefault(key, []).append(float(logs.get(key, math.nan)))
    state["epoch"] = epoch + 1
    state["train_time_s"] = float(state.get("train_time_s", 0.0)) + elapsed
    val_loss = float(logs["val_loss"])
    improved = state["best_val_loss"] is None or val_loss < state["best_val_loss"]
    if improved:
        state.update(best_val_loss=val_loss, best_epoch=epoch + 1, wait=0,
                     best_val_accuracy=float(logs.get("val_accuracy", math.nan)),
                     best_file=f"best-{epoch + 1:04d}.weights.h5")
    else:
        state["wait"] = int(state.get("wait", 0)) + 1
    if config.patience and state["wait"] >= config.patience:
        state["stopped_early"] = True
    return improved


def _commit_epoch(model: Any, out_dir: Path, state: dict[str, Any], epoch: int) -> None:
    """Save the epoch's model, then state.json (the commit point), then history.json, then
    drop the checkpoints that state.json no longer names."""
    ckpt_dir = out_dir / CHECKPOINT_DIR
    model_name = f"epoch-{epoch + 1:04d}.keras"
    with atomic_model_path(ckpt_dir / model_name) as tmp:
        model.save(tmp)
    state["model_file"] = model_name
    # state.json (which holds the history) is the commit point of this epoch;
    # history.json is a copy written after it, so it never runs ahead of the state.
    fileio.write_json_atomic(ckpt_dir / STATE_FILE, state)
    fileio.write_json_atomic(out_dir / HISTORY_FILE, state["history"])
    for stale in ckpt_dir.iterdir():
        if stale.name not in (model_name, state["best_file"], STATE_FILE) and \
                (stale.name.startswith("epoch-") or stale.name.startswith("best-")):
            stale.unlink(missing_ok=True)


def _epoch_line(arch: str, epoch: int, config: TrainConfig, logs: dict[str, Any], steps: int,
                elapsed: float, improved: bool, stopped_early: bool) -> str:
    """One progress line per epoch: losses, accuracies, time and stamps per second."""
    rate = steps * config.batch_size / max(elapsed, 1e-9)
    return (f"{arch} epoch {epoch + 1}/{config.epochs}: loss {logs.get('loss', 0):.4f} "
            f"acc {logs.get('accuracy', 0):.4f} val_loss {float(logs['val_loss']):.4f} "
            f"val_acc {logs.get('val_accuracy', 0):.4f}, {elapsed:.1f} s, "
            f"{rate:,.0f} stamps/s" + (" *" if improved else "")
            + (" (early stop)" if stopped_early else ""))


def compile_model(model: Any, config: TrainConfig, steps_per_epoch: int = 1) -> None:
    """Compile for one-hot labels: categorical cross-entropy, accuracy, SGD+momentum or Adam.

    ``lr_schedule="cosine"`` decays the learning rate from ``learning_rate`` to zero over
    ``epochs * steps_per_epoch`` steps (Keras's ``CosineDecay``; its step is the optimiser's
    iteration count, saved with the checkpoint, so a resumed run continues the same curve).
    """
    import keras

    lr: Any = config.learning_rate
    if config.lr_schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(
            config.learning_rate, decay_steps=max(1, config.epochs * int(steps_per_epoch)))
    if config.optimizer == "sgd":
        opt = keras.optimizers.SGD(learning_rate=lr, momentum=config.momentum)
    else:
        opt = keras.optimizers.Adam(learning_rate=lr)
    model.compile(optimizer=opt, loss="categorical_crossentropy", metrics=["accuracy"])


def extend_schedule(model: Any, config: TrainConfig, steps_per_epoch: int) -> None:
    """Stretch a resumed run's cosine decay over ``config.epochs`` (a run may be extended).

    The checkpoint's optimiser carries the schedule it was compiled with; extended beyond
    its decay steps it would train the added epochs at learning rate 0. Only the schedule's
    length changes (the optimiser's moments and step count are kept), so a resumed run with
    unchanged epochs continues exactly.
    """
    import keras

    schedule = getattr(model.optimizer, "_learning_rate", None)
    steps = max(1, config.epochs * int(steps_per_epoch))
    if isinstance(schedule, keras.optimizers.schedules.CosineDecay) and \
            int(schedule.decay_steps) != steps:
        model.optimizer._learning_rate = keras.optimizers.schedules.CosineDecay(
            schedule.initial_learning_rate, decay_steps=steps)


def _unwrap_stream_error(exc: BaseException, *streams: StampStream) -> BaseException:
    for s in streams:
        if s.error is not None:
            return s.error
    return exc


def train_run(store_path: Path | str | Sequence[Path | str], arch: str, out_dir: Path | str,
              config: TrainConfig, *,
              data_weights: Sequence[float] | None = None, progress: bool = True,
              callbacks: Sequence[Any] = (), figures: bool = True,
              export: bool = True) -> dict[str, Any]:
    """Train ``arch`` on the labelled store(s), evaluate it on the test split, fill ``out_dir``.

    Several stores are split each by itself (stratified by class) and pooled; with
    ``data_weights`` (one per store) each training epoch draws that share of its stamps from
    each store. ``DATA_FILE`` records the stores, weights and per-store class counts.

    Resumes from ``out_dir``'s checkpoint when there is one (history continued; ``epochs``,
    ``patience`` and ``target_fpr`` may differ from the first attempt, nothing else), and
    returns the saved metrics of a finished run without retraining. ``callbacks`` are extra
    Keras callbacks run after the checkpoint of each epoch. Returns the metrics dict.

    ``figures=False`` skips the PNG figures (``FIGURES``) and ``export=False`` the ONNX form
    for scoring (``export.export_for_scoring``; ``stampbatch score`` writes it on first use):
    for callers that read only the metrics, history, predictions or model (the test suite's
    small runs, where the two took half of a 2-epoch run's CPU time). Neither is a training
    setting: the run directory is otherwise the same, and a finished run is not redone for
    them. ``stampbatch train`` and Slurm jobs always write both.

    The run directory is locked (``flock``) for the whole run: a second process training
    into it (a manual ``stampbatch train --out`` beside a Slurm job) is refused at once.
    """
    with run_lock(Path(out_dir)):
        return _train_run_locked(store_path, arch, out_dir, config, data_weights, progress,
                                 callbacks, figures, export)


def _train_run_locked(store_path: Path | str | Sequence[Path | str], arch: str, out_dir: Path | str,
                      config: TrainConfig, data_weights: Sequence[float] | None, progress: bool,
                      callbacks: Sequence[Any], figures: bool = True,
                      export: bool = True) -> dict[str, Any]:
    t_start = time.monotonic()
    check_architecture(arch)
    try:
        config.validate()
    except ValueError as exc:
        raise UsageError(f"training configuration: {exc}") from exc
    out_dir = Path(out_dir)
    stores, data = _open_stores(store_path, data_weights)
    mode = check_run_dir(out_dir, arch, data, config)
    check_data_record(out_dir, stores)
    if mode == "done":
        return read_json(out_dir / METRICS_FILE)

    labels_per_store = stores.labels()
    labels = np.concatenate(labels_per_store)
    present = np.unique(labels)
    if len(present) < 2:
        only = "source" if present[0] == 1 else "no-source"
        raise TrainError(f"{data}: every label is {present[0]} ({only}); training needs "
                         f"both classes")
    if mode == "resume" and (out_dir / SPLIT_FILE).is_file():
        split = load_split(out_dir, len(stores))
    else:
        split = split_stores(labels_per_store, config, [str(p) for p in stores.paths])
    record = {"stores": split_summary(stores, labels_per_store, split),
              "data_weights": None if stores.weights is None else stores.weights.tolist()}
    # Nothing has been written before this point.
    configure_tensorflow()
    import keras

    ckpt_dir = out_dir / CHECKPOINT_DIR
    clear_partials(out_dir, ckpt_dir)
    if mode == "new":
        clear_attempt(out_dir)
    # config.toml first: any directory holding a checkpoint or a split also holds it.
    fileio.write_bytes_atomic(out_dir / CONFIG_FILE, config_text(arch, data, config).encode())
    fileio.write_json_atomic(out_dir / DATA_FILE, record)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if mode == "new" or not (out_dir / SPLIT_FILE).is_file():
        save_split(out_dir / SPLIT_FILE, split)
    (out_dir / FAILED_FILE).unlink(missing_ok=True)
    try:
        metrics = _train_and_evaluate(stores, arch, out_dir, config, stores.infos[0], labels,
                                      split, data, progress, callbacks, t_start, keras,
                                      figures)
    except Exception as exc:
        message = fileio.one_line(exc, limit=None)
        fileio.write_bytes_atomic(out_dir / FAILED_FILE, (message + "\n").encode())
        raise
    if export:
        export_for_scoring(out_dir)   # the ONNX form, once, after the final model.keras
    return metrics


def _train_and_evaluate(store_path: Stores, arch: str, out_dir: Path, config: TrainConfig,
                        info: store.StoreInfo, labels: np.ndarray, split: dict[str, np.ndarray],
                        data: str, progress: bool, callbacks: Sequence[Any], t_start: float,
                        keras: Any, figures: bool = True) -> dict[str, Any]:
    ckpt_dir = out_dir / CHECKPOINT_DIR
    state_path = ckpt_dir / STATE_FILE
    if state_path.is_file():
        state = read_json(state_path)
        state["epochs"] = config.epochs
        model = keras.models.load_model(ckpt_dir / state["model_file"], safe_mode=True)
        extend_schedule(model, config, math.ceil(len(split["train"]) / config.batch_size))
        if progress:
            print(f"{arch}: resuming from epoch {state['epoch']} of {config.epochs} "
                  f"({out_dir / CHECKPOINT_DIR})", file=sys.stderr, flush=True)
    else:
        state = {"architecture": arch, "data": data, "epoch": 0, "epochs": config.epochs,
                 "history": {k: [] for k in HISTORY_KEYS}, "best_val_loss": None,
                 "best_val_accuracy": None, "best_epoch": None, "best_file": None, "wait": 0,
                 "stopped_early": False, "model_file": None, "train_time_s": 0.0}
        keras.utils.set_random_seed(config.seed)
        model = build_model(arch, info.stamp_shape)
        compile_model(model, config, math.ceil(len(split["train"]) / config.batch_size))
    start_epoch = int(state["epoch"])
    # The run's wall time is this call's plus the training time of the calls it resumes
    # (their epochs are in train_time_s; this call's epochs are added there too, so they are
    # taken from the clock, not counted a second time).
    t_run_start = t_start - float(state.get("train_time_s", 0.0))
    if config.patience and int(state.get("wait", 0)) >= config.patience:
        state["stopped_early"] = True
    train_labels = labels[split["train"]]
    weights = class_weights(train_labels, config.class_weight)
    train_stream = StampStream(store_path, split["train"], config.batch_size, info.stamp_shape,
                               weights=weights, seed=config.seed, augment=config.augment,
                               store_weights=store_path.weights)
    val_stream = StampStream(store_path, split["val"], max(config.batch_size, 256),
                             info.stamp_shape)
    steps = max(1, math.ceil(len(split["train"]) / config.batch_size))
    if start_epoch < config.epochs and not state.get("stopped_early"):
        cbs = _make_callbacks(out_dir, state, config, steps, arch, progress) + list(callbacks)
        try:
            model.fit(train_stream.dataset(True, start_epoch), epochs=config.epochs,
                      initial_epoch=start_epoch, steps_per_epoch=steps,
                      validation_data=val_stream.dataset(False), callbacks=cbs, shuffle=False,
                      verbose=0)
        except Exception as exc:
            original = _unwrap_stream_error(exc, train_stream, val_stream)
            if original is not exc:
                raise original from None
            raise
        finally:
            # Finalise the suspended endless generator behind tf.data now, while the
            # interpreter is fully alive: left to interpreter shutdown it can deadlock
            # (tensorflow/tensorflow#22632, #21277).
            gc.collect()
        if train_stream.dropped_first_pass:
            print(f"warning: {data}: {train_stream.dropped_first_pass} training stamps "
                  f"have {UNUSABLE}; they carry weight 0 (no effect on training)", file=sys.stderr)
    if state.get("best_file"):
        model.load_weights(ckpt_dir / state["best_file"])
    calibration = calibrate_model(model, store_path, split["val"])
    with atomic_model_path(out_dir / MODEL_FILE) as tmp:
        model.save(tmp)
    fileio.write_json_atomic(out_dir / HISTORY_FILE, state["history"])
    return write_evaluation(model, store_path, arch, out_dir, config, info, split, data, state,
                            t_run_start, calibration, figures=figures)


def _open_stores(paths: Path | str | Sequence[Path | str],
                 data_weights: Sequence[float] | None) -> tuple[Stores, str]:
    """Validate the training stores; the run's ``data`` string (paths joined)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    stores = Stores(paths)
    for path, info in zip(stores.paths, stores.infos, strict=True):
        if info.is_score_file:
            raise TrainError(f"{path}: is a score side file, not a stamp store")
        if not info.labelled:
            raise TrainError(f"{path}: has no /labels (a candidate file?); training needs a "
                             f"labelled store")
    stores.weights = None
    if data_weights is not None:
        w = np.asarray(list(data_weights), dtype=np.float64)
        if len(w) != len(paths) or not (np.isfinite(w).all() and (w >= 0).all() and w.sum() > 0):
            raise UsageError(f"data weights {list(data_weights)}: give one non-negative weight "
                             f"per store ({len(paths)}), not all zero")
        stores.weights = w / w.sum()
    return stores, DATA_SEPARATOR.join(str(p.resolve()) for p in stores.paths)
