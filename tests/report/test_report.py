"""Tests for stampbatch.report.html: the HTML comparison of run directories."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest

from stampbatch.errors import StampbatchError
from stampbatch.report import html as report
from stampbatch.report import plots

EDGES = [3, 5, 7, 10, 15, 20, 30, 50, 100]
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
        "track", "wbr"}


class StrictParser(HTMLParser):
    """Collects problems: unbalanced or mis-nested tags; records img sources and cell texts."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.problems: list[str] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None
        self.text: list[str] = []
        self.doctype = False

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl.lower() == "doctype html"

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
            assert attrs.get("alt")
        if tag == "a" and "href" in attrs:
            self.links.append(attrs["href"])
        if tag == "tr":
            self.rows.append([])
        if tag in ("td", "th"):
            self._cell = []
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def parse(page: str) -> StrictParser:
    parser = StrictParser()
    parser.feed(page)
    parser.close()
    assert parser.doctype
    assert not parser.problems, parser.problems
    assert not parser.stack, f"unclosed tags: {parser.stack}"
    return parser


def make_metrics(arch: str, *, accuracy: float, auc: float, completeness_op: list[float],
                 counts: list[int], threshold: float = 0.8123) -> dict:
    """A metrics.json dict following the contract of train.py."""
    return {
        "architecture": arch, "data": "/abs/train.h5", "n_train": 700, "n_val": 100,
        "n_test": 200, "epochs_run": 7, "epochs": 20, "wall_time_s": 125.4,
        "parameters": 1234567, "macs_per_stamp": 1040000,
        "accuracy": accuracy, "roc_auc": auc, "precision": 0.9, "recall": 0.85,
        "confusion_matrix": [[90, 10], [15, 85]],
        "operating_point": {"target_fpr": 0.01, "threshold": threshold, "fpr": 0.009,
                            "completeness": 0.61},
        "completeness_vs_snr": {"bin_edges": EDGES,
                                "completeness": [min(1.0, c + 0.05) for c in completeness_op],
                                "counts": counts, "threshold": 0.5,
                                "completeness_at_operating_point": completeness_op},
        "fpr_by_kind": {"background": 0.02, "offcentre": 0.11},
        "best_val_loss": 0.3141, "best_val_accuracy": 0.9,
    }


def make_run(runs_dir: Path, name: str, metrics: dict | None, *, history_epochs: int = 3,
             config: str | None = None) -> Path:
    run = runs_dir / name
    run.mkdir(parents=True)
    history = {"loss": list(np.linspace(0.7, 0.3, history_epochs)),
               "accuracy": list(np.linspace(0.6, 0.9, history_epochs)),
               "val_loss": list(np.linspace(0.65, 0.35, history_epochs)),
               "val_accuracy": list(np.linspace(0.6, 0.88, history_epochs))}
    (run / "history.json").write_text(json.dumps(history))
    arch = metrics["architecture"] if metrics else "simple"
    (run / "config.toml").write_text(config if config is not None else
                                     f'architecture = "{arch}"\ndata = "/abs/train.h5"\n'
                                     "epochs = 20\nbatch_size = 256\n")
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
        plots.plot_history(history, run / "history.png")
        plots.plot_confusion_matrix(np.array(metrics["confusion_matrix"]),
                                    run / "confusion_matrix.png")
    return run


@pytest.fixture
def two_runs(tmp_path) -> Path:
    runs = tmp_path / "runs"
    make_run(runs, "vgg6", make_metrics("vgg6", accuracy=0.9523, auc=0.98761,
                                        completeness_op=[0.0, 0.1, 0.5, 0.8, 0.9, 1.0, 1.0, 1.0],
                                        counts=[10, 10, 10, 10, 10, 10, 20, 0]))
    make_run(runs, "simple", make_metrics("simple", accuracy=0.9011, auc=0.95,
                                          completeness_op=[0.0] * 8, counts=[5] * 8,
                                          threshold=0.7))
    return runs


def _row(parser: StrictParser, first_cell: str) -> list[str]:
    matches = [r for r in parser.rows if r and r[0] == first_cell]
    assert len(matches) == 1, (first_cell, parser.rows)
    return matches[0]


def test_completeness_above_pools_bins_from_snr_7():
    record = {"bin_edges": EDGES, "counts": [10, 10, 10, 10, 10, 10, 20, 0],
              "completeness_at_operating_point": [0.0, 0.1, 0.5, 0.8, 0.9, 1.0, 1.0, None]}
    # bins from 7: (0.5*10 + 0.8*10 + 0.9*10 + 1.0*10 + 1.0*20) / 60; empty last bin ignored
    assert report.completeness_above(record) == pytest.approx(52 / 60)
    assert report.completeness_above(record, snr_min=30) == pytest.approx(1.0)
    assert report.completeness_above(record, snr_min=200) is None
    assert report.completeness_above({"bin_edges": EDGES}) is None
    assert report.completeness_above(None) is None


