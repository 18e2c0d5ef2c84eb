"""The Dask scorer against the straightforward approach, same files, same run.

    .venv/bin/python benchmarks/bench_score.py [--only SECTION ...] [--sizes 100000 500000]
                                               [--repeats 3] [--workdir DIR] [--json OUT]

Sections (``--only``; the first five by default), each on freshly trained runs:

* ``rates`` — vgg6: inference only (in memory) vs ``stampbatch score`` as a whole process on
  ``--sizes`` stamps (first use of the run included), in-process and on a local Dask
  worker, and the small files scored in one call; interleaved ``--repeats`` rounds;
* ``precision`` — vgg6: every reduced-precision candidate (``benchmarks/precision.py``)
  side by side with FP32, its agreement on the run's held-out split (the verification
  gate, ``precision.verdict``), bf16 end to end;
* ``resnet50`` / ``resnet50-rates`` — the same two for resnet50 (trained on
  ``--resnet-train`` stamps for one epoch; ``--resnet-repeats`` rounds);
* ``occlusion`` — batched ``occlusion_maps`` vs the notebook's per-stamp loop, and
  ``stampbatch score --occlusion all`` end to end;
* ``backends``, ``end-to-end``, ``memory`` — tf.function vs ONNX Runtime; ``stampbatch
  score`` vs the straightforward script (load, normalise stamp by stamp,
  ``model.predict``, write); peak RSS of the process tree scoring ``--big`` stamps.

Other work on a shared machine makes every number noisy: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers


def make_candidates(path: Path, n: int, seed: int = 0) -> Path:
    """n unit-noise 21x21 stamps, 30 % with a centred source of random brightness."""
    from stampbatch import store

    if path.exists() and store.open_store(path).n_stamps == n:
        return path
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:21, :21]
    psf = np.exp(-((yy - 10) ** 2 + (xx - 10) ** 2) / (2 * 1.5**2)).astype(np.float32)
    with store.StoreWriter(path, labelled=False, overwrite=True) as w:
        for lo in range(0, n, 100_000):
            m = min(100_000, n - lo)
            block = rng.standard_normal((m, 21, 21), dtype=np.float32)
            src = rng.random(m) < 0.3
            block[src] += rng.uniform(2, 30, size=(int(src.sum()), 1, 1)).astype(np.float32) * psf
            w.append(block)
    return path


def make_model(path: Path) -> Path:
    if not path.exists():
        from stampbatch.train import models

        models.build_model("vgg6").save(path)
    return path


class TreeMemory:
    """Peak of the summed RSS of a process and all its descendants, polled every 0.2 s."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(0.2)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_process(cmd: list[str]) -> dict:
    """Run a whole process; wall time and peak tree RSS."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    mem = TreeMemory(proc.pid)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    peak = mem.stop()
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err[-3000:]}")
    res = {"wall_s": wall, "peak_rss_mb": peak / 1e6}
    found = re.search(r"in ([\d,.]+) s \(([\d,]+) stamps/s\)", out)
    if found:   # the scorer's own report: from its start to its end, interpreter start-up excluded
        res["scorer_reported_stamps_per_s"] = float(found.group(2).replace(",", ""))
    return res


def score_cmd(cand: Path | list[Path], model: Path, out: Path, *extra: str) -> list[str]:
    if out.exists():
        shutil.rmtree(out)
    cands = [cand] if isinstance(cand, Path) else cand
    return [sys.executable, "-m", "stampbatch", "score", *map(str, cands), "--model", str(model),
            "--out", str(out), "--quiet", *extra]


def scores_of(out: Path, cand: Path, name: str):
    from stampbatch import store

    return store.read_scores(store.score_target(cand, out), name)


# --------------------------------------------------------------------------- straightforward


def baseline_main(cand: str, model_path: str, out: str) -> None:
    """The straightforward whole-process run (the teaching notebook's way, applied to a file)."""
    import keras

    from stampbatch import store
    from stampbatch.train import preprocess

    model = keras.models.load_model(model_path, safe_mode=True, compile=False)
    stamps = store.read_stamps(cand)                                   # whole file in memory
    norm = np.stack([preprocess.normalize_reference(s) for s in stamps])
    p = model.predict(norm[..., None], batch_size=1024, verbose=0)[:, 1]
    store.create_score_file(out, cand, len(p), stamps.shape[1:])
    with store.ScoreWriter(out, "baseline", len(p), stamps.shape[1:]) as w:
        w.write_probability(0, p)
        w.commit({"method": "straightforward"})


# --------------------------------------------------------------------------- sections


def bench_backends(model_path: Path, n: int = 65536) -> dict:
    from stampbatch.score import inference
    from stampbatch.train import preprocess

    rng = np.random.default_rng(1)
    x = preprocess.normalize(rng.standard_normal((n, 21, 21), dtype=np.float32))
    source = inference.resolve_model(model_path)
    res: dict = {}
    outs = {}
    for backend in ("onnx", "tf"):
        spec = inference.prepare_model(source, backend)
        for threads_per_call, pipelines in ((1, 2), (2, 1)):
            predict = inference.load_predictor(spec, threads_per_call)
            batches = [x[i:i + 4096] for i in range(0, n, 4096)]
            with ThreadPoolExecutor(pipelines) as pool:
                list(pool.map(predict, batches[:pipelines]))                  # warm-up
                times = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    p = np.concatenate(list(pool.map(predict, batches)))
                    times.append(time.perf_counter() - t0)
            key = f"{backend} {pipelines} pipeline(s) x {threads_per_call} thread(s)"
            res[key] = n / float(np.median(times))
            outs[backend] = p
    res["max_abs_diff_onnx_vs_tf"] = float(np.abs(outs["onnx"] - outs["tf"]).max())
    return res


def bench_end_to_end(cand: Path, model: Path, work: Path, n: int, repeats: int) -> dict:
    """Whole processes, interleaved ``repeats`` times; medians (and every wall time)."""
    base_out = work / "baseline.scores.h5"
    fresh = work / "fresh_model" / "vgg6.keras"           # first use: exports ONNX
    if fresh.parent.exists():
        shutil.rmtree(fresh.parent)
    fresh.parent.mkdir()
    shutil.copy(model, fresh)
    r = run_process(score_cmd(cand, fresh, work / "o0"))
    res: dict = {"stampbatch onnx, first run (includes the ONNX export)":
                 {"wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"],
                  "stamps_per_s": n / r["wall_s"]}}

    def baseline() -> list[str]:
        if base_out.exists():
            base_out.unlink()
        return [sys.executable, __file__, "--baseline", str(cand), str(model), str(base_out)]

    runs = {
        "straightforward (normalize_reference loop + model.predict(1024))": baseline,
        "stampbatch onnx, 1 worker x 2 threads": lambda: score_cmd(cand, model, work / "o1"),
        "stampbatch onnx, 2 workers x 1 thread": lambda: score_cmd(
            cand, model, work / "o2", "--workers", "2", "--threads-per-worker", "1"),
        "stampbatch tf.function, 1 worker x 2 threads": lambda: score_cmd(
            cand, model, work / "t1", "--backend", "tf"),
    }
    walls: dict[str, list[float]] = {k: [] for k in runs}
    reported: dict[str, list[float]] = {k: [] for k in runs}
    peaks: dict[str, float] = {k: 0.0 for k in runs}
    for _ in range(repeats):
        for label, cmd in runs.items():
            r = run_process(cmd())
            walls[label].append(r["wall_s"])
            peaks[label] = max(peaks[label], r["peak_rss_mb"])
            if "scorer_reported_stamps_per_s" in r:
                reported[label].append(r["scorer_reported_stamps_per_s"])
    for label in runs:
        wall = float(np.median(walls[label]))
        res[label] = {"wall_s": wall, "all_wall_s": walls[label], "peak_rss_mb": peaks[label],
                      "stamps_per_s": n / wall}
        if reported[label]:
            res[label]["scorer_reported_stamps_per_s"] = float(np.median(reported[label]))
    from stampbatch import store

    base = store.read_scores(base_out, "baseline").probability
    res["max_abs_diff_vs_straightforward"] = float(
        np.abs(scores_of(work / "o1", cand, "vgg6").probability - base).max())
    res["max_abs_diff_tf_vs_onnx"] = float(np.abs(
        scores_of(work / "o1", cand, "vgg6").probability
        - scores_of(work / "t1", cand, "vgg6").probability).max())
    return res


