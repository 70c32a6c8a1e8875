"""Continual learning over a sequence of tasks: SparCL-style sparse training and three dense baselines.

:func:`train_continual` trains one model on tasks in order and measures, after every task, the accuracy on
every task seen so far (class-incremental: one head over all classes; task-incremental: argmax restricted to
the task's classes). Methods:

- ``finetune``: plain SGD on each task in turn (the forgetting baseline);
- ``replay``: experience replay, a reservoir buffer of past samples; every step adds a replay batch's loss;
- ``ewc``: elastic weight consolidation (online: one Fisher diagonal, accumulated after each task);
- ``sparcl``: SparCL-style (Wang et al., NeurIPS 2022) sparse continual learning, with the same replay buffer:
  *task-aware dynamic masking*: every Linear/Conv weight keeps a budget of (1 - sparsity) non-zeros; weights
  retained by earlier tasks are frozen; the current task trains the rest of the budget with RigL-style
  drop (smallest |w|) and grow (largest |gradient| among free positions) every ``update_every`` steps, and at
  the end of the task its ``budget / n_tasks`` largest weights are retained (the last task retains all it
  trained) while the others are freed for later tasks;
  *gradient masking*: the weight gradient is zero everywhere except on the current task's trainable weights,
  so no update touches another task's weights (a fresh optimizer per task keeps momentum from leaking).
  *Choice*: SparCL's dynamic data removal is left out; its gradient masking is used here for protection
  (the paper's version also drops low-magnitude gradients of the current weights to save computation).

Training FLOPs count 2 FLOPs per weight-multiply-accumulate for the forward pass and the input-gradient pass
over the non-zero weights, and for the weight-gradient pass over the weights that receive gradients (dense for
the dense methods; only the trainable ones for ``sparcl``, dense on its mask-update steps). EWC's Fisher
passes are counted as training steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsearch.engine.sparsifier import default_sparsifiable_parameters

Method = Literal["finetune", "replay", "ewc", "sparcl"]
METHODS: tuple[str, ...] = ("finetune", "replay", "ewc", "sparcl")


@dataclass(frozen=True)
class Task:
    """One task: its training and test samples and the classes it contains."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    classes: tuple[int, ...]


def split_by_classes(
    x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, classes_per_task: int = 2
) -> list[Task]:
    """Split a labelled data set into tasks of consecutive classes (0-1, 2-3, ... for Split-MNIST-style)."""
    labels = sorted(int(c) for c in torch.unique(y_train))
    if classes_per_task < 1 or len(labels) % classes_per_task:
        raise ValueError(
            f"{len(labels)} classes cannot be split into tasks of {classes_per_task}; use a divisor of {len(labels)}"
        )
    tasks = []
    for start in range(0, len(labels), classes_per_task):
        classes = tuple(labels[start : start + classes_per_task])
        train = torch.isin(y_train, torch.tensor(classes))
        test = torch.isin(y_test, torch.tensor(classes))
        tasks.append(Task(x_train[train], y_train[train], x_test[test], y_test[test], classes))
    return tasks


@dataclass
class ContinualResult:
    """``accuracy[i][j]``: accuracy on task j after training task i (j <= i), class- and task-incremental."""

    method: str
    accuracy: list[list[float]]
    task_accuracy: list[list[float]]
    train_flops: int
    final_density: float = 1.0
    seconds: float = 0.0

    @property
    def average_accuracy(self) -> float:
        """Mean class-incremental accuracy over all tasks after the last one."""
        return sum(self.accuracy[-1]) / len(self.accuracy[-1])

    @property
    def forgetting(self) -> float:
        """Mean over all but the last task of (best earlier accuracy - final accuracy), class-incremental."""
        return _forgetting(self.accuracy)

    @property
    def average_task_accuracy(self) -> float:
        return sum(self.task_accuracy[-1]) / len(self.task_accuracy[-1])

    @property
    def task_forgetting(self) -> float:
        return _forgetting(self.task_accuracy)


def _forgetting(matrix: list[list[float]]) -> float:
    tasks = len(matrix)
    if tasks < 2:
        return 0.0
    drops = [max(matrix[i][j] for i in range(j, tasks - 1)) - matrix[-1][j] for j in range(tasks - 1)]
    return sum(drops) / len(drops)


