#!/usr/bin/env python3
"""Move stampbatch's flat modules into stage folders (issue 28), and every reference with them.

    python tools/house_move.py            # check, move with git mv, rewrite references, sort imports
    python tools/house_move.py --check    # only the checks: exit 1 naming what stops the move

The map below is the layout: ``stampbatch/`` shows the pipeline (``sim``, ``ingest``, ``store``,
``train``, ``score``, ``kbmod``, ``slurm``, ``report``, ``commands``) with the shared modules
(``errors``, ``config``, ``fileio``, ``progress``) and the entry points (``cli``, ``console``,
``demo``) on top. The tests move with the code they test (``tests/score/test_plan.py`` for
``stampbatch/score/plan.py``); tests of the command line, the shared modules, the job
templates, the containers and the benchmarks stay in ``tests/``.

What it does, in order (nothing is written before every check passed):

1. refuses a dirty tree, a layout already applied, and any module or test file the map does not
   name (the message lists them: add them to ``MODULES`` / ``TESTS``), or a map entry with no file
   (the modules and tests other helpers of issue 28 add, ``*_IF_PRESENT``, are moved when there);
2. ``git mv`` of every module and test (history kept), a docstring-only ``__init__.py`` per
   stage (importing a stage imports nothing);
3. rewrites every reference in every tracked text file (this script and the frozen history
   ``benchmarks/HISTORY.md`` excepted): relative imports in the package become absolute,
   dotted names (``stampbatch.train`` in imports, ``python -m``, submitit, Dask preload,
   monkeypatch targets, docs), ``from stampbatch import a, b`` split by new home
   (``from stampbatch.train import loop as train``: the local name stays; in code, and also in
   strings, shell lines and docs, e.g. a test's ``python -c`` script), paths
   (``stampbatch/fetch.py``, ``tests/test_fetch.py``), and ``Path(__file__)`` arithmetic in
   moved tests; the HDF5 ``simulator`` attribute values are file format and are kept;
4. sorts the rewritten imports (``ruff check --fix --select I``) and lists what a person should
   still read: prose that names an old module file (``score.py``), a moved module using ``__file__``.
   Prose that names a module by its bare old name (ARCHITECTURE's module table) is left to a person.

Tests keep pytest's default import mode (``prepend``) without ``__init__.py`` files: every test
file's basename stays unique (checked here), and pyproject's pytest ``pythonpath`` lists every test
folder, so ``from conftest import …``, ``from test_score import _train`` (test_kbmod,
test_precision_gate) and ``import fault_child`` resolve as they did in the flat folder, whatever
is collected first and when one file runs alone. ``__init__.py`` packages would instead need
every such import rewritten (``tests.score.test_score``) and the rootdir on ``sys.path``.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

PKG = "stampbatch"

# old module (dotted, under stampbatch) -> new module. Only modules that move are listed.
MODULES: dict[str, str] = {
    # sim: simulated training stamps and injection into real backgrounds
    "simulate": "sim.simulate",
    "scene": "sim.scene",
    "field": "sim.field",
    "profiles": "sim.profiles",
    "backgrounds": "sim.backgrounds",
    "inject": "sim.inject",
    # ingest: real stamps brought in (named for what they do: fetch.py was `ingest`)
    "fetch": "ingest.arrays",
    "ingest_meta": "ingest.tables",
    "download": "ingest.download",
    # train: one architecture on labelled stores, and the run directory it leaves
    "train": "train.loop",
    "train_eval": "train.finish",
    "calibrate": "train.calibration",
    "dataset": "train.dataset",
    "rundir": "train.rundir",
    "models": "train.models",
    "preprocess": "train.preprocess",
    "export": "train.export",
    # score: candidate files scored on Dask, journaled, written back beside the file
    "score": "score.run",
    "plan": "score.plan",
    "journal": "score.journal",
    "tasks": "score.tasks",
    "cluster": "score.cluster",
    "inference": "score.inference",
    "occlusion": "score.occlusion",
    "plugin": "score.plugin",
    "candidates": "score.candidates",
    # slurm: training jobs on a cluster
    "launch": "slurm.launch",
    "train_job": "slurm.train_job",
    "job_status": "slurm.job_status",
    # report: what runs and scores mean
    "evaluate": "report.evaluate",
    "report": "report.html",
    "plots": "report.plots",
    "metrics": "report.metrics",
}
# Modules other helpers of issue 28 add (news.md, 22:25-22:29): moved when present, and named in
# the output either way. Any other new module still stops the move.
MODULES_IF_PRESENT: dict[str, str] = {
    "sim_config": "sim.config",        # A: SimConfig apart from simulate (the simulate/scene cycle)
    "train_config": "train.config",    # A: TrainConfig apart from train (the training cycle)
    "executor": "score.executor",      # C: the one chunk executor of HDF5 and KBMOD scoring
}
# Modules that stay where they are: entry points and what every stage shares.
STAY = {"__init__", "__main__", "cli", "console", "demo", "config", "errors", "fileio", "progress"}
# Sub-packages that are already a stage (or the command layer): kept whole.
KEEP_PACKAGES = {"store", "kbmod", "commands"}
STAGES: dict[str, str] = {
    "sim": "Simulated training stamps: the scene of each stamp (centre source, field, backgrounds,\n"
           "detector defects), sources injected into real backgrounds; written as stores.",
    "ingest": "Real stamps brought in: .npy/.npz arrays into a store (``ingest``), their per-stamp\n"
              "metadata tables, and resumable verified downloads (``fetch``).",
    "train": "Training one architecture on labelled stores: the data stream and its normalisation,\n"
             "the models, the epoch loop, the run directory, and what a finished run leaves\n"
             "(calibration, metrics, the ONNX export).",
    "score": "Scoring candidate files: the plan, chunk tasks on threads or a Dask cluster, the\n"
             "journal, inference and occlusion maps, and the scores written back beside each file.",
    "slurm": "Training on a Slurm cluster: one submitit job per architecture, the host-side requeue,\n"
             "and following the jobs through the launch manifest.",
    "report": "What runs and scores mean: classification metrics, evaluation on any labelled store,\n"
              "figures and the HTML report.",
}

# Test files: tests/<old> -> tests/<new>. Only files that move are listed.
TESTS: dict[str, str] = {
    "test_simulate.py": "sim/test_simulate.py",
    "test_inject.py": "sim/test_inject.py",
    "test_store.py": "store/test_store.py",
    "test_store_validation.py": "store/test_store_validation.py",
    "test_pack.py": "store/test_pack.py",
    "test_ownership.py": "store/test_ownership.py",
    "test_fetch.py": "ingest/test_arrays.py",
    "test_ingest_meta.py": "ingest/test_tables.py",
    "test_ingest_checks.py": "ingest/test_ingest_checks.py",
    "test_download.py": "ingest/test_download.py",
    "test_train.py": "train/test_train.py",
    "test_rundir.py": "train/test_rundir.py",
    "test_train_cli.py": "train/test_train_cli.py",
    "test_dataset.py": "train/test_dataset.py",
    "test_models.py": "train/test_models.py",
    "test_preprocess.py": "train/test_preprocess.py",
    "test_export.py": "train/test_export.py",
    "test_score.py": "score/test_score.py",
    "test_journal.py": "score/test_journal.py",
    "test_cluster.py": "score/test_cluster.py",
    "test_occlusion.py": "score/test_occlusion.py",
    "test_faults.py": "score/test_faults.py",
    "test_plot_occlusion_cli.py": "score/test_plot_occlusion_cli.py",
    "test_kbmod.py": "kbmod/test_kbmod.py",
    "test_launch.py": "slurm/test_launch.py",
    "test_train_job.py": "slurm/test_train_job.py",
    "test_job_status.py": "slurm/test_job_status.py",
    "test_evaluate.py": "report/test_evaluate.py",
    "test_report.py": "report/test_report.py",
    "test_plots.py": "report/test_plots.py",
    "test_metrics.py": "report/test_metrics.py",
}
# Tests that stay in tests/: the command line, shared modules, job templates, containers,
# the demo, the package's import rules and the benchmarks' own harnesses.
TESTS_STAY = {
    "test_architecture.py", "test_bad_input.py", "test_cli.py", "test_cli_errors.py",
    "test_cli_process.py", "test_config.py", "test_console.py", "test_containers.py",
    "test_demo.py", "test_fileio.py", "test_jobs.py", "test_gpu_check.py", "test_bench_quality.py",
    "test_observers.py", "test_precision_gate.py", "test_quality_breakdown.py",
    "test_house_move.py", "test_api.py", "test_errors.py",   # E: the README's API example; B: errors
}
TESTS_IF_PRESENT: dict[str, str] = {
    "test_executor.py": "score/test_executor.py",   # C
    "test_plan.py": "score/test_plan.py",           # C
}
TEST_HELPERS = {"conftest.py", "fault_child.py"}  # stay in tests/, found through sys.path

# Never rewritten: the frozen history, this script (its map names the old modules) and its
# test (its fixture is a flat package, in strings).
NO_REWRITE = {"benchmarks/HISTORY.md", "tools/house_move.py", "tests/test_house_move.py"}
# File format: the simulator attribute written into every store keeps its value.
FROZEN = re.compile(r"""["']simulator["']\s*:\s*["']stampbatch\.\w+["']""")


