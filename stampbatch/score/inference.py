"""Trained models for scoring: resolve, verify, export to ONNX once, and predict P(source).

A model is given as a training run directory (its ``model.keras``) or a ``.keras`` file.
Anything else is refused before it is opened: Keras files are zip archives, and a pickle or
a legacy HDF5 model is never loaded (pickles can run code). Models load with
``keras.models.load_model(path, safe_mode=True, compile=False)``.

Two inference backends compute the same function:

* ``onnx`` — ONNX Runtime on the model exported once (``model.export(format="onnx")``) and
  cached beside the model file as ``<stem>.<sha12>.onnx`` (keyed by the model's sha256, written
  atomically; under ``~/.cache/stampbatch/onnx`` when the model's directory is read-only).
  A training run makes it when it finishes (:mod:`stampbatch.train.export`), so scoring a fresh
  run finds it and never exports.
  ``CUDAExecutionProvider`` is used when onnxruntime-gpu offers it. The fastest CPU path here:
  80 k vs 64 k stamps/s for vgg6 on two cores (``benchmarks/bench_score.py``).
* ``tf`` — a compiled ``tf.function`` (no XLA: slower on this CPU) around the Keras model.

Every batch is checked to be a probability distribution over the two classes (finite, in
[0, 1], rows summing to 1): a model ending in logits is refused rather than storing logits
as probabilities. When exporting, ONNX Runtime's output is checked against Keras to 1e-5.

In a scoring worker each model is loaded once per process (:func:`cached_predictor`, filled
by the Dask worker plugin in :mod:`stampbatch.score.run`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import threading
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from stampbatch import fileio
from stampbatch.errors import ModelError, UsageError
from stampbatch.train.rundir import METRICS_FILE, MODEL_FILE, run_architecture

BACKENDS = ("auto", "onnx", "tf")
AGREEMENT_TOL = 1e-5          # ONNX Runtime vs Keras, max abs difference in P(source)
_SUM_TOL = 1e-3               # rows of a softmax output sum to 1 (float32 rounding allowed)
MAX_BATCH_CPU = 4096          # stamps per tf.function call on a CPU
ORT_BATCH_CPU = 128           # per ONNX Runtime call on a CPU: activations stay in L2 (+10-20 %)
MAX_BATCH_GPU = 65536
_EXPORT_LOCK = threading.Lock()


@dataclass(frozen=True)
class ModelSpec:
    """A verified model, picklable, as sent to scoring workers."""

    name: str                     # the /scores/<name> group
    keras_path: str               # absolute path of the .keras file
    sha256: str                   # of the .keras file
    architecture: str
    stamp_shape: tuple[int, int] = (21, 21)
    backend: str = "onnx"         # "onnx" or "tf" (never "auto" once prepared)
    onnx_path: str | None = None
    onnx_sha256: str | None = None  # of the ONNX export the workers load

    @property
    def loaded_file(self) -> tuple[str, str]:
        """(path, sha256) of the file a worker loads for this backend."""
        if self.backend == "onnx" and self.onnx_path is not None:
            return self.onnx_path, str(self.onnx_sha256)
        return self.keras_path, self.sha256

    @property
    def short(self) -> str:
        return self.sha256[:12]


Predictor = Callable[[np.ndarray], np.ndarray]


# --------------------------------------------------------------------------- resolving


RUN_MODEL_KEY = "model_sha256"     # metrics.json: the sha256 of the model.keras it describes


def check_run_model(run_dir: Path | str, sha256: str | None = None, *,
                    model: Path | str | None = None) -> bool:
    """Is ``model`` (default ``RUN/model.keras``) the model ``RUN/metrics.json`` describes
    (its architecture, thresholds, calibration)? True when the recorded sha256 matches; False
    for a run from before the hash was recorded (or without metrics.json); a mismatch is a
    one-line error. ``sha256`` is the model file's digest when the caller has it already."""
    run_dir = Path(run_dir)
    try:
        recorded = json.loads((run_dir / METRICS_FILE).read_text()).get(RUN_MODEL_KEY)
    except (OSError, ValueError, AttributeError):
        return False
    if not isinstance(recorded, str):
        return False
    model = Path(model) if model is not None else run_dir / MODEL_FILE
    try:
        sha256 = sha256 or fileio.sha256_file(model)
    except OSError as exc:
        raise ModelError(f"{model}: cannot read the model file ({exc.strerror})") from exc
    if sha256 != recorded:
        raise ModelError(f"{model}: is not the model {run_dir / METRICS_FILE} describes "
                         f"(sha256 {sha256[:12]}, trained {recorded[:12]}): it was replaced "
                         "after training (or is another model), so the run's architecture, "
                         "thresholds and calibration do not apply to it; retrain, or score a "
                         "copy outside the run directory")
    return True


