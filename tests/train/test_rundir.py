"""``rundir`` is the one home of a run directory's file names and of config.toml parsing (issue 28)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import stampbatch
from stampbatch import config
from stampbatch.train import rundir

PACKAGE = Path(stampbatch.__file__).resolve().parent  # the whole package, wherever rundir lives
RUNDIR = Path(rundir.__file__).resolve()
# A run directory's own files, as rundir names them (the test fails if one is renamed there).
RUN_FILES = (rundir.MODEL_FILE, rundir.CONFIG_FILE, rundir.METRICS_FILE, rundir.HISTORY_FILE,
             rundir.SPLIT_FILE, rundir.DATA_FILE, rundir.PREDICTIONS_FILE, rundir.STATE_FILE,
             rundir.LOCK_FILE)


def _code_strings(tree: ast.AST) -> list[ast.Constant]:
    """Every string constant of a module's code (f-string parts included), docstrings excepted:
    prose may mention a file; code may not spell it."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return [node for node in ast.walk(tree) if isinstance(node, ast.Constant)
            and isinstance(node.value, str) and id(node) not in docstrings]


def test_no_module_but_rundir_spells_a_run_directory_file_name():
    assert rundir.MODEL_FILE == "model.keras" and rundir.METRICS_FILE == "metrics.json"
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == RUNDIR:
            continue
        for node in _code_strings(ast.parse(path.read_text(encoding="utf-8"))):
            found += [f"{path.relative_to(PACKAGE)}:{node.lineno} {name}"
                      for name in RUN_FILES if name in node.value]
    assert found == []


def test_only_rundir_and_config_parse_toml():
    """config.toml is parsed by rundir alone (config's load_toml is the generic reader rundir
    and the job/settings files use): no other module imports tomllib."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path in (RUNDIR, Path(config.__file__).resolve()):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.relative_to(PACKAGE)}:{node.lineno}" for n in names if n == "tomllib"]
    assert found == []


def test_run_architecture_and_config_text(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert rundir.run_architecture(run) is None
    (run / rundir.METRICS_FILE).write_text(json.dumps({"architecture": "vgg6"}))
    assert rundir.run_architecture(run) == "vgg6"          # metrics.json when config.toml says nothing
    (run / rundir.CONFIG_FILE).write_text('architecture = "simple"\ndata = "/d/a.h5"\n[extra]\nk = 1\n')
    assert rundir.run_architecture(run) == "simple"        # config.toml first
    text = rundir.read_config_text(run)
    assert text.startswith("architecture")
    assert rundir.parse_config_text(text) == {"architecture": "simple", "data": "/d/a.h5", "extra": {"k": 1}}
    (run / rundir.CONFIG_FILE).write_text("architecture = [")
    assert rundir.run_architecture(run) == "vgg6"
    import tomllib

    with pytest.raises(tomllib.TOMLDecodeError):
        rundir.parse_config_text(rundir.read_config_text(run))
