"""The Sparsifier: keeps chosen weights of any model exactly sparse under any torch optimizer.

It attaches to a model *and* its optimizer. Masks are non-persistent buffers ``<param>_mask`` on the owning
modules (they move with ``model.to(device)`` but ``model.state_dict()`` keys stay unchanged); the
sparsifier's own state (masks, step, random state, algorithm state) round-trips through
``Sparsifier.state_dict()``. Optimizer hooks keep the invariants:

- after ``backward()``: gradients of masked weights are zeroed as soon as they are accumulated (a
  post-accumulate-grad hook), so clipping, logging and accumulation see the gradient the optimizer will use,
  except on steps where ``keeps_gradients_dense()`` (RigL's update steps, whose grow step reads them);
- before every step: ``before_step`` runs, then gradients of masked weights are zeroed (again);
- after every step: masked weights are exactly zero and so is optimizer state (momentum, Adam moments) at
  masked positions, so neither momentum nor weight decay can revive a pruned weight, and a weight grown
  later starts from zero with zero optimizer state. Weights and state are re-masked whenever masks change
  and after every step of an optimizer not known to be elementwise (``ELEMENTWISE_OPTIMIZERS``; for those,
  masked gradients plus zero state already keep both exactly zero).

The four axes are independent constructor arguments: ``distribution`` (uniform, er, erk, global, custom
mapping), ``structure`` (unstructured, N:M, block, channel) and the score (the ``compute_scores`` hook;
magnitude here); schedules enter through the algorithms. Algorithms subclass and override one hook:
``compute_scores``, ``initial_masks``, ``before_step`` or ``after_step``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from sparsearch.engine.distributed import MaskSync, refuse_sharded
from sparsearch.sparsity.distribution import (
    DISTRIBUTIONS,
    check_sparsity,
    custom_keep_counts,
    layer_keep_counts,
)
from sparsearch.sparsity.masks import global_topk_masks
from sparsearch.sparsity.scores import Batch
from sparsearch.sparsity.structures import NM, Structure, Unstructured, parse_structure

SPARSIFIABLE_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# the weights nn.MultiheadAttention keeps itself (the Linear input projections of a transformer layer)
ATTENTION_PROJECTIONS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
# Optimizers whose update of a weight depends only on that weight, its gradient and its own state, and is
# exactly zero when all three are zero: with gradients masked before the step, their step cannot revive a
# pruned weight or its state, so re-masking after every step is skipped (it still runs whenever masks change).
# Any other optimizer (subclasses included) is re-masked after every step.
ELEMENTWISE_OPTIMIZERS = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
)
MASK_SUFFIX = "_mask"


def mask_distributions() -> tuple[str, ...]:
    """Names a Sparsifier's ``distribution`` takes: the registered layer-wise rules (yours too) and "global"."""
    return (*DISTRIBUTIONS.names(), "global")

INITS = ("dense", "rescale")


@dataclass(frozen=True)
class LayerSparsity:
    """Target (what the mask asks) and actual (zeros in the weight the model computes with) sparsity of one
    masked parameter."""

    name: str
    numel: int
    target_sparsity: float
    actual_sparsity: float


@dataclass(frozen=True)
class SparsityReport:
    """Per-parameter sparsity rows plus the overall figures; ``str()`` gives a table, iteration the rows."""

    rows: tuple[LayerSparsity, ...]

    @property
    def numel(self) -> int:
        return sum(row.numel for row in self.rows)

    @property
    def target_sparsity(self) -> float:
        return round(sum(r.target_sparsity * r.numel for r in self.rows) / self.numel, 6) if self.rows else 0.0

    @property
    def actual_sparsity(self) -> float:
        return round(sum(r.actual_sparsity * r.numel for r in self.rows) / self.numel, 6) if self.rows else 0.0

    def __iter__(self) -> Iterator[LayerSparsity]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> LayerSparsity:
        return self.rows[index]

    def __str__(self) -> str:
        width = max(len("overall"), *(len(r.name) for r in self.rows))
        lines = [f"{'parameter':<{width}}  {'weights':>10}  {'target':>7}  {'actual':>7}"]
        lines += [
            f"{r.name:<{width}}  {r.numel:>10}  {r.target_sparsity:>7.2%}  {r.actual_sparsity:>7.2%}" for r in self.rows
        ]
        lines.append(
            f"{'overall':<{width}}  {self.numel:>10}  {self.target_sparsity:>7.2%}  {self.actual_sparsity:>7.2%}"
        )
        return "\n".join(lines)