class Stop(Exception):
    """A reason not to move; the message says what to do."""


def git(root: Path, *args: str, check: bool = True) -> str:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if check and done.returncode:
        raise Stop(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


# ----------------------------------------------------------------------------------- checks

def check(root: Path, modules: dict[str, str] = MODULES, tests: dict[str, str] = TESTS) -> None:
    """Raise :class:`Stop` naming everything that stops the move."""
    pkg = root / PKG
    if not pkg.is_dir():
        raise Stop(f"{pkg}: no package here; run from the repository root")
    applied = sorted(s for s in {m.split(".")[0] for m in modules.values()} if any((pkg / s).glob("*.py")))
    if applied:
        raise Stop(f"layout already applied: {', '.join(PKG + '/' + s for s in applied)} exist")
    if git(root, "status", "--porcelain").strip():
        raise Stop("the working tree is not clean: commit or stash first (git status)")
    problems = []
    flat = {p.stem for p in pkg.glob("*.py")}
    unknown = sorted(flat - set(modules) - STAY)
    if unknown:
        problems.append("modules not in the map (add them to MODULES or STAY): "
                        + ", ".join(f"{PKG}/{m}.py" for m in unknown))
    subs = {p.name for p in pkg.iterdir() if p.is_dir() and any(p.rglob("*.py"))}
    if subs - KEEP_PACKAGES:
        problems.append("sub-packages not in the map (add them to KEEP_PACKAGES): "
                        + ", ".join(f"{PKG}/{s}/" for s in sorted(subs - KEEP_PACKAGES)))
    missing = sorted(m for m in modules if m not in flat)
    if missing:
        problems.append("the map names modules that are not there (remove them from MODULES): "
                        + ", ".join(f"{PKG}/{m}.py" for m in missing))
    tdir = root / "tests"
    top_tests = {p.name for p in tdir.glob("*.py")}
    unknown_tests = sorted(top_tests - set(tests) - TESTS_STAY - TEST_HELPERS)
    if unknown_tests:
        problems.append("tests not in the map (add them to TESTS or TESTS_STAY): "
                        + ", ".join(f"tests/{t}" for t in unknown_tests))
    missing_tests = sorted(t for t in tests if t not in top_tests)
    if missing_tests:
        problems.append("the map names tests that are not there (remove them from TESTS): "
                        + ", ".join(f"tests/{t}" for t in missing_tests))
    nested = [p for p in tdir.rglob("test_*.py") if p.parent != tdir]
    names = [Path(n).name for n in tests.values()] + [t for t in top_tests if t not in tests]
    names += [p.name for p in nested]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        problems.append("test basenames would repeat (pytest's prepend import mode needs them unique): "
                        + ", ".join(dup))
    if problems:
        raise Stop("\n".join(problems))


# ------------------------------------------------------------------------------- rewriting

def dotted_pattern(modules: dict[str, str]) -> re.Pattern[str]:
    olds = sorted(modules, key=len, reverse=True)
    return re.compile(rf"(?<![\w.]){PKG}\.({'|'.join(map(re.escape, olds))})(?!\w)")


def path_pattern(modules: dict[str, str]) -> re.Pattern[str]:
    olds = sorted(modules, key=len, reverse=True)
    return re.compile(rf"(?<![\w/.]){PKG}/({'|'.join(map(re.escape, olds))})\.py(?!\w)")


def module_of(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _spans(text: str) -> list[int]:
    """Offsets of the start of each line (1-based line numbers index it)."""
    starts = [0, 0]
    for line in text.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    return starts


def _replace_nodes(text: str, edits: list[tuple[ast.stmt, str]]) -> str:
    starts = _spans(text)
    for node, new in sorted(edits, key=lambda e: (e[0].lineno, e[0].col_offset), reverse=True):
        a = starts[node.lineno] + node.col_offset
        b = starts[node.end_lineno] + node.end_col_offset  # type: ignore[index]
        text = text[:a] + new + text[b:]
    return text


def absolute_imports(text: str, module: str, is_package: bool, modules: dict[str, str]) -> str:
    """Relative imports that touch a moving module (or sit in one) become absolute (old names)."""
    tree = ast.parse(text)
    moving = module.removeprefix(PKG + ".") in modules
    base = module.split(".") if is_package else module.split(".")[:-1]
    edits = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.ImportFrom) and node.level):
            continue
        target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
        touched = {target} | {f"{target}.{a.name}" for a in node.names}
        if not moving and not any(t.removeprefix(PKG + ".") in modules for t in touched):
            continue
        names = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in node.names)
        edits.append((node, f"from {target} import {names}"))
    return _replace_nodes(text, edits) if edits else text


