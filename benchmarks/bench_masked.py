"""What masked pixels cost a classifier: the same labelled stamps scored clean and masked.

    .venv/bin/python benchmarks/bench_masked.py RUN STORE.h5 [--seed 0]

Real stamps hold masked pixels (NaN, Inf, |x| >= 1e30): bad columns, cosmic-ray and
saturation masks, the edge of a CCD. ``stampbatch.train.preprocess`` fills them with sky (the
quartiles of the stamp's other pixels in a checkerboard, which keeps its median and noise
level) unless the central 3x3 is masked or over half of the stamp is.
For each masking pattern (all off the central 3x3) the stamps of STORE are scored with RUN's
model three ways, side by side: clean (the yardstick), masked and filled by stampbatch, and
masked with NaN set to 0 (what KBMOD's own filter does before calling the model). Reported:
ROC AUC, completeness at the clean stamps' 1 %-FPR threshold, and the median change of P.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from sklearn.metrics import roc_auc_score  # noqa: E402

from stampbatch import store  # noqa: E402
from stampbatch.report.evaluate import store_truth  # noqa: E402
from stampbatch.train.preprocess import normalize_with_mask  # noqa: E402


def patterns(x: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Masked copies of the stamps (N, 21, 21), nothing masked in the central 3x3."""
    n, h, w = x.shape
    rows = np.arange(n)
    out = {}
    a = x.copy()
    a[rows, :, rng.choice(np.r_[0:w // 2 - 1, w // 2 + 2:w], n)] = np.nan
    out["a NaN column, >= 2 px off the centre"] = a
    a = x.copy()
    a[:, :, w - 5:] = np.nan
    out["the last 5 columns NaN (a CCD edge, 24 %)"] = a
    a = x.copy()
    a[:, :, :9] = np.nan
    out["the first 9 columns NaN (a CCD edge, 43 %)"] = a
    a = x.copy()
    r = rng.integers(0, h - 2, n)
    c = rng.choice(np.r_[0:w // 2 - 4, w // 2 + 3:w - 2], n)
    for dr in range(3):
        for dc in range(3):
            a[rows, r + dr, c + dc] = np.nan
    out["a 3x3 NaN block off the centre"] = a
    a = x.copy()
    m = rng.random(x.shape) < 0.02
    m[:, h // 2 - 1:h // 2 + 2, w // 2 - 1:w // 2 + 2] = False
    a[m] = np.nan
    out["2 % of the pixels NaN, scattered"] = a
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("store", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import keras

    from stampbatch.train.loop import configure_tensorflow

    configure_tensorflow()
    model = keras.models.load_model(args.run / "model.keras", safe_mode=True)
    y = store_truth(args.store)
    x = store.read_stamps(args.store).astype(np.float32)
    clean_rows = np.isfinite(x).all(axis=(1, 2))
    x, y = x[clean_rows], y[clean_rows]
    if x.shape[1:] != (21, 21):
        print(f"{args.store}: stamps are {x.shape[1:]}, this benchmark masks 21x21 stamps",
              file=sys.stderr)
        return 2

    def score(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z, valid = normalize_with_mask(raw)
        p = model.predict(z[..., None], batch_size=2048, verbose=0)[:, 1]
        return np.where(valid, p, np.nan), valid

    p0, _ = score(x)
    thr = float(np.quantile(p0[y == 0], 0.99))
    print(f"{args.store}, {len(y):,} stamps, model {args.run}")
    print(f"clean: ROC AUC {roc_auc_score(y, p0):.4f}, completeness at 1 % FPR "
          f"{np.mean(p0[y == 1] > thr):.3f}")
    print("pattern | scorable | AUC filled | AUC clean (same stamps) | AUC NaN->0 | "
          "C@1 % filled | C@1 % clean | median |dP| filled")
    for name, a in patterns(x, np.random.default_rng(args.seed)).items():
        p, valid = score(a)
        pz, _ = score(np.nan_to_num(a, nan=0.0))
        pos = valid & (y == 1)
        print(f"{name} | {valid.mean():.3f} | {roc_auc_score(y[valid], p[valid]):.4f} | "
              f"{roc_auc_score(y[valid], p0[valid]):.4f} | {roc_auc_score(y, pz):.4f} | "
              f"{np.mean(p[pos] > thr):.3f} | {np.mean(p0[pos] > thr):.3f} | "
              f"{np.nanmedian(np.abs(p - p0)):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
