"""An HTML report comparing training runs side by side.

A runs directory holds one subdirectory per training run (``runs/<name>/``, written by
:mod:`stampbatch.train.loop`). :func:`load_runs` reads what each run has so far (metrics.json
when finished, otherwise history.json and config.toml); :func:`write_report` writes
``runs/report.html``: one metrics table for all runs, a combined completeness-against-SNR
figure (``runs/completeness_comparison.png``) and, per run, its figures and configuration.
The page is static HTML with inline CSS; images are relative links, so the runs directory
can be copied or served as it is.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from stampbatch import __version__, fileio
from stampbatch.errors import PlotError, ReportError
from stampbatch.report.plots import plot_completeness_comparison, write_atomically
from stampbatch.train.rundir import CONFIG_FILE, HISTORY_FILE, METRICS_FILE, parse_config_text, read_config_text

REPORT_NAME = "report.html"
COMPARISON_NAME = "completeness_comparison.png"
RUN_MARKERS = (METRICS_FILE, HISTORY_FILE, CONFIG_FILE)
FIGURES = (
    ("confusion_matrix.png", "Confusion matrix (test split, P ≥ 0.5)"),
    ("history.png", "Loss and accuracy per epoch"),
    ("roc.png", "ROC curve with the operating point"),
    ("completeness_snr.png", "Completeness against SNR"),
    ("examples.png", "Example test stamps, misclassified first"),
)
SNR_CUT = 7.0


# ---------------------------------------------------------------- reading runs


def _read_json(path: Path) -> tuple[Any, str | None]:
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"{path.name} unreadable ({exc})"
    except json.JSONDecodeError as exc:
        return None, f"{path.name} is not valid JSON ({exc.msg}, line {exc.lineno})"


def _find_key(mapping: Mapping[str, Any] | None, key: str) -> Any:
    """``mapping[key]`` at the top level or inside one level of tables."""
    if not mapping:
        return None
    if key in mapping:
        return mapping[key]
    for value in mapping.values():
        if isinstance(value, Mapping) and key in value:
            return value[key]
    return None


def load_runs(runs_dir: Path | str) -> list[dict[str, Any]]:
    """Every run under ``runs_dir`` (a subdirectory holding metrics.json, history.json or
    config.toml), sorted by name. Each run is a dict:

    ``name``, ``path``; ``status``: "done" (metrics.json read), "incomplete" (no metrics yet:
    training, queued or stopped) or "unreadable" (a run file is corrupt); ``message``: a
    one-line status for people; ``metrics`` (dict or None); ``config`` (parsed config.toml or
    None) and ``config_text``; ``epochs_done`` (entries in history.json, or metrics'
    epochs_run) and ``epochs`` (planned); ``architecture``; ``figures``: PNG file names present.

    A missing or unreadable ``runs_dir`` is a :class:`ReportError`; a directory with no runs
    gives an empty list.
    """
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise ReportError(f"{runs_dir}: not a directory of training runs")
    try:
        candidates = sorted(p for p in runs_dir.iterdir()
                            if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:
        raise ReportError(f"{runs_dir}: cannot list runs ({exc.strerror or exc})") from None
    runs = []
    for run_dir in candidates:
        if any((run_dir / marker).is_file() for marker in RUN_MARKERS):
            runs.append(_load_run(run_dir))
    return runs


def _load_run(run_dir: Path) -> dict[str, Any]:
    problems: list[str] = []
    metrics, err = _read_json(run_dir / METRICS_FILE)
    if err:
        problems.append(err)
    elif metrics is not None and not isinstance(metrics, dict):
        problems.append(f"{METRICS_FILE} does not hold a JSON object")
        metrics = None
    history, err = _read_json(run_dir / HISTORY_FILE)
    if err:
        problems.append(err)
    config, config_text = None, None
    if (run_dir / CONFIG_FILE).is_file():
        try:
            config_text = read_config_text(run_dir)
            config = parse_config_text(config_text)
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{CONFIG_FILE} unreadable ({exc})")
        except ValueError as exc:  # tomllib.TOMLDecodeError
            problems.append(f"{CONFIG_FILE} is not valid TOML ({exc})")

    epochs_done = None
    if isinstance(history, dict):
        lengths = [len(v) for v in history.values() if isinstance(v, list)]
        epochs_done = max(lengths, default=0)
    epochs = _find_key(config, "epochs")
    architecture = _find_key(config, "architecture")
    if metrics is not None:
        epochs_done = metrics.get("epochs_run", epochs_done)
        epochs = metrics.get("epochs", epochs)
        architecture = metrics.get("architecture", architecture)

    if metrics is not None:
        status = "done"
        message = f"finished after {_fmt_int(epochs_done)} of at most {_fmt_int(epochs)} epochs"
        if problems:
            message += "; " + "; ".join(problems)
    elif any(p.startswith(METRICS_FILE) for p in problems):
        status, message = "unreadable", "; ".join(problems)
    else:
        status = "incomplete"
        if epochs_done is not None:
            of = f" of {_fmt_int(epochs)}" if _is_number(epochs) else ""
            message = (f"no metrics yet (training, or stopped): {epochs_done}{of} epochs "
                       f"in {HISTORY_FILE}")
        else:
            message = "no metrics yet (not started, or stopped before the first epoch)"
        if problems:
            message += "; " + "; ".join(problems)

    present = {p.name for p in run_dir.glob("*.png") if p.is_file()}
    known = [name for name, _ in FIGURES if name in present]
    figures = known + sorted(present - set(known))
    return {"name": run_dir.name, "path": run_dir, "status": status, "message": message,
            "metrics": metrics, "config": config, "config_text": config_text,
            "epochs_done": epochs_done, "epochs": epochs, "architecture": architecture,
            "figures": figures, "evaluations": _load_evaluations(run_dir)}


def _load_evaluations(run_dir: Path) -> list[dict[str, Any]]:
    """``RUN/eval/<store>/evaluation.json`` written by ``stampbatch evaluate`` (readable ones)."""
    out = []
    for path in sorted(run_dir.glob("eval/*/evaluation.json")):
        record, err = _read_json(path)
        if err is None and isinstance(record, dict):
            figures = sorted(p.name for p in path.parent.glob("*.png"))
            out.append({"dir": path.parent.name, "record": record, "figures": figures})
    return out


def _evaluations_html(run: dict[str, Any]) -> str:
    """One table row per store the run was evaluated on, then each evaluation's figures."""
    evals = run.get("evaluations") or []
    if not evals:
        return ""
    head = ("<table><thead><tr><th class=\"text\">evaluated on</th><th>stamps</th>"
            "<th>ROC AUC</th><th>ECE</th><th>completeness at the run's 1 % FPR threshold</th>"
            "<th>FPR there</th></tr></thead><tbody>")
    rows, figs = [], []
    for ev in evals:
        rec = ev["record"]
        at = (rec.get("at_run_thresholds") or {}).get("fpr_0.01") or {}
        rows.append(f'<tr><td class="text">{_e(rec.get("data", ev["dir"]))}</td>'
                    f"<td>{_fmt_int(rec.get('n'))}</td><td>{_fmt(rec.get('roc_auc'), 4)}</td>"
                    f"<td>{_fmt(rec.get('ece'), 4)}</td><td>{_fmt(at.get('completeness'))}</td>"
                    f"<td>{_fmt(at.get('fpr'), 4)}</td></tr>")
        for name in ev["figures"]:
            href = _href(run["name"], "eval", ev["dir"], name)
            figs.append(f'<figure><a href="{href}"><img src="{href}" alt="{_e(name)}" '
                        f'loading="lazy"></a><figcaption>{_e(ev["dir"])}: {_e(name)}'
                        f"</figcaption></figure>")
    return (f"<h4>Evaluations</h4>{head}{''.join(rows)}</tbody></table>"
            f'<div class="figures">{"".join(figs)}</div>')


