"""The verification gate that decides whether a reduced-precision scoring path may be offered
(``benchmarks/precision.py``, issue 14): it must pass FP32 itself run another way, and refuse
a damaged int8 model, quantised for real by ONNX Runtime and then broken on purpose."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, gaussian_stamps
from test_score import _train

from stampbatch.score import inference
from stampbatch.train import preprocess

sys.path.insert(0, str(REPO / "benchmarks"))
import precision  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.bench]


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory) -> Path:
    """A briefly trained model's FP32 ONNX export, as the scorer runs it."""
    run = _train(tmp_path_factory.mktemp("runs") / "vgg6", "vgg6", 4)
    spec = inference.prepare_model(inference.resolve_model(run), "onnx")
    return Path(str(spec.onnx_path))


def held_out(n: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    labels = (np.arange(n) % 2).astype(np.int64)
    stamps = gaussian_stamps(n, seed=21, sources=labels == 1, amplitude=5.0)
    return preprocess.normalize(stamps), labels


def damage(model: Path, dest: Path) -> int:
    """Negate the scale of every int8 weight's DequantizeLinear; the number of weights hit."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(model))
    inits = {t.name: t for t in m.graph.initializer}
    hit = 0
    for node in m.graph.node:
        w = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if w is not None and w.data_type == onnx.TensorProto.INT8:
            scale = inits[node.input[1]]
            scale.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(scale), scale.name))
            hit += 1
    onnx.save(m, str(dest))
    return hit


def test_the_gate_passes_fp32_at_another_batch_size(fp32_onnx):
    x, y = held_out()
    ref = precision._ort(fp32_onnx, 128)(x)
    assert precision.roc_auc(y, ref) > 0.9           # a model that has learned something
    v = precision.verdict(y, ref, precision._ort(fp32_onnx, 4096)(x), threshold=0.8)
    assert v["verified"] and v["agree_at_0.5"] == v["agree_at_threshold"] == 1.0
    assert v["max_abs_diff"] < 1e-5


def test_the_gate_refuses_a_damaged_int8_model(fp32_onnx, tmp_path):
    x, y = held_out()
    ref = precision._ort(fp32_onnx, 128)(x)
    int8 = precision._quantize(fp32_onnx, tmp_path / "int8.onnx", x[:512, ..., None], "qdq")
    assert damage(int8, tmp_path / "damaged.onnx") >= 2          # really quantised weights
    bad = precision._ort(tmp_path / "damaged.onnx", 128)(x)
    v = precision.verdict(y, ref, bad, threshold=0.8)
    assert not v["verified"]
    assert min(v["agree_at_0.5"], v["agree_at_threshold"]) < precision.KEEP_AGREEMENT
    # the undamaged int8 model is judged by the same rule, on the same numbers
    honest = precision.verdict(y, ref, precision._ort(int8, 128)(x), threshold=0.8)
    assert honest["agree_at_0.5"] > v["agree_at_0.5"]
    assert honest["verified"] == (min(honest["agree_at_0.5"], honest["agree_at_threshold"])
                                  >= 0.999 and abs(honest["auc_move"]) <= 0.001)
