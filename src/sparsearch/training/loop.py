"""The one training loop: every study arm and the short-training search score run it (same budget, same seed
-> same numbers).

``train(model, data, budget, seed=...)`` trains with SGD (momentum) or AdamW and a constant or per-step cosine
learning rate, optionally under a Sparsifier built by ``sparsifier_factory(total_steps)``, and evaluates the
validation and test accuracy after every epoch. Determinism: the weights come from the model's own seed
(``build_model(seed=...)``); the loop seeds torch with ``seed``, shuffles with a ``torch.Generator`` seeded
with ``seed``, and runs with ``torch.use_deterministic_algorithms(True, warn_only=True)`` (restored
afterwards). Results are bit-identical for the same seed, torch build, device and thread count. Batches move
to the device of the model's parameters, so a model on a GPU trains there.

``steps=k`` trains exactly k optimizer steps instead of ``budget.epochs`` epochs (the last epoch cut short):
the short-training search score is ``train(..., steps=k, evaluate="end", test=False)``.

Training FLOPs come from :class:`sparsearch.models.FlopMeter`: 3x the non-zero forward FLOPs per sample seen
(forward, input-gradient and weight-gradient passes), measured on the weights at every step, and the dense
weight-gradient pass instead of the sparse one on the steps where the sparsifier asked for dense gradients
(``dense_gradient_steps``).

Cost on this project's machine (AMD EPYC, 1 thread, batch 128, MNIST-1D with 7,200 train samples, other load
present; ``python benchmarks/training_speed.py`` -> benchmarks/results/training_speed.md): one epoch of the
MLP (512, 512, 256) takes ~0.6-0.8 s (15 epochs ~9-12 s, 71% test), MLP (256, 256) ~0.16-0.23 s (65%),
CNN (32, 64, 64) ~1.2-1.6 s (96%), CNN (16, 32, 32) ~0.6-0.8 s (96%). Masked (sparse) arms cost the same as
dense ones: masks are applied to dense weights. Use one thread per worker (``torch.set_num_threads(1)``):
with two busy threads per process on a shared 2-core machine small models train up to ~10x slower.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Literal

import pydantic
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsearch.data.splits import DataSplits
from sparsearch.engine.replaceable import reason_to_keep_dense, replace_module
from sparsearch.engine.sparsifier import Sparsifier
from sparsearch.kernels import PanelCSRMatrix, SparseLinear
from sparsearch.models.flops import FlopCount, FlopMeter

EVAL_BATCH_SIZE = 1024
# `sparse_kernels=True` moves a static mask's nn.Linear layers onto the kernels when they are kept at most this dense
# (the default of runtime.for_training; above it the dense products are about as fast)
KERNEL_MAX_DENSITY = 0.3


class TrainBudget(pydantic.BaseModel):
    """How long and how a network is trained; every arm of a study gets the same budget."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    epochs: int = pydantic.Field(20, ge=1)
    batch_size: int = pydantic.Field(128, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = pydantic.Field(0.05, gt=0)
    momentum: float = pydantic.Field(0.9, ge=0, lt=1)
    weight_decay: float = pydantic.Field(5e-4, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "cosine"

    def steps_per_epoch(self, n_train: int) -> int:
        """Optimizer steps in one epoch over ``n_train`` samples (the last batch may be smaller)."""
        return math.ceil(n_train / self.batch_size)

    def total_steps(self, n_train: int) -> int:
        """Optimizer steps of the whole budget: epochs * ceil(n_train / batch_size)."""
        return self.epochs * self.steps_per_epoch(n_train)


@dataclass
class EpochMetrics:
    """What one epoch produced; ``step`` is the number of optimizer steps done so far.

    Accuracies and the validation loss are NaN for a split that was not evaluated after this epoch.
    """

    epoch: int
    train_loss: float
    val_accuracy: float
    test_accuracy: float
    seconds: float
    step: int
    val_loss: float = math.nan


@dataclass
class TrainResult:
    """Per-epoch metrics and the final state of one training run."""

    epochs: list[EpochMetrics]
    final_val_accuracy: float
    final_test_accuracy: float
    seconds: float
    train_flops: int
    final_val_loss: float = math.nan
    forward_flops: FlopCount | None = None  # of the trained model, per sample (dense and non-zero)


def make_optimizer(model: nn.Module, budget: TrainBudget) -> torch.optim.Optimizer:
    """The budget's optimizer over all parameters of ``model``."""
    if budget.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=budget.lr, momentum=budget.momentum, weight_decay=budget.weight_decay
        )
    # fused: one kernel per step, and it avoids the unfused CPU path's torch.sqrt, which is ~8x slower on the
    # exact zeros that masked Adam state holds (benchmarks/engine_overhead.py measures both).
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in model.parameters())
    return torch.optim.AdamW(model.parameters(), lr=budget.lr, weight_decay=budget.weight_decay, fused=fused or None)