def completeness_above(record: Mapping[str, Any] | None, snr_min: float = SNR_CUT,
                       key: str = "completeness_at_operating_point") -> float | None:
    """Completeness of all sources in the SNR bins lying wholly at or above ``snr_min``,
    pooled over those bins (weighted by their counts), from a metrics.json
    ``completeness_vs_snr`` record; None when the record cannot give it."""
    if not isinstance(record, Mapping):
        return None
    edges, values, counts = record.get("bin_edges"), record.get(key), record.get("counts")
    if not (isinstance(edges, list) and isinstance(values, list) and isinstance(counts, list)):
        return None
    if len(edges) != len(values) + 1 or len(values) != len(counts):
        return None
    found = total = 0.0
    for lower, value, count in zip(edges[:-1], values, counts, strict=True):
        if not _is_number(lower) or lower < snr_min or not _is_number(count) or count <= 0:
            continue
        if not _is_number(value):
            return None
        found += value * count
        total += count
    return found / total if total > 0 else None


# ---------------------------------------------------------------- formatting


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _fmt_int(value: Any, missing: str = "?") -> str:
    return f"{int(value):,}" if _is_number(value) else missing


def _fmt(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if _is_number(value) else "—"


def _fmt_si(value: Any) -> str:
    """1234567 → "1.23 M" (three significant figures)."""
    if not _is_number(value):
        return "—"
    for factor, suffix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{suffix}"
    return f"{value:.3g}"


def _fmt_duration(seconds: Any) -> str:
    if not _is_number(seconds):
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _href(*parts: str) -> str:
    """A relative URL to a file (percent-encoded, then escaped for an attribute)."""
    return _e("/".join(quote(p, safe="") for p in parts))


# ---------------------------------------------------------------- the page

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1400px; padding: 0 1em; color: #1b1f24; line-height: 1.4; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: 0.2em; }
.meta, .note { color: #57606a; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #d0d7de; padding: 0.3em 0.6em; text-align: right; }
th { background: #f6f8fa; } td.text, th.text { text-align: left; }
tbody tr:nth-child(even) { background: #fafbfc; }
td.best { font-weight: bold; background: #dafbe1; }
.status { padding: 0.3em 0.6em; border-left: 4px solid #8c959f; background: #f6f8fa; }
.status.done { border-color: #1a7f37; } .status.incomplete { border-color: #bf8700; }
.status.unreadable { border-color: #cf222e; }
section.run { margin: 2em 0 3em; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
figure { margin: 0; } figure img { max-width: 100%; border: 1px solid #d0d7de; }
figcaption { font-size: 0.85em; color: #57606a; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
code { font-size: 0.9em; }
"""

# (header, cell: run -> (text, value for ranking), "max" to mark the best or None)
_Column = tuple[str, Callable[[dict[str, Any]], tuple[str, float | None]], str | None]


def _metric(key: str, digits: int = 3) -> Callable[[dict[str, Any]], tuple[str, float | None]]:
    def cell(run: dict[str, Any]) -> tuple[str, float | None]:
        value = (run["metrics"] or {}).get(key)
        return _fmt(value, digits), (value if _is_number(value) else None)
    return cell


def _completeness_cell(run: dict[str, Any]) -> tuple[str, float | None]:
    value = completeness_above((run["metrics"] or {}).get("completeness_vs_snr"))
    return _fmt(value), value


def _threshold_cell(run: dict[str, Any]) -> tuple[str, float | None]:
    op = (run["metrics"] or {}).get("operating_point")
    if not isinstance(op, Mapping) or not _is_number(op.get("threshold")):
        return "—", None
    target = op.get("target_fpr")
    suffix = f" (FPR {target:g})" if _is_number(target) else ""
    return f"{op['threshold']:.4f}{suffix}", None


def _epochs_cell(run: dict[str, Any]) -> tuple[str, float | None]:
    if run["epochs_done"] is None:
        return "—", None
    return f"{_fmt_int(run['epochs_done'])} / {_fmt_int(run['epochs'])}", None


_COLUMNS: tuple[_Column, ...] = (
    ("parameters", lambda r: (_fmt_int((r["metrics"] or {}).get("parameters"), "—"), None), None),
    ("MACs / stamp", lambda r: (_fmt_si((r["metrics"] or {}).get("macs_per_stamp")), None), None),
    ("epochs run", _epochs_cell, None),
    ("wall time", lambda r: (_fmt_duration((r["metrics"] or {}).get("wall_time_s")), None), None),
    ("accuracy", _metric("accuracy"), "max"),
    ("ROC AUC", _metric("roc_auc", 4), "max"),
    ("precision", _metric("precision"), "max"),
    ("recall", _metric("recall"), "max"),
    (f"completeness SNR ≥ {SNR_CUT:g} at operating point", _completeness_cell, "max"),
    ("threshold at target FPR", _threshold_cell, None),
)


def _metrics_table(runs: list[dict[str, Any]]) -> str:
    cells = [[column[1](run) for column in _COLUMNS] for run in runs]
    best: dict[int, float] = {}
    for j, (_, _, rule) in enumerate(_COLUMNS):
        values = [v for row, run in zip(cells, runs, strict=True)
                  if (v := row[j][1]) is not None and run["status"] == "done"]
        if rule == "max" and len(values) > 1:
            best[j] = max(values)
    out = ['<table class="metrics"><thead><tr><th class="text">run</th>'
           '<th class="text">architecture</th>']
    out += [f"<th>{_e(header)}</th>" for header, _, _ in _COLUMNS]
    out.append("</tr></thead><tbody>")
    for i, (run, row) in enumerate(zip(runs, cells, strict=True)):
        out.append(f'<tr><td class="text"><a href="#run-{i}">{_e(run["name"])}</a></td>'
                   f'<td class="text">{_e(run["architecture"] or "—")}</td>')
        if run["status"] != "done":
            out.append(f'<td class="text" colspan="{len(_COLUMNS)}">{_e(run["message"])}</td>')
        else:
            for j, (text, value) in enumerate(row):
                cls = ' class="best"' if j in best and value == best[j] else ""
                out.append(f"<td{cls}>{_e(text)}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _key_value_table(rows: list[tuple[str, str]]) -> str:
    body = "".join(f'<tr><th class="text">{_e(k)}</th><td>{_e(v)}</td></tr>' for k, v in rows)
    return f"<table>{body}</table>"


def _run_details(metrics: Mapping[str, Any]) -> str:
    rows = [("data", str(metrics.get("data", "—"))),
            ("stamps train / val / test", " / ".join(_fmt_int(metrics.get(k))
                                                     for k in ("n_train", "n_val", "n_test"))),
            ("best validation loss", _fmt(metrics.get("best_val_loss"), 4)),
            ("best validation accuracy", _fmt(metrics.get("best_val_accuracy")))]
    op = metrics.get("operating_point")
    if isinstance(op, Mapping):
        rows += [("operating point: target FPR", _fmt(op.get("target_fpr"), 4)),
                 ("operating point: threshold", _fmt(op.get("threshold"), 4)),
                 ("operating point: FPR on test", _fmt(op.get("fpr"), 4)),
                 ("operating point: completeness", _fmt(op.get("completeness")))]
    parts = [_key_value_table(rows)]
    cm = metrics.get("confusion_matrix")
    if (isinstance(cm, list) and len(cm) == 2
            and all(isinstance(r, list) and len(r) == 2 for r in cm)):
        names = ("no source", "source")
        body = "".join(f'<tr><th class="text">true {names[i]}</th>'
                       + "".join(f"<td>{_fmt_int(v)}</td>" for v in cm[i]) + "</tr>"
                       for i in range(2))
        parts.append('<table><thead><tr><th class="text">confusion (P ≥ 0.5)</th>'
                     '<th>predicted no source</th><th>predicted source</th></tr></thead>'
                     f"<tbody>{body}</tbody></table>")
    kinds = metrics.get("fpr_by_kind")
    if isinstance(kinds, Mapping) and kinds:
        parts.append(_key_value_table([(f"FPR (P ≥ 0.5): {kind}", _fmt(value, 4))
                                       for kind, value in kinds.items()]))
    return '<div class="figures">' + "".join(parts) + "</div>"


def _run_section(index: int, run: dict[str, Any]) -> str:
    out = [f'<section class="run" id="run-{index}"><h3>{_e(run["name"])}'
           f' <small>({_e(run["architecture"] or "architecture unknown")})</small></h3>',
           f'<p class="status {_e(run["status"])}">{_e(run["message"])}</p>']
    if run["metrics"] is not None:
        out.append(_run_details(run["metrics"]))
    if run["figures"]:
        captions = dict(FIGURES)
        out.append('<div class="figures">')
        for name in run["figures"]:
            caption = captions.get(name, name)
            out.append(f'<figure><a href="{_href(run["name"], name)}">'
                       f'<img src="{_href(run["name"], name)}" alt="{_e(caption)}" '
                       f'loading="lazy"></a><figcaption>{_e(caption)}</figcaption></figure>')
        out.append("</div>")
    out.append(_evaluations_html(run))
    if run["config_text"] is not None:
        out.append(f"<details open><summary>{CONFIG_FILE}</summary>"
                   f"<pre>{_e(run['config_text'])}</pre></details>")
    out.append("</section>")
    return "".join(out)


def _comparison_figure(runs_dir: Path, runs: list[dict[str, Any]]) -> str:
    records = {run["name"]: run["metrics"]["completeness_vs_snr"] for run in runs
               if run["metrics"] is not None
               and isinstance(run["metrics"].get("completeness_vs_snr"), Mapping)}
    if not records:
        return '<p class="note">No run has completeness against SNR yet.</p>'
    try:
        plot_completeness_comparison(records, runs_dir / COMPARISON_NAME)
    except PlotError as exc:
        return f'<p class="note">Comparison figure not drawn: {_e(exc)}</p>'
    caption = ("Completeness of true sources against SNR for every finished run (68 % Wilson "
               "intervals): left at P ≥ 0.5, right at each run's operating point.")
    return (f'<figure><img src="{_href(COMPARISON_NAME)}" alt="completeness against SNR, '
            f'all runs"><figcaption>{_e(caption)}</figcaption></figure>')


def render_report(runs_dir: Path, runs: list[dict[str, Any]], comparison_html: str) -> str:
    """The report page for ``runs`` (from :func:`load_runs`) as an HTML string."""
    generated = fileio.utc_now()
    n_done = sum(run["status"] == "done" for run in runs)
    title = f"stampbatch runs: {runs_dir.resolve().name}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="meta">Runs directory <code>{_e(runs_dir.resolve())}</code> · {len(runs)} '
        f"runs, {n_done} finished · generated {_e(generated)} by stampbatch "
        f"{_e(__version__)}</p>",
        "<h2>Comparison</h2>",
        _metrics_table(runs),
        '<p class="note">Metrics on each run\'s test split. Accuracy, precision and recall at '
        f"P ≥ 0.5; completeness SNR ≥ {SNR_CUT:g}: fraction of true sources in the SNR bins "
        "at or above that value recovered at the operating threshold (the threshold that "
        "gives the target false-positive rate on the test split). MACs: multiply-accumulates "
        "per stamp. Best of each column in bold.</p>",
        comparison_html,
        "<h2>Runs</h2>",
    ]
    parts += [_run_section(i, run) for i, run in enumerate(runs)]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(runs_dir: Path) -> Path:
    """Write ``runs_dir/report.html`` (and ``completeness_comparison.png``) comparing every
    run under ``runs_dir``; return the report's path. No runs is a :class:`ReportError`."""
    runs_dir = Path(runs_dir)
    runs = load_runs(runs_dir)
    if not runs:
        raise ReportError(f"{runs_dir}: no training runs (no subdirectory holds "
                          f"{', '.join(RUN_MARKERS)})")
    comparison = _comparison_figure(runs_dir, runs)
    page = render_report(runs_dir, runs, comparison)
    path = runs_dir / REPORT_NAME
    try:
        write_atomically(path, lambda fh: fh.write(page.encode("utf-8")))
    except PlotError as exc:
        raise ReportError(str(exc)) from None
    return path
