"""Batched occlusion maps: orientation, alignment, agreement with the per-stamp loop, patches."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import gaussian_stamps

from stampbatch.score import occlusion
from stampbatch.train import preprocess


def point_source_stamps(n: int, at: tuple[int, int], *, seed: int = 0,
                        amplitude: float = 40.0) -> np.ndarray:
    """Unit-noise 21x21 stamps with a Gaussian source (sigma 1.5 px) at pixel ``at``."""
    rng = np.random.default_rng(seed)
    stamps = rng.normal(0.0, 1.0, size=(n, 21, 21)).astype(np.float32)
    yy, xx = np.mgrid[:21, :21]
    psf = np.exp(-((yy - at[0]) ** 2 + (xx - at[1]) ** 2) / (2 * 1.5**2)).astype(np.float32)
    return stamps + amplitude * psf


def peak_predict(x: np.ndarray) -> np.ndarray:
    """A transparent stand-in for a network: P(source) rises with the brightest pixel's share."""
    flat = x.reshape(len(x), -1)
    peak = flat.max(axis=1)
    return (peak / (peak + 4.0 * flat.mean(axis=1))).astype(np.float32)


def test_keep_masks_zero_the_patch_rows_first():
    masks = occlusion.keep_masks((21, 21), 5)
    assert masks.shape == (17 * 17, 441)
    m = masks.reshape(17, 17, 21, 21)
    # position (r=2, c=9): rows 2..6 and columns 9..13 hidden, nothing else
    expected = np.ones((21, 21), np.float32)
    expected[2:7, 9:14] = 0
    np.testing.assert_array_equal(m[2, 9], expected)
    assert np.all(masks.sum(axis=1) == 441 - 25)


def test_off_centre_source_lights_up_its_own_position_not_the_transposed_one():
    stamps = preprocess.normalize(point_source_stamps(4, (5, 15), seed=1))
    maps = occlusion.occlusion_maps(stamps, peak_predict, patch=5)
    assert maps.shape == (4, 21, 21) and maps.dtype == np.float32
    for m in maps:
        assert np.unravel_index(np.argmax(m), m.shape) == (5, 15)
        assert m[5, 15] > m[15, 5] + 0.1
    # the patch centred on the source hides the most flux: the map peaks there, not beside it
    assert np.all(maps[:, 5, 15] > maps[:, 5, 13])


def test_agrees_with_the_per_stamp_loop_for_every_patch_size():
    stamps = preprocess.normalize(gaussian_stamps(6, seed=3, sources=np.arange(6) % 2 == 0))
    for patch in (3, 5, 7):
        fast = occlusion.occlusion_maps(stamps, peak_predict, patch=patch, batch_stamps=4)
        loop = occlusion.occlusion_maps_reference(stamps, peak_predict, patch=patch)
        assert fast.shape == loop.shape == (6, 21, 21)
        np.testing.assert_allclose(fast, loop, rtol=0, atol=1e-6)


@pytest.mark.parametrize("patch", [3, 5, 7])
def test_map_value_at_patch_centre_is_one_minus_p_of_that_occluded_stamp(patch):
    stamps = preprocess.normalize(point_source_stamps(2, (8, 12), seed=4))
    maps = occlusion.occlusion_maps(stamps, peak_predict, patch=patch)
    half = patch // 2
    for r, c in [(0, 0), (3, 7), (21 - patch, 21 - patch), (6, 10)]:
        v = stamps[1].copy()
        v[r:r + patch, c:c + patch] = 0.0
        p = peak_predict(preprocess.normalize_reference(v)[None])[0]
        assert maps[1, r + half, c + half] == pytest.approx(1.0 - p, abs=1e-6)


