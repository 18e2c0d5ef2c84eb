"""Benchmark the stamp simulator: generation in memory, and end to end into an HDF5 store.

    .venv/bin/python benchmarks/bench_simulate.py                 # 1,000,000 stamps
    .venv/bin/python benchmarks/bench_simulate.py --n 200000 --repeat 1

Prints a table of stamps/s (best of ``--repeat`` runs) and the peak resident memory, so
the bounded-memory claim of ``write_simulated`` can be checked too.
"""

from __future__ import annotations

import argparse
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from stampbatch.sim import simulate


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench_generate(n: int, repeat: int, config: simulate.SimConfig, workers: int) -> float:
    """Best seconds to simulate n stamps in memory, block by block (nothing kept)."""
    best = float("inf")
    for r in range(repeat):
        t0 = time.perf_counter()
        for _ in simulate.iter_blocks(n, config, r, workers=workers):
            pass
        best = min(best, time.perf_counter() - t0)
    return best


def bench_write(n: int, repeat: int, config: simulate.SimConfig, out_dir: Path,
                compression: str | None, candidates: bool, workers: int) -> float:
    """Best seconds for write_simulated of n stamps (file deleted after each run)."""
    best = float("inf")
    for r in range(repeat):
        path = out_dir / f"bench-sim-{r}.h5"
        t0 = time.perf_counter()
        simulate.write_simulated(path, n, config=config, seed=r, candidates=candidates,
                                 compression=compression, overwrite=True, progress=False,
                                 workers=workers)
        best = min(best, time.perf_counter() - t0)
        path.unlink()
    return best


def bench_io_floor(n: int, repeat: int, config: simulate.SimConfig, out_dir: Path) -> float:
    """Best seconds to append one pre-simulated block again and again up to n stamps:
    the HDF5 write cost alone, for comparison with end to end."""
    from stampbatch import store

    block = simulate.simulate_stamps(simulate.SIM_BLOCK_ROWS, config, simulate.block_rng(0, 0))
    meta = dict(block.meta)
    meta["kind"] = meta["kind"].astype("S10")
    best = float("inf")
    for r in range(repeat):
        path = out_dir / f"bench-io-{r}.h5"
        t0 = time.perf_counter()
        with store.StoreWriter(path, labelled=True, overwrite=True) as writer:
            for start in range(0, n, len(block)):
                m = min(len(block), n - start)
                writer.append(block.stamps[:m], block.labels[:m],
                              {k: v[:m] for k, v in meta.items()})
        best = min(best, time.perf_counter() - t0)
        path.unlink()
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000, help="stamps per run (default 1,000,000)")
    p.add_argument("--repeat", type=int, default=3, help="runs per measurement; best is kept")
    p.add_argument("--out-dir", type=Path, default=None, help="where the HDF5 file is written "
                   "(default: a temporary directory)")
    p.add_argument("--workers", type=int, default=None,
                   help="simulation threads (default: write_simulated's default)")
    p.add_argument("--lzf", action="store_true", help="also measure lzf compression")
    args = p.parse_args(argv)
    config = simulate.SimConfig()
    rows = []

    workers = args.workers or simulate._default_workers()
    for w in sorted({1, workers}):
        rows.append((f"generate in memory, {w} thread(s)",
                     bench_generate(args.n, args.repeat, config, w)))
    with tempfile.TemporaryDirectory(dir=args.out_dir) as tmp:
        rows.append(("HDF5 write only (no simulation)", bench_io_floor(
            args.n, args.repeat, config, Path(tmp))))
        for w in sorted({1, workers}):
            rows.append((f"write_simulated -> HDF5, {w} thread(s)", bench_write(
                args.n, args.repeat, config, Path(tmp), None, False, w)))
        rows.append((f"  candidates file, {workers} thread(s)", bench_write(
            args.n, args.repeat, config, Path(tmp), None, True, workers)))
        if args.lzf:
            rows.append((f"  lzf compression, {workers} thread(s)", bench_write(
                args.n, args.repeat, config, Path(tmp), "lzf", False, workers)))

    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"n = {args.n:,} stamps of {config.stamp_shape[0]}x{config.stamp_shape[1]}, "
          f"block {simulate.SIM_BLOCK_ROWS:,}, best of {args.repeat}, numpy {np.__version__}")
    print(f"| {'stage':40s} | {'seconds':>8s} | {'stamps/s':>10s} |")
    print(f"|{'-' * 42}|{'-' * 10}|{'-' * 12}|")
    for name, sec in rows:
        print(f"| {name:40s} | {sec:8.2f} | {args.n / sec:10,.0f} |")
    print(f"peak resident memory: {_peak_rss_mib():,.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
