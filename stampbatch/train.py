"""Train one architecture on a labelled stamp store, evaluate it, and write a run directory.

The stages of :func:`train_run`:

1. split each store's rows 70/10/20 (by default) into train/validation/test, stratified by
   class and reproducible from the seed (scikit-learn ``train_test_split`` twice), and pool
   the stores (:mod:`stampbatch.dataset`); the row indices are kept in ``split.npz`` and
   the stores with each split's class counts in ``data.json``, so a resumed run never
   trains on its test stamps;
2. stream training batches from the HDF5 stores through ``tf.data``
   (:class:`stampbatch.dataset.StampStream`): each epoch a random permutation of all the
   training rows (a pure function of seed and epoch), read in sorted windows, normalised
   (vectorised, :func:`stampbatch.preprocess.normalize_with_mask`), randomly
   flipped/rotated by multiples of 90 degrees, and batched while the model trains on the
   previous batch. Memory is bounded by the window, not the store size. Stamps with NaN/Inf
   pixels carry weight 0;
3. ``keras.Model.fit`` with categorical cross-entropy on one-hot labels (as the reference),
   SGD with momentum by default, "balanced" class weights, early stopping on the
   validation loss; after every epoch a checkpoint (model + optimizer state, history, best
   weights) is written atomically, and a rerun on the same directory resumes from it — a
   preempted Slurm job that is requeued simply carries on;
4. restore the best weights, fit temperature scaling on the validation split and fold it
   into the final layer (:mod:`stampbatch.calibrate`), predict the test split, compute the
   metrics (:mod:`stampbatch.metrics`: ROC AUC, completeness against SNR, thresholds for 1 %
   and 0.1 % FPR, expected calibration error, false positives by kind of negative) and draw
   the figures.

Every file is written under a temporary name and renamed into place, and ``metrics.json``
comes last: a directory holding ``metrics.json`` is a finished run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stampbatch import fileio, store
from stampbatch.config import from_mapping, load_toml, to_toml
from stampbatch.dataset import (  # noqa: F401  (re-exported: the training API)
    StampStream,
    Stores,
    TrainError,
    augment_dihedral,
    class_weights,
    predict_rows,
    split_rows,
    split_stores,
    split_summary,
)
from stampbatch.errors import StampbatchError, UsageError
from stampbatch.export import export_for_scoring
from stampbatch.metrics import compute_metrics
from stampbatch.models import build_model, check_architecture, count_macs
from stampbatch.preprocess import normalize_with_mask

OPTIMIZERS = ("sgd", "adam")
CLASS_WEIGHTS = ("balanced", "none")
LR_SCHEDULES = ("constant", "cosine")

# Several stores: their resolved paths joined by this in config.toml's ``data``.
DATA_SEPARATOR = " + "
DATA_FILE = "data.json"  # the stores, their weights and each split's class counts per store

# Run directory layout.
MODEL_FILE = "model.keras"
CONFIG_FILE = "config.toml"
HISTORY_FILE = "history.json"
SPLIT_FILE = "split.npz"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.npz"
CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.json"
FAILED_FILE = "FAILED"
LOCK_FILE = ".stampbatch-train.lock"  # flock held by the process training in the directory
FIGURES = ("confusion_matrix.png", "history.png", "roc.png", "completeness_snr.png",
           "examples.png")
HISTORY_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")
# Options that may change when a run is resumed (they do not change what was trained so far).
RESUMABLE_CHANGES = ("epochs", "patience", "target_fpr")


@dataclass
class TrainConfig:
    """Settings of one training run.

    The optimiser defaults to Adam at learning rate 0.003 decayed to zero by a cosine over
    the run: on the populated-sky defaults (30,000 stamps, 15 epochs) it reaches a lower
    validation loss than the notebook's SGD (0.01, here with momentum 0.9, which stays
    available as ``optimizer="sgd"``) and +0.004-0.007 ROC AUC on the shifted sky of
    ``benchmarks/bench_quality.py`` (BENCHMARKS.md); ``adam`` ignores ``momentum``.
    ``class_weight="balanced"`` weights each class by N / (2 N_class) of the training split.
    ``patience`` is the number of epochs without a lower validation loss before stopping
    early (0: never stop early); the best weights are restored at the end either way.
    ``augment`` applies random flips and rotations by multiples of 90 degrees to training
    stamps. ``lr_schedule`` is ``constant`` or ``cosine`` (decay to zero over the run, see
    :func:`compile_model`).
    """

    epochs: int = 20
    batch_size: int = 256
    optimizer: str = "adam"
    learning_rate: float = 0.003
    momentum: float = 0.9
    class_weight: str = "balanced"
    patience: int = 5
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    target_fpr: float = 0.01
    augment: bool = True
    lr_schedule: str = "cosine"

    def validate(self) -> None:
        """Raise ValueError naming the first invalid option."""
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, "
                             f"got {self.optimizer!r}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.class_weight not in CLASS_WEIGHTS:
            raise ValueError(f"class_weight must be one of {', '.join(CLASS_WEIGHTS)}, "
                             f"got {self.class_weight!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, "
                             f"got {self.lr_schedule!r}")
        if self.patience < 0:
            raise ValueError(f"patience must be 0 (no early stopping) or more, got {self.patience}")
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(f"val_fraction + test_fraction must be below 1, got "
                             f"{self.val_fraction} + {self.test_fraction}")
        if not 0.0 < self.target_fpr < 1.0:
            raise ValueError(f"target_fpr must be between 0 and 1, got {self.target_fpr}")


# --------------------------------------------------------------------------- small helpers


def _atomic(path: Path) -> contextlib.AbstractContextManager[Path]:
    """Yield a temporary path beside ``path`` (same suffix, as Keras insists on ``.keras`` and
    ``.weights.h5``); rename it onto ``path`` on success. A reader sees the old file or the
    complete new one, never a partial one."""
    path = Path(path)
    suffix = ".weights.h5" if path.name.endswith(".weights.h5") else path.suffix
    return fileio.atomic_path(path, overwrite=True, suffix=suffix)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TrainError(f"{path}: unreadable ({exc})") from exc


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


# --------------------------------------------------------------------------- run directory


def read_run_config(out_dir: Path) -> tuple[str, str, TrainConfig]:
    """(architecture, data path, TrainConfig) from a run directory's config.toml."""
    path = Path(out_dir) / CONFIG_FILE
    data = load_toml(path)
    arch, store_path = data.pop("architecture", None), data.pop("data", None)
    if not isinstance(arch, str) or not isinstance(store_path, str):
        raise TrainError(f"{path}: missing 'architecture' or 'data'")
    return arch, store_path, from_mapping(TrainConfig, data, str(path))


