"""Reduced-precision candidates for scoring, measured side by side with FP32 (issue 14).

Used by ``benchmarks/bench_score.py`` (section ``precision``). Each candidate is a predictor
from normalised stamps (N, 21, 21) to P(source), run as the scorer runs FP32: two pipelines
on the two cores, one intra-op thread each (ONNX Runtime), or one TensorFlow call using
both cores. Agreement is measured on the held-out test split of a freshly trained run:
decisions at P = 0.5 and at the run's stored 1 %-FPR threshold, and ROC AUC.

Candidates: FP32 ONNX Runtime at batch 128 (the scorer's), 1024 and 4096; int8 static
quantisation (per-channel weights, 2,048 calibration stamps, the first convolution and the
last dense layer and softmax kept in FP32) as QDQ and as fused QOperator (QLinearConv);
FP32 and bf16 (Keras ``mixed_bfloat16`` policy: oneDNN, AMX on CPUs that have it) through a
compiled ``tf.function``.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

Predictor = Callable[[np.ndarray], np.ndarray]
KEEP_SPEEDUP = 1.3          # end to end, to keep a reduced-precision path
KEEP_AGREEMENT = 0.999      # decisions agreeing with FP32 on held-out stamps
KEEP_AUC_MOVE = 0.001


def cpu_flags() -> dict[str, bool]:
    """The instruction-set flags that decide which kernels exist, from /proc/cpuinfo."""
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8",
              "amx_bf16")
    return {f: f in flags for f in wanted}


def roc_auc(labels: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC by the rank-sum formula (ties averaged)."""
    from scipy.stats import rankdata

    pos = labels == 1
    ranks = rankdata(p)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def rate(predict: Predictor, x: np.ndarray, pipelines: int, repeats: int = 3) -> float:
    """Median stamps/s over ``repeats`` passes of ``x`` (see :func:`one_pass`)."""
    with ThreadPoolExecutor(pipelines) as pool:
        one_pass(predict, x, pool, pipelines)                         # warm-up
        times = [one_pass(predict, x, pool, pipelines) for _ in range(repeats)]
    return len(x) / float(np.median(times))


