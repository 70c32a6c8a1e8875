"""Running studies for real on a tiny budget: every arm trains, numbers are identical on a re-run and across
executors, and a resumed study repeats no finished trial and loses none, also after ``kill -9``."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sparsearch.study.config import parse_study_config
from sparsearch.study.executors import InlineExecutor, ProcessExecutor
from sparsearch.study.runner import run_study
from sparsearch.study.store import StudyStore

TINY = {
    "name": "tiny",
    "dataset": "digits",
    "sparsities": [0.8],
    "seeds": [0],
    "model": {"arch": "mlp", "widths": [32, 32]},
    "budget": {"epochs": 2, "batch_size": 64},
    "search": {"n_candidates": 2, "scorer": "short-train", "short_train_steps": 5},
}
# timestamps and durations differ between runs; everything else must not
VOLATILE = {"started", "finished", "train_seconds", "wall_seconds", "search_json"}


def stable_numbers(path: Path, study: str = "tiny"):
    with StudyStore(path, create=False) as store:
        trials = {row["key"]: {k: v for k, v in row.items() if k not in VOLATILE} for row in store.trial_rows(study)}
        curves = {
            key: [(r.epoch, r.step, r.train_loss, r.val_accuracy, r.test_accuracy) for r in rows]
            for key, rows in store.epoch_rows(study).items()
        }
    return trials, curves


def test_every_arm_trains_and_reports_honest_sparsity(tmp_path):
    config = parse_study_config(TINY)
    run = run_study(config, store_path=tmp_path / "a.sqlite", executor=InlineExecutor(), show_progress=False)
    assert run.failed == {} and len(run.finished) == 5
    trials, curves = stable_numbers(tmp_path / "a.sqlite")
    for key, trial in trials.items():
        assert trial["status"] == "done"
        assert len(curves[key]) == 2
        assert 0.0 <= trial["test_accuracy"] <= 1.0
    dense = trials["dense/s0/seed0"]
    assert dense["weight_sparsity"] < 0.01 and dense["flops_nonzero"] == dense["flops_dense"]
    for arm in ("random-node", "random-weight", "search-node", "search-weight"):
        trial = trials[f"{arm}/s0.8/seed0"]
        assert trial["weight_sparsity"] == pytest.approx(0.8, abs=0.03)
        assert trial["params_nonzero"] < 0.35 * dense["params_nonzero"]
        assert trial["flops_nonzero"] < 0.3 * trial["flops_dense"]
    assert trials["random-node/s0.8/seed0"]["node_sparsity"] > 0.3
    assert trials["random-weight/s0.8/seed0"]["node_sparsity"] < 0.1
    # a searched arm's training FLOPs include scoring its candidates, on top of training the winner
    with StudyStore(tmp_path / "a.sqlite", create=False) as store:
        raw = {row["key"]: row for row in store.trial_rows("tiny")}
    searched, unscored = raw["search-weight/s0.8/seed0"], raw["random-weight/s0.8/seed0"]
    search_flops = json.loads(searched["search_json"])["flops"]
    assert search_flops > 0
    assert searched["train_flops"] - search_flops == pytest.approx(unscored["train_flops"], rel=0.01)


def test_algorithm_arms_run_in_a_study(tmp_path):
    arms = ["rigl", "snip", "gmp"]
    config = parse_study_config({**TINY, "arms": arms})
    run = run_study(config, store_path=tmp_path / "alg.sqlite", executor=InlineExecutor(), show_progress=False)
    assert run.failed == {}
    trials, curves = stable_numbers(tmp_path / "alg.sqlite")
    for arm in arms:
        trial = trials[f"{arm}/s0.8/seed0"]
        assert trial["status"] == "done" and len(curves[f"{arm}/s0.8/seed0"]) == 2
        assert trial["weight_sparsity"] == pytest.approx(0.8, abs=0.01)


def test_same_seed_same_numbers_whatever_the_executor(tmp_path):
    config = parse_study_config({**TINY, "arms": ["dense", "random-weight", "search-node"], "seeds": [0, 1]})
    run_study(config, store_path=tmp_path / "inline.sqlite", executor=InlineExecutor(), show_progress=False)
    run_study(config, store_path=tmp_path / "again.sqlite", executor=InlineExecutor(), show_progress=False)
    run_study(config, store_path=tmp_path / "pool.sqlite", executor=ProcessExecutor(2), show_progress=False)
    reference = stable_numbers(tmp_path / "inline.sqlite")
    assert stable_numbers(tmp_path / "again.sqlite") == reference
    assert stable_numbers(tmp_path / "pool.sqlite") == reference
    _, curves = reference
    # different seeds give different numbers (the comparison above could not pass by ignoring the seed)
    assert curves["dense/s0/seed0"] != curves["dense/s0/seed1"]


def test_sparse_kernels_run_the_static_mask_arms_on_the_kernels_and_resume_the_same_store(tmp_path, kernel_moves):
    """`sparse_kernels = true` changes how trials run, not what the study is: the same store resumes either way, and
    a random weight mask at 90% (every layer on the kernels) gives masked training's numbers to float rounding."""
    from sparsearch.study.config import StudyConfig

    study = {**TINY, "arms": ["random-weight"], "sparsities": [0.9], "model": {"arch": "mlp", "widths": [256, 256]}}
    config = parse_study_config(study)
    on_kernels = parse_study_config({**study, "sparse_kernels": True})
    assert on_kernels.sparse_kernels and on_kernels.config_hash() == config.config_hash()
    for study_config, name in ((config, "masked"), (on_kernels, "kernels")):
        run = run_study(study_config, store_path=tmp_path / f"{name}.sqlite", executor=InlineExecutor(),
                        show_progress=False)
        assert run.failed == {}
    # the kernel run moved the hidden layers; the output layer (ERK keeps 80% of it) trained masked
    assert kernel_moves == [["layers.0", "layers.1"]]
    masked, kernels = stable_numbers(tmp_path / "masked.sqlite"), stable_numbers(tmp_path / "kernels.sqlite")
    key = "random-weight/s0.9/seed0"
    assert kernels[0][key]["train_flops"] == masked[0][key]["train_flops"]
    assert kernels[0][key]["weight_sparsity"] == masked[0][key]["weight_sparsity"]
    for (epoch, step, loss, *_), expected in zip(kernels[1][key], masked[1][key], strict=True):
        assert (epoch, step) == expected[:2] and loss == pytest.approx(expected[2], rel=1e-4)
    again = run_study(on_kernels, store_path=tmp_path / "masked.sqlite", executor=InlineExecutor(),
                      show_progress=False)
    assert again.already_done == 1 and not again.finished
    assert "sparse_kernels" in StudyConfig.model_fields
    with pytest.raises(ValueError, match=r"sparse_kernels: Input should be a valid boolean.*'maybe'"):
        parse_study_config({**study, "sparse_kernels": "maybe"})


