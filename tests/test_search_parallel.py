"""Candidates of a study's searches in parallel ([search] workers): same stored results as one after another,
honest fallbacks, bad settings refused; and the search budget of a scorer of your own, checked before each
evaluation even when a batch runs in parallel."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from sparsearch.data import load_dataset
from sparsearch.models import build_model
from sparsearch.search import (
    SCORERS,
    Candidate,
    ParallelEvaluator,
    Score,
    SearchProblem,
    UnknownCostError,
    make_space,
    random_search_flops,
    run_method,
)
from sparsearch.study.config import parse_study_config
from sparsearch.study.executors import InlineExecutor, ProcessExecutor, RayExecutor
from sparsearch.study.runner import run_study, search_workers_for
from sparsearch.study.store import StudyStore

SEARCH_ARMS = ["search-weight", "sh-weight", "evolution-allocation"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _study(search_workers: object = 1, **changes) -> dict:
    return {
        "name": "parallel",
        "dataset": "digits",
        "sparsities": [0.9],
        "seeds": [0],
        "model": {"arch": "mlp", "widths": [48, 32]},
        "budget": {"epochs": 1, "batch_size": 64},
        "search": {"n_candidates": 4, "short_train_steps": 6, "workers": search_workers},
        "arms": ["random-weight", *SEARCH_ARMS],
        **changes,
    }


def _stored(path) -> dict[str, dict]:
    """Every stored number of each trial but the times and where candidates ran."""
    with StudyStore(path, create=False) as store:
        rows = {row["arm"]: dict(row) for row in store.trial_rows("parallel")}
    kept = {}
    for arm, row in rows.items():
        search = json.loads(row["search_json"]) if row["search_json"] else None
        if search is not None:
            assert search.pop("workers") >= 1
            search.pop("seconds")
            for entry in search["evaluations"]:
                entry.pop("seconds")
        kept[arm] = {
            "test_accuracy": row["test_accuracy"],
            "val_accuracy": row["val_accuracy"],
            "train_flops": row["train_flops"],
            "weight_sparsity": row["weight_sparsity"],
            "search": search,
        }
    return kept


def _workers_used(path) -> dict[str, int]:
    with StudyStore(path, create=False) as store:
        rows = store.trial_rows("parallel")
    return {row["arm"]: json.loads(row["search_json"])["workers"] for row in rows if row["search_json"]}


def test_candidates_in_parallel_store_the_same_results_as_in_order(tmp_path):
    in_order = run_study(_study(1), store_path=tmp_path / "1.sqlite", executor=InlineExecutor(), show_progress=False)
    parallel = run_study(_study(2), store_path=tmp_path / "2.sqlite", executor=InlineExecutor(), show_progress=False)
    # candidate pools forked inside the process executor's trial workers (forkserver children)
    pooled = run_study(_study(2), store_path=tmp_path / "3.sqlite", executor=ProcessExecutor(2), show_progress=False)
    for run in (in_order, parallel, pooled):
        assert run.failed == {} and len(run.finished) == 4
    assert _workers_used(tmp_path / "1.sqlite") == dict.fromkeys(SEARCH_ARMS, 1)
    assert _workers_used(tmp_path / "2.sqlite") == dict.fromkeys(SEARCH_ARMS, 2)
    assert _workers_used(tmp_path / "3.sqlite") == dict.fromkeys(SEARCH_ARMS, 2)
    reference = _stored(tmp_path / "1.sqlite")
    assert all(len(reference[arm]["search"]["evaluations"]) >= 2 for arm in SEARCH_ARMS)  # batches to share
    assert _stored(tmp_path / "2.sqlite") == reference
    assert _stored(tmp_path / "3.sqlite") == reference
    # where candidates run is not part of the study: the same config hash, so a store resumes across settings
    assert parse_study_config(_study(2)).config_hash() == parse_study_config(_study(1)).config_hash()


@pytest.mark.parametrize("bad", [0, -3, 1.5, "two", True, None])
def test_bad_search_workers_are_refused_naming_the_value(bad):
    with pytest.raises(ValueError) as error:
        parse_study_config(_study(bad))
    message = str(error.value)
    assert "search.workers: search workers must be a positive whole number of processes per search" in message
    assert f'or "auto" (the cores that parallel trials leave free), got {bad!r}' in message


def test_auto_gives_each_search_the_cores_that_trials_leave_free():
    config = parse_study_config(_study("auto"))
    assert config.search_worker_count(trials_in_flight=1, cores=16) == 16
    assert config.search_worker_count(trials_in_flight=4, cores=16) == 4
    assert config.search_worker_count(trials_in_flight=16, cores=16) == 1  # every core runs a trial already
    assert config.search_worker_count(trials_in_flight=3, cores=2) == 1
    assert parse_study_config(_study(3)).search_worker_count(trials_in_flight=16, cores=2) == 3  # as given
    # the runner counts the trials in flight: the executor's workers, or fewer trials left
    cores = os.cpu_count()
    assert search_workers_for(config, ProcessExecutor(cores), trials_left=1) == (cores, "")
    assert search_workers_for(config, ProcessExecutor(cores), trials_left=100) == (1, "")
    assert search_workers_for(config, InlineExecutor(), trials_left=100) == (cores, "")


def test_ray_executor_runs_candidates_in_order_and_says_why(tmp_path):
    config = parse_study_config(_study(2))
    workers, note = search_workers_for(config, RayExecutor(2), trials_left=4)
    assert workers == 1
    assert note == (
        "search workers = 2 asked, candidates ran in order: under the Ray executor each trial evaluates its "
        "candidates in its own task"
    )
    assert search_workers_for(parse_study_config(_study(1)), RayExecutor(2), trials_left=4) == (1, "")


# ---------------------------------------------------------------------------------- budget of your own scorer
@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def _parent() -> nn.Module:
    return build_model("mlp", (64,), 10, widths=(48, 32), seed=0)


def _problem(data, scorer: str) -> SearchProblem:
    space = make_space("weight", _parent(), 0.9)
    return SearchProblem(space, _parent, data, seed=3, scorer=scorer, n_candidates=6, batch_size=32)


def _kept_weights(model: nn.Module, masks, context) -> Score:
    """A scorer of one's own: the kept weights of the first layer; one forward pass per training sample."""
    flops = len(context.data.y_train) * context.flop_meter.forward(masks).nonzero
    return Score(float(next(iter(masks.values())).sum()), flops)


