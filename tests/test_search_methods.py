"""Search methods under one FLOP budget: each method's defining behaviour on tiny models and real data."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from sparsearch.data import load_dataset
from sparsearch.models import build_model
from sparsearch.registry import UnknownNameError
from sparsearch.report import write_report
from sparsearch.search import (
    SEARCH_METHODS,
    AllocationSpace,
    Candidate,
    NodeSpace,
    SearchProblem,
    WeightSpace,
    make_space,
    mutate,
    random_search,
    random_search_flops,
    run_method,
    weight_sparsity,
)
from sparsearch.search.dass import DASS, hard_masks
from sparsearch.search.evolution import RegularizedEvolution
from sparsearch.search.halving import SuccessiveHalving
from sparsearch.search.methods import short_train
from sparsearch.search.scorers import short_train_evaluation
from sparsearch.search.tpe import TPESearch
from sparsearch.study.config import parse_study_config
from sparsearch.study.executors import InlineExecutor
from sparsearch.study.runner import run_study
from sparsearch.study.store import StudyStore
from sparsearch.training import TrainBudget

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def _parent() -> nn.Module:
    return build_model("mlp", (64,), 10, widths=(48, 32), seed=0)


def _problem(data, space: str = "weight", sparsity: float = 0.9, **changes) -> SearchProblem:
    settings = {"seed": 3, "short_train_steps": 8, "n_candidates": 4, "batch_size": 32, **changes}
    return SearchProblem(make_space(space, _parent(), sparsity), _parent, data, **settings)


# ------------------------------------------------------------------------------------------------ Random Search
@pytest.mark.parametrize("space", ["node", "weight"])
def test_search_method_picks_what_scoring_every_sample_picks(digits, space):
    problem = _problem(digits, space)
    outcome = run_method("search", problem)
    # reference: the i-th sample of the seeded sampler, trained from the parent, best accuracy then lowest loss
    sampler = torch.Generator().manual_seed(3)
    samples = [problem.space.sample(sampler) for _ in range(4)]
    results = [
        short_train_evaluation(_parent(), masks, digits, steps=8, batch_size=32, budget=TrainBudget(), seed=3)
        for masks in samples
    ]
    best = max(range(4), key=lambda i: (results[i][0], -results[i][1], -i))
    assert [entry["score"] for entry in outcome.evaluations] == [accuracy for accuracy, _, _ in results]
    assert outcome.best_id == best
    assert all(torch.equal(outcome.best_masks[name], samples[best][name]) for name in samples[best])
    assert outcome.flops == outcome.budget_flops == random_search_flops(problem)
    legacy = random_search(
        problem.space, _parent, digits, scorer="short-train", n_candidates=4, seed=3, short_train_steps=8, batch_size=32
    )
    assert legacy.best_index == best and legacy.flops == outcome.flops


def test_resumed_short_training_equals_one_uninterrupted_run(digits):
    masks = WeightSpace(_parent(), 0.8).sample(torch.Generator().manual_seed(0))
    settings = {"batch_size": 32, "budget": TrainBudget(), "seed": 5}
    straight = short_train(_parent(), masks, digits, steps=70, **settings)
    first = short_train(_parent(), masks, digits, steps=50, **settings)  # crosses an epoch boundary (38 batches)
    resumed = short_train(_parent(), masks, digits, steps=70, resume=first[2], **settings)
    assert straight[:2] == resumed[:2]
    # resuming leaves the state it resumed from as it was (the optimizer's momentum was updated in place in it)
    assert short_train(_parent(), masks, digits, steps=70, resume=first[2], **settings)[:2] == straight[:2]
    assert short_train(_parent(), masks, digits, steps=50, **settings)[:2] == short_train_evaluation(
        _parent(), masks, digits, steps=50, **settings
    )[:2]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_short_training_on_the_kernels_scores_and_resumes_like_masked_training(digits, kernel_moves, optimizer):
    """sparse_kernels=True: the candidate's Linear layers train on the kernels, with the same accuracy and loss to
    float rounding; a run resumed on the kernels continues one that ran masked (momentum / Adam's moments move onto
    the kernels at the kept entries and back), and the state it leaves resumes masked training."""
    def parent():
        return build_model("mlp", (64,), 10, widths=(256, 128), seed=0)

    masks = WeightSpace(parent(), 0.9, "uniform").sample(torch.Generator().manual_seed(0))
    settings = {"batch_size": 32, "budget": TrainBudget(optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 3e-3),
                "seed": 5}
    straight = short_train(parent(), masks, digits, steps=60, **settings)
    first = short_train(parent(), masks, digits, steps=30, **settings)
    on_kernels_resumed = short_train(parent(), masks, digits, steps=60, resume=first[2], sparse_kernels=True,
                                     **settings)
    assert kernel_moves == [["layers.0", "layers.1", "layers.2"]]
    assert on_kernels_resumed[:2] == pytest.approx(straight[:2], rel=1e-3, abs=1e-3)
    kernels_first = short_train(parent(), masks, digits, steps=30, sparse_kernels=True, **settings)
    assert kernels_first[:2] == pytest.approx(first[:2], rel=1e-3, abs=1e-3)
    masked_resumed = short_train(parent(), masks, digits, steps=60, resume=kernels_first[2], **settings)
    assert masked_resumed[:2] == pytest.approx(straight[:2], rel=1e-3, abs=1e-3)
    for state, reference in ((kernels_first[2], first[2]), (on_kernels_resumed[2], straight[2])):
        for name, value in reference.model.items():  # same keys, masked entries zero, trained ones equal
            torch.testing.assert_close(state.model[name], value, rtol=1e-3, atol=1e-4)
        assert state.optimizer["state"].keys() == reference.optimizer["state"].keys()
        for index, expected in reference.optimizer["state"].items():
            for key, value in expected.items():
                torch.testing.assert_close(state.optimizer["state"][index][key], value, rtol=1e-3, atol=1e-4)


def test_a_search_problem_passes_sparse_kernels_to_short_training(digits, kernel_moves):
    """The study's key reaches the search arms: built-in short training and a registered scorer's context."""
    masked, kernels = _problem(digits, sparsity=0.9), _problem(digits, sparsity=0.9, sparse_kernels=True)
    candidate = Candidate(0, masked.space.sample(torch.Generator().manual_seed(0)), 8)
    assert kernels.evaluate(candidate).score == pytest.approx(masked.evaluate(candidate).score, abs=1e-3)
    assert kernel_moves == [["layers.0", "layers.1", "layers.2"]]  # a uniform 90% mask
    assert kernels.scoring_context(candidate, masked.meter).sparse_kernels
    assert not masked.scoring_context(candidate, masked.meter).sparse_kernels


# ------------------------------------------------------------------------------------------------ the budget
@pytest.mark.parametrize(
    ("method", "space"),
    [("search", "node"), ("sh", "weight"), ("evolution", "node"), ("tpe", "allocation"), ("dass", "weight")],
)
def test_every_method_stays_within_the_budget_and_reports_what_it_spent(digits, method, space):
    problem = _problem(digits, space)
    budget = random_search_flops(problem)
    outcome = run_method(method, problem, space_name=space)
    assert outcome.budget_flops == budget
    assert 0 < outcome.flops <= budget
    assert outcome.flops == sum(entry["flops"] for entry in outcome.evaluations)
    if method in ("evolution", "tpe"):  # they would go on: stopped by the budget, with less than one step left
        assert outcome.stopped_by_budget
        assert budget - outcome.flops < problem.evaluation_flops(Candidate(0, outcome.best_masks, 4))
    # half the budget: half the work (or less), never more than the budget
    smaller = run_method(method, _problem(digits, space), budget_flops=budget // 2)
    assert 0 < smaller.flops <= budget // 2


def test_a_budget_below_one_evaluation_is_an_error_not_an_empty_result(digits):
    problem = _problem(digits, "weight")
    with pytest.raises(RuntimeError, match="evaluated no candidate: the budget of 1000 FLOPs"):
        run_method("search", problem, budget_flops=1000)


# ------------------------------------------------------------------------------------------------ methods
def test_aging_evolution_removes_the_oldest_member_not_the_worst(digits):
    problem = _problem(digits, "weight")
    evolution = RegularizedEvolution(problem, random_search_flops(problem) * 2, population=3, tournament=2)
    outcome = evolution.run()
    told = [entry["id"] for entry in outcome.evaluations]
    assert len(told) > 5 and told == sorted(told)
    assert evolution.removed == told[: len(told) - 3]  # first in, first out, whatever their scores
    assert list(evolution.population) == told[-3:]
    scores = {entry["id"]: entry["score"] for entry in outcome.evaluations}
    assert outcome.best_score == max(scores.values())
    # children are mutations: same per-layer counts as the weight space prescribes
    for masks in evolution.masks.values():
        assert {name: int(mask.sum()) for name, mask in masks.items()} == problem.space.keep_counts


def test_successive_halving_promotes_the_best_to_longer_training(digits):
    problem = _problem(digits, "node", n_candidates=6)
    halving = SuccessiveHalving(problem, random_search_flops(problem))
    outcome = halving.run()
    assert len(halving.rung_steps) >= 2 and halving.rung_steps == sorted(halving.rung_steps)
    first, second = halving.results[0], halving.results[1]
    assert len(first) > len(second) >= 2
    ranked = sorted(first, key=lambda e: (e.score, -e.loss), reverse=True)
    assert {e.candidate_id for e in second} == {e.candidate_id for e in ranked[: len(second)]}
    assert all(e.steps == halving.rung_steps[1] for e in second)
    last = halving.results[-1]
    assert outcome.best_id in {e.candidate_id for e in last}
    assert outcome.flops <= outcome.budget_flops
    # a promotion continues training: its cost is the extra steps only
    promoted = second[0]
    assert promoted.flops < problem.evaluation_flops(
        Candidate(0, halving.masks[promoted.candidate_id], halving.rung_steps[1])
    )


def test_tpe_proposes_allocations_with_the_fixed_global_budget(digits):
    problem = _problem(digits, "allocation")
    tpe = TPESearch(problem, random_search_flops(problem) * 3, n_startup=3)
    tpe.run()
    space: AllocationSpace = problem.space
    allocations = set()
    for masks in tpe.masks.values():
        counts = space.counts(masks)
        assert sum(counts.values()) == space.total_keep
        assert all(1 <= counts[name] <= space.sizes[name] for name in counts)
        allocations.add(tuple(counts.values()))
    assert len(allocations) > 3  # it searched allocations, not one point
    base = space.counts_from_logits(dict.fromkeys(space.layers, 0.0))
    assert tuple(base.values()) in allocations  # the base distribution is its first trial


@pytest.mark.parametrize("space", ["weight", "allocation"])
def test_dass_learns_a_mask_that_meets_the_sparsity_exactly(digits, space):
    problem = _problem(digits, space, sparsity=0.85)
    outcome = run_method("dass", problem, budget_flops=random_search_flops(problem) * 3)
    masks = outcome.best_masks
    kept = sum(int(mask.sum()) for mask in masks.values())
    total = sum(mask.numel() for mask in masks.values())
    assert kept == round(0.15 * total)
    if space == "weight":
        assert {name: int(mask.sum()) for name, mask in masks.items()} == problem.space.keep_counts
    assert all(mask.any() for mask in masks.values())
    steps = outcome.evaluations[0]["steps"]
    assert steps > 10 and outcome.flops <= outcome.budget_flops
    # learning moved the mask away from magnitude pruning at initialisation (its starting point)
    start = DASS(problem, 10**12)
    weights = {name: p for name, p in _parent().named_parameters() if name.endswith("weight")}
    first = hard_masks(start.initial_scores(weights), start.space)
    assert sum(int(first[name].sum()) for name in first) == kept
    assert any(not torch.equal(first[name], masks[name]) for name in masks)


# ------------------------------------------------------------------------------------------------ spaces
def test_allocation_space_samples_and_mutations_keep_the_global_budget_exactly():
    model = build_model("cnn", (1, 40), 10, widths=(8, 16, 16), seed=0)
    space = AllocationSpace(model, 0.95)
    generator = torch.Generator().manual_seed(0)
    samples = [space.sample(generator) for _ in range(5)]
    for masks in samples:
        assert sum(int(m.sum()) for m in masks.values()) == space.total_keep
        assert weight_sparsity(masks) == pytest.approx(space.achieved_sparsity)
    assert len({tuple(space.counts(m).values()) for m in samples}) == 5  # allocations differ
    child = space.mutate(samples[0], generator)
    before, after = space.counts(samples[0]), space.counts(child)
    changed = [name for name in before if before[name] != after[name]]
    assert len(changed) == 2 and sum(after.values()) == space.total_keep
    # extreme factors cap a layer at its size and hand the rest to the others, total unchanged
    layers = space.layers
    counts = space.counts_from_logits({name: (10.0 if name == layers[0] else -10.0) for name in layers})
    assert counts[layers[0]] == space.sizes[layers[0]] and sum(counts.values()) == space.total_keep
    assert all(count >= 1 for count in counts.values())


def test_node_and_weight_mutations_stay_in_their_space():
    model = _parent()
    generator = torch.Generator().manual_seed(1)
    node = NodeSpace(model, 0.7)
    masks = node.sample(generator)
    child = mutate(node, masks, generator)
    assert weight_sparsity(child) == pytest.approx(weight_sparsity(masks))
    assert any(not torch.equal(child[n], masks[n]) for n in masks)
    for name, units in node.kept_units_of(child).items():
        assert int(units.sum()) == node.kept_units[name]
    weight = WeightSpace(model, 0.7)
    masks = weight.sample(generator)
    child = mutate(weight, masks, generator)
    assert {n: int(m.sum()) for n, m in child.items()} == weight.keep_counts
    assert sum(int((child[n] != masks[n]).sum()) for n in masks) > 0


class ResidualAttentionNet(nn.Module):
    """Not the package's own: a conv stem with BatchNorm, a residual block and multi-head attention."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(1, 8, 3, padding=1)
        self.norm = nn.BatchNorm1d(8)
        self.block = nn.Conv1d(8, 8, 3, padding=1)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm(self.stem(x.view(len(x), 1, -1))))
        h = h + torch.relu(self.block(h))
        tokens = h.transpose(1, 2)
        attended, _ = self.attention(tokens, tokens, tokens)
        return self.head((tokens + attended).mean(dim=1))


