"""Temperature scaling: calibrated P(source) folded into the saved model.

A softmax classifier trained with cross-entropy is usually over-confident. Temperature
scaling (Guo et al. 2017) divides the logits by one scalar ``T`` fitted on held-out stamps
(the validation split) by minimising the negative log-likelihood; it changes no ranking,
so ROC AUC and every operating point's completeness stay as they were, only the
probabilities move. The final layer of every architecture here is ``Dense(2, softmax)``:
``softmax((x W + b) / T) = softmax(x (W / T) + b / T)``, so dividing that layer's kernel
and bias by ``T`` folds the calibration into ``model.keras`` exactly. The saved model still
takes normalised (N, H, W, 1) stamps and returns (N, 2) softmax, column 1 = P(source), so
every client gets calibrated values without knowing about ``T``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from stampbatch.train.dataset import Stores
from stampbatch.train.preprocess import normalize_with_mask

T_BOUNDS = (0.05, 20.0)


def _head(model):
    """The final Dense softmax layer of ``model`` (ValueError when there is none)."""
    import keras

    layer = model.layers[-1]
    if not (isinstance(layer, keras.layers.Dense)
            and getattr(layer.activation, "__name__", "") == "softmax"):
        raise ValueError(f"model {model.name}: the last layer is not a Dense softmax layer; "
                         f"cannot fold a temperature into it")
    return layer


def logit_margin(model, stamps: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """``z1 - z0`` (P(source) = sigmoid of it) for normalised (N, H, W, 1) stamps, float64."""
    import keras

    head = _head(model)
    features = keras.Model(model.inputs, head.input)
    x = features.predict(stamps, batch_size=batch_size, verbose=0).astype(np.float64)
    kernel = np.asarray(head.kernel, dtype=np.float64)
    bias = np.asarray(head.bias, dtype=np.float64)
    z = x @ kernel + bias
    return z[:, 1] - z[:, 0]


def store_logit_margin(model, stores: Stores | Path, rows: np.ndarray, read_rows: int = 16384
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(margins, labels) of the (global) rows with finite pixels (others are skipped)."""
    stores = stores if isinstance(stores, Stores) else Stores([stores])
    rows = np.asarray(rows, dtype=np.int64)
    margins, labels = [], []
    for lo in range(0, len(rows), read_rows):
        raw, lab = stores.read(rows[lo:lo + read_rows])
        stamps, valid = normalize_with_mask(raw)
        if valid.any():
            margins.append(logit_margin(model, stamps[valid][..., None]))
            labels.append(np.asarray(lab)[valid])
    if not margins:
        return np.empty(0), np.empty(0, dtype=np.int8)
    return np.concatenate(margins), np.concatenate(labels)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function, float64."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    e = np.exp(x[~pos])
    out[~pos] = e / (1.0 + e)
    return out


def negative_log_likelihood(margins: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean binary cross-entropy of sigmoid(margin / T) against the labels."""
    z = np.asarray(margins, dtype=np.float64) / temperature
    y = np.asarray(labels, dtype=np.float64)
    # -[y log s(z) + (1-y) log(1-s(z))] = softplus(z) - y z, computed stably
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def fit_temperature(margins: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the validation NLL (bounded search over log T)."""
    from scipy.optimize import minimize_scalar

    margins = np.asarray(margins, dtype=np.float64)
    if len(margins) == 0 or len(np.unique(labels)) < 2:
        return 1.0
    res = minimize_scalar(lambda lt: negative_log_likelihood(margins, labels, math.exp(lt)),
                          bounds=tuple(math.log(b) for b in T_BOUNDS), method="bounded",
                          options={"xatol": 1e-5})
    return float(math.exp(res.x))


def fold_temperature(model, temperature: float) -> None:
    """Divide the final Dense layer's kernel and bias by ``temperature`` (in place)."""
    head = _head(model)
    t = np.float32(temperature)
    head.kernel.assign(np.asarray(head.kernel) / t)
    head.bias.assign(np.asarray(head.bias) / t)
