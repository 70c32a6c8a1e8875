"""Shared by the study benchmarks: run `sparsearch study` as a subprocess (what a user types), time it, and
write the report's table, the search-vs-random comparison, machine, date and load to benchmarks/results/."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from sparsearch.report import write_report
from sparsearch.report.methods import METHOD_HEADERS, method_cells
from sparsearch.report.render import METHODS_NOTE
from sparsearch.report.summary import COMPARISON_HEADERS, TABLE_HEADERS, comparison_cells, markdown_table, table_cells

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OUT = HERE / "out"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, torch {torch.__version__}"


def _descendants(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        found += frontier
    return found


class CpuMeter:
    """CPU seconds of a process tree, sampled from /proc every half second (the fork server's workers are not
    reaped by the study process, so getrusage(RUSAGE_CHILDREN) would miss them); Linux only."""

    def __init__(self, root: int) -> None:
        self.root, self.seen, self.stop = root, {}, threading.Event()
        self.tick = os.sysconf("SC_CLK_TCK")
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self.stop.is_set():
            for pid in [self.root, *_descendants(self.root)]:
                try:
                    fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
                except (OSError, IndexError):
                    continue
                self.seen[pid] = (int(fields[11]) + int(fields[12])) / self.tick
            self.stop.wait(0.5)

    def total(self) -> float:
        self.stop.set()
        self.thread.join()
        return sum(self.seen.values())


def run_and_record(
    name: str,
    *,
    study_file: Path | None,
    title: str,
    resume: bool = False,
    workers: int | None = None,
    report_only: bool = False,
    note: str = "",
) -> dict:
    """Run the study (fresh, or resumed), or with ``report_only`` re-render the results of the last run."""
    out = OUT / name
    store = out / f"{name}.sqlite"
    partial = None
    if report_only and not (RESULTS / f"{name}.json").exists():
        # a run stopped before its end (the deadline, not a failure): times from the store, load as of now
        with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as connection:
            first, last, done, total = connection.execute(
                "SELECT min(started), max(finished), sum(status = 'done'), count(*) FROM trial"
            ).fetchone()
        partial = (int(done), int(total))
        started_at = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(first))
        wall, resume, cpu, workers = last - first, True, None, None
        load_before = load_after = os.getloadavg()
    elif report_only:
        previous = json.loads((RESULTS / f"{name}.json").read_text())
        started_at, wall, resume = previous["date"], previous["wall_seconds"], previous["resumed"]
        load_before, load_after, workers = previous["load_average_before"], previous["load_average_after"], None
        cpu = previous.get("cpu_seconds")
        partial = tuple(previous["partial"]) if previous.get("partial") else None
    else:
        if not resume and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "sparsearch.cli", "study"]
        command += [str(study_file)] if study_file is not None else []
        command += ["--store", str(store), "--no-report"]
        command += ["--workers", str(workers)] if workers else []
        load_before = os.getloadavg()
        started_at = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        started = time.perf_counter()
        process = subprocess.Popen(command)
        # CPU time of the whole process tree (study process, fork server, workers): what the study itself
        # needed, whatever else shared the cores
        meter = CpuMeter(process.pid)
        if process.wait() != 0:
            raise SystemExit(f"the study failed with exit code {process.returncode}")
        wall = time.perf_counter() - started
        cpu = meter.total()
        load_after = os.getloadavg()
    report = write_report(store, folder=out / "report")
    RESULTS.mkdir(exist_ok=True)
    for plot in (report.files.accuracy_plot, report.files.convergence_plot):
        shutil.copyfile(plot, RESULTS / f"{name}_{plot.name}")
    config = json.loads(report.files.json.read_text())["config"]
    command_text = "sparsearch study" + (f" {study_file.relative_to(HERE.parent)}" if study_file else "")
    lines = [
        f"# {title}",
        "",
        f"Command: `{command_text}` ({'resumed' if resume else 'fresh store'}), workers: {workers or os.cpu_count()}.",
        f"Date: {started_at}. Machine: {machine()}.",
        f"Wall time: **{wall:.0f} s ({wall / 60:.1f} min)**"
        + (" (resumed run: only the remaining trials)" if resume else "")
        + f". Load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}: other work shared "
        "the cores during the run."
        + (
            f" CPU time of the study's processes (sampled from /proc): {cpu:.0f} s, i.e. about "
            f"{cpu / 2 / 60:.1f} min of wall time on 2 otherwise idle cores."
            if cpu
            else ""
        ),
        ""
        + (
            f"Stopped before the end: {partial[0]} of {partial[1]} trials finished (wall time above: first start "
            "to last finish, restarts included; load average as of rendering). `--resume` finishes the rest."
            if partial
            else ""
        )
        + (f" {note}" if note else ""),
        "",
        f"Study: data set `{config['dataset']}`, model `{config['model']}`, sparsities {config['sparsities']}, "
        f"seeds {config['seeds']}, budget {config['budget']}, search {config['search']}.",
        "",
        markdown_table(TABLE_HEADERS, table_cells(report.rows)),
        "",
        "Random Search winner minus its random counterpart (same space, sparsity and seed; percentage points):",
        "",
        markdown_table(COMPARISON_HEADERS, comparison_cells(report.comparison)),
        "",
    ]
    if report.methods:
        lines += [
            "Search methods side by side:",
            "",
            markdown_table(METHOD_HEADERS, method_cells(report.methods)),
            "",
            METHODS_NOTE,
            "",
        ]
    lines += [
        "sparsity = fraction of zero weights among masked (Linear/Conv) weights; node sparsity = fraction of "
        "hidden units removed. Epochs to 95% of dense: first epoch reaching 95% of the dense parent's final test "
        "accuracy at the same seed (mean over seeds that reach it; count when not all do).",
        "",
        f"![accuracy vs sparsity]({name}_accuracy_vs_sparsity.png)",
        f"![convergence]({name}_convergence.png)",
        "",
    ]
    (RESULTS / f"{name}.md").write_text("\n".join(lines), encoding="utf-8")
    document = {
        "title": title,
        "command": command_text,
        "date": started_at,
        "machine": machine(),
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "resumed": resume,
        "partial": partial,
        "note": note,
        "summary": [row.__dict__ for row in report.rows],
        "search_vs_random": [row.__dict__ for row in report.comparison],
        "search_methods": [row.__dict__ for row in report.methods],
        "config": config,
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(document, indent=1), encoding="utf-8")
    print((RESULTS / f"{name}.md").read_text())
    return document


def main(name: str, *, study_file: Path | None, title: str, description: str) -> None:
    """The command line shared by the study benchmarks: a fresh run, ``--resume`` or ``--report-only``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--resume", action="store_true", help="keep the store and finish the remaining trials")
    parser.add_argument("--report-only", action="store_true", help="re-render the results of the last run")
    parser.add_argument("--workers", type=int, default=None, help="parallel trials (default: every core)")
    parser.add_argument("--note", default="", help="a sentence for the result file (e.g. the load observed)")
    options = parser.parse_args()
    run_and_record(
        name,
        study_file=study_file,
        title=title,
        resume=options.resume,
        workers=options.workers,
        report_only=options.report_only,
        note=options.note,
    )
