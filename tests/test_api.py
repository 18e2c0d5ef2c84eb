"""The public API of ``stampbatch/__init__.py``: cheap to import, every name resolves to the
defining module's own object, and the README's "Python API" example runs as written."""

from __future__ import annotations

import ast
import importlib
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

import stampbatch

HEAVY = ("tensorflow", "keras", "dask", "distributed")


def _type_checking_imports() -> dict[str, str]:
    """name -> module of the ``if TYPE_CHECKING:`` imports in stampbatch/__init__.py."""
    tree = ast.parse((REPO / "stampbatch" / "__init__.py").read_text())
    found: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom) and imp.module, ast.dump(imp)
                for alias in imp.names:
                    found[alias.asname or alias.name] = imp.module
    return found


def test_import_loads_no_tensorflow_or_dask_and_every_name_resolves():
    """A fresh interpreter: ``import stampbatch`` loads neither TensorFlow, Dask nor h5py, and
    resolving every public name still loads neither TensorFlow nor Dask."""
    code = (
        "import json, sys\n"
        "import stampbatch\n"
        f"heavy = {HEAVY!r}\n"
        "after_import = sorted(m for m in (*heavy, 'h5py') if m in sys.modules)\n"
        "values = {n: getattr(stampbatch, n) for n in stampbatch.__all__}\n"
        "after_names = sorted(m for m in heavy if m in sys.modules)\n"
        "print(json.dumps({'import': after_import, 'names': after_names,\n"
        "                  'resolved': sorted(values), 'callable': sorted(n for n, v in values.items()\n"
        "                                                                 if callable(v))}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True)
    got = json.loads(out.stdout)
    assert got["import"] == []
    assert got["names"] == []
    assert got["resolved"] == sorted(stampbatch.__all__)
    assert set(got["callable"]) == set(stampbatch.__all__) - {"__version__"}


def test_exports_table_type_checking_imports_and_all_agree():
    exports = stampbatch._EXPORTS
    assert _type_checking_imports() == exports          # what mypy sees is what runs
    assert sorted(stampbatch.__all__) == sorted([*exports, "__version__"])
    for name, module in exports.items():
        assert getattr(stampbatch, name) is getattr(importlib.import_module(module), name)
    assert set(stampbatch.__all__) <= set(dir(stampbatch))
    with pytest.raises(AttributeError, match="no attribute 'score_file'"):
        stampbatch.score_file  # noqa: B018
    from stampbatch import store  # a submodule is still imported as one
    assert store.open_store is stampbatch.open_store


def _readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Python API section holds one python example"
    return blocks[0]


def test_readme_api_section_names_every_public_name():
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    missing = [n for n in stampbatch.__all__ if n != "__version__" and f"`{n}" not in section]
    assert missing == []


@pytest.mark.slow
def test_readme_api_example_runs_as_written(tmp_path, monkeypatch, capsys):
    """Runs the README's example in an empty directory and checks what it made. About 25 s of
    CPU (TensorFlow's import, one epoch of `simple` on 420 stamps, its ONNX export, scoring
    300 candidates with occlusion maps, the evaluation), so over 20 s of wall time on a busy
    2-core machine: the example is the whole pipeline on purpose."""
    monkeypatch.chdir(tmp_path)
    ns: dict[str, object] = {}
    exec(compile(_readme_example(), str(REPO / "README.md"), "exec"), ns)

    info = ns["info"]
    assert (info.n_stamps, info.stamp_shape, info.labelled) == (600, (21, 21), True)
    assert ns["stamps"].shape == (8, 21, 21) and ns["stamps"].dtype == np.float32
    labels = ns["labels"]
    assert labels.shape == (600,) and set(np.unique(labels)) == {0, 1}
    assert ns["snr"].shape == (600,)

    metrics = ns["metrics"]
    assert metrics["epochs_run"] == 1 and 0.0 <= metrics["roc_auc"] <= 1.0
    assert (tmp_path / "runs" / "simple" / "model.keras").is_file()

    summary = ns["summary"]
    assert summary.stamps_scored == 300 and list(summary.models) == ["simple"]
    assert summary.scheduler.startswith("in-process")

    scores = ns["scores"]
    prob = scores.probability
    assert prob.shape == (300,) and prob.dtype == np.float32
    finite = np.isfinite(prob)
    assert finite.sum() >= 290 and ((prob[finite] >= 0) & (prob[finite] <= 1)).all()
    above = ns["above"]
    assert np.array_equal(scores.occlusion_index, above)           # maps exactly for P >= 0.5
    assert scores.occlusion.shape == (len(above), 21, 21)
    assert stampbatch.list_scores(tmp_path / "cands.h5") == ["simple"]

    result = ns["result"]
    assert result["n"] == 300 and 0.0 <= result["roc_auc"] <= 1.0
    saved = json.loads((tmp_path / "runs" / "simple" / "eval" / "cands" / "evaluation.json").read_text())
    assert saved["roc_auc"] == result["roc_auc"]
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == (f"test-split AUC {metrics['roc_auc']:.3f}; {len(above)} of 300 candidates at "
                    f"P >= 0.5; AUC on the candidates {result['roc_auc']:.3f}")