def bench_occlusion(model_path: Path, cand: Path, work: Path, n_maps: int, n_ref: int) -> dict:
    import keras

    from stampbatch import store
    from stampbatch.score import inference, occlusion
    from stampbatch.train import preprocess

    stamps, usable = preprocess.normalize_with_mask(store.read_stamps(cand, 0, n_maps))
    stamps = stamps[usable]   # a few simulated stamps are masked at the centre: unscorable
    spec = inference.prepare_model(inference.resolve_model(model_path), "onnx")
    predict = inference.load_predictor(spec, 1)
    occlusion.occlusion_maps(stamps[:32], predict, threads=2)                 # warm-up
    t0 = time.perf_counter()
    maps = occlusion.occlusion_maps(stamps, predict, threads=2)
    t_fast = time.perf_counter() - t0
    model = keras.models.load_model(model_path, safe_mode=True, compile=False)
    t0 = time.perf_counter()
    ref = occlusion.occlusion_maps_reference(
        stamps[:n_ref], lambda v: model.predict(v, verbose=0)[:, 1])
    t_ref = time.perf_counter() - t0
    small = work / "occ_candidates.h5"
    store.create_store(small, store.read_stamps(cand, 0, n_maps), overwrite=True)
    r = run_process(score_cmd(small, model_path, work / "occ", "--occlusion", "all"))
    r.pop("scorer_reported_stamps_per_s", None)
    return {
        "batched occlusion_maps (ONNX Runtime, 2 pipelines) maps/s": n_maps / t_fast,
        "per-stamp loop (model.predict per stamp) maps/s": n_ref / t_ref,
        "speed-up": (n_maps / t_fast) / (n_ref / t_ref),
        "max_abs_diff_batched_vs_loop": float(np.abs(maps[:n_ref] - ref).max()),
        "stampbatch score --occlusion all (end to end)": {**r, "maps_per_s": n_maps / r["wall_s"]},
    }