def _config_text(arch: str, data: str, config: TrainConfig) -> str:
    return to_toml({"architecture": arch, "data": data, **dataclasses.asdict(config)})


def run_state(out_dir: Path) -> dict[str, Any]:
    """Where a run directory stands: new, training (checkpointed or started), done, failed."""
    out_dir = Path(out_dir)
    state: dict[str, Any] = {"status": "new", "epoch": 0, "epochs": 0, "best_val_loss": None,
                             "best_val_accuracy": None, "architecture": None}
    config_path = out_dir / CONFIG_FILE
    if config_path.is_file():
        try:
            arch, _, config = read_run_config(out_dir)
            state.update(status="training", architecture=arch, epochs=config.epochs)
        except StampbatchError:
            state["status"] = "training"
    ckpt = out_dir / CHECKPOINT_DIR / STATE_FILE
    if ckpt.is_file():
        saved = _read_json(ckpt)
        state.update(status="training", epoch=int(saved.get("epoch", 0)),
                     epochs=int(saved.get("epochs", state["epochs"])),
                     best_val_loss=saved.get("best_val_loss"),
                     best_val_accuracy=saved.get("best_val_accuracy"),
                     architecture=saved.get("architecture", state["architecture"]))
    if (out_dir / FAILED_FILE).is_file():
        state["status"] = "failed"
        state["message"] = (out_dir / FAILED_FILE).read_text().strip()
    if (out_dir / METRICS_FILE).is_file():
        metrics = _read_json(out_dir / METRICS_FILE)
        state.update(status="done", epoch=int(metrics.get("epochs_run", 0)),
                     epochs=int(metrics.get("epochs", 0)),
                     best_val_loss=metrics.get("best_val_loss"),
                     best_val_accuracy=metrics.get("best_val_accuracy"),
                     architecture=metrics.get("architecture"))
        state.pop("message", None)
    return state


