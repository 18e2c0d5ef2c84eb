"""Scoring a KBMOD Results file (Parquet) against scoring the same stamps in an HDF5 store.

    .venv/bin/python benchmarks/bench_kbmod.py [--n 1000000] [--repeats 1] [--workdir DIR]
                                               [--json OUT]

Writes a ``--n``-row Parquet Results file as KBMOD's ``write_table`` lays it out (astropy's
schema and YAML header, the trajectory columns, ``uuid``, a 21x21 ``coadd_mean`` flattened
with ``image_column_shapes``; written in 65,536-row groups because astropy would need the
whole table in memory) and an HDF5 candidate store holding the same stamps. Then, as whole
processes, interleaved ``--repeats`` times, with an (untrained: speed does not depend on the
weights) vgg6:

* ``stampbatch score cands.h5 --out DIR`` — the HDF5 path;
* ``stampbatch score results.parquet --out DIR`` — the KBMOD path: one pass over the table,
  each batch read, its chunks scored by the scorer's chunk task and journaled, the batch
  written with prob_real/prob_bogus/cnn_class into ``results.scored.parquet``.

Reports wall time, rows/s, the ratio, and the peak RSS summed over each process tree
(driver, Dask scheduler, workers). Goal: peak < 1.5 GB and the KBMOD path within 20 % of the
HDF5 path's throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_score import make_model, run_process, score_cmd  # noqa: E402

BLOCK = 65536


def astropy_schema(tmp: Path):
    """The Arrow schema (fields and metadata) astropy writes for a KBMOD Results table."""
    import pyarrow.parquet as pq
    from astropy.table import Table

    t = Table({"x": np.zeros(1, np.int64), "y": np.zeros(1, np.int64),
               "vx": np.zeros(1), "vy": np.zeros(1), "likelihood": np.zeros(1),
               "flux": np.zeros(1), "obs_count": np.zeros(1, np.int64),
               "uuid": ["0" * 32], "coadd_mean": np.zeros((1, 21, 21), np.float32)})
    t.meta["image_column_shapes"] = {"coadd_mean": [21, 21]}
    t.meta["mjd_mid"] = np.linspace(60370.1, 60372.1, 20)
    t.write(tmp, overwrite=True)
    return pq.ParquetFile(tmp).schema_arrow


def make_inputs(work: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    """results.parquet and cands.h5 with the same n stamps (30 % with a centred source)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stampbatch import store

    parquet, h5 = work / "results.parquet", work / "cands.h5"
    if parquet.exists() and h5.exists() and pq.ParquetFile(parquet).metadata.num_rows == n:
        return parquet, h5
    schema = astropy_schema(work / "schema.parquet")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:21, :21]
    psf = np.exp(-((yy - 10) ** 2 + (xx - 10) ** 2) / (2 * 1.5**2)).astype(np.float32)
    with pq.ParquetWriter(parquet, schema, version="2.4") as pw, \
            store.StoreWriter(h5, labelled=False, overwrite=True) as hw:
        for lo in range(0, n, BLOCK):
            m = min(BLOCK, n - lo)
            stamps = rng.standard_normal((m, 21, 21), dtype=np.float32)
            src = rng.random(m) < 0.3
            stamps[src] += rng.uniform(2, 30, (int(src.sum()), 1, 1)).astype(np.float32) * psf
            cols = {"x": rng.integers(0, 4000, m), "y": rng.integers(0, 4000, m),
                    "vx": rng.normal(0, 50, m), "vy": rng.normal(0, 50, m),
                    "likelihood": rng.uniform(5, 50, m), "flux": rng.uniform(1e2, 1e3, m),
                    "obs_count": rng.integers(10, 20, m),
                    "uuid": [f"{lo + i:032x}" for i in range(m)]}
            arrays = [pa.array(cols[f.name], type=f.type) for f in schema if f.name in cols]
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(stamps.reshape(-1)), 441))
            pw.write_table(pa.Table.from_arrays(arrays, schema=schema), row_group_size=BLOCK)
            hw.append(stamps)
    return parquet, h5


def cpu_flags() -> str:
    flags = set()
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    keep = sorted(f for f in flags if f.startswith(("avx", "fma", "sse4")))
    return " ".join(keep)


def run_kbmod(parquet: Path, model: Path, out: Path) -> dict:
    """The KBMOD path as a whole process; its own phase times (check, pass, commit)."""
    import subprocess

    from bench_score import REPO, TreeMemory

    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "stampbatch", "score", str(parquet),
                             "--model", str(model), "--out", str(out), "--quiet"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    mem = TreeMemory(proc.pid)
    stdout, stderr = proc.communicate()
    res = {"wall_s": time.perf_counter() - t0, "peak_rss_mb": mem.stop() / 1e6}
    if proc.returncode != 0:
        raise SystemExit(f"KBMOD path failed ({proc.returncode}):\n{stderr[-3000:]}")
    res["phases_s"] = {k: float(v.replace(",", "")) for k, v in
                       re.findall(r"(check|pass|commit) ([\d,.]+) s", stdout)}
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_kbmod."))
    work.mkdir(parents=True, exist_ok=True)
    parquet, h5 = make_inputs(work, args.n)
    model = make_model(work / "vgg6.keras")
    run_process(score_cmd(h5, model, work / "warm"))          # ONNX export, page cache
    res: dict = {"n": args.n, "cpu_flags": cpu_flags(), "load_before": os.getloadavg(),
                 "hdf5": [], "kbmod": []}
    for _ in range(args.repeats):
        res["hdf5"].append(run_process(score_cmd(h5, model, work / "out_h5")))
        out = work / "out_kbmod"
        shutil.rmtree(out, ignore_errors=True)
        res["kbmod"].append(run_kbmod(parquet, model, out))
    res["load_after"] = os.getloadavg()
    for key in ("hdf5", "kbmod"):
        walls = [r["wall_s"] for r in res[key]]
        res[f"{key}_median_wall_s"] = float(np.median(walls))
        res[f"{key}_rows_per_s"] = args.n / float(np.median(walls))
        res[f"{key}_peak_rss_mb"] = max(r["peak_rss_mb"] for r in res[key])
    res["throughput_ratio_kbmod_vs_hdf5"] = res["kbmod_rows_per_s"] / res["hdf5_rows_per_s"]
    print(json.dumps(res, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