def _foreign() -> nn.Module:
    torch.manual_seed(0)
    return ResidualAttentionNet()


@pytest.mark.parametrize(("method", "space"), [("dass", "allocation"), ("evolution", "allocation"), ("sh", "weight")])
def test_methods_work_on_a_model_that_is_not_the_packages_own(digits, method, space):
    problem = SearchProblem(
        make_space(space, _foreign(), 0.8), _foreign, digits, seed=0, short_train_steps=6, n_candidates=3, batch_size=32
    )
    outcome = run_method(method, problem, space_name=space)
    assert outcome.flops <= outcome.budget_flops
    assert weight_sparsity(outcome.best_masks) == pytest.approx(problem.space.achieved_sparsity)
    assert "attention.out_proj.weight" in outcome.best_masks and math.isfinite(outcome.best_score)


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_methods_spaces_and_budgets_are_refused_before_anything_runs(digits):
    with pytest.raises(UnknownNameError, match=r"unknown search method 'bayes'; allowed: .*search.*sh.*tpe"):
        SEARCH_METHODS.get("bayes")
    with pytest.raises(
        ValueError, match="search method 'tpe' does not fit search space 'node'; 'tpe' searches: allocation"
    ):
        run_method("tpe", _problem(digits, "node"), space_name="node")
    with pytest.raises(ValueError, match="'dass' searches: weight, allocation"):
        DASS(_problem(digits, "node"), 10**9)
    with pytest.raises(ValueError, match="the search budget must be a positive number of FLOPs, got 0"):
        run_method("sh", _problem(digits, "weight"), budget_flops=0)
    with pytest.raises(ValueError, match="the search budget must be a positive number of FLOPs, got 0"):
        _problem(digits, "weight", budget_flops=0)
    with pytest.raises(ValueError, match="search method 'sh' needs scorer 'short-train', got 'synflow'"):
        run_method("sh", _problem(digits, "weight", scorer="synflow"))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"arms": ["tpe-node"]}, "search method 'tpe' does not fit search space 'node'; 'tpe' searches: allocation"),
        ({"arms": ["dass-node"]}, "'dass' searches: weight, allocation"),
        (
            {"arms": ["sh-channels"]},
            "unknown search space 'channels' in arm 'sh-channels'; allowed spaces: node, weight",
        ),
        ({"arms": ["bayes-node"]}, "'bayes' is neither a search method nor 'random' (allowed: random, search, sh"),
        ({"search": {"budget_flops": 0}}, "the search budget must be a positive number of FLOPs (e.g. 2e11), got 0"),
        ({"search": {"budget_flops": -5e9}}, "got -5000000000.0"),
    ],
)
def test_study_files_with_bad_methods_or_budgets_are_refused(change, expected):
    study = {"name": "bad", "dataset": "digits", "sparsities": [0.9], **change}
    with pytest.raises(ValueError) as error:
        parse_study_config(study)
    assert expected in str(error.value)