class ReplayBuffer:
    """Reservoir sampling over every training sample offered (Vitter's algorithm R), seeded."""

    def __init__(self, size: int, generator: torch.Generator) -> None:
        self.size, self.generator = size, generator
        self.seen = self.filled = 0
        self.x: Tensor | None = None
        self.y: Tensor | None = None

    def add(self, x: Tensor, y: Tensor) -> None:
        if self.x is None or self.y is None:
            self.x = torch.empty(self.size, *x.shape[1:], dtype=x.dtype)
            self.y = torch.empty(self.size, dtype=y.dtype)
        for sample, label in zip(x, y, strict=True):
            slot = self.filled if self.filled < self.size else int(
                torch.randint(0, self.seen + 1, (1,), generator=self.generator)
            )
            if slot < self.size:
                self.x[slot], self.y[slot] = sample, label
                self.filled = max(self.filled, slot + 1)
            self.seen += 1

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        """``n`` stored samples drawn with replacement."""
        assert self.x is not None and self.y is not None
        rows = torch.randint(0, self.filled, (n,), generator=self.generator)
        return self.x[rows], self.y[rows]


@dataclass
class TaskAwareMasks:
    """SparCL's masks per weight: ``retained`` (frozen, earlier tasks) and ``trainable`` (the current task)."""

    params: dict[str, nn.Parameter]
    sparsity: float
    n_tasks: int
    generator: torch.Generator
    retained: dict[str, Tensor] = field(init=False)
    trainable: dict[str, Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.retained = {name: torch.zeros_like(p, dtype=torch.bool) for name, p in self.params.items()}
        self.trainable = {name: torch.zeros_like(p, dtype=torch.bool) for name, p in self.params.items()}

    def budget(self, name: str) -> int:
        return round((1 - self.sparsity) * self.params[name].numel())

    @torch.no_grad()
    def start_task(self) -> None:
        """Give the current task the part of each budget no earlier task retained, at random free positions."""
        for name, param in self.params.items():
            free = ~self.retained[name]
            count = self.budget(name) - int(self.retained[name].sum())
            scores = torch.rand(param.shape, generator=self.generator).masked_fill_(~free, -1.0)
            chosen = torch.zeros(param.numel(), dtype=torch.bool)
            chosen[scores.flatten().topk(count).indices] = True
            self.trainable[name] = chosen.view_as(param) & free
            # positions outside the budget are zero; freshly given ones keep their (initial or freed) value
            param.mul_(self.active(name))

    def active(self, name: str) -> Tensor:
        return self.retained[name] | self.trainable[name]

    def mask_gradients(self) -> None:
        """Zero the weight gradient everywhere except on the current task's trainable weights."""
        for name, param in self.params.items():
            if param.grad is not None:
                param.grad.mul_(self.trainable[name])

    @torch.no_grad()
    def drop_and_grow(
        self, fraction: float, dense_gradients: dict[str, Tensor], optimizer: torch.optim.Optimizer
    ) -> None:
        """RigL-style update of the trainable set only: drop the smallest |w|, grow the largest |grad| among free."""
        for name, param in self.params.items():
            trainable = self.trainable[name]
            n = math.floor(fraction * int(trainable.sum()))
            if n == 0:
                continue
            drop_scores = torch.where(trainable, -param.abs(), -math.inf).flatten()
            dropped = torch.zeros(param.numel(), dtype=torch.bool)
            dropped[drop_scores.topk(n).indices] = True
            dropped = dropped.view_as(param)
            free = ~(self.retained[name] | (trainable & ~dropped))
            grow_scores = torch.where(free, dense_gradients[name].abs(), -math.inf).flatten()
            grown = torch.zeros(param.numel(), dtype=torch.bool)
            grown[grow_scores.topk(n).indices] = True
            grown = grown.view_as(param)
            self.trainable[name] = (trainable & ~dropped) | grown
            param.mul_(~(dropped & ~grown))  # dropped weights become zero; regrown-in-place keep their value
            param.masked_fill_(grown & ~trainable, 0.0)  # newly grown weights start at zero
            momentum = optimizer.state.get(param, {}).get("momentum_buffer")
            if momentum is not None:
                momentum.mul_(self.trainable[name])

    @torch.no_grad()
    def end_task(self, last: bool) -> None:
        """Retain this task's largest weights (its share of the budget, or all of them after the last task)."""
        for name, param in self.params.items():
            trainable = self.trainable[name]
            share = int(trainable.sum()) if last else min(int(trainable.sum()), self.budget(name) // self.n_tasks)
            scores = torch.where(trainable, param.abs(), -math.inf).flatten()
            keep = torch.zeros(param.numel(), dtype=torch.bool)
            if share:
                keep[scores.topk(share).indices] = True
            self.retained[name] |= keep.view_as(param)
            self.trainable[name] = torch.zeros_like(trainable)
            if last:
                param.mul_(self.retained[name])

    def density(self) -> float:
        total = sum(p.numel() for p in self.params.values())
        return sum(int(self.active(name).sum()) for name in self.params) / total


@torch.no_grad()
def _accuracy(model: nn.Module, task: Task, restrict: bool) -> float:
    model.eval()
    logits = model(task.x_test)
    if restrict:
        allowed = torch.full((logits.shape[1],), -math.inf)
        allowed[list(task.classes)] = 0.0
        logits = logits + allowed
    model.train()
    return float((logits.argmax(1) == task.y_test).float().mean())


def train_continual(
    model: nn.Module,
    tasks: Sequence[Task],
    method: Method,
    *,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    buffer_size: int = 200,
    ewc_lambda: float = 1000.0,
    ewc_samples: int = 200,
    sparsity: float = 0.8,
    update_every: int = 50,
    drop_fraction: float = 0.3,
    seed: int = 0,
) -> ContinualResult:
    """Train ``model`` on ``tasks`` in order with ``method``; see the module docstring for the methods.

    Biases and normalisation parameters are shared by all tasks and trained throughout (replay protects them).
    """
    if method not in METHODS:
        raise ValueError(f"unknown continual method {method!r}; allowed: {', '.join(METHODS)}")
    if not tasks:
        raise ValueError("no tasks given: continual learning needs at least one task")
    for index, task in enumerate(tasks):
        if len(task.y_train) == 0 or len(task.y_test) == 0:
            raise ValueError(
                f"task {index} (classes {task.classes}) is empty: it has {len(task.y_train)} training and "
                f"{len(task.y_test)} test samples; every task needs both"
            )
    if method == "sparcl" and not 0 <= sparsity < 1:
        raise ValueError(f"SparCL sparsity {sparsity} is outside [0, 1)")
    if method in ("replay", "sparcl") and buffer_size < 1:
        raise ValueError(f"{method} needs a replay buffer of at least 1 sample, got buffer_size={buffer_size}")
    started = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    weights = default_sparsifiable_parameters(model)
    uses = _weight_uses(model, weights, tasks[0].x_train[:1])
    buffer = ReplayBuffer(buffer_size, generator) if method in ("replay", "sparcl") else None
    masks = TaskAwareMasks(weights, sparsity, len(tasks), generator) if method == "sparcl" else None
    fisher: dict[str, Tensor] = {}
    anchor: dict[str, Tensor] = {}
    flops = 0

    def step_flops(samples: int, gradient_weights: dict[str, int]) -> int:
        forward = sum(2 * uses[n] * int((p != 0).sum()) for n, p in weights.items())
        gradient = sum(2 * uses[n] * count for n, count in gradient_weights.items())
        return samples * (2 * forward + gradient)

    dense_counts = {n: p.numel() for n, p in weights.items()}
    accuracy: list[list[float]] = []
    task_accuracy: list[list[float]] = []
    for index, task in enumerate(tasks):
        params = list(model.parameters())
        decay = 0.0 if method == "sparcl" else weight_decay  # SparCL: decay only trainable weights (below)
        optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=decay)
        if masks is not None:
            masks.start_task()
        steps_per_epoch = math.ceil(len(task.y_train) / batch_size)
        total_steps = epochs * steps_per_epoch
        step = 0
        for _ in range(epochs):
            for rows in torch.randperm(len(task.y_train), generator=generator).split(batch_size):
                x, y = task.x_train[rows], task.y_train[rows]
                if buffer is not None and buffer.filled:
                    replay_x, replay_y = buffer.sample(len(rows))
                    x, y = torch.cat([x, replay_x]), torch.cat([y, replay_y])
                loss = F.cross_entropy(model(x), y)
                if method == "ewc" and fisher:
                    loss = loss + ewc_lambda / 2 * sum(
                        (fisher[n] * (p - anchor[n]) ** 2).sum() for n, p in model.named_parameters() if n in fisher
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if masks is not None:
                    update = step > 0 and step % update_every == 0 and step < 0.75 * total_steps
                    if update:
                        fraction = drop_fraction / 2 * (1 + math.cos(math.pi * step / (0.75 * total_steps)))
                        dense_gradients = {n: p.grad.detach().clone() for n, p in weights.items()}
                        masks.drop_and_grow(fraction, dense_gradients, optimizer)
                        flops += step_flops(len(y), dense_counts)
                    else:
                        flops += step_flops(len(y), {n: int(masks.trainable[n].sum()) for n in weights})
                    masks.mask_gradients()
                    if weight_decay:
                        for name, param in weights.items():
                            param.grad.add_(param.detach() * masks.trainable[name], alpha=weight_decay)
                else:
                    flops += step_flops(len(y), dense_counts)
                optimizer.step()
                if masks is not None:
                    with torch.no_grad():
                        for name, param in weights.items():
                            param.mul_(masks.active(name))
                if buffer is not None:
                    buffer.add(task.x_train[rows], task.y_train[rows])
                step += 1
        if masks is not None:
            masks.end_task(last=index == len(tasks) - 1)
        if method == "ewc":
            fisher, anchor = _update_fisher(model, task, fisher, ewc_samples, generator)
            flops += step_flops(min(ewc_samples, len(task.y_train)), dense_counts)
        accuracy.append([_accuracy(model, seen, restrict=False) for seen in tasks[: index + 1]])
        task_accuracy.append([_accuracy(model, seen, restrict=True) for seen in tasks[: index + 1]])
    density = masks.density() if masks is not None else 1.0
    return ContinualResult(method, accuracy, task_accuracy, flops, density, time.perf_counter() - started)


@torch.no_grad()
def _weight_uses(model: nn.Module, weights: dict[str, nn.Parameter], sample: Tensor) -> dict[str, int]:
    """How often each weight is applied per sample: 1 for Linear, output positions for Conv (one forward pass).

    (``sparsearch.models.flops`` measures the same, but algorithms/ sits above models/ in the layering.)
    """
    names = {id(parameter): name for name, parameter in weights.items()}
    uses: dict[str, int] = {}

    def record(module: nn.Module, _inputs: object, output: Tensor) -> None:
        name = names.get(id(module.weight))
        if name is not None:
            units = module.out_features if isinstance(module, nn.Linear) else module.out_channels
            uses[name] = output[:1].numel() // units

    layers = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d)]
    handles = [layer.register_forward_hook(record) for layer in layers]
    was_training = model.training
    model.eval()
    try:
        model(sample)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return {name: uses.get(name, 1) for name in weights}


def _update_fisher(
    model: nn.Module, task: Task, fisher: dict[str, Tensor], samples: int, generator: torch.Generator
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Online EWC: add this task's empirical Fisher diagonal (per-sample squared gradients, averaged)."""
    rows = torch.randperm(len(task.y_train), generator=generator)[:samples]
    params = dict(model.named_parameters())
    new = {name: torch.zeros_like(p) for name, p in params.items()}
    for row in rows:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(task.x_train[row : row + 1]), task.y_train[row : row + 1]).backward()
        for name, p in params.items():
            if p.grad is not None:
                new[name] += p.grad.detach() ** 2 / len(rows)
    model.zero_grad(set_to_none=True)
    combined = {name: fisher.get(name, 0) + value for name, value in new.items()}
    return combined, {name: p.detach().clone() for name, p in params.items()}
