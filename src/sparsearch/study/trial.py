"""One trial of a study, end to end: data, parent model, the arm's mask or sparsifier, training, metrics.

Arms:
- ``dense``: the parent, trained as is (once per seed).
- ``random-<space>``: one unscored sample from the space at the target sparsity, trained with fixed masks.
- ``<method>-<space>``: the search method (``search`` = Random Search, ``sh``, ``evolution``, ``tpe``, ``dass``;
  ``sparsearch.search.SEARCH_METHODS``) over the same space under the study's search budget, the winner
  trained with fixed masks. The random counterpart and the candidates come from independent generators
  derived from (seed, sparsity, arm), so neither sees the other's draws.
- every name in ``sparsearch.algorithms.ARMS``: that algorithm's sparsifier drives training.

Every arm at a seed starts from the same parent initialisation and sees the same data order and budget.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sparsearch.algorithms import ARMS, ArmSetting
from sparsearch.data import DataSplits
from sparsearch.engine.sparsifier import Sparsifier, StaticMaskSparsifier, default_sparsifiable_parameters
from sparsearch.models import count_flops, parameter_counts
from sparsearch.search import (
    ParallelEvaluator,
    SearchOutcome,
    SearchProblem,
    SearchSpace,
    check_method_fits,
    make_space,
    node_sparsity,
    parallel_candidates_unavailable,
    random_search_flops,
    weight_sparsity,
)
from sparsearch.study.config import StudyConfig, split_mask_arm
from sparsearch.study.inputs import StudyInputs
from sparsearch.study.store import EpochRow, TrialOutcome, TrialSpec
from sparsearch.training import EpochMetrics, train


def derive_seed(*parts: object) -> int:
    """A 63-bit seed that depends on every part (stable across processes and Python versions)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _weight_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Where the masked (Linear/Conv) weights are non-zero after training."""
    return {name: param.detach() != 0 for name, param in default_sparsifiable_parameters(model).items()}


def _algorithm_factory(
    config: StudyConfig, spec: TrialSpec, data: DataSplits, steps_per_epoch: int
) -> Callable[[int], Sparsifier]:
    factory = ARMS.get(spec.arm)
    # one seeded batch for the arms that score at initialisation; its own generator, so no other draw moves
    generator = torch.Generator().manual_seed(derive_seed(spec.seed, spec.sparsity, spec.arm, "batch"))
    rows = torch.randperm(len(data.y_train), generator=generator)[: config.budget.batch_size]

    def build(total_steps: int) -> Sparsifier:
        return factory(
            ArmSetting(
                sparsity=spec.sparsity,
                total_steps=total_steps,
                steps_per_epoch=steps_per_epoch,
                seed=derive_seed(spec.seed, spec.sparsity, spec.arm),
                distribution=config.search.distribution,
                batch=(data.x_train[rows], data.y_train[rows]),
            )
        )

    return build


def run_trial(inputs: StudyInputs, spec: TrialSpec, on_epoch: Callable[[EpochRow], None] | None = None) -> TrialOutcome:
    """Run one trial and return its final metrics and curve; ``on_epoch`` sees each epoch as it ends."""
    config = inputs.config
    started = time.perf_counter()
    data = inputs.load_data(spec.seed)

    def parent() -> nn.Module:
        return inputs.build_model(spec.seed, data)

    model = parent()
    mask_arm = split_mask_arm(spec.arm)
    notes: list[str] = []
    search_info: dict[str, Any] | None = None
    space: SearchSpace | None = None
    sparsifier_factory: Callable[[int], Sparsifier] | None = None
    if spec.arm == "dense":
        pass
    elif mask_arm is not None and mask_arm[0] == "random":
        space = make_space(mask_arm[1], model, spec.sparsity, distribution=config.search.distribution)
        masks = space.sample(torch.Generator().manual_seed(derive_seed(spec.seed, spec.sparsity, spec.arm)))
        sparsifier_factory = _static(masks)
    elif mask_arm is not None:
        space = make_space(mask_arm[1], model, spec.sparsity, distribution=config.search.distribution)
        workers, why_in_order = candidate_workers(inputs)
        if why_in_order:
            notes.append(why_in_order)
        outcome = run_search_arm(config, spec, mask_arm[0], space, mask_arm[1], parent, data, workers=workers)
        search_info = {
            "scorer": config.search.scorer,
            "n_candidates": config.search.n_candidates,
            "workers": workers,
            "scores": [float(entry["score"]) for entry in outcome.evaluations],
            "best_index": next(i for i, entry in enumerate(outcome.evaluations) if entry["id"] == outcome.best_id),
            **outcome.summary(),
        }
        sparsifier_factory = _static(outcome.best_masks)
    else:
        steps_per_epoch = math.ceil(len(data.y_train) / config.budget.batch_size)
        sparsifier_factory = _algorithm_factory(config, spec, data, steps_per_epoch)

    def report_epoch(metrics: EpochMetrics) -> None:
        if on_epoch is not None:
            on_epoch(_epoch_row(metrics))

    trained = train(
        model, data, config.budget, seed=spec.seed, sparsifier_factory=sparsifier_factory, on_epoch=report_epoch,
        sparse_kernels=config.sparse_kernels,
    )
    params_total, params_nonzero = parameter_counts(model)
    flops = count_flops(model, data.input_shape)
    final_masks = _weight_masks(model)
    return TrialOutcome(
        test_accuracy=float(trained.final_test_accuracy),
        val_accuracy=float(trained.final_val_accuracy),
        params_total=int(params_total),
        params_nonzero=int(params_nonzero),
        flops_dense=int(flops.dense),
        flops_nonzero=int(flops.nonzero),
        # the searched arm pays for scoring its candidates too
        train_flops=int(trained.train_flops) + (search_info["flops"] if search_info else 0),
        weight_sparsity=float(weight_sparsity(final_masks)),
        node_sparsity=_node_sparsity(model, final_masks),
        train_seconds=float(trained.seconds),
        wall_seconds=time.perf_counter() - started,
        epochs=tuple(_epoch_row(metrics) for metrics in trained.epochs),
        search=search_info,
        notes=tuple(str(note) for note in getattr(space, "notes", ())) + tuple(notes),
    )


def _node_sparsity(model: nn.Module, masks: dict[str, torch.Tensor]) -> float:
    """Fraction of hidden units removed; NaN for a model whose units the node analysis cannot find."""
    try:
        return float(node_sparsity(model, masks))
    except (TypeError, ValueError):
        return math.nan


def candidate_workers(inputs: StudyInputs) -> tuple[int, str]:
    """Processes this trial's search evaluates candidates on, and why it is 1 if more were asked for ("" else).

    More than one needs a process that may fork children: the trial's own under the inline and process
    executors (the process executor's workers are not daemonic); where it cannot, the search runs its
    candidates in order and the trial's notes say why.
    """
    if inputs.search_workers_note:
        return 1, inputs.search_workers_note
    if inputs.search_workers == 1:
        return 1, ""
    reason = parallel_candidates_unavailable()
    if reason is not None:
        return 1, f"search workers = {inputs.search_workers} asked, candidates ran in order: {reason}"
    return inputs.search_workers, ""


def run_search_arm(
    config: StudyConfig,
    spec: TrialSpec,
    method: str,
    space: SearchSpace,
    space_name: str,
    parent: Callable[[], nn.Module],
    data: DataSplits,
    *,
    workers: int = 1,
) -> SearchOutcome:
    """Run the arm's search method under the study's search budget and return its outcome.

    The budget is ``search.budget_flops`` or else what Random Search spends in the same space, sparsity and
    seed (its candidates drawn with the ``search-<space>`` arm's seed, so every method of a cell gets the
    same number even where candidates differ in cost, as in the allocation space). With ``workers`` > 1 each
    batch the method asks for is evaluated on that many forked processes; the outcome is the same.
    """
    method_class = check_method_fits(method, space_name)

    def problem(seed: int) -> SearchProblem:
        return SearchProblem(
            space,
            parent,
            data,
            seed=seed,
            scorer=config.search.scorer,
            short_train_steps=config.search.short_train_steps,
            n_candidates=config.search.n_candidates,
            batch_size=config.search.batch_size,
            train_budget=config.budget,
            budget_flops=config.search.budget_flops,
            sparse_kernels=config.sparse_kernels,
        )

    searched = problem(derive_seed(spec.seed, spec.sparsity, spec.arm))
    budget = config.search.budget_flops or random_search_flops(
        problem(derive_seed(spec.seed, spec.sparsity, f"search-{space_name}"))
    )
    if workers == 1:
        return method_class(searched, budget).run()
    with ParallelEvaluator(searched, workers) as pool:
        return method_class(searched, budget).run(pool)


def _static(masks: dict[str, torch.Tensor]) -> Callable[[int], Sparsifier]:
    def build(total_steps: int) -> Sparsifier:
        return StaticMaskSparsifier(masks)

    return build


def _epoch_row(metrics: EpochMetrics) -> EpochRow:
    return EpochRow(
        epoch=int(metrics.epoch),
        step=int(metrics.step),
        train_loss=float(metrics.train_loss),
        val_accuracy=float(metrics.val_accuracy),
        test_accuracy=float(metrics.test_accuracy),
        seconds=float(metrics.seconds),
    )