def _check_keras_file(path: Path) -> None:
    """Refuse anything that is not a Keras 3 zip archive, without unpickling or loading it."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise ModelError(f"{path}: cannot read the model file ({exc.strerror})") from exc
    if head[:1] == b"\x80":
        raise ModelError(f"{path}: is a Python pickle, not a Keras model file "
                         "(pickles can run code; refused)")
    if head.startswith(b"\x89HDF"):
        raise ModelError(f"{path}: is an HDF5 file (legacy Keras .h5?), not a Keras model file; "
                         "save the model as .keras")
    if path.suffix != ".keras":
        raise ModelError(f"{path}: not a Keras model file (expected a .keras file or a run "
                         f"directory holding {MODEL_FILE})")
    if not zipfile.is_zipfile(path):
        raise ModelError(f"{path}: not a Keras model file (not a .keras zip archive)")
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
    if "config.json" not in names:
        raise ModelError(f"{path}: not a Keras model file (the archive has no config.json)")


@dataclass(frozen=True)
class ModelSource:
    """A model file found and hashed, not yet loaded."""

    name: str
    keras_path: Path
    sha256: str
    architecture: str | None


def resolve_model(path: Path | str, name: str | None = None) -> ModelSource:
    """A run directory (→ its model.keras) or a .keras file; its name, sha256 and architecture.

    The name is the run directory's name or the .keras file's stem unless ``name`` is given.
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such model file or run directory")
    if path.is_dir():
        keras_path = path / MODEL_FILE
        if not keras_path.is_file():
            raise ModelError(f"{path}: is a directory without {MODEL_FILE} "
                             "(not a finished training run)")
        default_name = path.resolve().name
        arch = run_architecture(path)
    else:
        keras_path = path
        default_name = path.stem
        arch = run_architecture(path.parent) if path.name == MODEL_FILE else None
        if path.name == MODEL_FILE:
            default_name = path.resolve().parent.name
    _check_keras_file(keras_path)
    model_name = name or default_name
    if not model_name or "/" in model_name or model_name in (".", ".."):
        raise UsageError(f"invalid model name {model_name!r} (used as /scores/<name>)")
    sha = fileio.sha256_file(keras_path)
    if keras_path.name == MODEL_FILE:    # a run's model: the run must describe this file
        check_run_model(keras_path.parent, sha)
    return ModelSource(model_name, keras_path.resolve(), sha, arch)


# --------------------------------------------------------------------------- checks