def test_ray_executor_gives_the_same_numbers_and_resumes(tmp_path):
    pytest.importorskip("ray")
    from sparsearch.study.executors import RayExecutor

    config = parse_study_config({**TINY, "arms": ["dense", "random-weight", "search-node"]})
    run_study(config, store_path=tmp_path / "inline.sqlite", executor=InlineExecutor(), show_progress=False)
    run = run_study(config, store_path=tmp_path / "ray.sqlite", executor=RayExecutor(2), show_progress=False)
    assert run.failed == {} and len(run.finished) == 3
    assert stable_numbers(tmp_path / "ray.sqlite") == stable_numbers(tmp_path / "inline.sqlite")
    again = run_study(config, store_path=tmp_path / "ray.sqlite", executor=RayExecutor(2), show_progress=False)
    assert again.finished == [] and again.already_done == 3


def test_resume_reruns_only_the_interrupted_trial(tmp_path):
    path = tmp_path / "r.sqlite"
    config = parse_study_config({**TINY, "arms": ["dense", "random-node", "random-weight"]})
    run_study(config, store_path=path, executor=InlineExecutor(), show_progress=False)
    interrupted = "random-node/s0.8/seed0"
    # simulate a crash in the middle of a trial: status running, one partial (wrong) epoch row
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE trial SET status = 'running', finished = NULL WHERE key = ?", (interrupted,))
        connection.execute("DELETE FROM epoch WHERE trial_key = ? AND epoch = 2", (interrupted,))
        connection.execute("UPDATE epoch SET test_accuracy = -1 WHERE trial_key = ?", (interrupted,))
    with StudyStore(path) as store:
        before = {row["key"]: row for row in store.trial_rows("tiny")}
    run = run_study(config, store_path=path, executor=InlineExecutor(), show_progress=False)
    assert run.finished == [interrupted] and run.already_done == 2
    with StudyStore(path) as store:
        after = {row["key"]: row for row in store.trial_rows("tiny")}
        curves = store.epoch_rows("tiny")
    for key in ("dense/s0/seed0", "random-weight/s0.8/seed0"):
        assert after[key] == before[key]
    assert after[interrupted]["status"] == "done"
    assert [row.epoch for row in curves[interrupted]] == [1, 2]
    assert all(row.test_accuracy >= 0 for row in curves[interrupted])
    # a third run has nothing left to do
    assert run_study(config, store_path=path, executor=InlineExecutor(), show_progress=False).finished == []