def test_a_study_runs_every_method_and_records_its_budget(tmp_path):
    config = parse_study_config(
        {
            "name": "methods",
            "dataset": "digits",
            "sparsities": [0.9],
            "seeds": [0],
            "model": {"arch": "mlp", "widths": [48, 32]},
            "budget": {"epochs": 1, "batch_size": 64},
            "search": {"n_candidates": 3, "short_train_steps": 6},
            "arms": [
                "random-allocation",
                "search-allocation",
                "sh-weight",
                "evolution-allocation",
                "tpe-allocation",
                "dass-allocation",
            ],
        }
    )
    run = run_study(config, store_path=tmp_path / "m.sqlite", executor=InlineExecutor(), show_progress=False)
    assert run.failed == {} and len(run.finished) == 6
    with StudyStore(tmp_path / "m.sqlite", create=False) as store:
        rows = {row["arm"]: row for row in store.trial_rows("methods")}
    searches = {arm: json.loads(row["search_json"]) for arm, row in rows.items() if row["search_json"]}
    assert set(searches) == {
        "search-allocation",
        "sh-weight",
        "evolution-allocation",
        "tpe-allocation",
        "dass-allocation",
    }
    allocation_budget = searches["search-allocation"]["budget_flops"]
    assert searches["search-allocation"]["flops"] == allocation_budget  # Random Search spends exactly its budget
    for arm, search in searches.items():
        assert search["method"] == arm.split("-")[0] and 0 < search["flops"] <= search["budget_flops"]
        if arm.endswith("allocation"):
            assert search["budget_flops"] == allocation_budget  # one budget per cell, whatever the method
        # the searched arm's training FLOPs include the search
        assert rows[arm]["train_flops"] > search["flops"]
    for row in rows.values():
        assert row["weight_sparsity"] == pytest.approx(0.9, abs=1e-3)
    # the report puts the methods side by side against random-<space> and search-<space>
    report = write_report(tmp_path / "m.sqlite", folder=tmp_path / "report")
    by_arm = {f"{row.method}-{row.space}": row for row in report.methods}
    assert set(by_arm) == set(searches)
    tpe = by_arm["tpe-allocation"]
    accuracy = {arm: row["test_accuracy"] for arm, row in rows.items()}
    assert tpe.vs_random_mean == pytest.approx(accuracy["tpe-allocation"] - accuracy["random-allocation"])
    assert tpe.vs_search_mean == pytest.approx(accuracy["tpe-allocation"] - accuracy["search-allocation"])
    assert tpe.random_wins == int(accuracy["tpe-allocation"] > accuracy["random-allocation"]) and tpe.random_pairs == 1
    assert by_arm["sh-weight"].random_pairs == 0 and by_arm["sh-weight"].vs_random_mean is None  # no random-weight
    assert tpe.search_flops == searches["tpe-allocation"]["flops"] and tpe.budget_flops == allocation_budget
    assert "Search methods side by side" in report.files.html.read_text()


def test_candidates_evaluated_in_parallel_give_the_same_search(digits):
    from sparsearch.search.methods import ParallelEvaluator

    in_order = run_method("sh", _problem(digits, "weight"))
    problem = _problem(digits, "weight")
    with ParallelEvaluator(problem, 2) as pool:
        parallel = run_method("sh", problem, evaluate_many=pool)
    strip = [{k: v for k, v in entry.items() if k != "seconds"} for entry in in_order.evaluations]
    assert strip == [{k: v for k, v in entry.items() if k != "seconds"} for entry in parallel.evaluations]
    assert parallel.best_id == in_order.best_id and parallel.flops == in_order.flops
    with pytest.raises(ValueError, match="search workers must be a positive integer, got 0"):
        ParallelEvaluator(problem, 0)
