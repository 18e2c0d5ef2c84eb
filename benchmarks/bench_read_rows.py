"""Reading a training window of scattered rows: ``store.read_rows`` against h5py fancy indexing.

    .venv/bin/python benchmarks/bench_read_rows.py [--n 750000] [--dir /tmp] [--repeats 3]

Training reads each epoch in windows of up to 65,536 rows drawn at random from the training
split (``stampbatch.train.dataset``), sorted for the read. When the store is more than four times
the window, the rows are too sparse to read as one covering slice. The straightforward
reference is then one h5py fancy selection of all of them (``ds[rows]``, what ``read_rows``
did up to the tenth session). ``read_rows`` reads block by block: for each block of the
store's chunk rows that holds selected rows, the one slice that covers them, indexed in
memory. Both read the stamps and the labels of the same rows from the same uncompressed
store (noise stamps, chunks of 4,096 rows, the simulator's default). The reference is
timed only up to ``--reference-max`` rows, because its time grows with the square of the
window. Each figure is the median of ``--repeats`` reads with fresh random rows; the page
cache is warm, since the store is read whole once first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quality import cpu_flags  # noqa: E402

from stampbatch import store  # noqa: E402

WINDOWS = (1_024, 4_096, 16_384, 65_536)


def make_store(path: Path, n: int, batch: int = 50_000) -> None:
    rng = np.random.default_rng(0)
    with store.StoreWriter(path, labelled=True, chunk_rows=4096) as writer:
        for lo in range(0, n, batch):
            k = min(batch, n - lo)
            writer.append(rng.normal(size=(k, 21, 21)).astype(np.float32),
                          labels=(rng.random(k) < 0.5).astype(np.int8))


def reference(path: Path, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    uniq, inv = np.unique(rows, return_inverse=True)
    with h5py.File(path, "r") as h5:
        return h5["stamps"][uniq][inv], h5["labels"][uniq][inv]


def timed(fn, *args) -> tuple[float, tuple]:
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=750_000, help="stamps in the store")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the store")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-max", type=int, default=16_384,
                        help="largest window the reference is timed on")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "rows.h5"
        make_store(path, args.n)
        store.read_stamps(path)  # warm the page cache once
        train = np.random.default_rng(1).permutation(args.n)[: int(0.7 * args.n)]
        rng = np.random.default_rng(2)
        results = []
        for window in WINDOWS:
            ours, ref = [], []
            for _ in range(args.repeats):
                rows = rng.choice(train, window, replace=False)
                t_ours, (x, y) = timed(store.read_rows, path, rows)
                ours.append(t_ours)
                if window <= args.reference_max:
                    t_ref, (xr, yr) = timed(reference, path, rows)
                    ref.append(t_ref)
                    assert np.array_equal(x, xr) and np.array_equal(y, yr)
            row = {"window": window, "read_rows_s": statistics.median(ours),
                   "reference_s": statistics.median(ref) if ref else None}
            row["ratio"] = row["reference_s"] / row["read_rows_s"] if ref else None
            results.append(row)
            ref_text = (f"{row['reference_s']:8.3f} s  ({row['ratio']:.0f}x)" if ref
                        else "  not timed")
            print(f"{window:>7,} rows of {args.n:,}: read_rows {row['read_rows_s']:.3f} s, "
                  f"h5py fancy selection {ref_text}", flush=True)
    print(f"CPU: {cpu_flags()}")
    print(json.dumps({"n": args.n, "cpu": cpu_flags(), "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
