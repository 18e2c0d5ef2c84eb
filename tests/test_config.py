"""TOML configuration: every key checked, misspelt keys answered with the valid ones."""

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from stampbatch.config import from_mapping, load_toml, to_toml
from stampbatch.errors import UsageError


@dataclass
class Inner:
    partition: str = "debug"
    gpus: int = 0


@dataclass
class Outer:
    epochs: int = 3
    learning_rate: float = 0.01
    archs: tuple[str, ...] = ("vgg6",)
    data: Path | None = None
    slurm: Inner = field(default_factory=Inner)

    def validate(self) -> None:
        if self.epochs < 1:
            raise ValueError("epochs must be >= 1")


def test_round_trip_through_toml(tmp_path):
    obj = Outer(epochs=5, learning_rate=1, archs=("simple", "vgg6"), data=Path("a b/c.h5"),
                slurm=Inner("gpu", 2))
    path = tmp_path / "c.toml"
    path.write_text(to_toml(obj))
    back = from_mapping(Outer, load_toml(path), str(path))
    assert back == Outer(5, 1.0, ("simple", "vgg6"), Path("a b/c.h5"), Inner("gpu", 2))
    assert isinstance(back.learning_rate, float)


def test_unknown_key_lists_valid_ones():
    with pytest.raises(UsageError) as err:
        from_mapping(Outer, {"epoch": 3}, "job.toml")
    assert str(err.value) == ("job.toml: unknown option(s) ['epoch']; valid options are "
                              "['archs', 'data', 'epochs', 'learning_rate', 'slurm']")


@pytest.mark.parametrize("data, message", [
    ({"epochs": 2.5}, "option 'epochs': expected an integer, got 2.5"),
    ({"epochs": True}, "option 'epochs': expected an integer"),
    ({"learning_rate": "fast"}, "option 'learning_rate': expected a number"),
    ({"archs": "vgg6"}, "option 'archs': expected a list"),
    ({"slurm": {"gpu": 1}}, "unknown option\\(s\\) \\['gpu'\\]"),
    ({"epochs": 0}, "epochs must be >= 1"),
])
def test_bad_values(data, message):
    with pytest.raises(UsageError, match=message):
        from_mapping(Outer, data, "job.toml")


def test_bad_toml_files(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        load_toml(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = = 3\n")
    with pytest.raises(UsageError, match="bad.toml: not valid TOML"):
        load_toml(bad)
