"""A training run's directory: its files, config.toml, the lock, the split, the state that a resumed
run continues from, and the data record (the crash-safety protocol is in ARCHITECTURE.md).

The only module that knows the names of a run directory's files (``MODEL_FILE``,
``METRICS_FILE``, ``CONFIG_FILE``, ...: every other module uses these constants,
``tests/train/test_rundir.py`` checks it) and the only one that parses ``config.toml``
(:func:`read_run_config`, :func:`read_config_text` and :func:`parse_config_text`,
:func:`run_architecture`). It imports nothing heavy, so the command line's help can name
the files too."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stampbatch import fileio
from stampbatch.config import from_mapping, load_toml, to_toml
from stampbatch.errors import StampbatchError, TrainError
from stampbatch.train.config import TrainConfig

if TYPE_CHECKING:  # the CLI imports this module without the training data's dependencies
    from stampbatch.train.dataset import Stores

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


# --------------------------------------------------------------------------- small helpers


def atomic_model_path(path: Path) -> contextlib.AbstractContextManager[Path]:
    """Yield a temporary path beside ``path`` (same suffix, as Keras insists on ``.keras`` and
    ``.weights.h5``); rename it onto ``path`` on success. A reader sees the old file or the
    complete new one, never a partial one."""
    path = Path(path)
    suffix = ".weights.h5" if path.name.endswith(".weights.h5") else path.suffix
    return fileio.atomic_path(path, overwrite=True, suffix=suffix)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file of the run directory; TrainError naming it if it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TrainError(f"{path}: unreadable ({exc})") from exc


# --------------------------------------------------------------------------- run directory


def read_run_config(out_dir: Path) -> tuple[str, str, TrainConfig]:
    """(architecture, data path, TrainConfig) from a run directory's config.toml."""
    path = Path(out_dir) / CONFIG_FILE
    data = load_toml(path)
    arch, store_path = data.pop("architecture", None), data.pop("data", None)
    if not isinstance(arch, str) or not isinstance(store_path, str):
        raise TrainError(f"{path}: missing 'architecture' or 'data'")
    return arch, store_path, from_mapping(TrainConfig, data, str(path))


def read_config_text(run_dir: Path) -> str:
    """A run directory's config.toml as written (OSError or UnicodeDecodeError when unreadable)."""
    return (Path(run_dir) / CONFIG_FILE).read_text(encoding="utf-8")


def parse_config_text(text: str) -> dict[str, Any]:
    """The TOML table of a config.toml's text, its keys unchecked (the report shows runs of any
    version); ``tomllib.TOMLDecodeError`` (a ValueError) when it is not TOML."""
    return tomllib.loads(text)


def run_architecture(run_dir: Path) -> str | None:
    """The architecture a run directory says it trained (its config.toml, else its
    metrics.json), or None when neither says."""
    run_dir = Path(run_dir)
    with contextlib.suppress(OSError, ValueError, tomllib.TOMLDecodeError):
        arch = parse_config_text(read_config_text(run_dir)).get("architecture")
        if isinstance(arch, str):
            return arch
    with contextlib.suppress(OSError, ValueError, AttributeError):
        arch = json.loads((run_dir / METRICS_FILE).read_text()).get("architecture")
        if isinstance(arch, str):
            return arch
    return None


def config_text(arch: str, data: str, config: TrainConfig) -> str:
    """The text of config.toml for a run (what :func:`read_run_config` reads back)."""
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
        saved = read_json(ckpt)
        state.update(status="training", epoch=int(saved.get("epoch", 0)),
                     epochs=int(saved.get("epochs", state["epochs"])),
                     best_val_loss=saved.get("best_val_loss"),
                     best_val_accuracy=saved.get("best_val_accuracy"),
                     architecture=saved.get("architecture", state["architecture"]))
    if (out_dir / FAILED_FILE).is_file():
        state["status"] = "failed"
        state["message"] = (out_dir / FAILED_FILE).read_text().strip()
    if (out_dir / METRICS_FILE).is_file():
        metrics = read_json(out_dir / METRICS_FILE)
        state.update(status="done", epoch=int(metrics.get("epochs_run", 0)),
                     epochs=int(metrics.get("epochs", 0)),
                     best_val_loss=metrics.get("best_val_loss"),
                     best_val_accuracy=metrics.get("best_val_accuracy"),
                     architecture=metrics.get("architecture"))
        state.pop("message", None)
    return state


