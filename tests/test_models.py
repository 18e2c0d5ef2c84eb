"""The architecture registry: shapes, softmax outputs, BatchNorm where promised, MAC counts."""

from __future__ import annotations

import numpy as np
import pytest

from stampbatch import models
from stampbatch.errors import UsageError

keras = pytest.importorskip("keras")


def _normalised_batch(n: int = 5, shape: tuple[int, int] = (21, 21)) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.random((n, *shape, 1)).astype(np.float32)
    return x / x.sum(axis=(1, 2, 3), keepdims=True)


@pytest.fixture(scope="module")
def built() -> dict[str, object]:
    return {name: models.build_model(name) for name in models.architecture_names()}


def test_registry_names():
    assert models.architecture_names() == ["simple", "simple_bn", "vgg6", "resnet50"]
    assert list(models.ARCHITECTURES) == models.architecture_names()


@pytest.mark.parametrize("name", ["simple", "simple_bn", "vgg6", "resnet50"])
def test_every_architecture_gives_softmax_rows(built, name):
    model = built[name]
    assert tuple(model.input_shape) == (None, 21, 21, 1)
    out = keras.ops.convert_to_numpy(model(_normalised_batch(5), training=False))
    assert out.shape == (5, 2)
    assert np.all(out >= 0)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("name", ["simple", "simple_bn", "vgg6", "resnet50"])
def test_normalised_stamps_are_rescaled_to_unit_mean(built, name):
    scale = built[name].get_layer("unit_mean")
    assert isinstance(scale, keras.layers.Rescaling) and scale.scale == 441.0


def test_simple_bn_really_has_batch_normalization(built):
    def n_bn(model):
        return sum(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)

    assert n_bn(built["simple"]) == 0
    assert n_bn(built["simple_bn"]) == 2
    assert n_bn(built["vgg6"]) == 1
    # simple_bn differs from simple only by the BatchNorm parameters (4 per unit, 2 x 30 units)
    assert built["simple_bn"].count_params() - built["simple"].count_params() == 2 * 4 * 30


def test_macs_match_hand_computation(built):
    # vgg6 on 21x21 ('valid'): conv 19x19x16 (3x3x1), conv 17x17x16 (3x3x16), pool -> 8,
    # conv 6x6x32 (3x3x16), conv 4x4x32 (3x3x32), pool 4 -> 1x1x32, Dense 32->256, 256->2.
    vgg6 = (19 * 19 * 16 * 9 * 1 + 17 * 17 * 16 * 9 * 16 + 6 * 6 * 32 * 9 * 16
            + 4 * 4 * 32 * 9 * 32 + 32 * 256 + 256 * 2)
    assert vgg6 == 1_039_888
    assert models.count_macs(built["vgg6"]) == vgg6
    # simple: Dense(30) on each of 441 pixels (1 channel), Dense(30) per pixel, 13230 -> 2.
    simple = 441 * 1 * 30 + 441 * 30 * 30 + 441 * 30 * 2
    assert models.count_macs(built["simple"]) == simple
    assert models.count_macs(built["simple_bn"]) == simple
    # the per-stamp costs quoted in the performance notes: 0.87 and 2.08 MFLOP
    assert round(2 * simple / 1e6, 2) == 0.87
    assert round(2 * vgg6 / 1e6, 2) == 2.08


def test_describe(built):
    d = models.describe("vgg6")
    assert d == {"name": "vgg6", "parameters": built["vgg6"].count_params(),
                 "macs_per_stamp": 1_039_888}
    assert d["parameters"] == 25_458


def test_resnet50_adaptation_keeps_spatial_maps(built):
    """Stem at full resolution, 21 -> 11 -> 6 in the stem, then 6 -> 3 -> 2 -> 1 through the stages."""
    model = built["resnet50"]
    shapes = {layer.name: tuple(layer.output.shape[1:]) for layer in model.layers}
    assert shapes["stem_relu"] == (21, 21, 64)
    assert shapes["stem_pool"] == (6, 6, 64)
    assert shapes["res2c_out"] == (6, 6, 256)
    assert shapes["res3d_out"] == (3, 3, 512)
    assert shapes["res4f_out"] == (2, 2, 1024)
    assert shapes["res5c_out"] == (1, 1, 2048)
    blocks = [n for n in shapes if n.startswith("res") and n.endswith("_out")]
    assert len(blocks) == 3 + 4 + 6 + 3
    assert 23_000_000 < model.count_params() < 24_000_000


def test_unknown_architecture_lists_known_names():
    with pytest.raises(UsageError) as err:
        models.build_model("vgg16")
    message = str(err.value)
    assert "vgg16" in message and "\n" not in message
    for name in models.architecture_names():
        assert name in message


def test_too_small_stamps_are_a_usage_error():
    with pytest.raises(UsageError, match="vgg6.*11x11"):
        models.build_model("vgg6", (11, 11))
    # the fully convolutional ones take other stamp sizes
    model = models.build_model("simple", (15, 17))
    assert model(_normalised_batch(2, (15, 17)), training=False).shape == (2, 2)


def test_a_new_architecture_is_one_function_and_one_entry(monkeypatch):
    def tiny(stamp_shape=(21, 21), n_classes=2):
        inputs = keras.Input((*stamp_shape, 1))
        x = keras.layers.Flatten()(inputs)
        return keras.Model(inputs, keras.layers.Dense(n_classes, activation="softmax")(x))

    monkeypatch.setitem(models.ARCHITECTURES, "tiny", tiny)
    assert "tiny" in models.architecture_names()
    assert models.describe("tiny") == {"name": "tiny", "parameters": 441 * 2 + 2,
                                       "macs_per_stamp": 441 * 2}


def test_models_save_and_load_in_safe_mode(tmp_path, built):
    x = _normalised_batch(4)
    for name in ("simple_bn", "vgg6"):
        path = tmp_path / f"{name}.keras"
        built[name].save(path)
        loaded = keras.models.load_model(path, safe_mode=True)
        np.testing.assert_allclose(loaded.predict(x, verbose=0),
                                   built[name].predict(x, verbose=0), rtol=1e-5, atol=1e-6)