def test_border_padding_edge_and_min():
    stamps = preprocess.normalize(point_source_stamps(3, (2, 18), seed=5))
    edge = occlusion.occlusion_maps(stamps, peak_predict, patch=5, pad="edge")
    low = occlusion.occlusion_maps(stamps, peak_predict, patch=5, pad="min")
    inner = (slice(None), slice(2, 19), slice(2, 19))
    np.testing.assert_array_equal(edge[inner], low[inner])
    # edge: the border repeats the nearest patch centre's value
    np.testing.assert_array_equal(edge[:, 0, 2:19], edge[:, 2, 2:19])
    np.testing.assert_array_equal(edge[:, 0:2, 20], np.stack([edge[:, 2, 18]] * 2, axis=1))
    # a source near the corner stays visible at its own pixel with edge padding
    assert np.all(edge[:, 2, 18] == edge[:, 1, 19])
    # min: the border holds the map's minimum
    mins = low[inner].min(axis=(1, 2))
    np.testing.assert_array_equal(low[:, 0, :], np.broadcast_to(mins[:, None], (3, 21)))


def test_threads_and_batch_size_do_not_change_the_result():
    stamps = preprocess.normalize(gaussian_stamps(10, seed=6))
    one = occlusion.occlusion_maps(stamps, peak_predict, patch=5, batch_stamps=10)
    many = occlusion.occlusion_maps(stamps, peak_predict, patch=5, batch_stamps=3, threads=2)
    np.testing.assert_array_equal(one, many)


def test_other_stamp_shapes():
    stamps = preprocess.normalize(gaussian_stamps(3, seed=7, shape=(15, 17)))
    maps = occlusion.occlusion_maps(stamps, peak_predict, patch=3)
    loop = occlusion.occlusion_maps_reference(stamps, peak_predict, patch=3)
    assert maps.shape == (3, 15, 17)
    np.testing.assert_allclose(maps, loop, atol=1e-6)


def test_bad_inputs_are_refused():
    stamps = preprocess.normalize(gaussian_stamps(2, seed=8))
    with pytest.raises(ValueError, match="between 1 and 21"):
        occlusion.occlusion_maps(stamps, peak_predict, patch=22)
    with pytest.raises(ValueError, match="between 1 and 21"):
        occlusion.occlusion_maps(stamps, peak_predict, patch=0)
    bad = stamps.copy()
    bad[0, 3, 3] = np.nan
    with pytest.raises(ValueError, match="finite"):
        occlusion.occlusion_maps(bad, peak_predict)
    with pytest.raises(ValueError, match="padding"):
        occlusion.occlusion_maps(stamps, peak_predict, pad="zeros")
    with pytest.raises(ValueError, match="predict returned"):
        occlusion.occlusion_maps(stamps, lambda x: np.zeros(3, np.float32))


@pytest.mark.slow
def test_real_network_through_onnx_runtime_agrees_with_the_loop(tmp_path):
    """A small conv net exported to ONNX: batched maps == per-stamp loop to 1e-6."""
    import keras

    from stampbatch.score import inference

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((21, 21, 1)),
        keras.layers.Conv2D(4, 3, activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(2, activation="softmax"),
    ])
    path = tmp_path / "tiny.keras"
    model.save(path)
    spec = inference.prepare_model(inference.resolve_model(path), "onnx")
    predict = inference.load_predictor(spec)
    stamps = preprocess.normalize(gaussian_stamps(5, seed=9, sources=np.arange(5) < 3))
    fast = occlusion.occlusion_maps(stamps, predict, patch=5, threads=2, batch_stamps=2)
    loop = occlusion.occlusion_maps_reference(stamps, predict, patch=5)
    np.testing.assert_allclose(fast, loop, rtol=0, atol=1e-6)
    keras_maps = occlusion.occlusion_maps(
        stamps, lambda x: model.predict(x, verbose=0)[:, 1], patch=5)
    np.testing.assert_allclose(fast, keras_maps, rtol=0, atol=1e-5)
    assert np.ptp(fast) > 0          # the maps are not constant: the test can fail