def split_package_imports(text: str, modules: dict[str, str]) -> str:
    """``from stampbatch import a, b`` with moved modules among the names, split by new home."""
    tree = ast.parse(text)
    starts = _spans(text)
    edits = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == PKG):
            continue
        if not any(a.name in modules for a in node.names):
            continue
        indent = " " * node.col_offset
        groups: dict[str, list[str]] = {}
        for a in node.names:
            if a.name in modules:
                parent, _, leaf = f"{PKG}.{modules[a.name]}".rpartition(".")
                local = a.asname or a.name
                groups.setdefault(parent, []).append(leaf if leaf == local else f"{leaf} as {local}")
            else:
                groups.setdefault(PKG, []).append(a.name + (f" as {a.asname}" if a.asname else ""))
        source = text[starts[node.lineno] + node.col_offset: starts[node.end_lineno] + node.end_col_offset]
        if "#" in source:
            raise Stop(f"a comment inside a multi-line import would be lost: {source!r}; move it out, then rerun")
        lines = [f"from {parent} import {', '.join(names)}" for parent, names in groups.items()]
        edits.append((node, ("\n" + indent).join(lines)))
    return _replace_nodes(text, edits) if edits else text


_NAMES = r"\w+(?:[ \t]+as[ \t]+\w+)?(?:[ \t]*,[ \t]*\w+(?:[ \t]+as[ \t]+\w+)?)*"
TEXT_IMPORT = re.compile(rf"(?P<lead>^[ \t]*)?from[ \t]+{PKG}[ \t]+import[ \t]+(?P<names>{_NAMES})(?P<end>[ \t]*$)?",
                         re.MULTILINE)