def _descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_kill_minus_nine_in_the_middle_of_a_trial_then_resume(tmp_path):
    study_file = tmp_path / "k.toml"
    study_file.write_text(
        'name = "killme"\ndataset = "digits"\nsparsities = [0.5, 0.9]\n'
        'arms = ["dense", "random-node", "random-weight"]\nseeds = [0]\n'
        "[model]\nwidths = [64, 64]\n[budget]\nepochs = 12\nbatch_size = 32\n"
    )
    store = tmp_path / "k.sqlite"
    command = [sys.executable, "-m", "sparsearch.cli", "study", str(study_file), "--store", str(store)]
    command += ["--workers", "2", "--no-progress", "--no-report"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    statuses: dict[str, int] = {}
    while time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
        if store.exists():
            try:
                with sqlite3.connect(store, timeout=1) as connection:
                    statuses = dict(connection.execute("SELECT status, COUNT(*) FROM trial GROUP BY status").fetchall())
            except sqlite3.OperationalError:
                continue
            if statuses.get("done", 0) >= 1 and statuses.get("running", 0) >= 1:
                break
    assert process.poll() is None, f"study ended before it could be killed: {process.stderr.read().decode()}"
    assert statuses.get("running", 0) >= 1, statuses
    workers = _descendants(process.pid)
    assert len(workers) >= 2
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    with sqlite3.connect(store) as connection:
        done_before = connection.execute("SELECT * FROM trial WHERE status = 'done' ORDER BY key").fetchall()
    # orphaned workers stop on their own instead of computing for nobody
    stop_deadline = time.monotonic() + 15
    while time.monotonic() < stop_deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers)

    finished = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert finished.returncode == 0, finished.stderr
    with sqlite3.connect(store) as connection:
        done_keys = [row[1] for row in done_before]
        kept = connection.execute(
            f"SELECT * FROM trial WHERE key IN ({','.join('?' * len(done_keys))}) ORDER BY key", done_keys
        ).fetchall()
        assert kept == done_before  # same rows, same finished timestamps: never repeated
        counts = dict(connection.execute("SELECT status, COUNT(*) FROM trial GROUP BY status").fetchall())
        assert counts == {"done": 5}
        duplicates = connection.execute(
            "SELECT trial_key, epoch, COUNT(*) FROM epoch GROUP BY trial_key, epoch HAVING COUNT(*) > 1"
        ).fetchall()
        assert duplicates == []
        per_trial = connection.execute("SELECT trial_key, COUNT(*) FROM epoch GROUP BY trial_key").fetchall()
        assert sorted(n for _, n in per_trial) == [12] * 5
    assert f"{5 - len(done_before)} trials run, {len(done_before)} already done" in finished.stdout
