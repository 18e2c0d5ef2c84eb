"""``stampbatch train`` refuses settings that cannot mean what the user wants, before training."""

from __future__ import annotations

import numpy as np
import pytest

from stampbatch import cli, store
from stampbatch.commands.train import training_split_size
from stampbatch.config import from_mapping
from stampbatch.train.loop import TrainConfig, split_rows


@pytest.fixture
def data(tmp_path, labelled_arrays):
    stamps, labels = labelled_arrays
    path = tmp_path / "t.h5"
    store.create_store(path, stamps[:100], labels[:100])
    return path


@pytest.mark.parametrize("n", [20, 99, 100, 101, 300, 1237])
def test_training_split_size_matches_the_split(n):
    labels = (np.arange(n) % 2).astype(np.int8)
    config = TrainConfig()
    assert training_split_size(n, config) == len(split_rows(labels, config)["train"])


def test_batch_size_larger_than_the_training_split_is_refused(tmp_path, data, capsys):
    rc = cli.main(["train", "--data", str(data), "--arch", "simple", "--out", str(tmp_path / "r"),
                   "--batch-size", "71"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err == (f"stampbatch train: error: --batch-size 71 is larger than the training split "
                   f"of {data} (70 of 100 stamps); use at most 70\n")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("seed", ["-1", "4294967296", "x"])
def test_seed_out_of_range_is_a_usage_error(tmp_path, data, capsys, seed):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--data", str(data), "--arch", "simple", "--out", str(tmp_path / "r"),
                  f"--seed={seed}"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1
    assert "argument --seed: expected an integer from 0 to 4,294,967,295" in err
    assert "split" not in err


def test_seed_out_of_range_in_a_config_file(tmp_path, data, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'data = "{data}"\narchitecture = "simple"\nseed = -1\n')
    assert cli.main(["train", "--config", str(cfg), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert f"{cfg} (with command-line options): seed must be an integer from 0" in err


@pytest.mark.parametrize(("line", "expected"), [
    ("data = 3", "'data' must be a non-empty path or list of paths"),
    ('data = ""', "'data' must be a non-empty path or list of paths"),
    ("data = []", "'data' must be a non-empty path or list of paths"),
    ("data = [3]", "'data' must be a non-empty path or list of paths"),
    ("architecture = [1]", "'architecture' must be a non-empty string")])
def test_wrong_types_for_data_and_architecture_in_toml(tmp_path, data, capsys, line, expected):
    cfg = tmp_path / "c.toml"
    base = {"data": f'data = "{data}"', "architecture": 'architecture = "simple"'}
    base[line.split(" ")[0]] = line
    cfg.write_text("\n".join(base.values()) + "\n")
    assert cli.main(["train", "--config", str(cfg), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(cfg) in err and expected in err
    assert "Traceback" not in err and not (tmp_path / "r").exists()


def test_a_list_of_stores_in_toml_names_a_missing_one(tmp_path, data, capsys):
    """data = [...] is several training stores; a missing one is one line naming it."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'data = ["{data}", "{tmp_path / "nope.h5"}"]\narchitecture = "simple"\n')
    assert cli.main(["train", "--config", str(cfg), "--out", str(tmp_path / "r")]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.h5" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_config_from_mapping_still_accepts_a_normal_seed():
    assert from_mapping(TrainConfig, {"seed": 7}).seed == 7


def test_help_states_the_defaults_that_training_uses(capsys):
    """Every default `train --help` names is TrainConfig's (the CLI keeps TF and the training
    module out of its start-up, so the text is written by hand and checked here)."""
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    config = TrainConfig()
    for phrase in (f"maximum epochs (default {config.epochs})",
                   f"stamps per batch (default {config.batch_size})",
                   f"(default {config.learning_rate:g};",
                   f"{config.optimizer} (default)",
                   f"(default {config.seed})",
                   f"stopping (default {config.patience};",
                   f"stay whole (default {config.train_stamps}: the whole training split)"):
        assert phrase in text, phrase
    assert config.lr_schedule == "cosine" and "by a cosine" in text