def make_scheduler(
    optimizer: torch.optim.Optimizer, budget: TrainBudget, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step schedule: constant, or cosine from ``lr`` down to 0 at ``total_steps``."""
    if budget.lr_schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    )


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = EVAL_BATCH_SIZE) -> tuple[float, float]:
    """(accuracy, mean cross-entropy loss) of ``model`` on ``x, y``, in batches, in eval mode."""
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    device = _device_of(model)
    for start in range(0, len(y), batch_size):
        logits = model(x[start : start + batch_size].to(device))
        target = y[start : start + batch_size].to(device)
        correct += int((logits.argmax(dim=1) == target).sum())
        loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
    model.train(was_training)
    return correct / len(y), loss_sum / len(y)


def batch_order(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Index batches of one shuffled epoch (drawn from ``generator``; the last batch may be smaller)."""
    permutation = torch.randperm(n, generator=generator)
    yield from permutation.split(batch_size)


@contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """Run the block with deterministic algorithms (warn-only) and restore the previous setting."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    # warn_only: an op without a deterministic kernel (or CUDA without CUBLAS_WORKSPACE_CONFIG) warns, not fails
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn_only)


def kernel_layers(model: nn.Module, sparsifier: Sparsifier | None) -> dict[str, nn.Linear]:
    """The layers `train(..., sparse_kernels=True)` moves onto the sparse kernels, for the steps on which the
    sparsifier keeps its masks (`Sparsifier.masks_fixed_for_next_step`: every step of a static mask, the steps
    between updates of SET, RigL and GMP): those it masks that are CPU float32 `nn.Linear` layers kept at most
    KERNEL_MAX_DENSITY dense (now) and replaceable (weight not tied, not read by the parent, not the model itself: a
    bare layer has no parent to be replaced in). Its other layers train masked as usual."""
    if sparsifier is None or not sparsifier.masks_weights:
        return {}
    layers = {}
    for name, mask in sparsifier.masks.items():
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        if (module_name and leaf == "weight" and type(module) is nn.Linear and module.weight.dtype == torch.float32
                and module.weight.device.type == "cpu" and float(mask.float().mean()) <= KERNEL_MAX_DENSITY
                and reason_to_keep_dense(model, module_name) is None):
            layers[module_name] = module
    return layers


@contextmanager
def on_kernels(model: nn.Module, layers: dict[str, nn.Linear], masks: dict[str, Tensor],
               optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Within the block, each of `layers` is replaced in `model` by a trainable `SparseLinear` holding the entries
    its mask keeps, and in `optimizer` its weight and bias by the new layer's values and bias, with their optimizer
    state (momentum, Adam's moments) taken at the kept entries, so a run can move onto the kernels after it has
    stepped (a resumed short training). On exit the trained values and their state are written back into the
    layer's weight and state (the other entries' state as it was) and the layer and the optimizer's parameters are
    put back, so model and optimizer are what masked training would have left (to summation order). The
    sparsifier keeps its hooks on the same optimizer: the layers that stay in the model stay masked as before."""
    swapped = {}
    for name, linear in layers.items():
        matrix = PanelCSRMatrix.from_mask(linear.weight, masks[f"{name}.weight"])
        swapped[name] = SparseLinear(matrix, linear.bias, trainable=True)
    # (dense parameter, its replacement, the matrix whose entries the state is taken at, or None: same shape)
    pairs = [(linear.weight, swapped[name].values, swapped[name].matrix) for name, linear in layers.items()]
    pairs += [(linear.bias, swapped[name].bias, None) for name, linear in layers.items() if linear.bias is not None]
    dense_state = {id(old): optimizer.state.pop(old) for old, _, _ in pairs if old in optimizer.state}
    for old, new, matrix in pairs:
        if id(old) in dense_state:
            optimizer.state[new] = {key: matrix.gather(value) if _per_entry(value, old) and matrix is not None
                                    else value.clone() if isinstance(value, Tensor) else value
                                    for key, value in dense_state[id(old)].items()}
    replacement = {id(old): new for old, new, _ in pairs}
    groups = [group["params"] for group in optimizer.param_groups]
    try:
        for name, sparse in swapped.items():
            replace_module(model, name, sparse)
        for group in optimizer.param_groups:
            group["params"] = [replacement.get(id(param), param) for param in group["params"]]
        yield
    finally:
        with torch.no_grad():
            for name, linear in layers.items():
                sparse = swapped[name]
                linear.weight.copy_(sparse.matrix.to_dense())
                if linear.bias is not None:
                    linear.bias.copy_(sparse.bias)
                replace_module(model, name, linear)
            for group, params in zip(optimizer.param_groups, groups, strict=True):
                group["params"] = params
            for old, new, matrix in pairs:
                if new not in optimizer.state:
                    continue
                before = dense_state.get(id(old), {})
                optimizer.state[old] = {
                    key: matrix.scatter(value, before[key].clone() if key in before else torch.zeros_like(old))
                    if matrix is not None and _per_entry(value, new) else value
                    for key, value in optimizer.state.pop(new).items()}


def _per_entry(value: object, param: Tensor) -> bool:
    """Whether an optimizer state value holds one number per entry of `param` (momentum, Adam's moments), not a
    scalar such as Adam's step count."""
    return isinstance(value, Tensor) and value.dim() > 0 and value.shape == param.shape


class KernelSwitch:
    """A sparsifier's masked layers on the sparse kernels (`on_kernels`) for the steps on which it keeps its
    masks, back on the dense layers for the others (a mask update reads dense weights and gradients); the layers are
    chosen again after such a step, since the masks may have changed. What `train(sparse_kernels=True)` uses, and
    usable in your own loop: call `before_step()` before each step's forward pass; leaving the `with` block puts
    the dense layers back (the model and optimizer then are what masked training leaves)."""

    def __init__(self, model: nn.Module, sparsifier: Sparsifier, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.sparsifier, self.optimizer = model, sparsifier, optimizer
        self._active: AbstractContextManager[None] | None = None
        self._layers: dict[str, nn.Linear] | None = None  # None: choose again (the masks may have changed)

    def before_step(self) -> None:
        fixed = self.sparsifier.masks_fixed_for_next_step()
        if fixed and self._active is None:
            if self._layers is None:
                self._layers = kernel_layers(self.model, self.sparsifier)
            if self._layers:
                self._active = on_kernels(self.model, self._layers, self.sparsifier.masks, self.optimizer)
                self._active.__enter__()
        elif not fixed:
            self._leave()
            self._layers = None

    def live_weights(self) -> dict[str, Tensor]:
        """The stored non-zeros of the layers now on the kernels, by weight name: their dense weights are only
        written back when the layers leave, so FLOPs are counted on these (`FlopMeter.add_step`'s weights)."""
        if self._active is None or not self._layers:
            return {}
        return {f"{name}.weight": self.model.get_submodule(name).values.detach() for name in self._layers}

    def _leave(self) -> None:
        if self._active is not None:
            active, self._active = self._active, None
            active.__exit__(None, None, None)

    def __enter__(self) -> KernelSwitch:
        return self

    def __exit__(self, *exc: object) -> None:
        self._leave()


def train(
    model: nn.Module,
    data: DataSplits,
    budget: TrainBudget,
    *,
    seed: int,
    sparsifier_factory: Callable[[int], Sparsifier] | None = None,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    steps: int | None = None,
    evaluate_after: Literal["every-epoch", "end"] = "every-epoch",
    test: bool = True,
    sparse_kernels: bool = False,
) -> TrainResult:
    """Train ``model`` on ``data.x_train`` for ``budget.epochs`` epochs (or ``steps`` steps) and evaluate it.

    Args:
        model: the network (trained in place).
        data: train / validation / test splits.
        budget: epochs, batch size, optimizer and learning-rate schedule.
        seed: seeds torch and the shuffling generator.
        sparsifier_factory: called with the total number of optimizer steps; the Sparsifier it returns is
            attached to the model and the optimizer before the first step and stays attached afterwards
            (its masks live with the model as buffers).
        on_epoch: called with each epoch's metrics as soon as they exist (e.g. to stream them to a store).
        steps: train exactly this many optimizer steps instead of ``budget.epochs`` epochs.
        evaluate_after: evaluate after every epoch, or only after the last one.
        test: evaluate the test split too (False: validation only, as a search score must).
        sparse_kernels: train the masked layers that `kernel_layers` finds suitable on the sparse kernels (forward
            and backward cost per kept weight) on every step where the sparsifier keeps its masks (a static mask:
            all; SET, RigL, GMP: those between updates), the others masked as usual; the same arithmetic as masked
            training summed in another order, so results match it to float rounding, not bit for bit. The model
            is left as masked training leaves it.
    """
    if not isinstance(budget, TrainBudget):
        raise TypeError(f"budget must be a TrainBudget, got {type(budget).__name__}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    started = time.perf_counter()
    n_train = len(data.y_train)
    total_steps = budget.total_steps(n_train) if steps is None else steps
    epochs = budget.epochs if steps is None else math.ceil(steps / budget.steps_per_epoch(n_train))
    torch.manual_seed(seed)
    shuffle_generator = torch.Generator().manual_seed(seed)
    optimizer = make_optimizer(model, budget)
    scheduler = make_scheduler(optimizer, budget, total_steps)
    sparsifier = sparsifier_factory(total_steps) if sparsifier_factory is not None else None
    if sparsifier is not None:
        sparsifier.attach(model, optimizer)
    flops = FlopMeter(model, data.input_shape)  # on the masked layers: their pattern is what the kernels compute
    device = _device_of(model)
    history: list[EpochMetrics] = []
    step = 0
    kernels = KernelSwitch(model, sparsifier, optimizer) if sparse_kernels and sparsifier is not None else None
    model.train()
    with deterministic_algorithms(), kernels or nullcontext():
        for epoch in range(1, epochs + 1):
            epoch_started = time.perf_counter()
            loss_sum, seen = 0.0, 0
            for indices in batch_order(n_train, budget.batch_size, shuffle_generator):
                if kernels is not None:
                    kernels.before_step()
                dense_steps_before = sparsifier.dense_gradient_steps if sparsifier is not None else 0
                inputs, targets = data.x_train[indices].to(device), data.y_train[indices].to(device)
                loss = F.cross_entropy(model(inputs), targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                dense_gradient = sparsifier is not None and sparsifier.dense_gradient_steps > dense_steps_before
                flops.add_step(len(indices), dense_weight_gradient=dense_gradient,
                               weights=kernels.live_weights() if kernels is not None else None)
                loss_sum += float(loss.detach()) * len(indices)
                seen += len(indices)
                if step == total_steps:
                    break
            val_accuracy = val_loss = test_accuracy = math.nan
            if evaluate_after == "every-epoch" or epoch == epochs:
                val_accuracy, val_loss = evaluate(model, data.x_val, data.y_val)
                if test:
                    test_accuracy, _ = evaluate(model, data.x_test, data.y_test)
            metrics = EpochMetrics(
                epoch=epoch,
                train_loss=loss_sum / seen,
                val_accuracy=val_accuracy,
                test_accuracy=test_accuracy,
                seconds=time.perf_counter() - epoch_started,
                step=step,
                val_loss=val_loss,
            )
            history.append(metrics)
            if on_epoch is not None:
                on_epoch(metrics)
    return TrainResult(
        epochs=history,
        final_val_accuracy=history[-1].val_accuracy,
        final_test_accuracy=history[-1].test_accuracy,
        seconds=time.perf_counter() - started,
        train_flops=flops.total,
        forward_flops=flops.forward(),
        final_val_loss=history[-1].val_loss,
    )
