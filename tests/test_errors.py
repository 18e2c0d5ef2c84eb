"""Every error class of the package lives in ``stampbatch/errors.py`` (issue 28)."""

from __future__ import annotations

import ast
from pathlib import Path

import stampbatch
from stampbatch import errors

PACKAGE = Path(stampbatch.__file__).resolve().parent  # the whole package, wherever errors lives
ERRORS = Path(errors.__file__).resolve()


def _exception_names() -> set[str]:
    """The builtin exception names, and every class errors.py defines."""
    import builtins

    names = {n for n, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, BaseException)}
    return names | {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, BaseException)}


def _base_name(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


def test_every_error_class_is_defined_in_errors():
    """A class of stampbatch that derives from an exception (a builtin one or one of
    errors.py, by name or through a module: ``fileio.Locked``) is defined in errors.py.
    A private class (one underscore) may stay in its module: it never leaves it. errors.py
    imports no module of stampbatch, so that every module can import it without a cycle."""
    known = _exception_names()
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == ERRORS:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.ClassDef) and not node.name.startswith("_")
                    and any(_base_name(b) in known or _base_name(b).endswith(("Error", "Exception"))
                            for b in node.bases)):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}")
    assert found == []
    tree = ast.parse(ERRORS.read_text(encoding="utf-8"))
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert [m for m in imported if m and m.split(".")[0] == "stampbatch"] == []


def test_error_classes_keep_their_exit_codes_and_kinds():
    assert errors.UsageError.exit_code == 2 and errors.SimConfigError.exit_code == 2
    for cls in (errors.TrainError, errors.ScoreError, errors.StoreError, errors.FetchError, errors.MetaError,
                errors.KbmodError, errors.LaunchError, errors.ModelError, errors.EvaluateError,
                errors.ReportError, errors.PlotError, errors.FileError):
        assert issubclass(cls, errors.StampbatchError) and cls.exit_code == 1, cls
    assert issubclass(errors.ClusterStartError, errors.ScoreError)
    assert issubclass(errors.TableDataError, errors.KbmodError)
    for cls in (errors.StoreError, errors.FileError, errors.PlotError, errors.SimConfigError):
        assert issubclass(cls, ValueError), cls  # config loading and callers catch ValueError
    assert errors.Locked("123").holder == "123"
