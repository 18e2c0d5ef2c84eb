"""Training: split, streaming, metrics, run directory, resume, bad input, CLI."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import IN_CI, gaussian_stamps, write_labelled_store
from sklearn.metrics import accuracy_score, roc_auc_score

from stampbatch import cli, store
from stampbatch.errors import StoreError, TrainError, UsageError
from stampbatch.train.dataset import split_rows
from stampbatch.train.loop import (
    FIGURES,
    LOCK_FILE,
    TrainConfig,
    read_run_config,
    run_state,
    train_run,
)

keras = pytest.importorskip("keras")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
KINDS = np.array(["background", "offcentre", "hot_pixel"])


def tiny(**kw) -> TrainConfig:
    settings = {"epochs": 1, "batch_size": 32}
    settings.update(kw)
    return TrainConfig(**settings)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_labelled_store(tmp_path_factory.mktemp("data") / "train.h5")


@pytest.fixture(scope="module")
def vgg6_run(data, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("runs") / "vgg6"
    metrics = train_run(data, "vgg6", out, tiny(epochs=2), progress=False)
    return out, metrics


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file's (mtime, size), but the lock file (each trainer writes its pid into it)."""
    return {str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != LOCK_FILE}


# --------------------------------------------------------------------------- configuration


def test_config_validation_names_the_option():
    TrainConfig().validate()
    for bad, word in (({"epochs": 0}, "epochs"), ({"optimizer": "rmsprop"}, "optimizer"),
                      ({"learning_rate": -1.0}, "learning_rate"), ({"momentum": 1.0}, "momentum"),
                      ({"class_weight": "auto"}, "class_weight"),
                      ({"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction"),
                      ({"target_fpr": 0.0}, "target_fpr"), ({"patience": -1}, "patience"),
                      ({"lr_schedule": "step"}, "lr_schedule")):
        with pytest.raises(ValueError, match=word):
            TrainConfig(**bad).validate()


@pytest.mark.slow
def test_config_round_trips_through_run_directory(vgg6_run, data):
    out, _ = vgg6_run
    arch, path, config = read_run_config(out)
    assert (arch, path, config) == ("vgg6", str(data.resolve()), tiny(epochs=2))


# --------------------------------------------------------------------------- whole runs


@pytest.mark.slow
def test_run_directory_contents(vgg6_run, data):
    out, metrics = vgg6_run
    for name in ("model.keras", "config.toml", "history.json", "split.npz", "metrics.json",
                 "predictions.npz", *FIGURES):
        assert (out / name).is_file(), name
    assert (out / "checkpoint" / "state.json").is_file()
    assert not list(out.rglob("*.partial*"))
    history = json.loads((out / "history.json").read_text())
    assert set(history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert all(len(v) == 2 for v in history.values())
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == metrics
    for key in ("architecture", "data", "n_train", "n_val", "n_test", "epochs_run", "epochs",
                "wall_time_s", "parameters", "macs_per_stamp", "accuracy", "roc_auc",
                "precision", "recall", "confusion_matrix", "operating_point",
                "completeness_vs_snr", "fpr_by_kind", "best_val_loss", "best_val_accuracy"):
        assert key in metrics, key
    assert (metrics["n_train"], metrics["n_val"], metrics["n_test"]) == (210, 30, 60)
    assert metrics["epochs_run"] == metrics["epochs"] == 2
    assert metrics["parameters"] == 50_034 and metrics["macs_per_stamp"] == 1_064_464
    assert metrics["best_val_loss"] == pytest.approx(min(history["val_loss"]))
    assert set(metrics["fpr_by_kind"]) == set(KINDS)
    assert sum(sum(r) for r in metrics["confusion_matrix"]) == 60
    with np.load(out / "split.npz") as split:
        parts = [split[k] for k in ("train", "val", "test")]
    assert sum(map(len, parts)) == 300 and len(np.unique(np.concatenate(parts))) == 300
    assert run_state(out) == {"status": "done", "epoch": 2, "epochs": 2,
                              "best_val_loss": metrics["best_val_loss"],
                              "best_val_accuracy": metrics["best_val_accuracy"],
                              "architecture": "vgg6"}


def test_wall_time_is_the_clock_of_the_run(data, tmp_path):
    """wall_time_s counts each epoch once: at least the epochs' own time, at most the clock
    around the call (it once added this call's epochs twice)."""
    t0 = time.monotonic()
    metrics = train_run(data, "simple", tmp_path / "r", tiny(epochs=3), progress=False,
                        figures=False, export=False)  # not what this test reads
    elapsed = time.monotonic() - t0
    epochs = json.loads((tmp_path / "r" / "checkpoint" / "state.json").read_text())["train_time_s"]
    assert 0 < epochs <= metrics["wall_time_s"] <= elapsed


@pytest.mark.slow
def test_figures_are_png_files(vgg6_run):
    import matplotlib.image

    out, _ = vgg6_run
    for name in FIGURES:
        raw = (out / name).read_bytes()
        assert raw[:8] == PNG_MAGIC, name
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


@pytest.mark.slow
def test_saved_model_reproduces_test_predictions_and_metrics(vgg6_run, data):
    from stampbatch.train.preprocess import normalize

    out, metrics = vgg6_run
    model = keras.models.load_model(out / "model.keras", safe_mode=True)
    with np.load(out / "predictions.npz", allow_pickle=False) as npz:
        rows, labels, prob = npz["rows"], npz["labels"], npz["probability"]
    with np.load(out / "split.npz") as split:
        np.testing.assert_array_equal(rows, split["test"])
    raw, truth = store.read_rows(data, rows)
    np.testing.assert_array_equal(labels, truth)
    again = model.predict(normalize(raw)[..., None], verbose=0)[:, 1]
    np.testing.assert_allclose(again, prob, rtol=1e-5, atol=1e-6)
    assert metrics["roc_auc"] == pytest.approx(roc_auc_score(labels, prob))
    assert metrics["accuracy"] == pytest.approx(accuracy_score(labels, prob >= 0.5))
    # the saved model holds the best epoch's weights, the softmax head divided by T
    best = json.loads((out / "checkpoint" / "state.json").read_text())["best_file"]
    reference = keras.models.clone_model(model)
    reference.load_weights(out / "checkpoint" / best)
    t = metrics["calibration"]["temperature"]
    head = {id(v) for v in model.layers[-1].weights}
    for var, ref in zip(model.weights, reference.get_weights(), strict=True):
        expected = ref / np.float32(t) if id(var) in head else ref
        np.testing.assert_allclose(np.asarray(var), expected, rtol=1e-6)
    cal = metrics["calibration"]
    assert 0.05 <= t <= 20.0 and cal["n_val"] == metrics["n_val"]
    for key in ("ece_val_before", "ece_val_after", "ece_test_before", "ece_test_after"):
        assert 0.0 <= cal[key] <= 1.0, key
    assert cal["ece_test_after"] == pytest.approx(metrics["ece"])
    assert set(metrics["thresholds"]) == {"0.01", "0.001"}


def test_cosine_schedule_decays_to_zero_over_the_run_and_survives_a_checkpoint(tmp_path):
    from stampbatch.train.loop import compile_model, extend_schedule
    from stampbatch.train.models import build_model

    model = build_model("simple")
    compile_model(model, tiny(epochs=4, lr_schedule="cosine", learning_rate=0.02), 10)
    schedule = model.optimizer._learning_rate
    lr = [float(schedule(step)) for step in (0, 20, 40)]
    np.testing.assert_allclose(lr, [0.02, 0.01, 0.0], atol=1e-7)
    # the checkpoint is a .keras file with the optimiser: the schedule must come back with it
    model.save(tmp_path / "ckpt.keras")
    again = keras.models.load_model(tmp_path / "ckpt.keras", safe_mode=True)
    assert float(again.optimizer._learning_rate(20)) == pytest.approx(0.01)
    # a resumed run extended from 4 to 8 epochs decays over 80 steps, not 40
    extend_schedule(again, tiny(epochs=8, lr_schedule="cosine", learning_rate=0.02), 10)
    assert float(again.optimizer._learning_rate(40)) == pytest.approx(0.01)
    assert float(again.optimizer._learning_rate(80)) == pytest.approx(0.0, abs=1e-7)
    compile_model(model, tiny(epochs=4, lr_schedule="constant", optimizer="sgd"), 10)
    assert float(model.optimizer.learning_rate) == pytest.approx(TrainConfig().learning_rate)


def test_fit_temperature_recovers_a_known_temperature():
    from stampbatch.train.calibration import fit_temperature, sigmoid

    rng = np.random.default_rng(4)
    true_margin = rng.normal(0.0, 3.0, 40_000)
    labels = (rng.random(40_000) < sigmoid(true_margin)).astype(int)
    for t in (0.5, 2.5):  # the model's margins are T times the calibrated ones
        assert fit_temperature(t * true_margin, labels) == pytest.approx(t, rel=0.05)


def test_folding_the_temperature_is_exact():
    from stampbatch.train.calibration import fold_temperature, logit_margin, sigmoid
    from stampbatch.train.models import build_model

    keras.utils.set_random_seed(1)
    model = build_model("vgg6", (21, 21))
    x = np.random.default_rng(0).random((64, 21, 21, 1)).astype(np.float32)
    x /= x.sum(axis=(1, 2, 3), keepdims=True)
    margin = logit_margin(model, x)
    np.testing.assert_allclose(sigmoid(margin), model.predict(x, verbose=0)[:, 1], rtol=1e-4,
                               atol=1e-6)
    fold_temperature(model, 3.0)
    out = model.predict(x, verbose=0)
    assert out.shape == (64, 2)
    np.testing.assert_allclose(out[:, 1], sigmoid(margin / 3.0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-6)


@pytest.mark.slow
def test_finished_run_is_not_retrained(vgg6_run, data):
    out, metrics = vgg6_run
    before = snapshot(out)
    assert train_run(data, "vgg6", out, tiny(epochs=2), progress=False) == metrics
    assert snapshot(out) == before


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["simple", "simple_bn"])
def test_small_architectures_train_and_learn(data, tmp_path, arch):
    metrics = train_run(data, arch, tmp_path / arch, tiny(epochs=3), progress=False,
                        figures=False, export=False)  # vgg6_run's tests check those
    assert metrics["architecture"] == arch and metrics["epochs_run"] == 3
    assert metrics["roc_auc"] > 0.95  # bright centred sources: easy
    model = keras.models.load_model(tmp_path / arch / "model.keras", safe_mode=True)
    assert model.name == arch


@pytest.mark.slow
def test_resnet50_trains_one_epoch(tmp_path):
    """~1-2 min on 2 cores: building, training one epoch of and saving a 23.5 M-parameter
    network, then its ONNX export (the only test of resnet50's export, which the demo scores
    through)."""
    path = write_labelled_store(tmp_path / "small.h5", 64)
    metrics = train_run(path, "resnet50", tmp_path / "resnet50",
                        tiny(batch_size=16, val_fraction=0.125, test_fraction=0.25),
                        progress=False)
    assert metrics["epochs_run"] == 1 and metrics["n_test"] == 16
    assert metrics["parameters"] > 23_000_000
    model = keras.models.load_model(tmp_path / "resnet50" / "model.keras", safe_mode=True)
    assert model.output_shape == (None, 2)


class Interrupt(Exception):
    pass


class InterruptAfterFirstEpoch(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            raise Interrupt("simulated preemption after epoch 1")


@pytest.mark.slow
def test_interrupted_run_resumes_from_checkpoint(data, tmp_path):
    """~20 s on a loaded machine: simple_bn trained twice in this process (interrupted after
    epoch 1, then resumed to the end), with the figures and the ONNX export of the finished run."""
    out = tmp_path / "run"
    config = tiny(epochs=2)
    with pytest.raises(Interrupt):
        train_run(data, "simple_bn", out, config, progress=False,
                  callbacks=[InterruptAfterFirstEpoch()])
    state = run_state(out)
    assert state["status"] == "failed" and state["epoch"] == 1 and state["epochs"] == 2
    assert "preemption" in state["message"]
    first = json.loads((out / "history.json").read_text())
    assert all(len(v) == 1 for v in first.values())
    assert not (out / "metrics.json").exists() and not (out / "model.keras").exists()
    with np.load(out / "split.npz") as split:
        split_before = {k: split[k].copy() for k in split.files}

    metrics = train_run(data, "simple_bn", out, config, progress=False)
    history = json.loads((out / "history.json").read_text())
    assert all(len(v) == 2 for v in history.values())
    assert {k: v[:1] for k, v in history.items()} == first  # epoch 1 kept as it was
    assert metrics["epochs_run"] == 2
    assert run_state(out)["status"] == "done" and not (out / "FAILED").exists()
    with np.load(out / "split.npz") as split:
        assert all(np.array_equal(split[k], split_before[k]) for k in split.files)
    # the optimizer state travelled too: its step counter covers both epochs (7 steps each)
    ckpt = json.loads((out / "checkpoint" / "state.json").read_text())
    resumed = keras.models.load_model(out / "checkpoint" / ckpt["model_file"], safe_mode=True)
    assert int(resumed.optimizer.iterations) == 2 * 7


# A trainer in its own process, as a Slurm job or `stampbatch train` runs it; argv: store,
# run directory (several, os.pathsep between them: trained one after the other), epochs,
# learning rate, "E:B" to SIGKILL itself after batch B of epoch E (0-based) or "-", and the
# architecture. Neither figures nor the ONNX export: these tests read the history and the
# test predictions only. Both architectures are registered here as a user
# registers one, each with a dropout layer before its head (stampbatch's own vgg6 has none):
# the dropout masks' random state must be restored too. vgg6_dropout is vgg6 with it;
# tiny_dropout (one 4-filter convolution, 170 parameters) is for the kill sweep, which
# proves the checkpoint protocol at every one of a run's 15 commits and needs no real network
# for it (test_run_killed_in_epoch_2_resumes_exactly keeps vgg6).
TRAINER = r"""
import os, signal, sys
import keras
from stampbatch.train import models
from stampbatch.train.loop import TrainConfig, train_run
def vgg6_dropout(shape, n_classes):
    base = models.vgg6(shape, n_classes)
    x = keras.layers.Dropout(0.5, name="drop")(base.get_layer("fc_1").output)
    out = keras.layers.Dense(n_classes, activation="softmax", name="fc_out_dropout")(x)
    return keras.Model(base.input, out, name="vgg6_dropout")
def tiny_dropout(shape, n_classes):
    inputs = keras.Input((*shape, 1))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.MaxPooling2D(4, name="pool")(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dropout(0.5, name="drop")(x)
    out = keras.layers.Dense(n_classes, activation="softmax", name="fc_out")(x)
    return keras.Model(inputs, out, name="tiny_dropout")
models.ARCHITECTURES["vgg6_dropout"] = vgg6_dropout
models.ARCHITECTURES["tiny_dropout"] = tiny_dropout
store, outs, epochs, rate, kill_at, arch = sys.argv[1:7]
kill = tuple(int(x) for x in kill_at.split(":")) if kill_at[0].isdigit() else None
# "rename:K": SIGKILL just before the K-th rename (os.rename and os.replace both raise the
# "os.rename" audit event, before the syscall); RENAME_LOG: append each rename's target
kill_rename = int(kill_at.split(":")[1]) if kill_at.startswith("rename:") else 0
rename_log = os.environ.get("RENAME_LOG")
renames = 0
def audit(event, args):
    global renames
    if event != "os.rename":
        return
    renames += 1
    if rename_log:
        with open(rename_log, "a") as log:
            log.write(os.fsdecode(args[1]) + "\n")
    if renames == kill_rename:
        os.kill(os.getpid(), signal.SIGKILL)
sys.addaudithook(audit)
class Kill(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == kill:
            os.kill(os.getpid(), signal.SIGKILL)
config = TrainConfig(epochs=int(epochs), batch_size=32, patience=0, learning_rate=float(rate))
for out in outs.split(os.pathsep):
    train_run(store, arch, out, config, progress=False, callbacks=[Kill()], figures=False,
              export=False)
"""
EXACT_N = 320  # 224 training stamps: 7 full batches of 32 per epoch, no partial batch


# The trainers the kill tests kill and resume fork from this server, which made TRAINER's
# imports once: each fork is a new process, TensorFlow imported but not yet started (no op
# run, nothing traced), killed or resumed as a fresh one would be. A fresh process costs
# ~7 CPU-s of `import tensorflow` before it trains; the tests start 20 of them a run. The
# uninterrupted runs they are compared with (exact_data, tiny_exact) stay fresh processes,
# so every equality below also proves a forked trainer computes what a fresh one does.
FORK_SERVER = r"""
import json, os, sys, traceback
import keras
from stampbatch.train import loop, models
code = compile(sys.argv[1], "trainer", "exec")
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        out = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.environ.update(request["env"])
        sys.argv = ["-c", *request["argv"]]
        status = 1
        try:
            exec(code, {"__name__": "__main__"})
            status = 0
        except BaseException:
            traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


@pytest.fixture(scope="module")
def trainers() -> Iterator[subprocess.Popen]:
    """The fork server of TRAINER processes (see FORK_SERVER)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    server = subprocess.Popen([sys.executable, "-c", FORK_SERVER, TRAINER], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    yield server
    assert server.stdin is not None
    server.stdin.close()
    assert server.wait(timeout=60) == 0


def run_trainer(data: Path, out: Path, epochs: int = 2, *, kill_at: str = "-",
                rate: float = 0.01, prefix: tuple[str, ...] = (),
                arch: str = "vgg6_dropout", server: subprocess.Popen | None = None,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """TRAINER in a fresh process (under ``prefix``, e.g. strace), or forked by ``server``;
    its stdout and stderr together in ``.stderr``."""
    argv = [str(data), str(out), str(epochs), str(rate), kill_at, arch]
    if server is None:
        full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **(env or {})}
        return subprocess.run([*prefix, sys.executable, "-c", TRAINER, *argv],
                              capture_output=True, text=True, env=full_env, timeout=600)
    assert not prefix and server.stdin is not None and server.stdout is not None
    log = Path(str(out).split(os.pathsep)[0] + ".log")
    server.stdin.write(json.dumps({"argv": argv, "env": env or {}, "stderr": str(log)}) + "\n")
    server.stdin.flush()
    ready, _, _ = select.select([server.stdout], [], [], 600)
    assert ready, f"the forked trainer of {out} ran past 600 s"
    code = int(server.stdout.readline())
    return subprocess.CompletedProcess(argv, code, "", log.read_text())


def finished_run(out: Path) -> tuple[dict, np.ndarray]:
    """(history, test probabilities) of a finished run directory."""
    history = json.loads((out / "history.json").read_text())
    with np.load(out / "predictions.npz") as npz:
        return history, npz["probability"].copy()


@pytest.fixture(scope="module")
def exact_data(tmp_path_factory) -> tuple[Path, tuple[dict, np.ndarray]]:
    """A store whose training split is whole batches, and an uninterrupted 2-epoch run."""
    path = write_labelled_store(tmp_path_factory.mktemp("exact") / "train.h5", EXACT_N)
    labels = store.read_labels(path).astype(np.int64)
    assert len(split_rows(labels, tiny())["train"]) % 32 == 0
    out = path.parent / "uninterrupted"
    done = run_trainer(path, out)
    assert done.returncode == 0, done.stderr[-2000:]
    return path, finished_run(out)


@pytest.mark.slow
def test_run_killed_in_epoch_2_resumes_exactly(exact_data, trainers, tmp_path):
    """~20 s: two trainer processes (the killed one and the resuming one, forked by
    ``trainers``), each training vgg6 with dropout."""
    data, (history, probability) = exact_data
    out = tmp_path / "run"
    killed = run_trainer(data, out, kill_at="1:3", server=trainers)  # after batch 4, epoch 2
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert run_state(out)["epoch"] == 1 and not (out / "metrics.json").exists()
    resumed = run_trainer(data, out, server=trainers)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # optimizer state, dropout and augmentation randomness and data order all restored
    got_history, got_probability = finished_run(out)
    assert got_history == history
    assert np.array_equal(got_probability, probability)


RENAMES = "rename,renameat,renameat2"


def completed_renames(strace_log: Path) -> list[str]:
    """The targets of the renames that succeeded, in order, from ``strace -f -e trace=rename*``
    (a call split by another thread reads "<unfinished ...>" then "<... rename resumed>")."""
    targets, pending = [], {}
    for line in strace_log.read_text().splitlines():
        pid, _, call = line.partition(" ")
        if call.startswith("<..."):
            call = pending.pop(pid, "") + call
        elif call.endswith("<unfinished ...>"):
            pending[pid] = call
            continue
        if call.rstrip().endswith("= 0"):
            targets.append(call.split('"')[3])
    return targets


@pytest.fixture(scope="module")
def tiny_exact(exact_data) -> tuple[Path, tuple[dict, np.ndarray], list[str]]:
    """An uninterrupted 2-epoch tiny_dropout run on exact_data's store, its (history, test
    probabilities), and the files its renames committed, in order: traced by strace at the
    syscall, and the same list, in the same order, as the trainer's own "os.rename" audit
    events see it (where the kill sweep aims its SIGKILLs)."""
    if shutil.which("strace") is None:
        message = "strace is missing (make test installs it)"
        pytest.fail(message) if IN_CI else pytest.skip(message)
    data, _ = exact_data
    out = data.parent / "tiny-uninterrupted"
    log = data.parent / "tiny-renames.strace"
    audited = data.parent / "tiny-renames.audit"
    # --seccomp-bpf: only the traced calls stop the trainer (a full ptrace run took 3x as long)
    done = run_trainer(data, out, arch="tiny_dropout", env={"RENAME_LOG": str(audited)},
                       prefix=("strace", "--seccomp-bpf", "-f", "-qq", "-o", str(log),
                               "-e", f"trace={RENAMES}"))
    assert done.returncode == 0, done.stderr[-2000:]
    commits = completed_renames(log)
    assert audited.read_text().splitlines() == commits  # every rename the kernel saw, no other
    return data, finished_run(out), [str(Path(t).relative_to(out)) for t in commits]


@pytest.mark.slow
@pytest.mark.kill
def test_trainer_killed_at_every_checkpoint_step_resumes(tiny_exact, trainers, tmp_path):
    """~1 min: one trainer process per kill point (15, forked by ``trainers``), then one
    resuming them all.

    SIGKILL just before each rename that commits a file, every one of an uninterrupted run's:
    config, data record, split, then per epoch the best weights, the epoch model, state.json
    and history.json, then the final model, history, test predictions and metrics. The trainer
    sends itself the SIGKILL from its "os.rename" audit hook, before the syscall: no handler,
    ``finally`` or flush runs, as with strace's injection at the syscall's entry, which this
    sweep used before (tiny_exact proves the hook sees exactly the renames strace sees).
    strace stopped the trainer at every syscall of TensorFlow's start (3x the time), and with
    --seccomp-bpf it cannot inject a signal at all. Every directory left behind resumes to the
    same result."""
    data, (history, probability), commits = tiny_exact
    # the commit protocol as the run made it: a changed order or a lost commit shows here
    assert commits == ["config.toml", "data.json", "split.npz",
                       "checkpoint/best-0001.weights.h5", "checkpoint/epoch-0001.keras",
                       "checkpoint/state.json", "history.json",
                       "checkpoint/best-0002.weights.h5", "checkpoint/epoch-0002.keras",
                       "checkpoint/state.json", "history.json", "model.keras", "history.json",
                       "predictions.npz", "metrics.json"]
    outs = []
    for k in range(1, len(commits) + 1):
        out = tmp_path / f"kill-{k}"
        killed = run_trainer(data, out, kill_at=f"rename:{k}", arch="tiny_dropout",
                             server=trainers)
        assert killed.returncode == -signal.SIGKILL, (k, killed.returncode, killed.stderr[-2000:])
        assert not (out / "metrics.json").exists(), k
        outs.append(out)
    # one process resumes every directory in turn (a fresh process each proved nothing more:
    # each train_run reseeds and reloads from its own checkpoint; the kills need their own)
    resumed = run_trainer(data, Path(os.pathsep.join(map(str, outs))), arch="tiny_dropout",
                          server=trainers)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for k, out in enumerate(outs, 1):
        got_history, got_probability = finished_run(out)
        assert got_history == history, k
        assert np.array_equal(got_probability, probability), k
        assert run_state(out)["status"] == "done" and not list(out.rglob("*.partial*")), k


def test_second_trainer_on_a_locked_run_directory_is_refused(data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
         "f.write('pid 4242 on node7'); f.flush(); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('locked', flush=True); time.sleep(60)", str(out / LOCK_FILE)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(TrainError, match=r"run: in use by pid 4242 on node7 \(training "
                                             r"into it now\)"):
            train_run(data, "simple", out, tiny(), progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]


@pytest.mark.slow
def test_rerun_after_divergence_with_a_lower_rate(exact_data, trainers, tmp_path):
    """~20 s: two trainer processes (the diverging run and the rerun, forked by ``trainers``),
    as a user would run them one after the other."""
    data, (history, probability) = exact_data
    out = tmp_path / "run"
    diverged = run_trainer(data, out, rate=1e12, server=trainers)
    assert "diverged" in diverged.stderr and "lower the learning rate" in diverged.stderr
    assert run_state(out)["status"] == "failed" and run_state(out)["epoch"] == 0
    again = run_trainer(data, out, server=trainers)  # no epoch checkpointed: settings free
    assert again.returncode == 0, again.stderr[-2000:]
    assert read_run_config(out)[2].learning_rate == 0.01
    got_history, got_probability = finished_run(out)
    assert got_history == history and np.array_equal(got_probability, probability)


@pytest.mark.slow
def test_resume_may_extend_epochs_but_not_change_settings(data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Interrupt):
        train_run(data, "simple", out, tiny(epochs=2), progress=False,
                  callbacks=[InterruptAfterFirstEpoch()])
    before = snapshot(out)
    with pytest.raises(TrainError, match="learning_rate 0.003 -> 0.1"):
        train_run(data, "simple", out, tiny(epochs=2, learning_rate=0.1), progress=False)
    assert snapshot(out) == before
    metrics = train_run(data, "simple", out, tiny(epochs=3), progress=False, figures=False,
                        export=False)
    assert metrics["epochs_run"] == 3 and metrics["epochs"] == 3
    assert read_run_config(out)[2].epochs == 3


@pytest.mark.slow
def test_nonfinite_stamps_are_skipped_and_counted(tmp_path, capfd):
    path = write_labelled_store(tmp_path / "nan.h5", 300, nan_rows=range(0, 300, 25))
    metrics = train_run(path, "simple", tmp_path / "run", tiny(), progress=False,
                        figures=False, export=False)
    with np.load(tmp_path / "run" / "split.npz") as split:
        n_bad_test = np.isin(split["test"], np.arange(0, 300, 25)).sum()
        n_bad_train = np.isin(split["train"], np.arange(0, 300, 25)).sum()
    assert metrics["n_test_unscorable"] == n_bad_test
    assert sum(map(sum, metrics["confusion_matrix"])) == 60 - n_bad_test
    if n_bad_train:
        assert f"{n_bad_train} training stamps have masked pixels" in capfd.readouterr().err


# --------------------------------------------------------------------------- bad input


def test_unknown_architecture(data, tmp_path):
    with pytest.raises(UsageError, match="unknown architecture 'vgg7'.*simple, simple_bn, vgg6, "
                                         "resnet50"):
        train_run(data, "vgg7", tmp_path / "run", tiny(), progress=False)
    assert not (tmp_path / "run").exists()


def test_store_without_labels(tmp_path):
    path = tmp_path / "cand.h5"
    store.create_store(path, gaussian_stamps(50))
    with pytest.raises(TrainError, match="cand.h5: has no /labels"):
        train_run(path, "simple", tmp_path / "run", tiny(), progress=False)
    assert not (tmp_path / "run").exists()


def test_store_with_one_class(tmp_path):
    path = tmp_path / "one.h5"
    store.create_store(path, gaussian_stamps(50), np.zeros(50, np.int8))
    with pytest.raises(TrainError, match="one.h5: every label is 0"):
        train_run(path, "simple", tmp_path / "run", tiny(), progress=False)
    assert not (tmp_path / "run").exists()


def test_fractions_leaving_a_class_empty(tmp_path):
    path = tmp_path / "rare.h5"
    labels = np.zeros(200, np.int8)
    labels[:3] = 1
    store.create_store(path, gaussian_stamps(200, sources=labels == 1), labels)
    with pytest.raises(TrainError, match="rare.h5"):
        train_run(path, "simple", tmp_path / "run", tiny(val_fraction=0.05, test_fraction=0.05),
                  progress=False)
    assert not (tmp_path / "run").exists()


def test_not_a_store(tmp_path):
    path = tmp_path / "notes.h5"
    path.write_text("not HDF5")
    with pytest.raises(StoreError, match="notes.h5: not an HDF5 file"):
        train_run(path, "simple", tmp_path / "run", tiny(), progress=False)
    with pytest.raises(StoreError, match="no such file"):
        train_run(tmp_path / "missing.h5", "simple", tmp_path / "run", tiny(), progress=False)
    assert not (tmp_path / "run").exists()


def test_invalid_config_is_a_usage_error(data, tmp_path):
    with pytest.raises(UsageError, match="optimizer"):
        train_run(data, "simple", tmp_path / "run", tiny(optimizer="lbfgs"), progress=False)


@pytest.mark.slow
def test_run_directory_of_another_architecture(vgg6_run, data):
    out, _ = vgg6_run
    before = snapshot(out)
    with pytest.raises(TrainError, match="finished run of architecture 'vgg6', not 'simple'"):
        train_run(data, "simple", out, tiny(epochs=2), progress=False)
    other = write_labelled_store(data.parent / "other.h5", 100, seed=7)
    with pytest.raises(TrainError, match="trained on .*train.h5"):
        train_run(other, "vgg6", out, tiny(epochs=2), progress=False)
    with pytest.raises(TrainError, match="other settings"):
        train_run(data, "vgg6", out, tiny(epochs=3), progress=False)
    assert snapshot(out) == before


def test_directory_with_foreign_run_files(data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.keras").write_text("someone else's")
    with pytest.raises(TrainError, match="not a stampbatch run directory"):
        train_run(data, "simple", out, tiny(), progress=False)
    assert (out / "model.keras").read_text() == "someone else's"


@pytest.mark.slow
def test_diverging_training_stops_with_a_clear_error(data, tmp_path):
    with pytest.raises(TrainError, match="diverged.*lower the learning rate"):
        train_run(data, "simple", tmp_path / "run", tiny(learning_rate=1e12), progress=False)
    assert run_state(tmp_path / "run")["status"] == "failed"


def test_run_state_of_new_directory(tmp_path):
    assert run_state(tmp_path / "nothing")["status"] == "new"
    assert run_state(tmp_path)["epoch"] == 0


# --------------------------------------------------------------------------- command line


def test_cli_models(capsys):
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}
    for name in ("simple", "simple_bn", "vgg6", "resnet50"):
        assert name in lines
    assert "50,034" in lines["vgg6"] and "1,064,464" in lines["vgg6"] and "2.13" in lines["vgg6"]
    assert "0.87" in lines["simple"]


@pytest.mark.slow
def test_cli_train_with_config_file_and_overrides(data, tmp_path, capsys):
    config = tmp_path / "train.toml"
    config.write_text('architecture = "simple"\nepochs = 5\nbatch_size = 64\n'
                      'learning_rate = 0.05\n')
    out = tmp_path / "run"
    code = cli.main(["train", "--data", str(data), "--config", str(config), "--epochs", "1",
                     "--batch-size", "32", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "simple epoch 1/1: loss" in captured.err and "stamps/s" in captured.err
    assert "ROC AUC" in captured.out
    arch, _, saved = read_run_config(out)
    assert arch == "simple"
    assert (saved.epochs, saved.batch_size, saved.learning_rate) == (1, 32, 0.05)
    # a second call is idempotent and quick
    assert cli.main(["train", "--data", str(data), "--config", str(out / "config.toml"),
                     "--out", str(out), "--quiet"]) == 0


@pytest.mark.slow
def test_cli_report(vgg6_run, capsys):
    out, _ = vgg6_run
    assert cli.main(["report", str(out.parent)]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed.endswith("report.html") and Path(printed).is_file()
    assert "vgg6" in Path(printed).read_text()


def test_cli_train_bad_input(data, tmp_path, capsys):
    assert cli.main(["train", "--data", str(data), "--arch", "nope", "--out",
                     str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stampbatch train: error: unknown architecture 'nope'")
    assert len(err.splitlines()) == 1
    bad = tmp_path / "bad.h5"
    bad.write_bytes(os.urandom(64))
    assert cli.main(["train", "--data", str(bad), "--arch", "vgg6", "--out",
                     str(tmp_path / "r")]) == 1
    assert "bad.h5: not an HDF5 file" in capsys.readouterr().err
    config = tmp_path / "typo.toml"
    config.write_text("epoch = 3\n")
    assert cli.main(["train", "--data", str(data), "--arch", "vgg6", "--config", str(config),
                     "--out", str(tmp_path / "r")]) == 2
    assert "unknown option(s) ['epoch']" in capsys.readouterr().err
    assert cli.main(["train", "--arch", "vgg6", "--out", str(tmp_path / "r")]) == 2
    assert "--data" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    with pytest.raises(SystemExit):
        cli.main(["train", "--data", str(data), "--arch", "vgg6", "--out", "x",
                  "--learning-rate", "fast"])


@pytest.mark.slow
def test_training_on_two_stores_records_them_and_their_split(tmp_path, capsys):
    a = write_labelled_store(tmp_path / "sim.h5", 240, seed=2)
    b = write_labelled_store(tmp_path / "injected.h5", 160, seed=3)
    out = tmp_path / "run"
    toml = tmp_path / "t.toml"
    toml.write_text(f'data = ["{a}", "{b}"]\ndata_weights = [0.7, 0.3]\nepochs = 1\n'
                    f'batch_size = 32\n')
    assert cli.main(["train", "--config", str(toml), "--arch", "simple", "--out", str(out),
                     "--quiet"]) == 0
    record = json.loads((out / "data.json").read_text())
    assert record["data_weights"] == [0.7, 0.3]
    assert [s["n_stamps"] for s in record["stores"]] == [240, 160]
    for s, n in zip(record["stores"], (240, 160), strict=True):
        assert s["train"]["sources"] == s["train"]["negatives"] == 0.7 * n / 2
        assert s["test"]["sources"] == s["test"]["negatives"] == 0.2 * n / 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_train"] + metrics["n_val"] + metrics["n_test"] == 400
    assert metrics["stores"] == record["stores"]
    arch, data, _ = read_run_config(out)
    assert data == f"{a.resolve()} + {b.resolve()}"
    with np.load(out / "split.npz") as split:
        assert split["test"].max() >= 240  # global rows: the second store follows the first
    # the CLI's repeated --data and --data-weights; other weights are another run
    capsys.readouterr()
    assert cli.main(["train", "--data", str(a), "--data", str(b), "--data-weights", "0.5,0.5",
                     "--arch", "simple", "--out", str(out), "--epochs", "1",
                     "--batch-size", "32", "--quiet"]) == 1
    assert "other stores or data weights" in capsys.readouterr().err
    assert cli.main(["train", "--data", str(a), "--data", str(b), "--data-weights", "1",
                     "--arch", "simple", "--out", str(tmp_path / "r2"), "--quiet"]) == 2
