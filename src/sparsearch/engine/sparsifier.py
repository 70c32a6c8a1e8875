"""The Sparsifier: keeps chosen weights of any model exactly sparse under any torch optimizer.

It attaches to a model *and* its optimizer. Masks are non-persistent buffers on the owning modules (they move
with ``model.to(device)`` but ``model.state_dict()`` keys stay unchanged); the sparsifier's own state (masks,
step) round-trips through ``Sparsifier.state_dict()``. Optimizer hooks keep the invariants:

- before every step: gradients of masked weights are zeroed (after ``before_step`` could read them dense);
- after every step: masked weights are exactly zero and so is optimizer state (momentum, Adam moments) at
  masked positions, so neither momentum nor weight decay can revive a pruned weight.

Algorithms subclass it and override ``initial_masks``, ``before_step`` or ``after_step`` only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sparsearch.sparsity.distribution import (
    DISTRIBUTIONS,
    check_sparsity,
    custom_keep_counts,
    layer_keep_counts,
)
from sparsearch.sparsity.masks import topk_mask

SPARSIFIABLE_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
MASK_SUFFIX = "_mask"


@dataclass(frozen=True)
class LayerSparsity:
    """Target and measured sparsity of one masked parameter."""

    name: str
    numel: int
    target_sparsity: float
    actual_sparsity: float


def default_sparsifiable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Weights of Linear and Conv layers (biases, norms and embeddings are left dense)."""
    return {
        f"{module_name}.weight" if module_name else "weight": module.weight
        for module_name, module in model.named_modules()
        if isinstance(module, SPARSIFIABLE_MODULES)
    }


def parameters_matching(model: nn.Module, pattern: str) -> dict[str, nn.Parameter]:
    """Parameters whose full name matches the regular expression ``pattern`` (``re.search``)."""
    try:
        regex = re.compile(pattern)
    except re.error as error:
        raise ValueError(f"invalid parameter name pattern {pattern!r}: {error}") from None
    selected = {name: p for name, p in model.named_parameters() if regex.search(name)}
    if not selected:
        names = ", ".join(name for name, _ in model.named_parameters())
        raise ValueError(f"parameter name pattern {pattern!r} matches no parameter; the model has: {names}")
    return selected


