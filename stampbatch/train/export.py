"""The scoring form of a trained model, made once when training finishes.

Scoring runs ONNX Runtime on an ONNX export of ``model.keras``. Exporting costs seconds (it
loads TensorFlow and tf2onnx), so a training run makes it right after its final
``model.keras`` is written: :func:`export_for_scoring` exports, checks ONNX Runtime against
Keras to :data:`stampbatch.score.inference.AGREEMENT_TOL` on probe stamps, and stores
``model.<sha12>.onnx`` in the run directory with a sidecar ``model.<sha12>.onnx.json``
recording the sha256 of both files and the measured difference. Scoring finds it by the
model's sha256 (:func:`stampbatch.score.inference.prepare_model`) and never exports; a model from
elsewhere is exported by the first scoring run and cached the same way.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from stampbatch.errors import StampbatchError
from stampbatch.score import inference


def _stale_exports(run_dir: Path, keep: Path) -> list[Path]:
    """Exports of earlier model.keras files of this run (another sha256 in the name)."""
    found = []
    for path in run_dir.glob("model.*.onnx*"):
        if path.name not in (keep.name, keep.name + ".json"):
            found.append(path)
    return found


def export_for_scoring(run_dir: Path | str) -> Path | None:
    """Export the run's ``model.keras`` to verified ONNX beside it; return the ONNX path.

    Never fails a finished training: a model that cannot be exported (or whose export
    disagrees with Keras) is reported on stderr and left to scoring, which falls back to
    TensorFlow. Exports of a previous ``model.keras`` of the same run are removed.
    """
    run_dir = Path(run_dir)
    try:
        source = inference.resolve_model(run_dir)
        spec = inference.prepare_model(source, "onnx")
    except StampbatchError as exc:
        print(f"warning: {run_dir}: no ONNX export for scoring ({exc}); scoring will export "
              "or use TensorFlow", file=sys.stderr, flush=True)
        return None
    onnx = Path(str(spec.onnx_path))
    if onnx.parent.resolve() == run_dir.resolve():
        for stale in _stale_exports(run_dir, onnx):
            with contextlib.suppress(OSError):
                stale.unlink()
    return onnx
