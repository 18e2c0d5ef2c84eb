"""The top-level handler: one line for every failure, the traceback only with --verbose."""

from __future__ import annotations

import pytest

from stampbatch import cli
from stampbatch.commands import data


def _boom(args):  # noqa: ANN001 - stands in for a command with a genuine bug
    raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")


def test_an_unexpected_exception_is_one_line_with_a_hint(monkeypatch, capsys):
    monkeypatch.setattr(data, "run_inspect", _boom)
    assert cli.main(["inspect", "x.h5"]) == 1
    err = capsys.readouterr().err
    assert err == ("stampbatch inspect: error: TypeError: unsupported operand type(s) for +: 'int' "
                   "and 'str' (an unexpected failure; rerun with --verbose for the traceback and "
                   "report it)\n")


@pytest.mark.parametrize("argv", [["--verbose", "inspect", "x.h5"], ["inspect", "--verbose", "x.h5"]])
def test_verbose_shows_the_traceback(monkeypatch, argv):
    monkeypatch.setattr(data, "run_inspect", _boom)
    with pytest.raises(TypeError):
        cli.main(argv)


def test_expected_errors_stay_one_line_with_verbose_off(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path / "gone.h5")]) == 1
    assert capsys.readouterr().err == f"stampbatch inspect: error: {tmp_path / 'gone.h5'}: no such file\n"


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["evaluate", "run"])  # --n of simulate has a default now: --data has none
    assert info.value.code == 2
    assert capsys.readouterr().err == ("stampbatch evaluate: error: the following arguments are "
                                       "required: --data (see 'stampbatch evaluate --help')\n")
