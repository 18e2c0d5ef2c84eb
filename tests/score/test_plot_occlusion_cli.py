"""``plot-occlusion`` and ``score --name`` at their edges (issue 9, "smaller" findings)."""

from __future__ import annotations

import numpy as np
import pytest

from stampbatch import cli, store
from stampbatch.report import plots


@pytest.fixture
def scored(tmp_path):
    """A candidate store whose /scores/m has maps for rows 2999 and 6 (no model needed)."""
    n = 3000
    rng = np.random.default_rng(0)
    path = tmp_path / "c.h5"
    store.create_store(path, rng.normal(size=(n, 21, 21)).astype(np.float32))
    with store.ScoreWriter(path, "m", n, (21, 21)) as writer:
        writer.write_probability(0, rng.uniform(size=n).astype(np.float32))
        mapped = np.array([6, 2999] + list(range(100, 160)))
        writer.append_occlusion(mapped, rng.uniform(size=(len(mapped), 21, 21)).astype(np.float32))
        writer.commit({"architecture": "test"})
    return path


def test_panels_carry_the_real_row_numbers(scored, tmp_path, monkeypatch):
    """--rows 2999,6 used to label the panels 'stamp 0' and 'stamp 1'."""
    titles: list[str] = []
    real = plots._occlusion_figure

    def spy(*args, **kwargs):  # the real figure, with its titles recorded
        fig = real(*args, **kwargs)
        titles.extend(ax.get_title() for ax in fig.axes if ax.get_title().startswith("stamp"))
        return fig

    monkeypatch.setattr(plots, "_occlusion_figure", spy)
    out = tmp_path / "f.png"
    assert cli.main(["plot-occlusion", str(scored), "--model", "m", "--rows", "2999,6",
                     "--out", str(out)]) == 0
    assert [t.split(":")[0] for t in titles] == ["stamp 2999", "stamp 6"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _stamp_titles(fig) -> list[str]:
    return [ax.get_title().split(":")[0] for ax in fig.axes if ax.get_title().startswith("stamp")]


def test_figure_labels_default_to_the_rows():
    stamps = np.random.default_rng(1).normal(size=(5, 21, 21))
    fig = plots._occlusion_figure(stamps, np.zeros((5, 21, 21)), np.full(5, 0.5), [3, 1],
                                  "x.png", "t", labels=[300, 100])
    assert _stamp_titles(fig) == ["stamp 300", "stamp 100"]
    fig = plots._occlusion_figure(stamps, np.zeros((5, 21, 21)), np.full(5, 0.5), [3, 1], "x.png", "t")
    assert _stamp_titles(fig) == ["stamp 3", "stamp 1"]


@pytest.mark.parametrize("argv", [["--top", "1000"], ["--top", "51"],
                                  ["--rows", ",".join(str(r) for r in range(100, 160))]])
def test_too_many_panels_are_refused_at_parse_time(scored, tmp_path, capsys, argv):
    out = tmp_path / "f.png"
    with pytest.raises(SystemExit) as info:
        cli.main(["plot-occlusion", str(scored), "--model", "m", *argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "at most 50" in err
    assert not out.exists()


@pytest.mark.parametrize("name", ["", "  ", "a\nb", "x" * 300, "a/b", " lead", "tab\there"])
def test_score_name_is_checked_at_parse_time(tmp_path, capsys, name):
    with pytest.raises(SystemExit) as info:
        cli.main(["score", str(tmp_path / "c.h5"), "--model", str(tmp_path / "m.keras"),
                  "--name", name])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "argument --name" in err
    assert list(tmp_path.iterdir()) == []