def split_package_imports_text(text: str, modules: dict[str, str]) -> str:
    """The same split where no parser sees it: code in strings (``python -c``, a script written
    by a test), shell and docs. Whole lines stay lines; ``…\\nfrom stampbatch import a, b\\n…``
    stays ``\\n``-separated; anything else is joined with ``; ``."""
    def fix(m: re.Match[str]) -> str:
        pairs = [re.split(r"[ \t]+as[ \t]+", n.strip()) for n in m.group("names").split(",")]
        if not any(p[0] in modules for p in pairs):
            return m.group(0)
        groups: dict[str, list[str]] = {}
        for p in pairs:
            name, local = p[0], p[-1]
            if name in modules:
                parent, _, leaf = f"{PKG}.{modules[name]}".rpartition(".")
                groups.setdefault(parent, []).append(leaf if leaf == local else f"{leaf} as {local}")
            else:
                groups.setdefault(PKG, []).append(name if local == name else f"{name} as {local}")
        lines = [f"from {parent} import {', '.join(names)}" for parent, names in groups.items()]
        lead = m.group("lead")
        if lead is not None and m.group("end") is not None:
            sep = "\n" + lead
        elif text[m.end():m.end() + 2] == "\\n":
            sep = "\\n"
        else:
            sep = "; "
        return (lead or "") + sep.join(lines) + (m.group("end") or "")
    return TEXT_IMPORT.sub(fix, text)