def mask_stream_seed(seed: int) -> int:
    """The seed of the sparsifier's own random stream, derived from ``seed`` by a hash.

    Seeding it with ``seed`` itself would replay the stream of ``torch.manual_seed(seed)``, which is usually what
    initialised the model: ``torch.rand`` then draws the very numbers ``nn.Linear``'s uniform init drew, and a
    "random" mask of the first layer keeps exactly its largest positive weights (measured: 100% positive).
    """
    digest = hashlib.sha256(f"sparsearch-mask-stream:{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def parameter_aliases(model: nn.Module) -> dict[str, str]:
    """Every name of every parameter -> its canonical name (the one ``named_parameters()`` yields).

    A tensor shared by two modules (a head tied to its embedding) has several names; the engine handles it once,
    under its canonical name, whichever of its names a user passes.
    """
    canonical: dict[int, str] = {}
    return {
        name: canonical.setdefault(id(param), name) for name, param in model.named_parameters(remove_duplicate=False)
    }


def _is_default_target(module: nn.Module, leaf: str, attention_projections: bool) -> bool:
    if isinstance(module, SPARSIFIABLE_MODULES):
        return leaf == "weight"
    return attention_projections and isinstance(module, nn.MultiheadAttention) and leaf in ATTENTION_PROJECTIONS


def default_sparsifiable_parameters(
    model: nn.Module, *, attention_projections: bool = True, forward_masked: bool = False
) -> dict[str, nn.Parameter]:
    """Weights of Linear and Conv layers and the input projections of ``nn.MultiheadAttention``, by canonical name.

    Biases, norms and embeddings stay dense, and so does any weight shared with a module of another kind (a
    head tied to its embedding: masking it would sparsify the embedding table); pass ``include=`` to mask those.
    ``forward_masked``: only weights that reach the computation through their module's own ``forward`` (for
    algorithms that mask the forward pass: ``nn.MultiheadAttention`` reads ``out_proj.weight`` itself).
    """
    read_by_parent = {id(module.out_proj) for module in model.modules() if isinstance(module, nn.MultiheadAttention)}
    verdicts: dict[int, bool] = {}
    for module in model.modules():
        for leaf, param in module.named_parameters(recurse=False):
            ok = _is_default_target(module, leaf, attention_projections and not forward_masked)
            if forward_masked and id(module) in read_by_parent:
                ok = False
            verdicts[id(param)] = verdicts.get(id(param), True) and ok
    return {name: param for name, param in model.named_parameters() if verdicts.get(id(param), False)}


def parameters_matching(model: nn.Module, pattern: str) -> dict[str, nn.Parameter]:
    """Parameters any of whose names matches the regular expression ``pattern`` (``re.search``), by canonical
    name (a tied tensor is selected once)."""
    try:
        regex = re.compile(pattern)
    except re.error as error:
        raise ValueError(f"invalid parameter name pattern {pattern!r}: {error}") from None
    aliases = parameter_aliases(model)
    chosen = {canonical for name, canonical in aliases.items() if regex.search(name)}
    selected = {name: p for name, p in model.named_parameters() if name in chosen}
    if not selected:
        names = ", ".join(aliases)
        raise ValueError(f"parameter name pattern {pattern!r} matches no parameter; the model has: {names}")
    return selected


class Sparsifier:
    """Keep a fixed fraction of a model's weights at zero, chosen at attach time by magnitude.

    Args:
        sparsity: fraction of zero weights over all masked parameters, in [0, 1). With an N:M structure it
            may be omitted (it is then 1 - N/M) and must otherwise equal 1 - N/M. Default 0.9.
        distribution: "uniform", "er", "erk", "global" (one top-k over all layers), or a mapping
            {parameter name: sparsity} (custom; unnamed layers stay dense).
        structure: "unstructured", "N:M" (e.g. "2:4"), "blockRxC" (e.g. "block4x4"), "channel", or a Structure.
        include: regular expression selecting parameters by name; default: Linear/Conv weights.
        dense_layers: parameter names kept dense (they still count towards the budget).
        incompatible: what to do with a layer the structure cannot take (e.g. N:M on an input dimension not
            divisible by M): "error" (default) raises, "dense" leaves that layer dense and unmasked.
        init: "dense" (default) leaves the kept weights as they are; "rescale" multiplies each masked layer's
            kept weights by 1/sqrt(density) once at attach, so a layer keeping 10% of its inputs starts with
            the variance PyTorch's init gives its live fan-in (sparsity-aware init, as sparselab and Cerebras
            do). Use it when training from scratch, never on a pretrained model.
        seed: seed for every random choice the sparsifier makes.
    """

    #: False for algorithms that keep dense weights and mask only the forward pass (SR-STE, PGF).
    masks_weights: bool = True

    def __init__(
        self,
        sparsity: float | None = None,
        *,
        distribution: str | Mapping[str, float] = "uniform",
        structure: str | Structure = "unstructured",
        include: str | None = None,
        dense_layers: tuple[str, ...] = (),
        incompatible: Literal["error", "dense"] = "error",
        init: Literal["dense", "rescale"] = "dense",
        seed: int = 0,
    ) -> None:
        if init not in INITS:
            raise ValueError(f"init must be one of {', '.join(map(repr, INITS))}, got {init!r}")
        self.init = init
        self.structure = parse_structure(structure)
        if isinstance(self.structure, NM):
            implied = self.structure.sparsity
            if sparsity is not None and abs(check_sparsity(sparsity) - implied) > 1e-9:
                raise ValueError(
                    f"sparsity {sparsity} contradicts the {self.structure} structure, which means sparsity "
                    f"{implied:g}; omit sparsity or pass {implied:g}"
                )
            sparsity = implied
        self.sparsity = check_sparsity(0.9 if sparsity is None else sparsity)
        if isinstance(distribution, str) and distribution != "global" and distribution not in DISTRIBUTIONS:
            allowed = ", ".join(mask_distributions())
            raise ValueError(f"unknown distribution {distribution!r}; allowed: {allowed}, or a mapping")
        if not isinstance(distribution, str | Mapping):
            raise TypeError(f"distribution must be a name or a mapping, got {type(distribution).__name__}")
        if incompatible not in ("error", "dense"):
            raise ValueError(f"incompatible must be 'error' or 'dense', got {incompatible!r}")
        self.distribution = distribution
        self.include = include
        self.dense_layers = tuple(dense_layers)
        self.incompatible = incompatible
        self.seed = seed
        self.generator = torch.Generator().manual_seed(mask_stream_seed(seed))
        self.step = 0
        # optimizer steps on which the algorithm needed dense gradients (RigL); counted into training FLOPs
        self.dense_gradient_steps = 0
        # sum over optimizer steps of the kept fraction of masked weights (average density for FLOP counts)
        self.density_sum = 0.0
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.params: dict[str, nn.Parameter] = {}
        self.batch: Batch | None = None
        self._owners: dict[str, tuple[nn.Module, str]] = {}
        self._handles: list[Any] = []
        self._multiplier_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._skip_requested = False
        self._snapshot: dict[str, Any] | None = None
        self._density: float | None = None
        #: keeps masks identical across data-parallel processes; installed by engine.distributed.synchronize
        self.mask_sync: MaskSync | None = None

    # ----------------------------------------------------------------------------------- attaching
    def attach(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        batch: Batch | None = None,
        state: Mapping[str, Any] | None = None,
    ) -> Sparsifier:
        """Select the parameters, compute the initial masks, apply them and hook the optimizer.

        ``batch`` = (inputs, targets) is used by data-dependent scores (SNIP, GraSP) and not kept. ``state`` (a
        ``state_dict()`` of this sparsifier) resumes: its masks are used instead of new ones, so the weights and
        optimizer state of a restored checkpoint are never masked with a mask they were not trained with.
        """
        if self.model is not None:
            raise RuntimeError("this sparsifier is already attached; create a new one for another model")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if getattr(model, "_sparsearch_sparsifier", None) is not None:
            raise RuntimeError(
                f"model already has a {type(model._sparsearch_sparsifier).__name__} attached; "
                "call .detach() on it before attaching another"
            )
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if self.include:
            params = parameters_matching(model, self.include)
        else:
            params = default_sparsifiable_parameters(model, forward_masked=not self.masks_weights)
        # before the emptiness check: FSDP1 hides the Linear weights in one flat parameter of its own
        refuse_sharded(model, params)
        if not params:
            raise ValueError("the model has no Linear or Conv layers to sparsify; pass include=<name pattern>")
        aliases = {alias: name for alias, name in parameter_aliases(model).items() if name in params}
        if isinstance(self.distribution, Mapping):
            unknown = sorted(set(self.distribution) - set(aliases))
            if unknown:
                raise ValueError(f"custom distribution names unknown parameters {unknown}; known: {sorted(params)}")
            self.distribution = {aliases[name]: value for name, value in self.distribution.items()}
        unknown_dense = sorted(set(self.dense_layers) - set(aliases))
        if unknown_dense:
            raise ValueError(f"dense_layers names unknown parameters {unknown_dense}; known: {sorted(params)}")
        self.dense_layers = tuple(dict.fromkeys(aliases[name] for name in self.dense_layers))
        params = self._compatible(params)
        if optimizer is not None:
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            missing = [name for name, p in params.items() if id(p) not in held]
            if missing:
                raise ValueError(f"the optimizer does not hold the model's parameters {missing}")
        self.model, self.optimizer, self.params = model, optimizer, params
        self._owners = {name: _owner(model, name) for name in params}
        model._sparsearch_sparsifier = self
        self.batch = batch
        try:
            if state is not None:
                masks = state["masks"]  # a checkpoint every rank loads: already the same everywhere
            else:
                masks = self.initial_masks()
                if self.mask_sync is not None:
                    masks = self.mask_sync.agree_initial_masks(self, masks)
            for name, mask in masks.items():
                self._set_mask(name, mask)
            self.on_attach()
            if state is not None:
                self.load_state_dict(state)
        except Exception:
            # leave the model as it was, so that the user can fix the input and attach again
            for module, leaf in self._owners.values():
                module.__dict__.pop("forward", None)
                if hasattr(module, leaf + MASK_SUFFIX):
                    delattr(module, leaf + MASK_SUFFIX)
            del model._sparsearch_sparsifier
            self.model, self.optimizer, self.params, self._owners = None, None, {}, {}
            raise
        finally:
            self.batch = None
        if state is None and self.init == "rescale":
            self._rescale_kept_weights()
        self.apply_masks()
        if optimizer is not None:
            self._handles = [
                optimizer.register_step_pre_hook(self._pre_step_hook),
                optimizer.register_step_post_hook(self._post_step_hook),
            ]
            if self.masks_weights:
                self._handles += [
                    param.register_post_accumulate_grad_hook(self._gradient_hook(name))
                    for name, param in params.items()
                    if param.requires_grad
                ]
        return self

    def _gradient_hook(self, name: str) -> Any:
        module, leaf = self._owners[name]

        def mask_gradient(param: torch.Tensor) -> None:
            # right after backward() accumulates the gradient, so that clip_grad_norm_, logging and gradient
            # accumulation see the gradient the optimizer will use (the pre-step hook masks again: cheap, and
            # it holds even where a wrapper such as DDP rewrites .grad after this hook)
            if param.grad is not None and not self.keeps_gradients_dense():
                mask = getattr(module, leaf + MASK_SUFFIX)
                param.grad.mul_(self._multiplier(name, mask, param.grad))

        return mask_gradient

    def masks_fixed_for_next_step(self) -> bool:
        """Whether the coming optimizer step keeps the masks, reads no dense gradient and no masked weight, so the
        masked layers may run it on the sparse kernels (``train(sparse_kernels=True)``). False unless an algorithm
        says so: one that changes its masks in its hooks must run those steps on the dense layers."""
        return False

    def keeps_gradients_dense(self) -> bool:
        """Whether backward() leaves the gradients of masked weights dense until the coming optimizer step (an
        algorithm that reads dense gradients on that step, e.g. RigL's grow step); they are masked before the
        step either way."""
        return False

    def _compatible(self, params: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
        kept = {}
        for name, param in params.items():
            try:
                self.structure.check(name, tuple(param.shape))
            except ValueError:
                if self.incompatible == "error":
                    raise
                continue
            kept[name] = param
        if not kept:
            raise ValueError(f"no parameter can take the {self.structure} structure: {sorted(params)}")
        return kept

    @torch.no_grad()
    def _rescale_kept_weights(self) -> None:
        for name, mask in self.masks.items():
            density = int(mask.count_nonzero()) / mask.numel()
            if 0.0 < density < 1.0:
                self.params[name].mul_(density**-0.5)

    def on_attach(self) -> None:
        """Called once masks exist, before they are applied. Override to install extra hooks."""

    def detach(self) -> None:
        """Remove hooks and mask buffers; the weights keep their zeros."""
        for handle in self._handles:
            handle.remove()
        for module, leaf in self._owners.values():
            delattr(module, leaf + MASK_SUFFIX)
        if self.model is not None:
            del self.model._sparsearch_sparsifier
        self.model, self.optimizer, self._handles, self._owners = None, None, [], {}
        self._multiplier_cache = {}

    def finalize(self) -> None:
        """Bake the masks into the weights (zeros at masked positions) and detach."""
        with torch.no_grad():
            for name, mask in self.masks.items():
                self.params[name].mul_(mask)
        self.detach()

    # ----------------------------------------------------------------------------- masks and budget
    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Current boolean masks by parameter name (True = kept)."""
        return {name: getattr(module, leaf + MASK_SUFFIX) for name, (module, leaf) in self._owners.items()}

    def _set_mask(self, name: str, mask: torch.Tensor) -> None:
        if name not in self.params:
            raise ValueError(f"no masked parameter named {name!r}; masked: {sorted(self.params)}")
        param = self.params[name]
        if tuple(mask.shape) != tuple(param.shape):
            raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, parameter has {tuple(param.shape)}")
        module, leaf = self._owners[name]
        module.register_buffer(leaf + MASK_SUFFIX, mask.to(device=param.device, dtype=torch.bool), persistent=False)
        self._density = None

    def set_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Replace masks (by parameter name) and apply them to weights and optimizer state."""
        for name, mask in masks.items():
            self._set_mask(name, mask)
        self.apply_masks()

    def _multiplier(self, name: str, mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The mask as 0/1 in ``like``'s dtype, cached until the mask buffer is replaced or moved: an in-place
        multiply by a float mask is several times faster than masked_fill_ or a multiply by a bool mask."""
        cached = self._multiplier_cache.get(name)
        if cached is None or cached[0] is not mask or cached[1].dtype != like.dtype:
            cached = (mask, mask.to(like.dtype))
            self._multiplier_cache[name] = cached
        return cached[1]

    def keep_counts(self, sparsity: float | None = None) -> dict[str, int]:
        """Exact weights to keep per parameter for ``sparsity`` (default: the target) under the distribution."""
        shapes = {name: tuple(p.shape) for name, p in self.params.items()}
        if isinstance(self.distribution, Mapping):
            return custom_keep_counts(shapes, self.distribution)
        target = self.sparsity if sparsity is None else sparsity
        distribution = "uniform" if self.distribution == "global" else self.distribution
        return layer_keep_counts(shapes, target, distribution, self.dense_layers)

    def masks_from_scores(
        self, scores: Mapping[str, torch.Tensor], sparsity: float | None = None
    ) -> dict[str, torch.Tensor]:
        """Masks keeping the highest scores: per layer with the distribution's exact counts and the structure,
        or one top-k over all non-dense layers for ``distribution="global"`` (unstructured only)."""
        target = self.sparsity if sparsity is None else sparsity
        if self.distribution == "global":
            if not isinstance(self.structure, Unstructured):
                raise ValueError(f"distribution 'global' supports only unstructured masks, not {self.structure}")
            total = sum(p.numel() for p in self.params.values())
            dense = {name: self.params[name].numel() for name in self.dense_layers}
            budget = round((1.0 - target) * total) - sum(dense.values())
            if budget < 0:
                raise ValueError(f"sparsity {target} is unreachable with dense layers {sorted(dense)}")
            ranked = {name: s for name, s in scores.items() if name not in dense}
            masks = global_topk_masks(ranked, budget)
            masks.update({name: torch.ones_like(self.params[name], dtype=torch.bool) for name in dense})
            return {name: masks[name] for name in scores}
        counts = self.keep_counts(target)
        return {name: self.structure.mask(score, counts[name]) for name, score in scores.items()}

    def score(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """Importance of each weight of one parameter; higher is kept. The base class uses magnitude."""
        return param.detach().abs()

    def compute_scores(self) -> dict[str, torch.Tensor]:
        """Scores of every masked parameter at attach time (the score axis). Default: ``score`` per layer."""
        return {name: self.score(name, p) for name, p in self.params.items()}

    def initial_masks(self) -> dict[str, torch.Tensor]:
        """Masks at attach time: the highest-scoring weights, with exact counts under the distribution."""
        return self.masks_from_scores(self.compute_scores())

    def effective_weight(self, name: str) -> torch.Tensor:
        """The weight the model computes with once training ends (masked)."""
        return self.params[name].detach() * self.masks[name]

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero masked weights and the optimizer state at masked positions (no-op for dense-weight methods)."""
        if not self.masks_weights:
            return
        for name, mask in self.masks.items():
            param = self.params[name]
            multiplier = self._multiplier(name, mask, param)
            param.mul_(multiplier)
            if self.optimizer is not None:
                for value in self.optimizer.state.get(param, {}).values():
                    if torch.is_tensor(value) and value.shape == param.shape:
                        value.mul_(multiplier if value.dtype == param.dtype else mask)

    def density(self) -> float:
        """Fraction of masked weights currently kept (all masked layers together)."""
        if self._density is None:
            masks = self.masks
            total = sum(m.numel() for m in masks.values())
            self._density = sum(int(m.count_nonzero()) for m in masks.values()) / total if total else 1.0
        return self._density

    @property
    def average_density(self) -> float:
        """Mean over the optimizer steps taken so far of the kept fraction (1 - sparsity) of masked weights."""
        return self.density_sum / self.step if self.step else self.density()

    # ------------------------------------------------------------------------------ optimizer hooks
    def skip_optimizer_step(self) -> None:
        """From ``before_step``: make the coming optimizer step a no-op (weights and optimizer state restored)."""
        self._skip_requested = True

    def _pre_step_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.density_sum += self.density()
        self.before_step()
        if self._skip_requested:
            self._snapshot = _optimizer_snapshot(optimizer)
            self._skip_requested = False
        if not self.masks_weights:
            return
        for name, mask in self.masks.items():
            grad = self.params[name].grad
            if grad is not None:
                grad.mul_(self._multiplier(name, mask, grad))

    def _post_step_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._snapshot is not None:
            _restore_snapshot(optimizer, self._snapshot)
            self._snapshot = None
        self.step += 1
        if type(optimizer) not in ELEMENTWISE_OPTIMIZERS:
            self.apply_masks()
        self.after_step()
        if self.mask_sync is not None:
            self.mask_sync.after_step(self)

    def before_step(self) -> None:
        """Called before each optimizer step while gradients are still dense. Override to update masks."""

    def after_step(self) -> None:
        """Called after each optimizer step once masks were applied. Override for post-step updates."""

    # ------------------------------------------------------------------------------------ reporting
    def report(self) -> SparsityReport:
        """Target (from the masks) and actual (zeros in the effective weights) sparsity per parameter; prints as a
        table, iterates over its rows."""
        rows = []
        for name, mask in self.masks.items():
            numel = mask.numel()
            rows.append(
                LayerSparsity(
                    name=name,
                    numel=numel,
                    target_sparsity=round(1.0 - int(mask.count_nonzero()) / numel, 6),
                    actual_sparsity=round(1.0 - int(self.effective_weight(name).count_nonzero()) / numel, 6),
                )
            )
        return SparsityReport(tuple(rows))

    def overall_sparsity(self) -> float:
        """Fraction of zero weights over all masked parameters (the one meaning of "sparsity" here)."""
        total = sum(mask.numel() for mask in self.masks.values())
        zeros = sum(
            mask.numel() - int(self.effective_weight(name).count_nonzero()) for name, mask in self.masks.items()
        )
        return zeros / total

    def summary(self) -> str:
        """A plain-text table: per layer and overall, target vs actual sparsity (``str(self.report())``)."""
        return str(self.report())

    def config(self) -> dict[str, Any]:
        """The constructor settings as JSON-friendly values (recorded in checkpoints)."""
        distribution = dict(self.distribution) if isinstance(self.distribution, Mapping) else self.distribution
        return {
            "algorithm": type(self).__name__,
            "sparsity": self.sparsity,
            "distribution": distribution,
            "structure": str(self.structure),
            "include": self.include,
            "dense_layers": list(self.dense_layers),
            "init": self.init,
            "seed": self.seed,
        }

    # ------------------------------------------------------------------------------- serialisation
    def state_dict(self) -> dict[str, Any]:
        """Masks, step, counters and random state: tensors, numbers and strings only (safetensors-friendly)."""
        return {
            "step": self.step,
            "dense_gradient_steps": self.dense_gradient_steps,
            "density_sum": self.density_sum,
            "masks": {name: mask.detach().cpu().clone() for name, mask in self.masks.items()},
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore masks, step and random state; names and shapes must match the attached model."""
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
        self.dense_gradient_steps = int(state.get("dense_gradient_steps", 0))
        self.density_sum = float(state.get("density_sum", 0.0))
        self.generator.set_state(state["generator"])
        self.apply_masks()


def _owner(model: nn.Module, param_name: str) -> tuple[nn.Module, str]:
    module_path, _, leaf = param_name.rpartition(".")
    return (model.get_submodule(module_path) if module_path else model), leaf


def _optimizer_snapshot(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {
        "params": [p.detach().clone() for p in params],
        "state": [
            {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
            if p in optimizer.state
            else None
            for p in params
        ],
    }


@torch.no_grad()
def _restore_snapshot(optimizer: torch.optim.Optimizer, snapshot: dict[str, Any]) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for param, saved, state in zip(params, snapshot["params"], snapshot["state"], strict=True):
        param.copy_(saved)
        if state is None:
            optimizer.state.pop(param, None)
        else:
            optimizer.state[param] = state


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

    def masks_fixed_for_next_step(self) -> bool:
        return True