def test_report_has_both_runs_with_their_numbers(two_runs):
    path = report.write_report(two_runs)
    assert path == two_runs / "report.html"
    parser = parse(path.read_text(encoding="utf-8"))
    header = _row(parser, "run")
    vgg, simple = _row(parser, "vgg6"), _row(parser, "simple")
    cell = dict(zip(header, vgg, strict=True))
    assert cell["architecture"] == "vgg6"
    assert cell["parameters"] == "1,234,567"
    assert cell["MACs / stamp"] == "1.04 M"
    assert cell["epochs run"] == "7 / 20"
    assert cell["wall time"] == "2 min 05 s"
    assert cell["accuracy"] == "0.952"
    assert cell["ROC AUC"] == "0.9876"
    assert cell["precision"] == "0.900" and cell["recall"] == "0.850"
    assert cell["completeness SNR ≥ 7 at operating point"] == f"{52 / 60:.3f}"
    assert cell["threshold at target FPR"] == "0.8123 (FPR 0.01)"
    cell = dict(zip(header, simple, strict=True))
    assert cell["architecture"] == "simple" and cell["accuracy"] == "0.901"
    assert cell["completeness SNR ≥ 7 at operating point"] == "0.000"
    assert cell["threshold at target FPR"] == "0.7000 (FPR 0.01)"
    # per-run details and configuration
    text = "".join(parser.text)
    assert 'architecture = "vgg6"' in text and "batch_size = 256" in text
    assert "0.3141" in text  # best validation loss
    assert parser.rows.count(["FPR (P ≥ 0.5): offcentre", "0.1100"]) == 2  # one per run
    assert parser.rows.count(["true source", "15", "85"]) == 2  # confusion matrix counts


def test_report_images_exist_and_are_relative(two_runs):
    path = report.write_report(two_runs)
    parser = parse(path.read_text(encoding="utf-8"))
    assert "completeness_comparison.png" in parser.images
    assert "vgg6/history.png" in parser.images and "simple/confusion_matrix.png" in parser.images
    for src in parser.images:
        assert not src.startswith(("/", "http")), src
        assert (two_runs / unquote(src)).is_file(), src
    assert (two_runs / "completeness_comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_best_value_marked(two_runs):
    page = report.write_report(two_runs).read_text(encoding="utf-8")
    assert '<td class="best">0.952</td>' in page
    assert '<td class="best">0.901</td>' not in page


def test_run_names_and_config_are_escaped(tmp_path):
    runs = tmp_path / "runs"
    name = 'a<&>"b'
    metrics = make_metrics("vgg6<script>", accuracy=0.5, auc=0.5, completeness_op=[0.5] * 8,
                           counts=[1] * 8)
    make_run(runs, name, metrics, config='note = "</pre><b>x</b>"\nepochs = 20\n')
    page = report.write_report(runs).read_text(encoding="utf-8")
    assert "<script>" not in page and "</pre><b>" not in page
    assert "a&lt;&amp;&gt;&quot;b" in page
    parser = parse(page)
    assert _row(parser, name)[1] == "vgg6<script>"  # shown as text, exactly
    assert 'note = "</pre><b>x</b>"' in "".join(parser.text)
    run_images = [src for src in parser.images if src != "completeness_comparison.png"]
    assert run_images and all((runs / unquote(src)).is_file() for src in run_images)


def test_incomplete_and_corrupt_runs_get_status_lines(two_runs):
    make_run(two_runs, "resnet50", None, history_epochs=4,
             config='architecture = "resnet50"\nepochs = 30\n')
    queued = two_runs / "simple_bn"
    queued.mkdir()
    (queued / "config.toml").write_text('architecture = "simple_bn"\nepochs = 20\n')
    broken = make_run(two_runs, "broken", None)
    (broken / "metrics.json").write_text("{not json")
    (two_runs / "logs").mkdir()  # not a run: no run files
    (two_runs / ".hidden").mkdir()

    runs = {r["name"]: r for r in report.load_runs(two_runs)}
    assert sorted(runs) == ["broken", "resnet50", "simple", "simple_bn", "vgg6"]
    assert runs["vgg6"]["status"] == "done" and runs["vgg6"]["epochs_done"] == 7
    assert runs["resnet50"]["status"] == "incomplete"
    assert (runs["resnet50"]["epochs_done"], runs["resnet50"]["epochs"]) == (4, 30)
    assert runs["resnet50"]["architecture"] == "resnet50"
    assert runs["simple_bn"]["status"] == "incomplete" and runs["simple_bn"]["epochs_done"] is None
    assert runs["broken"]["status"] == "unreadable" and "not valid JSON" in runs["broken"]["message"]

    parser = parse(report.write_report(two_runs).read_text(encoding="utf-8"))
    row = _row(parser, "resnet50")
    assert row[1] == "resnet50" and "4 of 30 epochs" in row[2]
    assert "no metrics yet" in _row(parser, "simple_bn")[2]
    assert "metrics.json is not valid JSON" in _row(parser, "broken")[2]
    assert not any(r and r[0] == "logs" for r in parser.rows)


def test_comparison_figure_skipped_without_completeness(tmp_path):
    runs = tmp_path / "runs"
    make_run(runs, "only", None)
    page = report.write_report(runs).read_text(encoding="utf-8")
    parse(page)
    assert "No run has completeness against SNR yet" in page
    assert not (runs / "completeness_comparison.png").exists()


def test_report_is_replaced_atomically(two_runs):
    path = report.write_report(two_runs)
    make_run(two_runs, "late", None)
    report.write_report(two_runs)
    assert "late" in path.read_text(encoding="utf-8")
    assert not [p for p in two_runs.iterdir() if p.name.endswith(".partial")]


def test_empty_runs_dir_is_report_error(tmp_path):
    (tmp_path / "logs").mkdir()
    with pytest.raises(report.ReportError, match=str(tmp_path)):
        report.write_report(tmp_path)
    assert not (tmp_path / "report.html").exists()
    with pytest.raises(report.ReportError, match="not a directory"):
        report.write_report(tmp_path / "missing")
    assert issubclass(report.ReportError, StampbatchError)