def _check_run_dir(out_dir: Path, arch: str, data: str, config: TrainConfig) -> str:
    """Decide what to do with ``out_dir``: "new", "resume" or "done"; refuse clashes.

    A directory whose checkpoint holds no committed epoch (killed before the first epoch
    ended, or diverged in it) is "new" whatever its config.toml says: nothing is lost by
    starting afresh, with other settings if need be (a lower learning rate).
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainError(f"{out_dir}: exists and is not a directory")
    if not (out_dir / CONFIG_FILE).is_file():
        ours = [n for n in (MODEL_FILE, METRICS_FILE, SPLIT_FILE, CHECKPOINT_DIR, HISTORY_FILE)
                if (out_dir / n).exists()]
        if ours:
            raise TrainError(f"{out_dir}: holds {', '.join(ours)} but no {CONFIG_FILE}; not a "
                             f"stampbatch run directory (choose another output directory)")
        return "new"
    finished = (out_dir / METRICS_FILE).is_file()
    state_path = out_dir / CHECKPOINT_DIR / STATE_FILE
    if not finished and not state_path.is_file():
        return "new"  # no epoch committed (killed early, or diverged): start afresh
    old_arch, old_data, old = read_run_config(out_dir)
    what = "a finished run" if finished else "a checkpoint"
    if old_arch != arch:
        raise TrainError(f"{out_dir}: holds {what} of architecture '{old_arch}', not '{arch}'; "
                         f"choose another output directory")
    if old_data != data:
        raise TrainError(f"{out_dir}: holds {what} trained on {old_data}, not {data}; choose "
                         f"another output directory")
    new_d, old_d = dataclasses.asdict(config), dataclasses.asdict(old)
    allowed = () if finished else RESUMABLE_CHANGES
    changed = [k for k in new_d if new_d[k] != old_d[k] and k not in allowed]
    if changed:
        diff = ", ".join(f"{k} {old_d[k]!r} -> {new_d[k]!r}" for k in changed)
        raise TrainError(f"{out_dir}: holds {what} with other settings ({diff}); use the same "
                         f"settings to resume, or another output directory")
    if not finished:
        done = int(_read_json(state_path).get("epoch", 0))
        if config.epochs < done:
            raise TrainError(f"{out_dir}: holds a checkpoint after {done} epochs; cannot resume "
                             f"it with epochs={config.epochs}")
    return "done" if finished else "resume"


def _load_split(out_dir: Path, n_stamps: int) -> dict[str, np.ndarray]:
    path = out_dir / SPLIT_FILE
    try:
        with np.load(path, allow_pickle=False) as npz:
            split = {k: np.asarray(npz[k], dtype=np.int64) for k in ("train", "val", "test")}
    except (OSError, KeyError, ValueError) as exc:
        raise TrainError(f"{path}: unreadable split file ({exc})") from exc
    top = max(int(v.max()) for v in split.values() if len(v))
    if top >= n_stamps:
        raise TrainError(f"{path}: row {top} beyond the store's {n_stamps} stamps (another store?)")
    return split


def _save_split(path: Path, split: dict[str, np.ndarray]) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, **split)
    fileio.write_bytes_atomic(path, buf.getvalue())


# --------------------------------------------------------------------------- training loop


def reseed(model, seed: int, epoch: int) -> None:
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
                    config: TrainConfig, steps: int, arch: str, progress: bool):
    import keras

    from stampbatch.progress import Progress

    ckpt_dir = out_dir / CHECKPOINT_DIR

    class Checkpoint(keras.callbacks.Callback):
        """History, early stopping and an atomic checkpoint after every epoch."""

        def on_epoch_begin(self, epoch, logs=None):
            self._t0 = time.monotonic()
            reseed(self.model, config.seed, epoch)
            self._bar = Progress(steps, f"{arch} epoch {epoch + 1}/{config.epochs}", "batches",
                                 enabled=progress and sys.stderr.isatty())

        def on_train_batch_end(self, batch, logs=None):
            self._bar.update(1)

        def on_epoch_end(self, epoch, logs=None):
            logs = dict(logs or {})
            elapsed = time.monotonic() - self._t0
            improved = _record_epoch(state, logs, epoch, elapsed, config, out_dir)
            if improved:
                with _atomic(ckpt_dir / state["best_file"]) as tmp:
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


def _commit_epoch(model, out_dir: Path, state: dict[str, Any], epoch: int) -> None:
    """Save the epoch's model, then state.json (the commit point), then history.json, then
    drop the checkpoints that state.json no longer names."""
    ckpt_dir = out_dir / CHECKPOINT_DIR
    model_name = f"epoch-{epoch + 1:04d}.keras"
    with _atomic(ckpt_dir / model_name) as tmp:
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


def compile_model(model, config: TrainConfig, steps_per_epoch: int = 1) -> None:
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


def extend_schedule(model, config: TrainConfig, steps_per_epoch: int) -> None:
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


def train_run(store_path: Path | Sequence[Path], arch: str, out_dir: Path, config: TrainConfig, *,
              data_weights: Sequence[float] | None = None, progress: bool = True,
              callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Train ``arch`` on the labelled store(s), evaluate it on the test split, fill ``out_dir``.

    Several stores are split each by itself (stratified by class) and pooled; with
    ``data_weights`` (one per store) each training epoch draws that share of its stamps from
    each store. ``DATA_FILE`` records the stores, weights and per-store class counts.

    Resumes from ``out_dir``'s checkpoint when there is one (history continued; ``epochs``,
    ``patience`` and ``target_fpr`` may differ from the first attempt, nothing else), and
    returns the saved metrics of a finished run without retraining. ``callbacks`` are extra
    Keras callbacks run after the checkpoint of each epoch. Returns the metrics dict.

    The run directory is locked (``flock``) for the whole run: a second process training
    into it (a manual ``stampbatch train --out`` beside a Slurm job) is refused at once.
    """
    with _run_lock(Path(out_dir)):
        return _train_run_locked(store_path, arch, out_dir, config, data_weights, progress,
                                 callbacks)


