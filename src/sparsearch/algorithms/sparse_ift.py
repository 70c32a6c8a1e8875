"""Sparse Iso-FLOP Transformations (Sparse-IFT, Thangarasa et al., ICML 2024): same FLOPs, more capacity.

A dense layer is replaced by a sparse family member with the same number of non-zero multiply-accumulates
per sample (k = round(1 / (1 - s))):

- ``wide``: every hidden layer of units gets ``sqrt(k)`` times more units; each weight then keeps exactly as
  many non-zeros as the dense one had (needs a model with ``hidden_layers()``, e.g. sparsearch's MLP and CNN, or
  a plain chain of Linear layers).
- ``parallel``: ``k`` sparse copies of the layer, outputs summed; each keeps 1/k of its weights.
- ``factorized``: W (in -> out) becomes U (in -> d_h, the original kernel) then V (d_h -> out, a 1x1 kernel for
  convolutions), both sparse at s; d_h = round(in*out*K / ((1 - s)(in*K + out))) for a kernel of K positions.
- ``doped``: a sparse copy of W plus a dense low-rank path U V of rank r = floor(s*in*out*K / (in*K + out));
  the sparse copy keeps what the low-rank path leaves of the dense layer's budget.

Every replaced layer's non-zero weights (and so its FLOPs) equal the dense layer's within rounding (one weight
per factor). *Choices*, documented: the paper keeps the first and last layers dense; ``parallel``,
``factorized`` and ``doped`` do the same by default (``skip_first_last``), while ``wide`` must widen the
first layer's outputs and the last layer's inputs, so those two stay iso-FLOP by being sparse themselves
(density 1/sqrt(k)). The sparse weights are trained with a dynamic sparse method, RigL by default, whose
per-layer counts are fixed by the transformation (a ``custom`` distribution).

:func:`sparse_ift` transforms a model in place and returns the plan (which weights are sparse and how sparse);
:class:`SparseIFT` does the same when it is attached (so a study, which creates the model and optimizer first,
can use it as an arm: ``sift-wide``, ``sift-parallel``, ``sift-factorized``, ``sift-doped``).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from sparsearch.algorithms.dynamic import RigL
from sparsearch.engine.replaceable import reason_to_keep_dense, replace_module, shared_parameters
from sparsearch.engine.sparsifier import SPARSIFIABLE_MODULES, Sparsifier

Family = Literal["wide", "parallel", "factorized", "doped"]
FAMILIES: tuple[str, ...] = ("wide", "parallel", "factorized", "doped")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class SparseIFTPlan:
    """What :func:`sparse_ift` did: the family, k, and the sparsity of every sparse weight (by parameter name).

    Parameters not in ``layer_sparsities`` are dense (biases, skipped layers, the low-rank path of ``doped``).
    ``replaced`` lists the names of the original layers that were transformed.
    """

    family: str
    sparsity: float
    k: int
    layer_sparsities: dict[str, float]
    replaced: tuple[str, ...]

    @property
    def include(self) -> str:
        """A regular expression matching exactly the sparse weights (for a Sparsifier's ``include``)."""
        return "^(" + "|".join(re.escape(name) for name in sorted(self.layer_sparsities)) + ")$"


class SparseParallel(nn.Module):
    """``k`` layers of the same shape, applied to the same input, outputs summed."""

    def __init__(self, branches: list[nn.Module]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: Tensor) -> Tensor:
        return sum((branch(x) for branch in self.branches[1:]), self.branches[0](x))


class SparseFactorized(nn.Module):
    """``second(first(x))``: the original kernel into ``d_h`` units, then a pointwise map to the outputs."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(x))


class SparseDoped(nn.Module):
    """A sparse copy of the layer plus a dense low-rank path (``low_rank[1](low_rank[0](x))``)."""

    def __init__(self, sparse: nn.Module, low_rank: nn.Sequential) -> None:
        super().__init__()
        self.sparse, self.low_rank = sparse, low_rank

    def forward(self, x: Tensor) -> Tensor:
        return self.sparse(x) + self.low_rank(x)


def iso_flop_k(sparsity: float) -> int:
    """k = round(1 / (1 - s)): the capacity factor at sparsity s; at least 2, else nothing changes."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"Sparse-IFT sparsity {sparsity} is outside [0, 1)")
    k = round(1 / (1 - sparsity))
    if k < 2:
        raise ValueError(
            f"Sparse-IFT at sparsity {sparsity} gives k = round(1/(1-s)) = {k}: the transformation would change "
            "nothing; use a sparsity of at least 1/3 (k >= 2)"
        )
    return k


def _shape_of(layer: nn.Module) -> tuple[int, int, int]:
    """(in, out, kernel positions) of a Linear or ConvNd."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features, 1
    return layer.in_channels, layer.out_channels, math.prod(layer.kernel_size)


def _like(layer: nn.Module, in_units: int, out_units: int, bias: bool, pointwise: bool = False) -> nn.Module:
    """A fresh layer of ``layer``'s kind mapping ``in_units`` to ``out_units`` (a 1x1 kernel if ``pointwise``)."""
    if isinstance(layer, nn.Linear):
        return nn.Linear(in_units, out_units, bias=bias)
    if layer.groups != 1:
        raise ValueError(f"Sparse-IFT supports ungrouped convolutions only, got groups={layer.groups}")
    if pointwise:
        return type(layer)(in_units, out_units, 1, bias=bias)
    return type(layer)(
        in_units, out_units, layer.kernel_size, stride=layer.stride, padding=layer.padding,
        dilation=layer.dilation, bias=bias, padding_mode=layer.padding_mode,
    )


def _copy_bias(source: nn.Module, target: nn.Module) -> None:
    if source.bias is not None and target.bias is not None:
        with torch.no_grad():
            target.bias.copy_(source.bias)


def _keep_unit_attributes(original: nn.Module, replacement: nn.Module) -> None:
    """Give the replacement the original's in/out unit attributes, which models read (``hidden_layers()``)."""
    for attribute in ("in_features", "out_features", "in_channels", "out_channels"):
        if hasattr(original, attribute):
            setattr(replacement, attribute, getattr(original, attribute))


def _sparsity_for(dense_weights: int, weights: int, where: str) -> float:
    """The sparsity that leaves ``dense_weights`` non-zeros out of ``weights``."""
    if dense_weights > weights:
        raise ValueError(
            f"{where}: the transformed layer has {weights} weights, fewer than the dense layer's {dense_weights}, "
            "so it cannot spend the same FLOPs; choose a larger width factor or sparsity"
        )
    return 1.0 - dense_weights / weights


def _transform_layer(
    layer: nn.Module, family: str, sparsity: float, k: int, where: str
) -> tuple[nn.Module, dict[str, float]]:
    """The family member replacing ``layer`` and its sparse weights' sparsities (names relative to it)."""
    in_units, out_units, kernel = _shape_of(layer)
    dense = in_units * out_units * kernel
    bias = layer.bias is not None
    if family == "parallel":
        branches = [_like(layer, in_units, out_units, bias and i == 0) for i in range(k)]
        _copy_bias(layer, branches[0])
        per_branch = round(dense / k)
        return SparseParallel(branches), {
            f"branches.{i}.weight": _sparsity_for(per_branch, dense, where) for i in range(k)
        }
    if family == "factorized":
        hidden = max(1, round(dense / ((1 - sparsity) * (in_units * kernel + out_units))))
        first = _like(layer, in_units, hidden, bias=False)
        second = _like(layer, hidden, out_units, bias, pointwise=True)
        _copy_bias(layer, second)
        layer_sparsity = _sparsity_for(dense, hidden * (in_units * kernel + out_units), where)
        return SparseFactorized(first, second), {"first.weight": layer_sparsity, "second.weight": layer_sparsity}
    if family == "doped":
        rank = math.floor(sparsity * dense / (in_units * kernel + out_units))
        if rank < 1:
            raise ValueError(
                f"{where}: Sparse Doped at sparsity {sparsity} leaves a low-rank path of rank 0 for a "
                f"{in_units}->{out_units} layer; use a larger layer or sparsity, or another family"
            )
        sparse = _like(layer, in_units, out_units, bias)
        _copy_bias(layer, sparse)
        low_rank = nn.Sequential(
            _like(layer, in_units, rank, bias=False), _like(layer, rank, out_units, bias=False, pointwise=True)
        )
        remaining = dense - rank * (in_units * kernel + out_units)
        return SparseDoped(sparse, low_rank), {"sparse.weight": _sparsity_for(remaining, dense, where)}
    raise ValueError(f"unknown Sparse-IFT family {family!r}; allowed: {', '.join(FAMILIES)}")


def _hidden_units(model: nn.Module) -> list[tuple[str, str, int, int]]:
    """(producer, consumer, units, consumer group) per hidden layer: ``model.hidden_layers()``, or inferred for a
    plain chain of Linear layers (each feeding the next, no convolutions or norms)."""
    if hasattr(model, "hidden_layers"):
        return [(h.producer, h.consumer, h.units, h.consumer_group) for h in model.hidden_layers()]
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    others = [name for name, module in model.named_modules()
              if isinstance(module, (*_CONVS, nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm))]
    chained = all(a.out_features == b.in_features for (_, a), (_, b) in itertools.pairwise(linears))
    if others or len(linears) < 2 or not chained:
        raise ValueError(
            f"Sparse Wide needs to know which layers produce and consume each hidden layer: "
            f"{type(model).__name__} has no hidden_layers() (sparsearch's MLP and CNN do) and is not a plain "
            "chain of Linear layers; use the parallel, factorized or doped family for other models"
        )
    return [(f"{a}.weight", f"{b}.weight", layer.out_features, 1)
            for (a, layer), (b, _) in itertools.pairwise(linears)]


def _widen(model: nn.Module, factor: float) -> tuple[dict[str, float], tuple[str, ...]]:
    """Sparse Wide: ``factor`` times the units of every hidden layer; sparsities keep each weight's count."""
    hidden_units = _hidden_units(model)
    if factor < 1:
        raise ValueError(
            f"Sparse Wide width factor {factor} is below 1: narrower layers cannot spend the dense model's FLOPs"
        )
    modules = dict(model.named_modules())
    in_units: dict[str, int] = {}
    out_units: dict[str, int] = {}
    original = {name[: -len(".weight")]: modules[name[: -len(".weight")]] for producer, consumer, _, _ in hidden_units
                for name in (producer, consumer)}
    for producer, consumer, units, group in hidden_units:
        widened = round(units * factor)
        out_units[producer[: -len(".weight")]] = widened
        in_units[consumer[: -len(".weight")]] = widened * group
    sparsities = {}
    for name, layer in original.items():
        old_in, old_out, _ = _shape_of(layer)
        new = _like(layer, in_units.get(name, old_in), out_units.get(name, old_out), layer.bias is not None)
        replace_module(model, name, new)
        sparsities[f"{name}.weight"] = _sparsity_for(layer.weight.numel(), new.weight.numel(), name)
    return sparsities, tuple(original)


def sparse_ift(
    model: nn.Module,
    family: Family,
    sparsity: float,
    *,
    skip_first_last: bool = True,
    width: float | None = None,
    seed: int | None = None,
) -> SparseIFTPlan:
    """Replace ``model``'s Linear/Conv layers in place by the Sparse-IFT ``family`` member at ``sparsity``.

    New layers get PyTorch's default initialisation (seeded with ``seed`` if given); the plan says which
    weights must be sparse and how sparse (train them with :class:`SparseIFT`, or pass
    ``distribution=plan.layer_sparsities, include=plan.include`` to any sparsifier). ``width`` overrides
    Sparse Wide's factor sqrt(k). Models with units shared by residual connections need a family other than
    ``wide``.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown Sparse-IFT family {family!r}; allowed: {', '.join(FAMILIES)}")
    k = iso_flop_k(sparsity)
    if width is not None and family != "wide":
        raise ValueError(f"width={width} applies to the 'wide' family only, not {family!r}")
    if seed is not None:
        torch.manual_seed(seed)
    if family == "wide":
        sparsities, replaced = _widen(model, math.sqrt(k) if width is None else width)
        return SparseIFTPlan(family, sparsity, k, sparsities, replaced)
    # a layer whose weight its parent reads itself (nn.MultiheadAttention's out_proj, the encoder layer's fast path)
    # or that shares its weight (a head tied to an embedding) cannot be replaced by another module: it stays
    owners = shared_parameters(model)
    layers = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, SPARSIFIABLE_MODULES) and reason_to_keep_dense(model, name, owners) is None
    ]
    if skip_first_last:
        layers = layers[1:-1]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no Linear/Conv layer between its first and last one to transform; "
            "pass skip_first_last=False or use a deeper model"
        )
    sparsities: dict[str, float] = {}
    replacements = []
    for name, layer in layers:  # every replacement is built (and checked) before the model changes
        if not isinstance(layer, (nn.Linear, *_CONVS)):
            raise ValueError(f"layer {name!r} is a {type(layer).__name__}; Sparse-IFT transforms Linear and ConvNd")
        replacement, relative = _transform_layer(layer, family, sparsity, k, name)
        _keep_unit_attributes(layer, replacement)
        replacements.append((name, replacement))
        sparsities.update({f"{name}.{leaf}": value for leaf, value in relative.items()})
    for name, replacement in replacements:
        replace_module(model, name, replacement)
    return SparseIFTPlan(family, sparsity, k, sparsities, tuple(name for name, _ in layers))


def rebind_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """After layers were replaced: drop parameters the model no longer has, add its new ones to group 0."""
    if any(len(state) for state in optimizer.state.values()):
        raise RuntimeError("the optimizer has already taken steps; transform the model before training starts")
    live = {id(p) for p in model.parameters()}
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) in live]
    optimizer.param_groups[0]["params"].extend(p for p in model.parameters() if id(p) not in held)


class SparseIFT(RigL):
    """RigL on a Sparse-IFT transformation of the model, made when attached.

    ``attach(model, optimizer)`` transforms ``model`` in place (see :func:`sparse_ift`), moves the optimizer
    over to the new parameters (it must not have stepped yet) and then masks the sparse weights with the
    plan's exact per-layer counts; every other RigL argument (``total_steps``, ``update_every``, ...) passes
    through. ``plan`` holds the transformation after attaching. ``sparse_init`` (default) rescales the new sparse
    weights by 1/sqrt(density) after masking, so deep sparse stacks do not start with vanishing signals (without
    it, Sparse Wide MLPs of three sparse hidden layers did not train at all in our tests).
    """

    def __init__(
        self,
        family: Family,
        sparsity: float,
        *,
        skip_first_last: bool = True,
        width: float | None = None,
        sparse_init: bool = True,
        **rigl_kwargs: Any,
    ) -> None:
        if family not in FAMILIES:
            raise ValueError(f"unknown Sparse-IFT family {family!r}; allowed: {', '.join(FAMILIES)}")
        iso_flop_k(sparsity)
        for fixed in ("distribution", "include", "dense_layers"):
            if fixed in rigl_kwargs:
                raise ValueError(f"SparseIFT sets {fixed} from the transformation; do not pass {fixed}=")
        super().__init__(sparsity, **rigl_kwargs)
        self.family, self.skip_first_last, self.width = family, skip_first_last, width
        self.sparse_init = sparse_init
        self.plan: SparseIFTPlan | None = None

    def attach(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        batch: tuple[Tensor, Tensor] | None = None,
    ) -> Sparsifier:
        if optimizer is not None and any(len(state) for state in optimizer.state.values()):
            raise RuntimeError("the optimizer has already taken steps; attach SparseIFT before training starts")
        device = next(model.parameters()).device
        self.plan = sparse_ift(
            model, self.family, self.sparsity, skip_first_last=self.skip_first_last, width=self.width,
            seed=self.seed,
        )
        model.to(device)
        if optimizer is not None:
            rebind_optimizer(optimizer, model)
        self.distribution = self.plan.layer_sparsities
        self.include = self.plan.include
        super().attach(model, optimizer, batch=batch)
        if self.sparse_init:
            self._rescale_sparse_weights()
        return self

    @torch.no_grad()
    def _rescale_sparse_weights(self) -> None:
        """Scale each sparse weight by 1/sqrt(density) so a unit's output variance at initialisation matches the
        dense layer's (Evci et al. 2022); the k branches of ``parallel`` already sum to the dense variance."""
        assert self.plan is not None
        if self.plan.family == "parallel":
            return
        for name, sparsity in self.plan.layer_sparsities.items():
            self.params[name].mul_(1.0 / math.sqrt(1.0 - sparsity))

    def config(self) -> dict[str, Any]:
        return {**super().config(), "family": self.family, "k": iso_flop_k(self.sparsity)}


def sparse_ift_arm(family: Family) -> Callable[..., Sparsifier]:
    """A study-arm factory: ``setting -> SparseIFT(family, setting.sparsity, ...)`` with the study's RigL cadence."""

    def factory(setting: Any) -> Sparsifier:
        return SparseIFT(
            family, setting.sparsity, total_steps=setting.total_steps,
            update_every=setting.update_every(), seed=setting.seed,
        )

    return factory