class Sparsifier:
    """Keep a fixed fraction of a model's weights at zero, chosen at attach time by magnitude.

    Args:
        sparsity: fraction of zero weights over all masked parameters, in [0, 1).
        distribution: "uniform", "er", "erk", or a mapping {parameter name: sparsity} (custom).
        include: regular expression selecting parameters by name; default: Linear/Conv weights.
        dense_layers: parameter names kept dense (they still count towards the budget).
        seed: seed for every random choice the sparsifier makes.
    """

    def __init__(
        self,
        sparsity: float = 0.9,
        *,
        distribution: str | Mapping[str, float] = "uniform",
        include: str | None = None,
        dense_layers: tuple[str, ...] = (),
        seed: int = 0,
    ) -> None:
        self.sparsity = check_sparsity(sparsity)
        if isinstance(distribution, str) and distribution not in DISTRIBUTIONS:
            allowed = ", ".join(DISTRIBUTIONS)
            raise ValueError(f"unknown distribution {distribution!r}; allowed: {allowed}, or a mapping")
        self.distribution = distribution
        self.include = include
        self.dense_layers = tuple(dense_layers)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0
        # optimizer steps on which the algorithm needed dense gradients (RigL); counted into training FLOPs
        self.dense_gradient_steps = 0
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.params: dict[str, nn.Parameter] = {}
        self._owners: dict[str, tuple[nn.Module, str]] = {}
        self._handles: list[Any] = []

    # ----------------------------------------------------------------------------------- attaching
    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Sparsifier:
        """Select the parameters, compute the initial masks, apply them and hook the optimizer."""
        if self.model is not None:
            raise RuntimeError("this sparsifier is already attached; create a new one for another model")
        if getattr(model, "_sparsearch_sparsifier", None) is not None:
            raise RuntimeError(
                f"model already has a {type(model._sparsearch_sparsifier).__name__} attached; "
                "call .detach() on it before attaching another"
            )
        params = parameters_matching(model, self.include) if self.include else default_sparsifiable_parameters(model)
        if not params:
            raise ValueError("the model has no Linear or Conv layers to sparsify; pass include=<name pattern>")
        if optimizer is not None:
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            missing = [name for name, p in params.items() if id(p) not in held]
            if missing:
                raise ValueError(f"the optimizer does not hold the model's parameters {missing}")
        self.model, self.optimizer, self.params = model, optimizer, params
        self._owners = {name: _owner(model, name) for name in params}
        model._sparsearch_sparsifier = self
        for name, mask in self.initial_masks().items():
            self._set_mask(name, mask)
        self.apply_masks()
        if optimizer is not None:
            self._handles = [
                optimizer.register_step_pre_hook(self._pre_step_hook),
                optimizer.register_step_post_hook(self._post_step_hook),
            ]
        return self

    def detach(self) -> None:
        """Remove hooks and mask buffers; the weights keep their zeros."""
        for handle in self._handles:
            handle.remove()
        for module, leaf in self._owners.values():
            delattr(module, leaf + MASK_SUFFIX)
        if self.model is not None:
            del self.model._sparsearch_sparsifier
        self.model, self.optimizer, self._handles, self._owners = None, None, [], {}

    # ----------------------------------------------------------------------------- masks and budget
    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Current boolean masks by parameter name (True = kept)."""
        return {name: getattr(module, leaf + MASK_SUFFIX) for name, (module, leaf) in self._owners.items()}

    def _set_mask(self, name: str, mask: torch.Tensor) -> None:
        param = self.params[name]
        if mask.shape != param.shape:
            raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, parameter has {tuple(param.shape)}")
        module, leaf = self._owners[name]
        module.register_buffer(leaf + MASK_SUFFIX, mask.to(device=param.device, dtype=torch.bool), persistent=False)

    def keep_counts(self, sparsity: float | None = None) -> dict[str, int]:
        """Exact weights to keep per parameter for ``sparsity`` (default: the target) under the distribution."""
        shapes = {name: tuple(p.shape) for name, p in self.params.items()}
        if isinstance(self.distribution, Mapping):
            return custom_keep_counts(shapes, self.distribution)
        target = self.sparsity if sparsity is None else sparsity
        return layer_keep_counts(shapes, target, self.distribution, self.dense_layers)

    def score(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """Importance of each weight; higher is kept. The base class uses magnitude."""
        return param.detach().abs()

    def initial_masks(self) -> dict[str, torch.Tensor]:
        """Masks at attach time: the highest-scoring weights per layer, with exact counts."""
        counts = self.keep_counts()
        return {name: topk_mask(self.score(name, p), counts[name]) for name, p in self.params.items()}

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero masked weights and the optimizer state at masked positions."""
        for name, mask in self.masks.items():
            param = self.params[name]
            param.mul_(mask)
            if self.optimizer is not None:
                for value in self.optimizer.state.get(param, {}).values():
                    if torch.is_tensor(value) and value.shape == param.shape:
                        value.mul_(mask)

    # ------------------------------------------------------------------------------ optimizer hooks
    def _pre_step_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.before_step()
        for name, mask in self.masks.items():
            grad = self.params[name].grad
            if grad is not None:
                grad.mul_(mask)

    def _post_step_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.step += 1
        self.apply_masks()
        self.after_step()

    def before_step(self) -> None:
        """Called before each optimizer step while gradients are still dense. Override to update masks."""

    def after_step(self) -> None:
        """Called after each optimizer step once masks were applied. Override for post-step updates."""

    # ------------------------------------------------------------------------------------ reporting
    def report(self) -> list[LayerSparsity]:
        """Target (from the masks) and actual (zeros in the weights) sparsity per parameter."""
        rows = []
        for name, mask in self.masks.items():
            param = self.params[name]
            numel = param.numel()
            rows.append(
                LayerSparsity(
                    name=name,
                    numel=numel,
                    target_sparsity=1.0 - int(mask.count_nonzero()) / numel,
                    actual_sparsity=1.0 - int(param.detach().count_nonzero()) / numel,
                )
            )
        return rows

    def overall_sparsity(self) -> float:
        """Fraction of zero weights over all masked parameters."""
        rows = self.report()
        total = sum(r.numel for r in rows)
        return sum(r.actual_sparsity * r.numel for r in rows) / total

    # ------------------------------------------------------------------------------- serialisation
    def state_dict(self) -> dict[str, Any]:
        """Masks, step and random state; plain tensors and numbers (safetensors-friendly)."""
        return {
            "step": self.step,
            "masks": {name: mask.detach().cpu().clone() for name, mask in self.masks.items()},
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore masks, step and random state; shapes and names must match the attached model."""
        if self.model is None:
            raise RuntimeError("attach the sparsifier to the model before loading its state")
        masks = state["masks"]
        if set(masks) != set(self.params):
            raise ValueError(
                f"checkpoint masks name parameters {sorted(masks)}, but the sparsifier masks {sorted(self.params)}"
            )
        for name, mask in masks.items():
            self._set_mask(name, mask)
        self.step = int(state["step"])
        self.generator.set_state(state["generator"])
        self.apply_masks()


def _owner(model: nn.Module, param_name: str) -> tuple[nn.Module, str]:
    module_path, _, leaf = param_name.rpartition(".")
    return (model.get_submodule(module_path) if module_path else model), leaf


class StaticMaskSparsifier(Sparsifier):
    """Keep a given set of masks fixed for the whole training (e.g. a searched or random sub-network)."""

    def __init__(self, masks: Mapping[str, torch.Tensor], *, seed: int = 0) -> None:
        if not masks:
            raise ValueError("StaticMaskSparsifier needs at least one mask")
        kept = sum(int(m.count_nonzero()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        super().__init__(1.0 - kept / total if kept < total else 0.0, seed=seed)
        self.given_masks = {name: m.to(torch.bool) for name, m in masks.items()}
        self.include = "^(" + "|".join(re.escape(name) for name in self.given_masks) + ")$"

    def initial_masks(self) -> dict[str, torch.Tensor]:
        return dict(self.given_masks)