def one_pass(predict: Predictor, x: np.ndarray, pool: ThreadPoolExecutor,
             pipelines: int) -> float:
    """Seconds to predict ``x`` in blocks of at most 4096 stamps spread over the pool's
    pipelines (at least one block per pipeline: fewer stamps than 4096 per pipeline would
    otherwise leave a pipeline, and a core, idle)."""
    block = max(1, min(4096, -(-len(x) // pipelines)))
    t0 = time.perf_counter()
    list(pool.map(predict, [x[i:i + block] for i in range(0, len(x), block)]))
    return time.perf_counter() - t0


def interleaved(predictors: dict[str, tuple[Predictor, int]], x: np.ndarray,
                rounds: int) -> dict[str, list[float]]:
    """Seconds per pass of every predictor, the predictors taking turns in each round."""
    pools = {k: ThreadPoolExecutor(pipes) for k, (_, pipes) in predictors.items()}
    try:
        for k, (predict, pipes) in predictors.items():
            one_pass(predict, x[:8192], pools[k], pipes)              # warm-up
        times: dict[str, list[float]] = {k: [] for k in predictors}
        for _ in range(rounds):
            for k, (predict, pipes) in predictors.items():
                times[k].append(one_pass(predict, x, pools[k], pipes))
        return times
    finally:
        for pool in pools.values():
            pool.shutdown()


def _ort(path: Path, batch: int) -> Predictor:
    from stampbatch.score import inference

    session = inference._ort_session(str(path), 1, gpu=False)
    name = session.get_inputs()[0].name
    return lambda x: inference._batched(lambda b: session.run(None, {name: b})[0], x, batch,
                                        str(path))


def _quantize(fp32: Path, dest: Path, calib: np.ndarray, fmt: str) -> Path:
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    graph = onnx.load(str(fp32)).graph
    nodes = list(graph.node)
    convs = [n.name for n in nodes if n.op_type == "Conv"]
    last = max(i for i, n in enumerate(nodes) if n.op_type in ("MatMul", "Gemm"))
    exclude = convs[:1] + [n.name for n in nodes[last:]]   # first conv; last dense onwards
    name = graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.blocks = iter([{name: calib[i:i + 256]} for i in range(0, len(calib), 256)])

        def get_next(self):
            return next(self.blocks, None)

    quantize_static(str(fp32), str(dest), Reader(),
                    quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, nodes_to_exclude=exclude)
    return dest


def _tf(keras_path: Path, arch: str, bf16: bool) -> Predictor:
    import keras
    import tensorflow as tf

    from stampbatch.score import inference
    from stampbatch.train import models

    fp32 = inference.load_keras(keras_path)
    if bf16:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        try:
            model = models.build_model(arch)
        finally:
            keras.mixed_precision.set_global_policy("float32")
        model.set_weights(fp32.get_weights())
    else:
        model = fp32
    sig = [tf.TensorSpec((None, 21, 21, 1), tf.float32)]
    def run(b):   # a bf16 softmax sums to 1 only to ~4e-3: renormalise in float32
        out = tf.cast(model(b, training=False), tf.float32)
        return out / tf.reduce_sum(out, axis=1, keepdims=True)

    fn = tf.function(run, input_signature=sig)
    return lambda x: inference._batched(lambda b: fn(b).numpy(), x, 4096, str(keras_path))


def candidates(run: Path, arch: str, calib: np.ndarray, work: Path) -> dict[str, tuple]:
    """{label: (predictor, pipelines)} for every path tried; FP32 ONNX first."""
    from stampbatch.score import inference

    spec = inference.prepare_model(inference.resolve_model(run), "onnx")
    onnx = Path(str(spec.onnx_path))
    out: dict[str, tuple] = {
        "fp32 onnx batch 128 (scorer)": (_ort(onnx, 128), 2),
        "fp32 onnx batch 1024": (_ort(onnx, 1024), 2),
        "fp32 onnx batch 4096": (_ort(onnx, 4096), 2),
    }
    for fmt in ("qdq", "qoperator"):
        label = f"int8 onnx {fmt} per-channel, first/last fp32"
        try:
            q = _quantize(onnx, work / f"{arch}.int8.{fmt}.onnx", calib, fmt)
            out[label] = (_ort(q, 128), 2)
        except Exception as exc:  # noqa: BLE001 - record why a candidate could not be built
            out[label] = (None, f"failed: {type(exc).__name__}: {exc}"[:200])
    out["fp32 tf.function batch 4096"] = (_tf(Path(spec.keras_path), arch, False), 1)
    out["bf16 tf.function (mixed_bfloat16, oneDNN) batch 4096"] = (
        _tf(Path(spec.keras_path), arch, True), 1)
    return out


def _threshold(run: Path) -> float:
    """The run's stored operating-point threshold (1 % FPR), found in metrics.json."""
    def find(obj):
        if isinstance(obj, dict):
            if "operating_point" in obj and isinstance(obj["operating_point"], dict):
                return obj["operating_point"].get("threshold")
            for v in obj.values():
                if (t := find(v)) is not None:
                    return t
        return None

    t = find(json.loads((run / "metrics.json").read_text()))
    return float(t) if t is not None else 0.5


def verdict(labels: np.ndarray, ref: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    """The verification gate for a reduced-precision path, on a run's held-out stamps:
    ``verified`` when its decisions at P = 0.5 and at the run's stored threshold agree with
    FP32's (``ref``) on at least KEEP_AGREEMENT of the stamps and its ROC AUC moves by at
    most KEEP_AUC_MOVE. A path is offered only if verified and KEEP_SPEEDUP faster."""
    auc_ref, auc = roc_auc(labels, ref), roc_auc(labels, p)
    row = {"agree_at_0.5": float(np.mean((p >= 0.5) == (ref >= 0.5))),
           "agree_at_threshold": float(np.mean((p >= threshold) == (ref >= threshold))),
           "auc": auc, "auc_move": auc - auc_ref,
           "max_abs_diff": float(np.abs(p - ref).max())}
    row["verified"] = bool(min(row["agree_at_threshold"], row["agree_at_0.5"]) >= KEEP_AGREEMENT
                           and abs(row["auc_move"]) <= KEEP_AUC_MOVE)
    return row


def trial(run: Path, arch: str, data: Path, work: Path, n_speed: int,
          rounds: int = 5, n_calib: int = 2048) -> dict:
    """Speed of every candidate and its agreement with FP32 on the run's test split."""
    from stampbatch import store
    from stampbatch.train import preprocess

    with np.load(run / "split.npz") as npz:
        test = np.sort(npz["test"])
    x_test, scorable = preprocess.normalize_with_mask(store.read_stamps(data)[test])
    y_test = store.read_labels(data)[test].astype(np.int64)
    x_test, y_test = x_test[scorable], y_test[scorable]   # stamps masked at the centre: no score
    rng = np.random.default_rng(5)
    x_speed = x_test[rng.integers(0, len(x_test), n_speed)]
    # ORT's calibrator keeps every activation of every calibration stamp (resnet50: 9 GB
    # for 2,048 stamps), so resnet50 is calibrated on fewer
    calib, scorable = preprocess.normalize_with_mask(store.read_stamps(data, 0, n_calib))
    calib = calib[scorable][..., None]
    thr = _threshold(run)
    res: dict = {"held_out_stamps": int(len(test)), "threshold_1pct_fpr": thr,
                 "speed_stamps": int(len(x_speed)), "rounds": rounds,
                 "calibration_stamps": int(len(calib))}
    built = candidates(run, arch, calib, work)
    usable = {k: v for k, v in built.items() if v[0] is not None}
    times = interleaved(usable, x_speed, rounds)
    base_label = "fp32 onnx batch 128 (scorer)"
    ref = usable[base_label][0](x_test)
    for label, (predict, pipelines) in built.items():
        if predict is None:
            res[label] = {"status": pipelines}
            continue
        p = predict(x_test)
        ratios = np.array(times[base_label]) / np.array(times[label])   # per round
        row = {"median_stamps_per_s": len(x_speed) / float(np.median(times[label])),
               "speed_vs_fp32_median_of_rounds": float(np.median(ratios)),
               **verdict(y_test, ref, p, thr)}
        row["qualifies_on_inference_alone"] = bool(
            row["verified"] and row["speed_vs_fp32_median_of_rounds"] >= KEEP_SPEEDUP)
        res[label] = row
    return res


def whole_process_main(kind: str, candidates: str, run: str) -> None:
    """One whole process: imports, model load, read + normalise + predict every chunk of the
    file on two pipelines (as the in-process scorer), no journal or write. ``kind``:
    ``fp32-onnx`` (the scorer's path) or ``bf16-tf`` (the bf16 candidate, TensorFlow)."""
    from stampbatch import store
    from stampbatch.score import inference
    from stampbatch.train.preprocess import normalize_with_mask

    spec = inference.prepare_model(inference.resolve_model(run), "onnx")
    if kind == "fp32-onnx":
        predict = inference.load_predictor(spec, 1)
    else:
        predict = _tf(Path(spec.keras_path), spec.architecture, True)
    n = store.open_store(candidates).n_stamps

    def chunk(lo: int) -> int:
        x, _ = normalize_with_mask(store.read_stamps(candidates, lo, min(lo + 4096, n)))
        return len(predict(x))

    with ThreadPoolExecutor(2) as pool:
        done = sum(pool.map(chunk, range(0, n, 4096)))
    assert done == n


def end_to_end(candidates: Path, run: Path, rounds: int) -> dict:
    """fp32-onnx vs bf16-tf whole processes on one file, interleaved; per-round ratios."""
    import subprocess
    import sys

    times: dict[str, list[float]] = {"fp32-onnx": [], "bf16-tf": []}
    for _ in range(rounds):
        for kind in times:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, __file__, kind, str(candidates), str(run)],
                           check=True, capture_output=True)
            times[kind].append(time.perf_counter() - t0)
    n = _n_stamps(candidates)
    ratio = np.array(times["fp32-onnx"]) / np.array(times["bf16-tf"])
    return {"stamps": n, **{f"{k} stamps/s (median)": n / float(np.median(v))
                            for k, v in times.items()},
            "all_s": times, "bf16 speed-up, median of rounds": float(np.median(ratio))}


def _n_stamps(path: Path) -> int:
    from stampbatch import store

    return store.open_store(path).n_stamps


if __name__ == "__main__":
    import sys

    whole_process_main(*sys.argv[1:4])
