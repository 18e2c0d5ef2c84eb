"""The architecture registry: shapes, softmax outputs, BatchNorm where promised, MAC counts."""

from __future__ import annotations

import numpy as np
import pytest

from stampbatch.errors import UsageError
from stampbatch.train import models

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


@pytest.mark.parametrize("name", ["simple", "simple_bn", "resnet50"])
def test_normalised_stamps_are_rescaled_to_unit_mean(built, name):
    scale = built[name].get_layer("unit_mean")
    assert isinstance(scale, keras.layers.Rescaling) and scale.scale == 441.0


def _noise_units(model, x: np.ndarray) -> np.ndarray:
    sub = keras.Model(model.input, model.get_layer("noise_units").output)
    return keras.ops.convert_to_numpy(sub(x, training=False))[..., 0]


def _sky(n: int, seed: int = 1) -> np.ndarray:
    """Raw stamps: sky 100, Gaussian noise sigma 5."""
    return np.random.default_rng(seed).normal(100.0, 5.0, (n, 21, 21)).astype(np.float32)


def test_vgg6_sees_stamps_in_noise_units(built):
    from stampbatch.train.preprocess import normalize

    x = normalize(_sky(6))[..., None]
    flat = x.reshape(6, -1).astype(np.float64)
    p25, p50, p75 = np.percentile(flat, [25, 50, 75], axis=1)
    expected = np.arcsinh((flat - p50[:, None]) / (0.7413 * (p75 - p25))[:, None])
    np.testing.assert_allclose(_noise_units(built["vgg6"], x), expected.reshape(6, 21, 21),
                               atol=1e-4)
    # the flat rows normalize() gives unusable stamps map to zeros, not NaN
    flat_rows = np.full((2, 21, 21, 1), 1 / 441, dtype=np.float32)
    assert np.all(_noise_units(built["vgg6"], flat_rows) == 0.0)


def test_vgg6_input_of_a_faint_source_ignores_a_bright_star(built):
    # A SNR ~5-per-pixel source at the centre, with and without a 1e5-count star in the
    # corner: divided by the stamp's sum the centre shrinks ~100-fold, in noise units not.
    from stampbatch.train.preprocess import normalize

    raw = np.repeat(_sky(1), 2, axis=0)   # the same sky twice
    raw[:, 9:12, 9:12] += 25.0
    raw[1, 1:4, 1:4] += 1e5
    x = normalize(raw)[..., None]
    unit_mean = 441 * x[:, 10, 10, 0]
    assert unit_mean[0] / unit_mean[1] > 50
    z = _noise_units(built["vgg6"], x)[:, 10, 10]
    np.testing.assert_allclose(z[1], z[0], rtol=0.05)
    assert z[0] > 1.5   # asinh(5) = 2.3: well above the noise


def test_vgg6_loads_without_stampbatch_in_safe_mode(tmp_path, built):
    """vgg6 loaded in a fresh process without stampbatch (~35 s: that process imports
    TensorFlow and Keras itself, as a client such as KBMOD's filter does)."""
    # Clients (KBMOD's filter) load model.keras with their own code, no stampbatch import: they
    # normalise each co-add stamp the reference way and pass (N, 21, 21), no channel axis.
    import subprocess
    import sys

    from stampbatch.train import preprocess

    rng = np.random.default_rng(3)
    sky = rng.normal(1000.0, 12.0, size=(4, 21, 21)).astype(np.float32)  # unsubtracted co-adds
    sky[1, 8:13, 8:13] += 400.0                                           # a source at the centre
    client = np.stack([preprocess.normalize_reference(s) for s in sky])   # (4, 21, 21)
    built["vgg6"].save(tmp_path / "vgg6.keras")
    np.save(tmp_path / "x.npy", client)
    code = ("import sys, numpy as np, keras\n"
            f"m = keras.models.load_model({str(tmp_path / 'vgg6.keras')!r}, safe_mode=True)\n"
            f"np.save({str(tmp_path / 'p.npy')!r}, m.predict(np.load({str(tmp_path / 'x.npy')!r}), verbose=0))\n"
            "assert 'stampbatch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    ours = built["vgg6"].predict(preprocess.normalize(sky)[..., None], verbose=0)
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), ours, rtol=1e-5, atol=1e-6)


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
    # conv 6x6x32 (3x3x16), conv 4x4x32 (3x3x32), pool 2 -> 2x2x32, Dense 128->256, 256->2.
    vgg6 = (19 * 19 * 16 * 9 * 1 + 17 * 17 * 16 * 9 * 16 + 6 * 6 * 32 * 9 * 16
            + 4 * 4 * 32 * 9 * 32 + 2 * 2 * 32 * 256 + 256 * 2)
    assert vgg6 == 1_064_464
    assert models.count_macs(built["vgg6"]) == vgg6
    # simple: Dense(30) on each of 441 pixels (1 channel), Dense(30) per pixel, 13230 -> 2.
    simple = 441 * 1 * 30 + 441 * 30 * 30 + 441 * 30 * 2
    assert models.count_macs(built["simple"]) == simple
    assert models.count_macs(built["simple_bn"]) == simple
    # the per-stamp costs quoted in the performance notes: 0.87 and 2.08 MFLOP (vgg6 with
    # its old 4x4 last pooling; the 2x2 pooling adds 2 %)
    assert round(2 * simple / 1e6, 2) == 0.87
    assert round(2 * (vgg6 - 3 * 32 * 256) / 1e6, 2) == 2.08
    assert round(2 * vgg6 / 1e6, 2) == 2.13


def test_describe(built):
    d = models.describe("vgg6")
    assert d == {"name": "vgg6", "parameters": built["vgg6"].count_params(),
                 "macs_per_stamp": 1_064_464}
    assert d["parameters"] == 50_034


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
