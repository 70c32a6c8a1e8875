"""Writing a study report to a folder: PNG plots, a self-contained HTML page (images inlined), CSV, JSON and
a markdown table, plus the same table as a Rich table for the terminal."""

from __future__ import annotations

import base64
import csv
import html
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.table import Table

from sparsearch.report.methods import METHOD_HEADERS, MethodComparison, compare_methods, method_cells
from sparsearch.report.plots import plot_accuracy_vs_sparsity, plot_convergence
from sparsearch.report.summary import (
    COMPARISON_HEADERS,
    CONVERGENCE_FRACTION,
    SPARSITY_DEFINITION,
    TABLE_HEADERS,
    ArmSummary,
    SearchComparison,
    StudyResults,
    compare_search_with_random,
    comparison_cells,
    json_ready,
    load_results,
    markdown_table,
    search_info,
    space_notes,
    summarize,
    table_cells,
)


@dataclass(frozen=True)
class ReportFiles:
    """Where each part of a written report is."""

    folder: Path
    html: Path
    csv: Path
    json: Path
    markdown: Path
    accuracy_plot: Path
    convergence_plot: Path


@dataclass(frozen=True)
class Report:
    """A written report: the study's name, its files and the numbers in its tables."""

    study: str
    files: ReportFiles
    rows: list[ArmSummary]
    comparison: list[SearchComparison]
    notes: dict[str, list[str]] = field(default_factory=dict)  # per arm: what its search space said about the model
    methods: list[MethodComparison] = field(default_factory=list)  # searched arms side by side


METHODS_NOTE = (
    "Each searched arm <method>-<space> against its random counterpart random-<space> and against Random Search "
    "search-<space>, paired by seed (same parent initialisation, data order and training budget): mean ± std of "
    "the differences in test accuracy (pp), and the seed pairs the method won. Search FLOPs: what the search "
    "spent, in brackets as a share of its budget (by default what Random Search spends in the same cell)."
)


def default_report_folder(store_path: Path, study: str) -> Path:
    """``<store folder>/<study>-report``."""
    return store_path.parent / f"{study}-report"


def rich_table(rows: list[ArmSummary], title: str) -> Table:
    """The summary table for the terminal."""
    table = Table(title=title, caption=SPARSITY_DEFINITION)
    for header in TABLE_HEADERS:
        table.add_column(header, justify="left" if header == "Arm" else "right", no_wrap=header == "Arm")
    for cells in table_cells(rows):
        table.add_row(*cells)
    return table


def rich_comparison(rows: list[SearchComparison]) -> Table:
    """The search-vs-random comparison for the terminal."""
    table = Table(title="Random Search winner vs random counterpart (paired by seed)")
    for header in COMPARISON_HEADERS:
        table.add_column(header, justify="left" if header == "Space" else "right", no_wrap=header == "Space")
    for cells in comparison_cells(rows):
        table.add_row(*cells)
    return table


def rich_methods(rows: list[MethodComparison]) -> Table:
    """The search methods side by side, for the terminal."""
    table = Table(title="Search methods vs random counterpart and Random Search (paired by seed)")
    for header in METHOD_HEADERS:
        table.add_column(header, justify="left" if header in ("Space", "Method") else "right")
    for cells in method_cells(rows):
        table.add_row(*cells)
    return table


