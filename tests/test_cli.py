"""The command line as a user meets it: help everywhere, one-line errors, exit codes."""

import subprocess
import sys

import numpy as np
import pytest

from stampbatch import cli, store


def test_every_command_has_help(capsys):
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001
    assert {"simulate", "ingest", "fetch", "inspect"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as exit_info:
            cli.main([name, "--help"])
        assert exit_info.value.code == 0
        assert "usage: stampbatch " + name in capsys.readouterr().out


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["simulate", "x.h5", "--n", "zero"])
    assert exit_info.value.code == 2
    assert "expected a positive integer" in capsys.readouterr().err


def test_bad_file_is_one_line_exit_1(tmp_path, capsys):
    bad = tmp_path / "notes.h5"
    bad.write_text("not hdf5")
    assert cli.main(["inspect", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err == f"stampbatch inspect: error: {bad}: not an HDF5 file\n"


def test_inspect_of_several_files_reports_each_bad_one_and_exits_1_at_the_end(tmp_path, capsys,
                                                                             labelled_arrays):
    """One bad file among several no longer stops inspect: each bad file gets its one line,
    every good file its summary, and the exit code says something was wrong."""
    stamps, labels = labelled_arrays
    good = tmp_path / "good.h5"
    store.create_store(good, stamps, labels)
    bad, missing = tmp_path / "notes.h5", tmp_path / "absent.h5"
    bad.write_text("not hdf5")
    assert cli.main(["inspect", str(bad), str(good), str(missing)]) == 1
    captured = capsys.readouterr()
    assert captured.out.count("300 stamps of 21x21") == 1
    lines = captured.err.splitlines()
    assert lines[0] == f"stampbatch inspect: error: {bad}: not an HDF5 file"
    assert len(lines) == 2 and lines[1].startswith(f"stampbatch inspect: error: {missing}")


def test_inspect_summarises_a_store(tmp_path, capsys, labelled_arrays):
    stamps, labels = labelled_arrays
    path = tmp_path / "t.h5"
    store.create_store(path, stamps, labels, {"snr": np.where(labels == 1, 10.0, 0.0),
                                               "kind": np.where(labels == 1, "source", "background")})
    assert cli.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "300 stamps of 21x21" in out
    assert "labels: 150 source / 150 no source (50.0% sources)" in out
    assert "kinds: background 150, source 150" in out
    assert "scores: none" in out


def test_help_does_not_import_tensorflow():
    code = ("import sys\nfrom stampbatch import cli\n"
            "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('tensorflow' in sys.modules, 'dask' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False False"