def _declared_cost(masks, context) -> int:
    return len(context.data.y_train) * context.flop_meter.forward(masks).nonzero


@pytest.fixture(scope="module")
def own_scorers():
    def declared(model, masks, context):
        return _kept_weights(model, masks, context)

    def understated(model, masks, context):  # says half of what it then reports
        return _kept_weights(model, masks, context)

    declared.cost = _declared_cost
    understated.cost = lambda masks, context: _declared_cost(masks, context) // 2
    SCORERS.add("test-undeclared", _kept_weights, replace=True)
    SCORERS.add("test-declared", declared, replace=True)
    SCORERS.add("test-understated", understated, replace=True)
    yield
    for name in ("test-undeclared", "test-declared", "test-understated"):
        SCORERS.remove(name)


def _one_cost(problem: SearchProblem) -> int:
    # the weight space keeps the same count per layer in every candidate: every evaluation costs the same
    masks = problem.space.sample(torch.Generator().manual_seed(0))
    return _declared_cost(masks, problem.scoring_context(Candidate(0, masks, 0), problem.meter))


@pytest.mark.parametrize("workers", [1, 2])
def test_a_scorer_that_reports_its_cost_afterwards_never_runs_past_the_budget(digits, own_scorers, workers):
    problem = _problem(digits, "test-undeclared")
    expected = r"scorer 'test-undeclared' reports its FLOPs only after it ran.*explicit budget \(\[search\]"
    with pytest.raises(UnknownCostError, match=expected):
        random_search_flops(problem)
    cost = _one_cost(problem)
    budget = 2 * cost + cost // 2  # room for two of the six candidates
    if workers == 1:
        outcome = run_method("search", problem, budget_flops=budget)
    else:
        with ParallelEvaluator(problem, workers) as pool:  # the cost measured in a worker still reaches the budget
            outcome = run_method("search", problem, budget_flops=budget, evaluate_many=pool)
    assert [entry["id"] for entry in outcome.evaluations] == [0, 1]
    assert outcome.flops == 2 * cost <= budget and outcome.overrun_flops == 0 and outcome.stopped_by_budget
    assert outcome.summary()["overrun_flops"] == 0
    expected = rf"one evaluation by scorer 'test-undeclared' cost {cost} FLOPs, more than the budget of {cost - 1}"
    with pytest.raises(RuntimeError, match=expected):
        run_method("search", problem, budget_flops=cost - 1)
    # evolution sizes its population from the cost of one evaluation: refused, naming the missing attribute
    with pytest.raises(UnknownCostError, match="give the scorer a cost attribute"):
        run_method("evolution", problem, budget_flops=budget)


def test_a_declared_cost_is_checked_before_the_batch_and_an_understatement_is_recorded(digits, own_scorers):
    problem = _problem(digits, "test-declared")
    cost = _one_cost(problem)
    assert random_search_flops(problem) == 6 * cost  # the default budget is known before anything runs
    with ParallelEvaluator(problem, 2) as pool:
        outcome = run_method("search", problem, budget_flops=3 * cost, evaluate_many=pool)
    assert len(outcome.evaluations) == 3 and outcome.flops == 3 * cost and outcome.overrun_flops == 0
    # a scorer that declares half its cost: six halves fit, the search spends what the scorer reported
    lying = _problem(digits, "test-understated")
    outcome = run_method("search", lying, budget_flops=3 * cost)
    assert len(outcome.evaluations) == 6 and outcome.flops == 6 * cost and outcome.overrun_flops == 3 * cost


def _children(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if parent == pid:
                children.append(int(entry.name))
    return children


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_candidate_workers_stop_when_the_study_is_killed(tmp_path):
    study_file = tmp_path / "k.toml"
    study_file.write_text(
        'name = "killme"\ndataset = "digits"\nsparsities = [0.9]\narms = ["search-weight"]\nseeds = [0]\n'
        "[model]\nwidths = [256, 256]\n[search]\nn_candidates = 2\nshort_train_steps = 600\nworkers = 2\n"
    )
    command = [sys.executable, "-m", "sparsearch.cli", "study", str(study_file), "--store", str(tmp_path / "k.sqlite")]
    process = subprocess.Popen([*command, "--workers", "1", "--no-progress", "--no-report"], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    pool: list[int] = []
    while time.monotonic() < deadline and process.poll() is None and len(pool) < 2:
        time.sleep(0.2)
        pool = _children(process.pid)  # the inline executor's trial runs in the study process: its pool's workers
    assert process.poll() is None, process.stderr.read().decode()
    assert len(pool) == 2
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    stop_deadline = time.monotonic() + 15
    while time.monotonic() < stop_deadline and any(_alive(pid) for pid in pool):
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in pool)