def bench_memory(model: Path, work: Path, big: int) -> dict:
    res = {}
    for n in (big // 2, big):
        cand = make_candidates(work / f"candidates_{n}.h5", n, seed=3)
        r = run_process(score_cmd(cand, model, work / f"mem{n}"))
        res[f"{n:,} stamps"] = {**r, "stamps_per_s": n / r["wall_s"]}
    a, b = res[f"{big // 2:,} stamps"], res[f"{big:,} stamps"]
    res["time ratio (2x stamps)"] = b["wall_s"] / a["wall_s"]
    return res


def fresh_run(work: Path, arch: str, n_train: int, epochs: int) -> tuple[Path, Path]:
    """A freshly trained run directory (train_run, so with its training-time ONNX export)."""
    from stampbatch.sim import simulate
    from stampbatch.train.loop import TrainConfig, train_run

    data = work / f"train_{n_train}.h5"
    if not data.exists():
        simulate.write_simulated(data, n_train, seed=1, progress=False)
    run = work / f"run_{arch}_{n_train}_{epochs}"
    if (run / "metrics.json").is_file():       # trained earlier in this run of the benchmark
        return run, data
    if run.exists():
        shutil.rmtree(run)
    t0 = time.perf_counter()
    train_run(data, arch, run, TrainConfig(epochs=epochs, batch_size=256), progress=False)
    print(f"trained {arch} on {n_train:,} stamps, {epochs} epoch(s): "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return run, data


def _copy_run(run: Path, dest: Path) -> Path:
    """A never-used copy of a run (model.keras and its training-time export only)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for f in run.glob("model.*"):
        shutil.copy(f, dest / f.name)
    shutil.copy(run / "config.toml", dest / "config.toml")
    return dest


def inference_only(run: Path, n: int = 65536) -> float:
    """The scorer's inference alone, in memory: 2 pipelines x 1 thread, batch 128."""
    from precision import rate

    from stampbatch.score import inference
    from stampbatch.train import preprocess

    x = preprocess.normalize(np.random.default_rng(1).standard_normal((n, 21, 21),
                                                                       dtype=np.float32))
    spec = inference.prepare_model(inference.resolve_model(run), "onnx")
    return rate(inference.load_predictor(spec, 1), x, 2)


def bench_rates(run: Path, work: Path, sizes: tuple[int, ...], repeats: int,
                n_inference: int = 65536) -> dict:
    """Inference-only vs whole process (in-process threads and a local Dask worker), each
    whole process on a never-used copy of a freshly trained run; interleaved, medians."""
    cands = {n: make_candidates(work / f"candidates_{n}.h5", n) for n in sizes}
    big, small = max(sizes), min(sizes)
    # The same stamps as the big file's, in big/small files scored by one call: the files of
    # one run share the start-up (the "kept warm across the files of one run").
    batch = [make_candidates(work / f"candidates_{small}_{k}.h5", small, seed=100 + k)
             for k in range(big // small)] if big > small else []
    samples: dict[str, list[float]] = {}

    def add(label: str, value: float) -> None:
        samples.setdefault(label, []).append(value)

    for r in range(repeats):
        add("inference only (in memory)", inference_only(run, n_inference))
        for n, cand in cands.items():
            for how, extra in (("in-process", ()), ("local Dask worker", ("--workers", "1"))):
                fresh = _copy_run(run, work / f"fresh_{r}_{n}_{how[:2]}" / run.name)
                res = run_process(score_cmd(cand, fresh, work / "rates_out", *extra))
                add(f"whole process {n:,} stamps, {how}", n / res["wall_s"])
                shutil.rmtree(fresh.parent)
        if batch:
            fresh = _copy_run(run, work / f"fresh_{r}_batch" / run.name)
            res = run_process(score_cmd(batch, fresh, work / "rates_out"))
            add(f"{len(batch)} files of {small:,} stamps in one call, in-process",
                len(batch) * small / res["wall_s"])
            shutil.rmtree(fresh.parent)
    out: dict = {k: {"median_stamps_per_s": float(np.median(v)), "all": v}
                 for k, v in samples.items()}
    inf = np.array(samples["inference only (in memory)"])
    for label, row in out.items():   # the load moves between rounds: ratios within a round
        row["vs_inference_only_median_of_rounds"] = float(np.median(np.array(samples[label])
                                                                    / inf))
    def ratio(a: str, b: str) -> float:
        return float(np.median(np.array(samples[a]) / np.array(samples[b])))

    for how in ("in-process", "local Dask worker"):
        out[f"{small:,} vs {big:,} stamps ({how}), median of rounds"] = ratio(
            f"whole process {small:,} stamps, {how}", f"whole process {big:,} stamps, {how}")
    if batch:
        out[f"{small:,}-stamp files in one call vs one {big:,}-stamp file, in-process, median "
            f"of rounds"] = ratio(f"{len(batch)} files of {small:,} stamps in one call, in-process",
                                  f"whole process {big:,} stamps, in-process")
    for n in sizes:
        out[f"in-process vs Dask worker, {n:,} stamps, median of rounds"] = ratio(
            f"whole process {n:,} stamps, in-process",
            f"whole process {n:,} stamps, local Dask worker")
    return out


def bench_precision(work: Path, arch: str, n_train: int, epochs: int, n_speed: int,
                    e2e: int = 0, repeats: int = 3, n_calib: int = 2048) -> dict:
    """Every precision candidate against FP32; with ``e2e`` stamps, the bf16 candidate end
    to end too (whole processes, interleaved)."""
    from precision import end_to_end, trial

    run, data = fresh_run(work, arch, n_train, epochs)
    res = trial(run, arch, data, work, n_speed, n_calib=n_calib)
    if e2e:
        cand = make_candidates(work / f"candidates_{e2e}.h5", e2e)
        res["end to end, bf16 vs fp32"] = end_to_end(cand, run, repeats)
    return res


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--baseline":
        baseline_main(*sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200_000, help="stamps, end-to-end section")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 500_000],
                        help="stamps, whole-process rates")
    parser.add_argument("--big", type=int, default=2_000_000, help="stamps, memory run")
    parser.add_argument("--maps", type=int, default=1000, help="occlusion maps, batched")
    parser.add_argument("--ref-maps", type=int, default=50, help="occlusion maps, loop")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs (median)")
    parser.add_argument("--train", type=int, default=20_000, help="vgg6 training stamps")
    parser.add_argument("--resnet-train", type=int, default=2_000,
                        help="resnet50 training stamps (one epoch)")
    parser.add_argument("--resnet-repeats", type=int, default=1,
                        help="interleaved rounds of resnet50's whole-process rates")
    parser.add_argument("--speed-stamps", type=int, default=32768,
                        help="stamps per inference-only pass (resnet50: 1/16)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/stampbatch-bench-score"))
    parser.add_argument("--only", nargs="*", default=["rates", "precision", "resnet50",
                                                      "resnet50-rates", "occlusion"],
                        choices=["rates", "precision", "resnet50", "resnet50-rates",
                                 "occlusion", "backends", "end-to-end", "memory"])
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    work = args.workdir
    if work.exists():                          # every model freshly trained, every file new
        shutil.rmtree(work)
    work.mkdir(parents=True)
    from precision import cpu_flags

    model = make_model(work / "vgg6.keras")
    results: dict = {"load_average_at_start": os.getloadavg(), "cores": os.cpu_count(),
                     "cpu_flags": cpu_flags()}
    print(json.dumps(results))

    def rates():
        run, _ = fresh_run(work, "vgg6", args.train, 2)
        return bench_rates(run, work, tuple(args.sizes), args.repeats)

    def cand():
        return make_candidates(work / f"candidates_{args.n}.h5", args.n)

    sections = [("rates", rates),
                ("precision", lambda: bench_precision(work, "vgg6", args.train, 2,
                                                      args.speed_stamps, max(args.sizes),
                                                      args.repeats)),
                ("resnet50", lambda: bench_precision(work, "resnet50", args.resnet_train, 1,
                                                     args.speed_stamps // 16, n_calib=256)),
                ("resnet50-rates", lambda: bench_rates(
                    fresh_run(work, "resnet50", args.resnet_train, 1)[0], work,
                    tuple(args.sizes), args.resnet_repeats, args.speed_stamps // 2)),
                ("occlusion", lambda: bench_occlusion(model, cand(), work, args.maps,
                                                       args.ref_maps)),
                ("backends", lambda: bench_backends(model)),
                ("end-to-end", lambda: bench_end_to_end(cand(), model, work, args.n,
                                                        args.repeats)),
                ("memory", lambda: bench_memory(model, work, args.big))]
    for name, fn in sections:
        if name not in args.only:
            continue
        t0 = time.perf_counter()
        results[name] = fn()
        results[name]["load_average"] = os.getloadavg()
        print(f"== {name} ({time.perf_counter() - t0:.0f} s)")
        print(json.dumps(results[name], indent=2), flush=True)
    results["load_average_at_end"] = os.getloadavg()
    if "end-to-end" in results:
        e = results["end-to-end"]
        ours = e["stampbatch onnx, 1 worker x 2 threads"]["stamps_per_s"]
        base = next(v for k, v in e.items() if k.startswith("straightforward"))
        print(f"end to end: {ours:,.0f} stamps/s, "
              f"{ours / base['stamps_per_s']:.1f}x the straightforward run")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