def check_run_dir(out_dir: Path, arch: str, data: str, config: TrainConfig) -> str:
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
        done = int(read_json(state_path).get("epoch", 0))
        if config.epochs < done:
            raise TrainError(f"{out_dir}: holds a checkpoint after {done} epochs; cannot resume "
                             f"it with epochs={config.epochs}")
    return "done" if finished else "resume"


def load_split(out_dir: Path, n_stamps: int) -> dict[str, np.ndarray]:
    """The run's saved train/val/test row indices; TrainError if unreadable or out of range."""
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


def save_split(path: Path, split: dict[str, np.ndarray]) -> None:
    """Write the train/val/test row indices to ``path`` atomically."""
    import io

    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **split)
    fileio.write_bytes_atomic(path, buf.getvalue())


@contextlib.contextmanager
def run_lock(out_dir: Path) -> Iterator[None]:
    """Hold the run directory's lock (a non-blocking ``fileio.FileLock`` on its
    ``LOCK_FILE``, creating the directory): a second trainer is refused with the holder's
    pid and host. A directory created here that is left holding nothing else is removed again."""
    import socket

    if out_dir.exists() and not out_dir.is_dir():
        raise TrainError(f"{out_dir}: exists and is not a directory")

    def cannot(exc: OSError) -> TrainError:
        return TrainError(f"{out_dir}: cannot create the run directory ({exc.strerror})")

    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise cannot(exc) from exc
    lock = fileio.FileLock(
        out_dir / LOCK_FILE, text=f"pid {os.getpid()} on {socket.gethostname()}\n", remove=False,
        unknown_holder="another process", failed=cannot,
        busy=lambda holder: TrainError(f"{out_dir}: in use by {holder} (training into it now); wait "
                                       f"for it to end or choose another output directory"))
    with lock:
        try:
            yield
        finally:
            if created and [p.name for p in out_dir.iterdir()] == [LOCK_FILE]:
                (out_dir / LOCK_FILE).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    out_dir.rmdir()


def clear_partials(*dirs: Path) -> None:
    """Remove temporary files of writes a kill interrupted (the lock is held)."""
    for d in dirs:
        for tmp in d.glob(".*.partial*"):
            tmp.unlink(missing_ok=True)


def clear_attempt(out_dir: Path) -> None:
    """Forget an attempt that committed no epoch: its checkpoint files and history."""
    ckpt_dir = out_dir / CHECKPOINT_DIR
    if ckpt_dir.is_dir():
        for f in ckpt_dir.iterdir():
            if f.is_file() and (f.name.startswith(("epoch-", "best-", "."))):
                f.unlink(missing_ok=True)
    (out_dir / HISTORY_FILE).unlink(missing_ok=True)


def check_data_record(out_dir: Path, stores: Stores) -> None:
    """Refuse to resume (or reuse) a run whose stores, their sizes or weights changed."""
    path = out_dir / DATA_FILE
    if not path.is_file():
        return
    old = read_json(path)
    was = ([(s["path"], s["n_stamps"]) for s in old.get("stores", [])], old.get("data_weights"))
    now = ([(str(p.resolve()), int(n)) for p, n in zip(stores.paths, stores.sizes, strict=True)],
           None if stores.weights is None else stores.weights.tolist())
    if was != now:
        raise TrainError(f"{out_dir}: holds a run on other stores or data weights ({path}); "
                         f"use the same ones to resume, or another output directory")
