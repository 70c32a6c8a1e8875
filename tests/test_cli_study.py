"""`sparsearch study` and `sparsearch report` end to end on a tiny budget, and every bad input: a specific
message naming the value and what is allowed, exit code 2, no traceback, nothing stored changed."""

from __future__ import annotations

import sqlite3

import pytest
from typer.testing import CliRunner

from sparsearch.cli import app
from sparsearch.study.store import StudyStore, TrialSpec

runner = CliRunner()

TINY_TOML = """
name = "tiny"
dataset = "digits"
sparsities = [0.8]
seeds = [0]
[model]
widths = [32, 32]
[budget]
epochs = 2
batch_size = 64
[search]
n_candidates = 2
scorer = "synflow"
"""


def write(tmp_path, text: str, name: str = "s.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_study_then_report_end_to_end(tmp_path):
    study_file = write(tmp_path, TINY_TOML)
    store = tmp_path / "runs" / "tiny.sqlite"
    arguments = ["study", str(study_file), "--store", str(store), "--workers", "1", "--no-progress"]
    result = runner.invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert "5 trials run, 0 already done, 0 failed" in result.output
    report_folder = tmp_path / "runs" / "tiny-report"
    assert f"report: {report_folder / 'report.html'}" in result.output
    for name in ("report.html", "summary.csv", "results.json", "summary.md", "accuracy_vs_sparsity.png"):
        assert (report_folder / name).stat().st_size > 0
    assert "search-weight" in result.output and "Random Search winner vs random" in result.output

    again = runner.invoke(app, arguments)
    assert again.exit_code == 0, again.output
    assert "0 trials run, 5 already done" in again.output

    (report_folder / "report.html").unlink()
    report = runner.invoke(app, ["report", str(store), "--out", str(tmp_path / "elsewhere")])
    assert report.exit_code == 0, report.output
    assert (tmp_path / "elsewhere" / "report.html").exists()
    assert "random-node" in report.output


BAD_STUDIES = {
    "sparsity one": ("sparsities = [0.8]", "sparsities = [0.5, 1.0]", "sparsity 1.0 is outside [0, 1)"),
    "negative sparsity": ("sparsities = [0.8]", "sparsities = [-0.2]", "sparsity -0.2 is outside [0, 1)"),
    "empty sparsities": ("sparsities = [0.8]", "sparsities = []", "sparsities is empty"),
    "unknown dataset": ('dataset = "digits"', 'dataset = "imagenet"', "unknown dataset 'imagenet'; allowed: mnist1d"),
    "unknown arm": ("seeds = [0]", 'seeds = [0]\narms = ["dense", "magic"]', "unknown arm 'magic'; allowed: dense"),
    "unknown space": ("seeds = [0]", 'seeds = [0]\narms = ["search-layer"]', "unknown search space 'layer'"),
    "unknown key": ("seeds = [0]", "seeds = [0]\nseed = 3", "unknown config key 'seed'; allowed: name, dataset"),
    "unknown nested key": (
        "batch_size = 64",
        "batch_size = 64\nepoch = 3",
        "unknown config key 'epoch' in table 'budget'",
    ),
    "missing data directory": (
        'dataset = "digits"',
        'dataset = "fashion-mnist"\ndata_dir = "{missing}"',
        "apt-get install dataset-fashion-mnist",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_STUDIES))
def test_bad_study_files(tmp_path, case):
    old, new, expected = BAD_STUDIES[case]
    text = TINY_TOML.replace(old, new.replace("{missing}", str(tmp_path / "no-such-dir")), 1)
    store = tmp_path / "never.sqlite"
    result = runner.invoke(app, ["study", str(write(tmp_path, text)), "--store", str(store), "--workers", "1"])
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert "Traceback" not in result.output
    assert not store.exists()


def test_a_different_study_under_the_same_name_changes_nothing(tmp_path):
    store = tmp_path / "tiny.sqlite"
    with StudyStore(store) as existing:
        existing.register_study("tiny", {"sparsities": [0.3]}, "0123456789abcdef", [TrialSpec("dense", 0.0, 0)])
    with sqlite3.connect(store) as connection:
        before = list(connection.iterdump())
    result = runner.invoke(app, ["study", str(write(tmp_path, TINY_TOML)), "--store", str(store), "--workers", "1"])
    assert result.exit_code == 2, result.output
    assert "already holds a different study named 'tiny'" in result.output
    assert "--store" in result.output and "new name" in result.output
    assert "Traceback" not in result.output
    with sqlite3.connect(store) as connection:
        assert list(connection.iterdump()) == before


def test_other_bad_command_lines(tmp_path):
    missing = runner.invoke(app, ["study", str(tmp_path / "nope.toml")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    workers = runner.invoke(app, ["study", str(write(tmp_path, TINY_TOML)), "--workers", "0"])
    assert workers.exit_code == 2 and "workers must be at least 1, got 0" in workers.output
    report = runner.invoke(app, ["report", str(tmp_path / "absent.sqlite")])
    assert report.exit_code == 2 and "does not exist" in report.output
    unknown = runner.invoke(app, ["report", "no-such-study"])
    assert unknown.exit_code == 2 and "no study named 'no-such-study'" in unknown.output
    for result in (missing, workers, report, unknown):
        assert "Traceback" not in result.output