@contextlib.contextmanager
def _run_lock(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``out_dir``'s lock file (creating the directory); a
    directory created here that is left holding nothing else is removed again."""
    import fcntl
    import socket

    if out_dir.exists() and not out_dir.is_dir():
        raise TrainError(f"{out_dir}: exists and is not a directory")
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fh = open(out_dir / LOCK_FILE, "a+")
    except OSError as exc:
        raise TrainError(f"{out_dir}: cannot create the run directory ({exc.strerror})") from exc
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise TrainError(f"{out_dir}: in use by {holder} (training into it now); wait for "
                             f"it to end or choose another output directory") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        try:
            yield
        finally:
            if created and [p.name for p in out_dir.iterdir()] == [LOCK_FILE]:
                (out_dir / LOCK_FILE).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    out_dir.rmdir()


def _clear_partials(*dirs: Path) -> None:
    """Remove temporary files of writes a kill interrupted (the lock is held)."""
    for d in dirs:
        for tmp in d.glob(".*.partial*"):
            tmp.unlink(missing_ok=True)


def _clear_attempt(out_dir: Path) -> None:
    """Forget an attempt that committed no epoch: its checkpoint files and history."""
    ckpt_dir = out_dir / CHECKPOINT_DIR
    if ckpt_dir.is_dir():
        for f in ckpt_dir.iterdir():
            if f.is_file() and (f.name.startswith(("epoch-", "best-", "."))):
                f.unlink(missing_ok=True)
    (out_dir / HISTORY_FILE).unlink(missing_ok=True)


def _train_run_locked(store_path: Path | Sequence[Path], arch: str, out_dir: Path,
                      config: TrainConfig, data_weights: Sequence[float] | None, progress: bool,
                      callbacks: Sequence[Any]) -> dict[str, Any]:
    t_start = time.monotonic()
    check_architecture(arch)
    try:
        config.validate()
    except ValueError as exc:
        raise UsageError(f"training configuration: {exc}") from exc
    out_dir = Path(out_dir)
    stores, data = _open_stores(store_path, data_weights)
    mode = _check_run_dir(out_dir, arch, data, config)
    _check_data_record(out_dir, stores)
    if mode == "done":
        return _read_json(out_dir / METRICS_FILE)

    labels_per_store = stores.labels()
    labels = np.concatenate(labels_per_store)
    present = np.unique(labels)
    if len(present) < 2:
        only = "source" if present[0] == 1 else "no-source"
        raise TrainError(f"{data}: every label is {present[0]} ({only}); training needs "
                         f"both classes")
    if mode == "resume" and (out_dir / SPLIT_FILE).is_file():
        split = _load_split(out_dir, len(stores))
    else:
        split = split_stores(labels_per_store, config, [str(p) for p in stores.paths])
    record = {"stores": split_summary(stores, labels_per_store, split),
              "data_weights": None if stores.weights is None else stores.weights.tolist()}
    # Nothing has been written before this point.
    configure_tensorflow()
    import keras

    ckpt_dir = out_dir / CHECKPOINT_DIR
    _clear_partials(out_dir, ckpt_dir)
    if mode == "new":
        _clear_attempt(out_dir)
    # config.toml first: any directory holding a checkpoint or a split also holds it.
    fileio.write_bytes_atomic(out_dir / CONFIG_FILE, _config_text(arch, data, config).encode())
    fileio.write_json_atomic(out_dir / DATA_FILE, record)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if mode == "new" or not (out_dir / SPLIT_FILE).is_file():
        _save_split(out_dir / SPLIT_FILE, split)
    (out_dir / FAILED_FILE).unlink(missing_ok=True)
    try:
        metrics = _train_and_evaluate(stores, arch, out_dir, config, stores.infos[0], labels,
                                      split, data, progress, callbacks, t_start, keras)
    except Exception as exc:
        message = fileio.one_line(exc, limit=None)
        fileio.write_bytes_atomic(out_dir / FAILED_FILE, (message + "\n").encode())
        raise
    export_for_scoring(out_dir)   # the ONNX form, once, after the final model.keras
    return metrics


def _train_and_evaluate(store_path, arch, out_dir, config, info, labels, split, data, progress,
                        callbacks, t_start, keras) -> dict[str, Any]:
    ckpt_dir = out_dir / CHECKPOINT_DIR
    state_path = ckpt_dir / STATE_FILE
    if state_path.is_file():
        state = _read_json(state_path)
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
            print(f"warning: {data}: {train_stream.dropped_first_pass} training stamps have "
                  f"NaN or Inf pixels or sentinel values (|x| >= 1e30); they carry weight 0 (no effect on training)",
                  file=sys.stderr)
    if state.get("best_file"):
        model.load_weights(ckpt_dir / state["best_file"])
    calibration = _calibrate(model, store_path, split["val"])
    with _atomic(out_dir / MODEL_FILE) as tmp:
        model.save(tmp)
    fileio.write_json_atomic(out_dir / HISTORY_FILE, state["history"])
    return _evaluate(model, store_path, arch, out_dir, config, info, split, data, state, t_start,
                     calibration)


def _calibrate(model, stores: Stores, val_rows: np.ndarray) -> dict[str, Any]:
    """Fit temperature scaling on the validation split and fold it into ``model``."""
    from stampbatch import calibrate
    from stampbatch.metrics import expected_calibration_error

    margins, labels = calibrate.store_logit_margin(model, stores, val_rows)
    temperature = calibrate.fit_temperature(margins, labels)
    calibrate.fold_temperature(model, temperature)
    out: dict[str, Any] = {"method": "temperature scaling on the validation split",
                           "temperature": temperature, "n_val": int(len(labels))}
    if len(labels):
        out["ece_val_before"] = expected_calibration_error(labels, calibrate.sigmoid(margins))
        out["ece_val_after"] = expected_calibration_error(
            labels, calibrate.sigmoid(margins / temperature))
    return out


def _evaluate(model, store_path: Stores, arch: str, out_dir: Path, config: TrainConfig,
              info, split: dict[str, np.ndarray], data: str, state: dict[str, Any],
              t_start: float, calibration: dict[str, Any]) -> dict[str, Any]:
    from stampbatch import plots

    test = split["test"]
    prob, labels, finite = predict_rows(model, store_path, test)
    buf_rows = {"rows": test, "labels": labels, "probability": prob, "finite": finite}
    _save_npz(out_dir / PREDICTIONS_FILE, buf_rows)
    meta = _pooled_meta(store_path, (store.META_SNR, store.META_KIND))
    snr = meta[store.META_SNR][test][finite] if store.META_SNR in meta else None
    kind = meta[store.META_KIND][test][finite] if store.META_KIND in meta else None
    y, p = labels[finite], prob[finite]
    try:
        scores = compute_metrics(y, p, snr=snr, kind=kind, target_fpr=config.target_fpr)
    except ValueError as exc:
        raise TrainError(f"{store_path}: cannot evaluate the test split ({exc})") from exc
    metrics: dict[str, Any] = {
        "architecture": arch, "data": data, "n_train": len(split["train"]),
        "n_val": len(split["val"]), "n_test": len(test),
        "n_test_unscorable": int((~finite).sum()),
        "epochs_run": int(state["epoch"]), "epochs": config.epochs,
        "stopped_early": bool(state.get("stopped_early", False)),
        "best_epoch": state.get("best_epoch"),
        "parameters": int(model.count_params()), "macs_per_stamp": count_macs(model),
        **scores,
        "best_val_loss": state.get("best_val_loss"),
        "best_val_accuracy": state.get("best_val_accuracy"),
        "stores": _read_json(out_dir / DATA_FILE)["stores"],
        "calibration": {**calibration, "ece_test_after": scores["ece"],
                        "ece_test_before": _ece_uncalibrated(y, p, calibration["temperature"])},
    }
    title = f"{arch} ({out_dir.name})"
    plots.plot_confusion_matrix(np.asarray(scores["confusion_matrix"]),
                                out_dir / "confusion_matrix.png", title=f"{title}: test split")
    plots.plot_history(state["history"], out_dir / "history.png", title=title)
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(y, p)
    op = scores["operating_point"]
    plots.plot_roc(fpr, tpr, out_dir / "roc.png", auc=scores["roc_auc"],
                   operating_point=(op["fpr"], op["completeness"]), title=f"{title}: ROC")
    _plot_completeness(plots, scores, out_dir / "completeness_snr.png", title)
    _plot_examples(plots, store_path, test[finite], y, p, out_dir / "examples.png", title,
                   config.seed)
    metrics["wall_time_s"] = float(state.get("train_time_s", 0.0)) + (time.monotonic() - t_start)
    fileio.write_json_atomic(out_dir / METRICS_FILE, metrics)  # last: marks the run as done
    return json.loads(json.dumps(fileio.jsonable(metrics)))


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


def _check_data_record(out_dir: Path, stores: Stores) -> None:
    """Refuse to resume (or reuse) a run whose stores, their sizes or weights changed."""
    path = out_dir / DATA_FILE
    if not path.is_file():
        return
    old = _read_json(path)
    was = ([(s["path"], s["n_stamps"]) for s in old.get("stores", [])], old.get("data_weights"))
    now = ([(str(p.resolve()), int(n)) for p, n in zip(stores.paths, stores.sizes, strict=True)],
           None if stores.weights is None else stores.weights.tolist())
    if was != now:
        raise TrainError(f"{out_dir}: holds a run on other stores or data weights ({path}); "
                         f"use the same ones to resume, or another output directory")


def _pooled_meta(stores: Stores, columns: Sequence[str]) -> dict[str, np.ndarray]:
    """Metadata columns that every store has, concatenated in global-row order."""
    have = [c for c in columns if all(c in info.meta_columns for info in stores.infos)]
    parts = [store.read_meta(p, have) for p in stores.paths] if have else []
    return {c: np.concatenate([part[c].astype(str) if part[c].dtype.kind in "SUO" else part[c]
                               for part in parts]) for c in have}


def _ece_uncalibrated(y: np.ndarray, p: np.ndarray, temperature: float) -> float:
    """ECE of the probabilities before the temperature was folded in (margin times T)."""
    from stampbatch.calibrate import sigmoid
    from stampbatch.metrics import expected_calibration_error

    q = np.clip(np.asarray(p, np.float64), 1e-12, 1 - 1e-12)
    return expected_calibration_error(y, sigmoid(temperature * np.log(q / (1 - q))))


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    fileio.write_bytes_atomic(path, buf.getvalue())


def _plot_completeness(plots, scores: dict[str, Any], path: Path, title: str) -> None:
    cvs = scores.get("completeness_vs_snr")
    if cvs is None:  # no SNR in the store: completeness of all sources in one bin
        edges = [1.0, 1000.0]
        rec = scores["confusion_matrix"][1]
        n = rec[0] + rec[1]
        comp, counts = [rec[1] / n if n else None], [n]
        extra = {f"at FPR {scores['operating_point']['target_fpr']:g}":
                 [scores["operating_point"]["completeness"]]}
        plots.plot_completeness(edges, comp, counts, path, extra=extra,
                                title=f"{title}: no SNR in the store, all sources")
        return
    op = scores["operating_point"]
    plots.plot_completeness(
        cvs["bin_edges"], cvs["completeness"], cvs["counts"], path,
        extra={f"at FPR {op['target_fpr']:g} (P >= {op['threshold']:.3g})":
               cvs["completeness_at_operating_point"]},
        title=f"{title}: completeness of test sources (P >= 0.5)")


def _plot_examples(plots, store_path: Stores, rows: np.ndarray, y: np.ndarray, p: np.ndarray,
                   path: Path, title: str, seed: int, n: int = 32) -> None:
    rng = np.random.default_rng(seed)
    wrong = np.flatnonzero((p >= 0.5).astype(np.int64) != y)
    right = np.flatnonzero((p >= 0.5).astype(np.int64) == y)
    pick_wrong = rng.permutation(wrong)[: n // 2]
    pick = np.concatenate([pick_wrong, rng.permutation(right)[: n - len(pick_wrong)]])
    raw, _ = store_path.read(rows[pick])
    stamps, _ = normalize_with_mask(raw)
    plots.plot_stamp_grid(stamps, y[pick], p[pick], path, max_stamps=n,
                          title=f"{title}: test stamps (normalised)")
