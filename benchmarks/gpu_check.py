"""The measuring half of ``benchmarks/gpu_check.sh`` (run by it; testable on a CPU).

    python benchmarks/gpu_check.py compare RUN CANDIDATES SCORES_TARGET [--n N] [--cpu-dry-run]
    python benchmarks/gpu_check.py util UTIL_LOG

``compare`` scores the first N stamps again through ONNX Runtime's CPU provider and checks
the stored (GPU) probabilities against them: the largest difference and the fraction of
decisions at P = 0.5 that agree; it fails (exit 1) beyond 1e-3 or below 99.9 %. It also
reports which execution provider the scorer's ONNX Runtime offers. ``util`` summarises the
``nvidia-smi`` samples taken while scoring (mean and peak GPU utilisation).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

MAX_DIFF = 1e-3          # GPU (TF32 convolutions) vs CPU FP32, in P(source)
MIN_AGREEMENT = 0.999


def compare(run: Path, candidates: Path, target: Path, n: int, dry_run: bool) -> int:
    import onnxruntime as ort

    from stampbatch import store
    from stampbatch.score import inference
    from stampbatch.train import preprocess

    providers = ort.get_available_providers()
    print(f"onnxruntime {ort.__version__} providers: {', '.join(providers)}")
    if not dry_run and "CUDAExecutionProvider" not in providers:
        print("FAIL: onnxruntime offers no CUDAExecutionProvider: the GPU path was not used")
        return 1
    spec = inference.prepare_model(inference.resolve_model(run), "onnx")
    session = inference._ort_session(str(spec.onnx_path), 4, gpu=False)
    name = session.get_inputs()[0].name
    x, usable = preprocess.normalize_with_mask(store.read_stamps(candidates, 0, n))
    cpu = inference._batched(lambda b: session.run(None, {name: b})[0], x[..., None], 4096,
                             "cpu check")
    gpu = store.read_scores(target, "vgg6").probability[:n]
    if not np.array_equal(np.isnan(gpu), ~usable):
        print("FAIL: the scored file's unscorable stamps are not the ones the CPU check finds")
        return 1
    cpu, gpu = cpu[usable], gpu[usable]   # stamps masked at the centre have no probability
    diff = float(np.max(np.abs(cpu - gpu)))
    agree = float(np.mean((cpu >= 0.5) == (gpu >= 0.5)))
    ok = diff <= MAX_DIFF and agree >= MIN_AGREEMENT
    print(f"GPU vs CPU probabilities on {n:,} stamps: max |diff| {diff:.2e}, decisions at 0.5 "
          f"agree on {100 * agree:.3f} % -> {'OK' if ok else 'FAIL'}")
    return 0 if ok else 1


def utilisation(log: Path) -> int:
    values = []
    if log.is_file():
        for line in log.read_text().splitlines():
            try:
                values.append(float(line.split(",")[0]))
            except ValueError:
                continue
    if not values:
        print("GPU utilisation: n/a (no nvidia-smi samples)")
        return 0
    print(f"GPU utilisation while scoring: mean {np.mean(values):.0f} %, "
          f"peak {np.max(values):.0f} % ({len(values)} samples)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    c = sub.add_parser("compare")
    c.add_argument("run", type=Path)
    c.add_argument("candidates", type=Path)
    c.add_argument("target", type=Path)
    c.add_argument("--n", type=int, default=100_000)
    c.add_argument("--cpu-dry-run", action="store_true")
    u = sub.add_parser("util")
    u.add_argument("log", type=Path)
    args = parser.parse_args()
    if args.what == "compare":
        return compare(args.run, args.candidates, args.target, args.n, args.cpu_dry_run)
    return utilisation(args.log)


if __name__ == "__main__":
    sys.exit(main())
