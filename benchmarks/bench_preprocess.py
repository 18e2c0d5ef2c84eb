"""Vectorised normalisation vs the per-stamp reference loop, same stamps, same run.

    .venv/bin/python benchmarks/bench_preprocess.py [--n 100000] [--repeats 3]

Prints stamps/s for both and their ratio, and checks the two agree bit for bit.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from stampbatch.train import preprocess


def reference_loop(stamps: np.ndarray) -> np.ndarray:
    """The notebook's approach: one stamp at a time through np.percentile."""
    out = np.empty_like(stamps, dtype=np.float32)
    for i in range(len(stamps)):
        out[i] = preprocess.normalize_reference(stamps[i])
    return out


def best_of(fn, stamps: np.ndarray, repeats: int) -> tuple[float, np.ndarray]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn(stamps)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    stamps = rng.normal(100.0, 5.0, size=(args.n, 21, 21)).astype(np.float32)
    stamps[: args.n // 2, 9:12, 9:12] += rng.uniform(5, 200, size=(args.n // 2, 1, 1)).astype(np.float32)

    t_loop, ref = best_of(reference_loop, stamps, args.repeats)
    t_vec, fast = best_of(preprocess.normalize, stamps, args.repeats)
    identical = bool(np.array_equal(ref, fast))
    print(f"{'method':<28}{'median s':>10}{'stamps/s':>14}")
    print(f"{'per-stamp reference loop':<28}{t_loop:>10.3f}{args.n / t_loop:>14,.0f}")
    print(f"{'vectorised normalize()':<28}{t_vec:>10.3f}{args.n / t_vec:>14,.0f}")
    print(f"speed-up: {t_loop / t_vec:.1f}x  (n={args.n:,}, median of {args.repeats}); bit-identical: {identical}")


if __name__ == "__main__":
    main()