FILE_MOVES = re.compile(r"Path\(__file__\)(\.resolve\(\))?(\.parents\[(\d)\]|\.parent(?!s)|\.with_name\()")


def moved_test_paths(text: str, name: str) -> str:
    """A test one folder deeper: ``Path(__file__)`` arithmetic keeps pointing where it did."""
    def fix(m: re.Match[str]) -> str:
        head = "Path(__file__)" + (m.group(1) or "")
        if m.group(3) is not None:
            return f"{head}.parents[{int(m.group(3)) + 1}]"
        if m.group(2).startswith(".with_name"):
            return f"{head}.parent.with_name("
        return f"{head}.parent.parent"
    # ``module.__file__`` names where that module lives wherever it moved: not this file's own
    if re.search(r"(?<![\w.])__file__", FILE_MOVES.sub("", text)):
        raise Stop(f"{name}: a use of __file__ this script does not know how to move; fix it by hand first")
    return FILE_MOVES.sub(fix, text)


def rewrite_text(text: str, modules: dict[str, str], tests: dict[str, str]) -> str:
    """Dotted names, module paths and test paths; the frozen values kept."""
    frozen: list[str] = []

    def hide(m: re.Match[str]) -> str:
        frozen.append(m.group(0))
        return f"\0{len(frozen) - 1}\0"
    text = FROZEN.sub(hide, text)
    text = dotted_pattern(modules).sub(lambda m: f"{PKG}.{modules[m.group(1)]}", text)
    text = path_pattern(modules).sub(lambda m: f"{PKG}/{modules[m.group(1)].replace('.', '/')}.py", text)
    olds = sorted(tests, key=len, reverse=True)
    tpat = re.compile(rf"(?<![\w/.])tests/({'|'.join(map(re.escape, olds))})(?!\w)")
    text = tpat.sub(lambda m: f"tests/{tests[m.group(1)]}", text)
    renamed = {old: Path(new).name for old, new in tests.items() if Path(new).name != old}
    if renamed:
        bare = re.compile(rf"(?<![\w/.])({'|'.join(map(re.escape, renamed))})(?!\w)")
        text = bare.sub(lambda m: renamed[m.group(1)], text)
    return re.sub(r"\0(\d+)\0", lambda m: frozen[int(m.group(1))], text)


def is_text(path: Path) -> bool:
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if b"\0" in data[:8192]:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def pytest_pythonpath(root: Path, tests: dict[str, str]) -> list[str]:
    """Every test folder on ``sys.path`` (pyproject's pytest ``pythonpath``), as ``tests/`` alone
    was: test modules import one another by basename (``from test_score import _train``),
    whichever is collected first, and a single file still runs alone."""
    path = root / "pyproject.toml"
    text = path.read_text()
    if re.search(r"(?m)^pythonpath\s*=", text):
        raise Stop("pyproject.toml: pytest's pythonpath is set already; add the test folders to it by hand")
    folders = ["tests"] + sorted({f"tests/{Path(new).parent}" for new in tests.values()})
    line = ("# The test folders mirror the package; tests import one another by basename.\n"
            f"pythonpath = [{', '.join(json.dumps(f) for f in folders)}]\n")
    new, n = re.subn(r"(?m)^(testpaths\s*=.*\n)", lambda m: m.group(1) + line, text, count=1)
    if not n:
        raise Stop("pyproject.toml: no testpaths line under [tool.pytest.ini_options] to put pythonpath after")
    path.write_text(new)
    return ["pyproject.toml"]


# ------------------------------------------------------------------------------------ move