def probe_stamps(stamp_shape: tuple[int, int], n: int = 64) -> np.ndarray:
    """Normalised noise stamps (plus one flat stamp) to probe a model's output: (n, H, W, 1)."""
    from stampbatch.train.preprocess import normalize

    rng = np.random.default_rng(12345)
    raw = rng.normal(0.0, 1.0, size=(n, *stamp_shape)).astype(np.float32)
    h, w = stamp_shape
    yy, xx = np.mgrid[:h, :w]
    psf = np.exp(-((yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2) / 4.5).astype(np.float32)
    raw[: n // 2] += 10.0 * psf                                 # half with a centred source
    out = normalize(raw)
    out[-1] = 1.0 / (h * w)  # the flat stamp normalisation gives the unusable ones
    return out[..., None]


def source_probability(out: np.ndarray, where: str) -> np.ndarray:
    """Column 1 of a (M, 2) softmax output, after checking it is one; float32 (M,)."""
    out = np.asarray(out)
    if out.ndim != 2 or out.shape[1] != 2:
        raise ModelError(f"{where}: model output has shape {out.shape}, expected (N, 2) "
                         "class probabilities (no source, source)")
    if not np.all(np.isfinite(out)) or out.min() < -1e-6 or out.max() > 1 + 1e-6 \
            or np.abs(out.sum(axis=1) - 1.0).max() > _SUM_TOL:
        raise ModelError(f"{where}: model output is not a probability distribution (values "
                         f"{out.min():.3g}..{out.max():.3g}); the last layer must be a softmax, "
                         "logits are never stored as probabilities")
    return np.ascontiguousarray(out[:, 1], dtype=np.float32)


def _input_shape(model, where: str) -> tuple[int, int]:
    shape = tuple(model.inputs[0].shape) if getattr(model, "inputs", None) else None
    if shape is None or len(shape) != 4 or shape[3] != 1 or None in shape[1:3]:
        raise ModelError(f"{where}: model input shape {shape} is not (N, H, W, 1) stamps")
    return int(shape[1]), int(shape[2])


# --------------------------------------------------------------------------- loading


def _import_tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    import tensorflow as tf

    return tf


def load_keras(path: Path | str):
    """Load a .keras model with safe_mode (no arbitrary code), uncompiled."""
    path = Path(path)
    _check_keras_file(path)
    _import_tf()
    import keras

    try:
        return keras.models.load_model(path, safe_mode=True, compile=False)
    except Exception as exc:  # noqa: BLE001 - Keras raises many types; report one line
        text = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ModelError(f"{path}: cannot load the Keras model ({text})") from exc


def _cache_root() -> Path:
    env = os.environ.get("STAMPBATCH_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "stampbatch"


def _dir_writable(directory: Path) -> bool:
    """Really writable (root ignores mode bits, a read-only mount does not): try it."""
    try:
        fd, name = _mkstemp(directory, ".stampbatch-write-test")
    except OSError:
        return False
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(name)
    return True


def _mkstemp(directory: Path, prefix: str) -> tuple[int, str]:
    import tempfile

    return tempfile.mkstemp(prefix=prefix, dir=directory)


def onnx_cache_path(source: ModelSource) -> Path:
    """Where the exported ONNX of this model lives: beside it, or in the user cache."""
    beside = source.keras_path.with_name(f"{source.keras_path.stem}.{source.sha256[:12]}.onnx")
    if beside.is_file() or _dir_writable(beside.parent):
        return beside
    return _cache_root() / "onnx" / f"{source.sha256}.onnx"


def _ort_session(path: str, threads: int, gpu: bool | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, int(threads))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if threads > 1:   # no busy-waiting threads competing with numpy and other sessions
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    available = ort.get_available_providers()
    providers = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available and gpu is not False:
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(path, so, providers=providers)


def _export_onnx(model, stamp_shape: tuple[int, int], dest: Path) -> None:
    """Export atomically and durably (:func:`stampbatch.fileio.atomic_path`)."""
    tf = _import_tf()
    dest.parent.mkdir(parents=True, exist_ok=True)
    spec = tf.TensorSpec((None, *stamp_shape, 1), tf.float32, name="stamps")
    with fileio.atomic_path(dest, overwrite=True, suffix=".onnx") as tmp:
        sink = io.StringIO()
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            model.export(str(tmp), format="onnx", verbose=False, input_signature=[spec])


def prepare_model(source: ModelSource, backend: str = "auto", *,
                  gpu: bool = False) -> ModelSpec:
    """Verify a model for scoring and make its backend ready (ONNX exported and cached).

    Loads the Keras model (safe mode) to read its input shape and check its output is a
    two-class softmax; for the ONNX backend exports it once (cached by sha256) and checks
    ONNX Runtime agrees with Keras to 1e-5. ``auto`` picks ONNX Runtime (the faster path
    here) unless the export fails, or a GPU is wanted and onnxruntime has no CUDA provider.
    """
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    where = str(source.keras_path)
    if backend != "tf" and not (gpu and backend == "auto" and not _ort_has_cuda()):
        cached = _cached_onnx(source)
        if cached is not None:
            return cached
    model = load_keras(source.keras_path)
    stamp_shape = _input_shape(model, where)
    probe = probe_stamps(stamp_shape)
    p_keras = source_probability(model.predict(probe, verbose=0, batch_size=256), where)
    arch = source.architecture or str(getattr(model, "name", "unknown"))
    spec = ModelSpec(source.name, str(source.keras_path), source.sha256, arch, stamp_shape, "tf")
    if backend == "tf":
        return spec
    if backend == "auto" and gpu and not _ort_has_cuda():
        return spec
    dest = onnx_cache_path(source)
    try:
        with _EXPORT_LOCK:   # a cache entry that _cached_onnx did not verify is rebuilt
            _export_onnx(model, stamp_shape, dest)
        session = _ort_session(str(dest), 1, gpu=False)
        out = session.run(None, {session.get_inputs()[0].name: probe})[0]
        p_onnx = source_probability(out, f"{dest} (ONNX export of {where})")
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - export failures come in many types
        if backend == "onnx":
            text = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise ModelError(f"{where}: ONNX export failed ({text}); use --backend tf") from exc
        return spec
    diff = float(np.abs(p_onnx - p_keras).max())
    if diff > AGREEMENT_TOL:
        with contextlib.suppress(OSError):
            dest.unlink()     # a stale or foreign file under our cache name: never trust it
        if backend == "onnx":
            raise ModelError(f"{where}: ONNX Runtime disagrees with Keras by {diff:.2g} "
                             f"(> {AGREEMENT_TOL}); use --backend tf")
        return spec
    spec = replace(spec, backend="onnx", onnx_path=str(dest), onnx_sha256=fileio.sha256_file(dest))
    with contextlib.suppress(OSError):   # lets later runs skip loading TensorFlow
        info = {"sha256": source.sha256, "onnx_sha256": spec.onnx_sha256,
                "stamp_shape": list(stamp_shape), "architecture": arch, "max_abs_diff": diff}
        fileio.write_json_atomic(_sidecar(dest), info)
    return spec


def _ort_has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def _sidecar(onnx_path: Path) -> Path:
    return onnx_path.with_name(onnx_path.name + ".json")


def _cached_onnx(source: ModelSource) -> ModelSpec | None:
    """The verified ONNX export of this exact model (by sha256), without loading TensorFlow."""
    dest = onnx_cache_path(source)
    try:
        info = json.loads(_sidecar(dest).read_text())
        if info.get("sha256") != source.sha256 or not dest.is_file() \
                or info.get("onnx_sha256") != fileio.sha256_file(dest):
            return None
        stamp_shape = (int(info["stamp_shape"][0]), int(info["stamp_shape"][1]))
        arch = source.architecture or str(info.get("architecture") or "unknown")
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    spec = ModelSpec(source.name, str(source.keras_path), source.sha256, arch, stamp_shape,
                     "onnx", str(dest), str(info["onnx_sha256"]))
    try:
        session = _ort_session(str(dest), 1, gpu=False)
        out = session.run(None, {session.get_inputs()[0].name: probe_stamps(stamp_shape)})[0]
    except Exception:  # noqa: BLE001 - an unusable cache entry is simply rebuilt
        return None
    source_probability(out, f"{dest} (ONNX export of {source.keras_path})")
    return spec


class _OnnxPredictor:
    def __init__(self, spec: ModelSpec, threads: int) -> None:
        assert spec.onnx_path is not None
        self.session = _ort_session(spec.onnx_path, threads)
        self.input = self.session.get_inputs()[0].name
        gpu = "CUDAExecutionProvider" in self.session.get_providers()
        self.max_batch = MAX_BATCH_GPU if gpu else ORT_BATCH_CPU
        self.where = spec.onnx_path

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return _batched(lambda b: self.session.run(None, {self.input: b})[0], x,
                        self.max_batch, self.where)


class _TFPredictor:
    def __init__(self, spec: ModelSpec, threads: int) -> None:
        tf = _import_tf()
        # TF's thread pools are per process and shared by concurrent calls: size them for
        # the process's cores (possible only before TF's runtime starts).
        with contextlib.suppress(RuntimeError, AttributeError):
            tf.config.threading.set_intra_op_parallelism_threads(len(os.sched_getaffinity(0)))
            tf.config.threading.set_inter_op_parallelism_threads(1)
        model = load_keras(spec.keras_path)
        sig = [tf.TensorSpec((None, *spec.stamp_shape, 1), tf.float32)]
        self.fn = tf.function(lambda b: model(b, training=False), input_signature=sig,
                              jit_compile=False)
        self.max_batch = MAX_BATCH_GPU if tf.config.list_physical_devices("GPU") else MAX_BATCH_CPU
        self.where = spec.keras_path

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return _batched(lambda b: self.fn(b).numpy(), x, self.max_batch, self.where)


def _batched(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, max_batch: int,
             where: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 3:
        x = x[..., None]
    x = np.ascontiguousarray(x)
    out = np.empty(len(x), dtype=np.float32)
    for lo in range(0, len(x), max_batch):
        out[lo:lo + max_batch] = source_probability(run(x[lo:lo + max_batch]), where)
    return out


def load_predictor(spec: ModelSpec, threads: int = 1) -> Predictor:
    """A callable mapping normalised stamps (M, H, W[, 1]) to P(source) (M,) float32.

    Safe to call from several threads at once (ONNX Runtime sessions and tf.functions are).
    The file is hashed again first: a model replaced since it was prepared is refused
    (its scores would be recorded under the old sha256).
    """
    path, expected = spec.loaded_file
    try:
        actual = fileio.sha256_file(path)
    except OSError as exc:
        raise ModelError(f"{path}: cannot read the model file ({exc.strerror})") from exc
    if actual != expected:
        raise ModelError(f"{path}: the model file changed during the run (sha256 {actual[:12]}, "
                         f"prepared {expected[:12]}); rerun to score with the new file")
    if spec.backend == "onnx":
        return _OnnxPredictor(spec, threads)
    if spec.backend == "tf":
        return _TFPredictor(spec, threads)
    raise UsageError(f"model {spec.name}: backend {spec.backend!r} is not prepared")


# --------------------------------------------------------------------------- per-process cache

_CACHE: dict[tuple[str, str, int], Predictor] = {}
_LOADS: dict[str, int] = {}
_CACHE_LOCK = threading.Lock()


def cached_predictor(spec: ModelSpec, threads: int = 1) -> Predictor:
    """This process's predictor for ``spec``, loaded on first use and kept (keyed by sha256)."""
    key = (spec.sha256, spec.backend, int(threads))
    with _CACHE_LOCK:
        predictor = _CACHE.get(key)
        if predictor is None:
            predictor = load_predictor(spec, threads)
            _CACHE[key] = predictor
            _LOADS[spec.sha256] = _LOADS.get(spec.sha256, 0) + 1
        return predictor


def load_counts() -> dict[str, int]:
    """How many times this process loaded each model (by sha256): 1 each when cached right."""
    with _CACHE_LOCK:
        return dict(_LOADS)