def _html_table(headers: tuple[str, ...], cells: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _inline_png(path: Path, alt: str) -> str:
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px}
th{background:#f3f3f3}td{text-align:right}td:first-child{text-align:left}img{max-width:100%}
pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:12px}.note{color:#555}"""


TRIAL_HEADERS = (
    "Trial",
    "Status",
    "Test acc. %",
    "Val. acc. %",
    "Weight sparsity",
    "Node sparsity",
    "Search",
    "Wall s",
)


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def _search_text(trial: dict) -> str:
    search = search_info(trial)
    if search is None:
        return ""
    scores = [
        f"[{score:.4g}]" if i == search["best_index"] else f"{score:.4g}" for i, score in enumerate(search["scores"])
    ]
    return f"{search.get('scorer', 'scores')}: " + " ".join(scores)


def _trial_cells(results: StudyResults) -> list[list[str]]:
    return [
        [
            trial["key"],
            trial["status"],
            _percent(trial["test_accuracy"]),
            _percent(trial["val_accuracy"]),
            "" if trial["weight_sparsity"] is None else f"{trial['weight_sparsity']:.4f}",
            "" if trial["node_sparsity"] is None else f"{trial['node_sparsity']:.3f}",
            _search_text(trial),
            "" if trial["wall_seconds"] is None else f"{trial['wall_seconds']:.1f}",
        ]
        for trial in results.trials
    ]


def _html_page(
    results: StudyResults,
    rows: list[ArmSummary],
    comparison: list[SearchComparison],
    files: ReportFiles,
    methods: list[MethodComparison],
) -> str:
    counts = ", ".join(f"{count} {status}" for status, count in sorted(results.status_counts().items()))
    config = results.config
    budget = config.get("budget", {})
    search = config.get("search", {})
    title = f"sparsearch study report: {results.name}"
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='note'>Data set <b>{html.escape(str(config.get('dataset')))}</b>, model "
        f"<b>{html.escape(json.dumps(config.get('model')))}</b>, {budget.get('epochs')} epochs per trial, "
        f"Random Search: {search.get('n_candidates')} candidates scored by {html.escape(str(search.get('scorer')))}. "
        f"Trials: {html.escape(counts)}. Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from "
        f"<code>{html.escape(str(results.store_path))}</code>.</p>",
        f"<p><b>{html.escape(SPARSITY_DEFINITION)}.</b> Node sparsity = fraction of hidden units removed. "
        f"Epochs to {CONVERGENCE_FRACTION:.0%} of dense = first epoch whose test accuracy reaches "
        f"{CONVERGENCE_FRACTION:.0%} of the dense parent's final test accuracy at the same seed (mean over the "
        "seeds that reach it; the count in brackets when not all do; — if none). FLOPs count 2 per "
        "multiply-accumulate for one sample's forward pass; training FLOPs cover the whole training run (not the "
        "search); wall time per trial includes the search of the search arms.</p>",
        "<h2>Results per arm and sparsity</h2>",
        _html_table(TABLE_HEADERS, table_cells(rows)),
    ]
    if comparison:
        parts += [
            "<h2>Random Search winner vs random counterpart</h2>",
            "<p class='note'>Paired by seed: the same parent initialisation, data order and budget; "
            "pp = percentage points of test accuracy.</p>",
            _html_table(COMPARISON_HEADERS, comparison_cells(comparison)),
        ]
    notes = space_notes(results)
    if notes:
        parts += [
            "<h2>Search-space notes</h2>",
            "<p class='note'>What the search spaces found about the model (layers kept whole, units tied).</p>",
            "<ul>",
            *(
                f"<li><b>{html.escape(arm)}</b>: {html.escape(note)}</li>"
                for arm, lines in notes.items()
                for note in lines
            ),
            "</ul>",
        ]
    if methods:
        parts += [
            "<h2>Search methods side by side</h2>",
            f"<p class='note'>{html.escape(METHODS_NOTE)}</p>",
            _html_table(METHOD_HEADERS, method_cells(methods)),
        ]
    parts += [
        "<h2>Accuracy vs sparsity</h2>",
        _inline_png(files.accuracy_plot, "accuracy vs sparsity"),
        "<h2>Convergence</h2>",
        _inline_png(files.convergence_plot, "convergence curves"),
        "<h2>Trials</h2>",
        "<details><summary>every trial of the study (Random Search: scores of all candidates, winner marked)</summary>",
        _html_table(TRIAL_HEADERS, _trial_cells(results)),
        "</details>",
        "<h2>Study configuration</h2>",
        f"<pre>{html.escape(json.dumps(config, indent=2, sort_keys=True))}</pre>",
        "</body></html>",
    ]
    return "\n".join(parts)


def write_report(store_path: str | Path, study: str | None = None, folder: str | Path | None = None) -> Report:
    """Render a study's report from its store into ``folder`` (default: next to the store)."""
    store_path = Path(store_path)
    results = load_results(store_path, study)
    if not results.done:
        counts = ", ".join(f"{count} {status}" for status, count in sorted(results.status_counts().items()))
        raise ValueError(f"study {results.name!r} in {str(store_path)!r} has no finished trial yet ({counts})")
    out = Path(folder) if folder is not None else default_report_folder(store_path, results.name)
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(results)
    comparison = compare_search_with_random(results)
    methods = compare_methods(results)
    if all(row.method == "search" for row in methods):
        methods = []  # Random Search alone: the comparison above says it all
    files = ReportFiles(
        folder=out,
        html=out / "report.html",
        csv=out / "summary.csv",
        json=out / "results.json",
        markdown=out / "summary.md",
        accuracy_plot=plot_accuracy_vs_sparsity(results, rows, out / "accuracy_vs_sparsity.png"),
        convergence_plot=plot_convergence(results, out / "convergence.png"),
    )
    with files.csv.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(row) for row in rows)
    trials = [
        {
            **{k: v for k, v in trial.items() if k not in ("search_json", "notes_json")},
            "search": search_info(trial),
            "notes": json.loads(trial.get("notes_json") or "[]"),
        }
        for trial in results.trials
    ]
    document = {
        "study": results.name,
        "definition": SPARSITY_DEFINITION,
        "config": results.config,
        "summary": [asdict(row) for row in rows],
        "search_vs_random": [asdict(row) for row in comparison],
        "search_methods": [asdict(row) for row in methods],
        "trials": trials,
        "curves": {key: [asdict(row) for row in curve] for key, curve in results.curves.items()},
    }
    files.json.write_text(json.dumps(json_ready(document), indent=1), encoding="utf-8")
    markdown = [markdown_table(TABLE_HEADERS, table_cells(rows))]
    if comparison:
        markdown.append(markdown_table(COMPARISON_HEADERS, comparison_cells(comparison)))
    notes = space_notes(results)
    if notes:
        markdown.append("\n".join(f"- {arm}: {note}" for arm, lines in notes.items() for note in lines))
    if methods:
        markdown.append(markdown_table(METHOD_HEADERS, method_cells(methods)) + f"\n\n{METHODS_NOTE}")
    files.markdown.write_text("\n\n".join(markdown) + f"\n\n{SPARSITY_DEFINITION}.\n", encoding="utf-8")
    files.html.write_text(_html_page(results, rows, comparison, files, methods), encoding="utf-8")
    return Report(results.name, files, rows, comparison, notes, methods)