def move(root: Path, modules: dict[str, str] = MODULES, tests: dict[str, str] = TESTS,
         stages: dict[str, str] = STAGES) -> list[str]:
    """Apply the layout; return the lines a person should still read."""
    check(root, modules, tests)
    pkg = root / PKG
    # Relative imports first, while every module is where its imports were written.
    for path in sorted(pkg.rglob("*.py")):
        text = path.read_text()
        new = absolute_imports(text, module_of(root, path), path.name == "__init__.py", modules)
        if new != text:
            path.write_text(new)
    for stage in sorted({m.split(".")[0] for m in modules.values()}):
        (pkg / stage).mkdir(exist_ok=True)        # (a __pycache__ of an earlier checkout may be there)
        doc = stages.get(stage)
        if not doc:
            raise Stop(f"stage {stage} has no docstring in STAGES")
        (pkg / stage / "__init__.py").write_text(f'"""{doc}"""\n')
        git(root, "add", f"{PKG}/{stage}/__init__.py")
    for old, new in modules.items():
        git(root, "mv", f"{PKG}/{old}.py", f"{PKG}/{new.replace('.', '/')}.py")
    for old, new in tests.items():
        (root / "tests" / new).parent.mkdir(parents=True, exist_ok=True)
        git(root, "mv", f"tests/{old}", f"tests/{new}")
    moved_tests = {f"tests/{new}" for new in tests.values()}
    changed = []
    for rel in git(root, "ls-files").splitlines():
        path = root / rel
        if rel in NO_REWRITE or not path.is_file() or path.is_symlink() or not is_text(path):
            continue
        text = path.read_text()
        new = rewrite_text(text, modules, tests)
        if rel.endswith(".py"):
            new = split_package_imports(new, modules)
        new = split_package_imports_text(new, modules)
        if rel.endswith(".py"):
            if rel in moved_tests:
                new = moved_test_paths(new, rel)
        if new != text:
            path.write_text(new)
            changed.append(rel)
    changed += pytest_pythonpath(root, tests)
    py = [c for c in changed if c.endswith(".py")]
    ruff = next((str(p) for p in (root / ".venv/bin/ruff", Path(sys.executable).with_name("ruff")) if p.exists()),
                shutil.which("ruff"))
    notes = []
    if ruff and py:
        subprocess.run([ruff, "check", "--quiet", "--fix", "--select", "I", *py], cwd=root)
    elif py:
        notes.append("ruff not found: run `ruff check --fix --select I` on the rewritten files")
    git(root, "add", "-A", "--", PKG, "tests", *changed)
    # A moved module one folder deeper that finds files from its own path: read by a person.
    for new in modules.values():
        rel = f"{PKG}/{new.replace('.', '/')}.py"
        if "__file__" in (root / rel).read_text():
            notes.append(f"{rel}: uses __file__ and is one folder deeper now: check the paths it builds")
    # Prose that names an old module by its file name: read by a person.
    bare = re.compile(rf"(?<![\w/.])({'|'.join(map(re.escape, sorted(modules, key=len, reverse=True)))})\.py(?!\w)")
    for rel in git(root, "ls-files").splitlines():
        path = root / rel
        if rel in NO_REWRITE or not path.is_file() or not is_text(path):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if bare.search(line):
                notes.append(f"{rel}:{n}: {line.strip()[:110]}")
    return [f"rewrote {len(changed)} files; moved {len(modules)} modules and {len(tests)} test files"] + notes


def the_map(root: Path) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """MODULES and TESTS with the entries of ``*_IF_PRESENT`` whose file is there; and a line each."""
    modules, tests, notes = dict(MODULES), dict(TESTS), []
    for old, new in MODULES_IF_PRESENT.items():
        here = (root / PKG / f"{old}.py").exists()
        if here:
            modules[old] = new
        notes.append(f"{PKG}/{old}.py -> {PKG}/{new.replace('.', '/')}.py" if here else f"{PKG}/{old}.py: not here")
    for old, new in TESTS_IF_PRESENT.items():
        here = (root / "tests" / old).exists()
        if here:
            tests[old] = new
        notes.append(f"tests/{old} -> tests/{new}" if here else f"tests/{old}: not here")
    return modules, tests, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 naming what stops the move")
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    args = parser.parse_args(argv)
    try:
        modules, tests, notes = the_map(args.root)
        for line in notes:
            print(f"other helpers' files: {line}")
        if args.check:
            check(args.root, modules, tests)
            print("house_move: ready to move")
            return 0
        for line in move(args.root, modules, tests):
            print(line)
    except Stop as e:
        print(f"house_move: {e}", file=sys.stderr)
        return 1
    print("house_move: done; review `git diff --cached -M --stat`, run the checks, then commit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
