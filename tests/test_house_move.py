"""tools/house_move.py, the stage-folder move of issue 28, on a small real git repository.

The script's own map is proved on the real tree by applying it (see its docstring); here a
tiny package with the same kinds of references shows what each rewrite rule does, and that
the script refuses a dirty tree, an applied layout and a module its map does not name.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import house_move  # noqa: E402

MODULES = {"train": "train.loop", "score": "score.run", "fetch": "ingest.arrays"}
TESTS = {"test_train.py": "train/test_train.py", "test_fetch.py": "ingest/test_arrays.py"}
STAGES = {"train": "Training.", "score": "Scoring.", "ingest": "Bringing stamps in."}

FILES = {
    "stampbatch/__init__.py": '__version__ = "1"\n',
    "stampbatch/cli.py": "from stampbatch import __version__, score, train\n\n\n"
                         "def main():\n    return train.fit() + score.VALUE + __version__\n",
    "stampbatch/train.py": "from stampbatch.score import VALUE\n\n\ndef fit():\n    return VALUE\n",
    "stampbatch/score.py": 'VALUE = "s"\nATTRS = {"simulator": "stampbatch.score"}\n'
                           'PRELOAD = ["stampbatch.train"]\n',
    "stampbatch/fetch.py": "def ingest():\n    from stampbatch import train as _train\n\n"
                           "    return _train.fit()\n",
    "stampbatch/store/__init__.py": "",
    "stampbatch/store/_read.py": "from stampbatch import fetch\n",
    "tests/conftest.py": "",
    "tests/test_train.py": "from pathlib import Path\n\nfrom stampbatch import train\n\n"
                           "REPO = Path(__file__).resolve().parents[1]\n"
                           "HERE = Path(__file__).parent\n\n\n"
                           "def test_fit(monkeypatch):\n"
                           '    monkeypatch.setattr("stampbatch.train.fit", lambda: 1)\n',
    "tests/test_fetch.py": 'SCRIPT = """\n    from stampbatch import __version__, train\n"""\n'
                           'CODE = "import sys\\nfrom stampbatch import score\\n"\n\n\n'
                           "def test_ingest():\n    pass\n",
    "pyproject.toml": '[tool.pytest.ini_options]\ntestpaths = ["tests"]\n',
    "Makefile": "demo:\n\tpython -m stampbatch.train --out x\n"
                "\tpython -c 'from stampbatch import train; train.fit()'\n",
    "README.md": "See `stampbatch/fetch.py`, `tests/test_fetch.py::test_ingest`, test_fetch.py and "
                 "`stampbatch.score.VALUE`; `.stampbatch.lock` and `stampbatch.sif` stay.\n",
}


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=root,
                          check=True, capture_output=True, text=True).stdout


def _repo(tmp_path: Path, extra: dict[str, str] | None = None) -> Path:
    root = tmp_path / "repo"
    for rel, text in {**FILES, **(extra or {})}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "flat")
    return root


def _move(root: Path) -> list[str]:
    return house_move.move(root, MODULES, TESTS, STAGES)


def test_the_move_keeps_history_and_rewrites_every_kind_of_reference(tmp_path):
    root = _repo(tmp_path)
    _move(root)
    staged = _git(root, "diff", "--cached", "--name-status", "--no-renames").split("\n")
    for old, new in [("stampbatch/train.py", "stampbatch/train/loop.py"),
                     ("tests/test_fetch.py", "tests/ingest/test_arrays.py")]:
        assert f"D\t{old}" in staged and f"A\t{new}" in staged    # staged, for git to see the rename
    assert (root / "stampbatch/train/__init__.py").read_text() == '"""Training."""\n'
    cli = (root / "stampbatch/cli.py").read_text()
    assert "from stampbatch import __version__\nfrom stampbatch.score import run as score\n" \
           "from stampbatch.train import loop as train\n" in cli
    assert "from stampbatch.score.run import VALUE" in (root / "stampbatch/train/loop.py").read_text()
    assert "    from stampbatch.train import loop as _train\n" in (root / "stampbatch/ingest/arrays.py").read_text()
    assert (root / "stampbatch/store/_read.py").read_text() == "from stampbatch.ingest import arrays as fetch\n"
    score = (root / "stampbatch/score/run.py").read_text()
    assert '{"simulator": "stampbatch.score"}' in score            # a file format value: kept
    assert '["stampbatch.train.loop"]' in score                   # a dotted target: moved
    test = (root / "tests/train/test_train.py").read_text()
    assert "REPO = Path(__file__).resolve().parents[2]" in test
    assert "HERE = Path(__file__).parent.parent" in test
    assert '"stampbatch.train.loop.fit"' in test
    makefile = (root / "Makefile").read_text()
    assert "python -m stampbatch.train.loop --out" in makefile
    assert "python -c 'from stampbatch.train import loop as train; train.fit()'" in makefile
    arrays = (root / "tests/ingest/test_arrays.py").read_text()   # code in strings, split alike
    assert 'SCRIPT = """\n    from stampbatch import __version__\n    from stampbatch.train import loop as train\n"""' \
        in arrays
    assert 'CODE = "import sys\\nfrom stampbatch.score import run as score\\n"' in arrays
    assert (root / "README.md").read_text() == (
        "See `stampbatch/ingest/arrays.py`, `tests/ingest/test_arrays.py::test_ingest`, test_arrays.py and "
        "`stampbatch.score.run.VALUE`; `.stampbatch.lock` and `stampbatch.sif` stay.\n")
    pyproject = (root / "pyproject.toml").read_text()
    assert 'pythonpath = ["tests", "tests/ingest", "tests/train"]' in pyproject
    # the moved package imports and runs
    run = subprocess.run([sys.executable, "-c", "from stampbatch.cli import main; print(main())"],
                         cwd=root, capture_output=True, text=True, env={"PYTHONPATH": str(root)})
    assert run.stdout.strip() == "ss1", run.stderr


def test_a_module_or_test_not_in_the_map_stops_the_move_naming_it(tmp_path):
    root = _repo(tmp_path, {"stampbatch/executor.py": "", "tests/test_executor.py": ""})
    with pytest.raises(house_move.Stop) as stop:
        _move(root)
    assert "stampbatch/executor.py" in str(stop.value)
    assert "tests/test_executor.py" in str(stop.value)
    assert _git(root, "status", "--porcelain") == ""               # nothing written


def test_a_dirty_tree_and_an_applied_layout_are_refused(tmp_path):
    root = _repo(tmp_path)
    (root / "README.md").write_text("edited\n")
    with pytest.raises(house_move.Stop, match="not clean"):
        _move(root)
    _git(root, "checkout", "README.md")
    _move(root)
    _git(root, "commit", "-qm", "moved")
    with pytest.raises(house_move.Stop, match="already applied: stampbatch/ingest"):
        _move(root)
