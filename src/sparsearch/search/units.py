"""Which neurons / channels of any ``nn.Module`` can be removed, and which must go together (unit groups).

The forward pass is traced with ``torch.fx`` (``torch.nn`` layers are leaves; user modules are traced
through) and every tensor is followed from the layer that makes its units to every op that reads them:

- **Producers** make units: a Linear's output features, a Conv's output channels. Removing unit ``i``
  zeros row ``i`` of the producer's weight (its bias stays: the unit then outputs a constant that nobody
  reads).
- **Consumers** read units: the next Linear's input columns, the next Conv's input channels. Removing unit
  ``i`` zeros those columns. After a flatten, channel ``i`` of a conv is a block of ``in_features / channels``
  consecutive columns of the next Linear (channel-major, as ``flatten(1)`` lays it out).
- **Per-unit ops pass units through unchanged**: activations, dropout, pooling over spatial axes,
  reductions over other axes (``x.mean((2, 3))``), BatchNorm (its channel ``i`` goes with unit ``i``; the
  group lists the BatchNorm so a physical pruner can drop those entries), a depthwise conv
  (``groups == in_channels == out_channels``: its channel ``i`` reads only channel ``i``, so its rows join the
  group of its input), and element-wise arithmetic with a tensor that carries no units (a scalar, a gate).
- **Ops that tie units**: ``a + b``, ``a - b``, ``a * b`` of two tensors carrying units (a residual
  connection) put unit ``i`` of ``a`` and unit ``i`` of ``b`` in one group: both producers lose row ``i``
  and every consumer of the sum loses column ``i`` together. ``torch.cat`` along the unit axis lays groups
  side by side at offsets; along another axis it ties them like an add.
- **Kept whole** (a *note* says which layer and why): units that reach the model's output; units read by
  an op the analysis does not understand or that mixes units: LayerNorm/GroupNorm (they normalise over the
  units together, so removing one changes the others), attention (``nn.MultiheadAttention`` is a leaf:
  its inner ``out_proj`` Linear is kept whole too), reshape/view other than ``view(batch, -1)``, indexing,
  softmax, a grouped (not depthwise) conv's input, division by them; a layer called more than once, a weight
  shared with another module (tied embeddings), a weight read directly as a tensor (``F.linear(x,
  self.fc.weight)``). A kept-whole group keeps every unit of every producer in it.
- A model ``torch.fx`` cannot trace (data-dependent control flow, ...) keeps every layer whole, with a
  note naming the tracing error. ``len(x)`` on a traced tensor is allowed (recorded as the batch size).

Shapes are not propagated (no example input is needed), so the analysis tracks only where the unit axis
sits, counted from the end (broadcasting keeps that fixed), and the tensor's rank where an op fixes it (a
Conv{d} output has rank ``d + 2``: batched inputs are assumed; ``flatten(s)`` gives rank ``s + 1``; the
model's inputs have unknown rank). Where the rank is needed and unknown (``BatchNorm1d`` after a Linear that
reads the raw input, ``x.mean(dim=1)`` of a Linear's output), the units are kept whole rather than guessed:
a flatten at the input, or negative ``dim`` values, make them removable.

``torch.nn`` layers are leaves of the trace, and so are user subclasses of Linear/Conv/BatchNorm that keep the
base ``forward``; a subclass with its own ``forward`` is traced into, and its weight, read as a tensor there,
is kept whole.
"""

from __future__ import annotations

import builtins
import operator
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from sparsearch.engine.sparsifier import default_sparsifiable_parameters


@dataclass(frozen=True)
class UnitSlot:
    """Where a group's units sit in one masked weight.

    As a producer: unit ``i`` is row ``offset + i``. As a consumer: unit ``i`` is columns
    ``offset + i * block ... offset + (i + 1) * block - 1`` (``block`` > 1 after a flatten).
    """

    parameter: str
    offset: int = 0
    block: int = 1


@dataclass(frozen=True)
class UnitGroup:
    """Units that are removed together: unit ``i`` of the group is unit ``i`` of every slot in it."""

    name: str  # the first producer's weight
    units: int
    producers: tuple[UnitSlot, ...]
    consumers: tuple[UnitSlot, ...]
    norms: tuple[str, ...] = ()  # BatchNorm modules whose channel i belongs to unit i


@dataclass(frozen=True)
class UnitAnalysis:
    """The removable unit groups of a model (in forward order) and one note per layer kept whole."""

    groups: tuple[UnitGroup, ...]
    notes: tuple[str, ...]


# ------------------------------------------------------------------------------------------------ tracing
_TRACING = threading.Lock()  # tracing shadows `len` in module globals: one trace at a time


class _Tracer(fx.Tracer):
    """torch.fx tracer that also records ``len(tensor)`` (fx refuses it: our CNN reshapes with ``len(x)``).

    Subclasses of Linear, Conv and BatchNorm that keep the base ``forward`` are leaves like their base (fx
    would trace into them and see their weight read as a tensor); one that overrides ``forward`` is traced.
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return type(m).forward in _BASE_FORWARDS or super().is_leaf_module(m, module_qualified_name)

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        tracer = self

        def traced_len(obj: Any) -> Any:
            if isinstance(obj, fx.Proxy):
                return tracer.create_proxy("call_function", builtins.len, (obj,), {})
            return builtins.len(obj)

        # the forward code looks `len` up in its module's globals first: shadow the builtin there while
        # tracing (what fx.wrap does, without registering it for every fx user of the process)
        namespaces = {id(g): g for m in root.modules() if (g := getattr(type(m).forward, "__globals__", None))}
        with _TRACING:
            patched = [g for g in namespaces.values() if "len" not in g]
            for g in patched:
                g["len"] = traced_len
            try:
                return super().trace(root, concrete_args)
            finally:
                for g in patched:
                    g.pop("len", None)


# ---------------------------------------------------------------------------------------- value layouts
@dataclass(frozen=True)
class _Layout:
    """Where units sit in a tensor: the unit axis (negative, from the end) and the groups along it."""

    axis: int
    segments: tuple[tuple[int, int], ...]  # (group id, units) in order along the axis
    block: int | None = 1  # None: flattened, each unit a block of trailing size that the reader resolves

    @property
    def units(self) -> int:
        return sum(units for _, units in self.segments)


@dataclass(frozen=True)
class _Value:
    """A tensor: its rank where known, and its layout if it carries units."""

    rank: int | None
    layout: _Layout | None = None


_BATCH = object()  # x.size(0), x.shape[0], len(x): the batch size
_OTHER = object()  # any other non-tensor value (a shape, a dtype, ...)

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_BATCH_NORMS = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}
_BASE_FORWARDS = {nn.Linear.forward, *(conv.forward for conv in _CONVS), nn.modules.batchnorm._BatchNorm.forward}
_UNARY_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.ELU, nn.LeakyReLU, nn.Hardswish, nn.Hardtanh, nn.Sigmoid, nn.Tanh,
    nn.Mish, nn.Softplus, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
)  # fmt: skip
_UNARY_FUNCTIONS = {
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.elu, F.leaky_relu, F.hardswish,
    F.hardtanh, F.mish, F.softplus, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh, F.dropout, F.dropout1d,
    F.dropout2d, F.dropout3d, torch.abs, torch.neg, operator.neg,
}  # fmt: skip
_UNARY_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous", "clone", "abs", "neg", "float",
    "double", "half", "bfloat16", "to", "detach", "type_as",
}  # fmt: skip
_BINARY_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.iadd, operator.isub, operator.imul,
                     torch.add, torch.sub, torch.mul}  # fmt: skip
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_"}
_DIVISIONS = {operator.truediv, operator.itruediv, torch.div, torch.true_divide}
_POOL_MODULES = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3, nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3,
}  # fmt: skip
_POOL_FUNCTIONS = {
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3,
    F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3, torch.max_pool1d: 1,
    torch.max_pool2d: 2, torch.max_pool3d: 3, torch.avg_pool1d: 1,
}  # fmt: skip
_REDUCTIONS = {"mean", "sum", "amax", "amin"}
_NON_TENSOR_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad"}


@dataclass
class _Group:
    units: int
    producers: list[UnitSlot] = field(default_factory=list)
    consumers: list[UnitSlot] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)


def _layer_label(model: nn.Module, parameter: str) -> str:
    module_name, _, leaf = parameter.rpartition(".")
    module = model.get_submodule(module_name)
    where = f"{module_name or '(root)'} ({type(module).__name__})"
    return where if leaf == "weight" else f"{where}.{leaf}"


class _Analysis:
    """One walk over the fx graph, collecting groups (union-find for ties) and reasons to keep units."""

    def __init__(self, model: nn.Module, graph: fx.Graph) -> None:
        self.model = model
        self.graph = graph
        self.masked = default_sparsifiable_parameters(model)
        # Linear/Conv modules whose own weight is masked (a head tied to its embedding is not), by module name
        name_of = {id(parameter): name for name, parameter in self.masked.items()}
        self.weight_of_module = {
            module_name: name_of[id(module.weight)]
            for module_name, module in model.named_modules()
            if isinstance(module, _LAYERS) and id(module.weight) in name_of
        }
        self.groups: list[_Group] = []
        self.parent: list[int] = []
        self.layer_reasons: dict[str, list[str]] = {name: [] for name in self.masked}
        for name in set(self.masked) - set(self.weight_of_module.values()):
            # nn.MultiheadAttention's input projections: masked weights that are no Linear/Conv layer's own
            self.layer_reasons[name].append("it is not the weight of a Linear or Conv layer (attention projection)")
        self.values: dict[fx.Node, Any] = {}
        self.called: dict[str, int] = {}
        for node in graph.nodes:
            if node.op == "call_module":
                self.called[node.target] = self.called.get(node.target, 0) + 1

    # -------------------------------------------------------------------------------- union-find groups
    def find(self, group: int) -> int:
        while self.parent[group] != group:
            self.parent[group] = self.parent[self.parent[group]]
            group = self.parent[group]
        return group

    def new_group(self, units: int) -> int:
        self.groups.append(_Group(units))
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        first, second = min(a, b), max(a, b)  # the earlier group names the union: forward order is kept
        self.parent[second] = first
        merged, other = self.groups[first], self.groups[second]
        merged.producers += other.producers
        merged.consumers += other.consumers
        merged.norms += other.norms
        merged.reasons += other.reasons

    def keep(self, value: Any, reason: str) -> None:
        """Keep every unit carried by ``value`` (or by tensors nested in it) whole, for ``reason``."""
        for layout in _layouts_in(value):
            for group, _ in layout.segments:
                self.groups[self.find(group)].reasons.append(reason)

    # ------------------------------------------------------------------------------------------- walk
    def run(self) -> UnitAnalysis:
        self.find_shared_weights()
        for node in self.graph.nodes:
            self.values[node] = self.visit(node)
        for module_name, weight in self.weight_of_module.items():
            if module_name not in self.called and not self.layer_reasons[weight]:
                self.layer_reasons[weight].append(self.why_never_called(module_name))
        return self.result()

    def find_shared_weights(self) -> None:
        names_of: dict[int, list[str]] = {}
        for name, parameter in self.model.named_parameters(remove_duplicate=False):
            names_of.setdefault(id(parameter), []).append(name)
        for name, parameter in self.masked.items():
            others = [other for other in names_of[id(parameter)] if other != name]
            if others:
                self.layer_reasons[name].append(f"its weight is shared with {', '.join(others)}")
        for module_name, weight in self.weight_of_module.items():
            calls = self.called.get(module_name, 0)
            if calls > 1:
                self.layer_reasons[weight].append(f"it is called {calls} times (shared layer)")

    def why_never_called(self, module_name: str) -> str:
        called_parents = [name for name in self.called if module_name.startswith(f"{name}.")]
        if called_parents:
            parent = max(called_parents, key=len)
            kind = type(self.model.get_submodule(parent)).__name__
            return f"it runs inside {parent} ({kind}), whose computation the analysis does not look into"
        return "the traced forward pass never calls it"

    def arg(self, value: Any) -> Any:
        """The analysis value of an fx argument (nodes looked up, containers kept, constants as they are)."""
        if isinstance(value, fx.Node):
            return self.values[value]
        if isinstance(value, list | tuple):
            return type(value)(self.arg(item) for item in value)
        if isinstance(value, dict):
            return {key: self.arg(item) for key, item in value.items()}
        if isinstance(value, slice):
            return _OTHER
        return value

    def visit(self, node: fx.Node) -> Any:
        args = [self.arg(a) for a in node.args]
        kwargs = {key: self.arg(v) for key, v in node.kwargs.items()}
        if node.op == "placeholder":
            return _Value(None)
        if node.op == "get_attr":
            return self.get_attr(node.target)
        if node.op == "output":
            self.keep(args, "they are the model's output")
            return _OTHER
        if node.op == "call_module":
            return self.call_module(node.target, args, kwargs)
        if node.op == "call_method":
            return self.call_method(node.target, args, kwargs)
        return self.call_function(node.target, args, kwargs)

    def get_attr(self, target: str) -> Any:
        attribute = self.model
        for part in target.split("."):
            attribute = getattr(attribute, part)
        for name, parameter in self.masked.items():
            if attribute is parameter:
                self.layer_reasons[name].append("the forward code reads its weight directly as a tensor")
        return _Value(attribute.dim() if isinstance(attribute, torch.Tensor) else None)

    def unknown(self, what: str, args: list[Any], kwargs: dict[str, Any]) -> _Value:
        self.keep([args, kwargs], f"they are read by {what}, which the analysis does not understand as per-unit")
        return _Value(None)

    # ------------------------------------------------------------------------------------------ modules
    def call_module(self, target: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        module = self.model.get_submodule(target)
        label = f"{target} ({type(module).__name__})"
        x = args[0] if args else None
        if isinstance(module, _LAYERS) and target in self.weight_of_module and len(args) == 1 and not kwargs:
            return self.layer(target, module, x)
        if isinstance(module, _UNARY_MODULES) and isinstance(x, _Value):
            return x
        if _norm_dims(module) and isinstance(x, _Value):
            return self.batch_norm(target, module, x)
        if type(module) in _POOL_MODULES and isinstance(x, _Value) and not getattr(module, "return_indices", False):
            return self.pool(x, _POOL_MODULES[type(module)], label)
        if isinstance(module, nn.Flatten) and isinstance(x, _Value):
            return self.flatten(x, module.start_dim, module.end_dim, label)
        if target in self.weight_of_module:
            self.layer_reasons[self.weight_of_module[target]].append(
                "it is called with arguments the analysis does not follow"
            )
        return self.unknown(label, args, kwargs)

    def layer(self, target: str, module: nn.Module, x: Any) -> _Value:
        weight = self.weight_of_module[target]
        label = f"{target} ({type(module).__name__})"
        dims = 0 if isinstance(module, nn.Linear) else next(d for kind, d in _CONVS.items() if isinstance(module, kind))
        axis = -1 if dims == 0 else -(dims + 1)
        layout = x.layout if isinstance(x, _Value) else None
        if self.layer_reasons[weight]:
            self.keep(x, f"they are read by {label}, which is kept whole")
            layout = None
        depthwise = dims > 0 and module.groups > 1 and module.groups == module.in_channels == module.out_channels
        if layout is not None:
            in_size = module.in_features if dims == 0 else module.in_channels
            block = layout.block
            if block is None and dims == 0 and in_size % layout.units == 0:
                block = in_size // layout.units
            if layout.axis != axis or block is None or layout.units * block != in_size:
                self.keep(x, f"{label} reads them along another axis or size than the analysis tracks")
                layout = None
            elif dims > 0 and module.groups > 1 and not depthwise:
                self.keep(x, f"they are read by {label}, a grouped convolution (groups={module.groups})")
                layout = None
            elif not depthwise:
                offset = 0
                for group, units in layout.segments:
                    self.groups[self.find(group)].consumers.append(UnitSlot(weight, offset * block, block))
                    offset += units
        rank = x.rank if dims == 0 and isinstance(x, _Value) else (dims + 2 if dims else None)
        if depthwise and layout is not None:
            offset = 0  # channel i reads only channel i: the conv's rows join the groups of its input
            for group, units in layout.segments:
                self.groups[self.find(group)].producers.append(UnitSlot(weight, offset))
                offset += units
            return _Value(rank, layout)
        units = module.out_features if dims == 0 else module.out_channels
        group = self.new_group(units)
        self.groups[group].producers.append(UnitSlot(weight))
        self.groups[group].reasons += self.layer_reasons[weight]
        return _Value(rank, _Layout(axis, ((group, units),)))

    def batch_norm(self, target: str, module: nn.Module, x: _Value) -> _Value:
        dims = _norm_dims(module)
        label = f"{target} ({type(module).__name__})"
        if x.layout is None:
            return x
        layout, rank = x.layout, x.rank
        if dims == 1 and rank is None:
            # (N, C) or (N, C, L): which axis it normalises depends on the rank; guessing could tie the wrong axis
            self.keep(x, f"{label} normalises axis 1 of a tensor whose rank is unknown (flatten the input first)")
            return _Value(None)
        channel_axis = -(dims + 1) if dims > 1 else 1 - rank
        if layout.axis != channel_axis or layout.block != 1 or layout.units != module.num_features:
            self.keep(x, f"{label} normalises them along another axis than the analysis tracks")
            return _Value(rank)
        for group, _ in layout.segments:
            self.groups[self.find(group)].norms.append(target)
        return _Value(rank if rank is not None else dims + 2, layout)  # BatchNorm2d/3d: (N, C, ...) only

    # ---------------------------------------------------------------------------------------- functions
    def call_function(self, target: Any, args: list[Any], kwargs: dict[str, Any]) -> Any:
        name = getattr(target, "__name__", repr(target))
        x = args[0] if args else None
        if target is builtins.len:
            return _BATCH
        if target is builtins.getattr:
            if isinstance(x, _Value) and args[1] in _NON_TENSOR_ATTRIBUTES:
                return _OTHER
            return self.unknown(f"attribute {args[1]!r}", args, kwargs)
        if target is operator.getitem and not isinstance(x, _Value):
            return _BATCH if args[1] == 0 and x is _OTHER else _OTHER
        if target in _UNARY_FUNCTIONS and isinstance(x, _Value):
            return x
        if target in _BINARY_FUNCTIONS and len(args) == 2:
            return self.elementwise(args, kwargs, name)
        if target in _DIVISIONS and len(args) == 2 and not _layouts_in(args[1]):
            return self.elementwise(args, kwargs, name)
        if target in _POOL_FUNCTIONS and isinstance(x, _Value) and not kwargs.get("return_indices", False):
            return self.pool(x, _POOL_FUNCTIONS[target], name)
        if target is torch.flatten and isinstance(x, _Value):
            return self.flatten(x, *_positional(args[1:], kwargs, ("start_dim", 0), ("end_dim", -1)), name)
        if target in (torch.cat, torch.concat) and isinstance(x, list | tuple):
            (dim,) = _positional(args[1:], kwargs, ("dim", 0))
            return self.cat(list(x), dim, name)
        if target in (torch.mean, torch.sum, torch.amax, torch.amin) and isinstance(x, _Value):
            return self.reduce(x, args[1:], kwargs, name)
        if target is torch.reshape and isinstance(x, _Value):
            return self.reshape(x, args[1], name)
        return self.unknown(name, args, kwargs)

    def call_method(self, target: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        x, rest = args[0], args[1:]
        if not isinstance(x, _Value):
            return _OTHER
        if target == "size":
            return _BATCH if rest == [0] or kwargs == {"dim": 0} else _OTHER
        if target in {"dim", "numel", "nelement"}:
            return _OTHER
        if target in _UNARY_METHODS:
            return x
        if target in _BINARY_METHODS and len(rest) == 1:
            return self.elementwise(args, kwargs, f".{target}()")
        if target in {"div", "div_"} and len(rest) == 1 and not _layouts_in(rest[0]):
            return self.elementwise(args, kwargs, f".{target}()")
        if target == "flatten":
            return self.flatten(x, *_positional(rest, kwargs, ("start_dim", 0), ("end_dim", -1)), ".flatten()")
        if target in {"view", "reshape"}:
            shape = rest[0] if len(rest) == 1 and isinstance(rest[0], list | tuple) else rest
            return self.reshape(x, shape, f".{target}()")
        if target in _REDUCTIONS:
            return self.reduce(x, rest, kwargs, f".{target}()")
        return self.unknown(f".{target}()", args, kwargs)

    # ------------------------------------------------------------------------------------- op semantics
    def elementwise(self, args: list[Any], kwargs: dict[str, Any], what: str) -> _Value:
        values = [a for a in args if isinstance(a, _Value)]
        ranks = [v.rank for v in values]
        # broadcasting aligns trailing axes: the unit axis, counted from the end, stays where it was
        rank = None if None in ranks else max(ranks, default=None)
        layouts = [v.layout for v in values if v.layout is not None]
        if not layouts:
            return _Value(rank)
        first = layouts[0]
        for other in layouts[1:]:
            same = (other.axis, other.block, [u for _, u in other.segments]) == (
                first.axis,
                first.block,
                [u for _, u in first.segments],
            )
            if not same:
                self.keep(args, f"{what} combines them with units laid out differently")
                return _Value(rank)
        for other in layouts[1:]:
            for (a, _), (b, _) in zip(first.segments, other.segments, strict=True):
                self.union(a, b)
        return _Value(rank, first)

    def pool(self, x: _Value, dims: int, what: str) -> _Value:
        if x.layout is not None and (x.layout.axis >= -dims or x.layout.block != 1):
            self.keep(x, f"{what} pools over them")
            return _Value(x.rank)
        return x

    def flatten(self, x: _Value, start: Any, end: Any, what: str) -> _Value:
        if not isinstance(start, int) or not isinstance(end, int):
            return self.unknown(what, [x], {})
        if x.rank is None:
            if start < 0 or end != -1:
                return self.unknown(what, [x], {})
            if x.layout is not None:
                self.keep(x, f"{what} flattens them where the tensor's rank is unknown")
            return _Value(start + 1)
        rank = x.rank
        start, end = start % rank, end % rank
        new_rank = rank - (end - start)
        layout = x.layout
        if layout is None or layout.block != 1:
            if layout is not None and start <= rank + layout.axis <= end and start != end:
                self.keep(x, f"{what} flattens them twice")
                return _Value(new_rank)
            return _Value(new_rank, layout)
        position = rank + layout.axis
        if position < start:
            return _Value(new_rank, _Layout(position - new_rank, layout.segments))
        if position > end:
            return _Value(new_rank, _Layout(layout.axis, layout.segments))
        if start == end:
            return x
        if position == start:  # units become the major index: each one a block of the trailing size
            return _Value(new_rank, _Layout(start - new_rank, layout.segments, None))
        self.keep(x, f"{what} interleaves them with the axes before them")
        return _Value(new_rank)

    def reshape(self, x: _Value, shape: Any, what: str) -> _Value:
        shape = list(shape) if isinstance(shape, list | tuple) else None
        if shape is not None and len(shape) == 2 and shape[0] is _BATCH and shape[1] == -1:
            return self.flatten(x, 1, -1, what)  # view(batch, -1) is flatten(1)
        if x.layout is not None:
            self.keep(x, f"{what} reshapes them")
        return _Value(len(shape) if shape is not None else None)

    def reduce(self, x: _Value, rest: list[Any], kwargs: dict[str, Any], what: str) -> _Value:
        dim, keepdim = _positional(rest, kwargs, ("dim", None), ("keepdim", False))
        dims = [dim] if isinstance(dim, int) else list(dim) if isinstance(dim, list | tuple) else None
        if dims is None or not all(isinstance(d, int) for d in dims) or not isinstance(keepdim, bool):
            return self.unknown(what, [x], {})
        if x.rank is None and any(d >= 0 for d in dims):
            if x.layout is not None:
                self.keep(x, f"{what} reduces axes of a tensor whose rank is unknown")
            return _Value(None)
        negative = [d if d < 0 else d - x.rank for d in dims]
        rank = None if x.rank is None else (x.rank if keepdim else x.rank - len(dims))
        if x.layout is None:
            return _Value(rank)
        axis = x.layout.axis
        if axis in negative or x.layout.block != 1:
            self.keep(x, f"{what} reduces over them")
            return _Value(rank)
        if not keepdim:
            axis += sum(1 for d in negative if d > axis)
        return _Value(rank, _Layout(axis, x.layout.segments))

    def cat(self, tensors: list[Any], dim: Any, what: str) -> _Value:
        if not isinstance(dim, int) or not all(isinstance(t, _Value) for t in tensors) or not tensors:
            return self.unknown(what, [tensors], {})
        ranks = {t.rank for t in tensors if t.rank is not None}
        rank = ranks.pop() if len(ranks) == 1 else None
        layouts = [t.layout for t in tensors if t.layout is not None]
        if not layouts:
            return _Value(rank)
        if dim >= 0:
            if rank is None:
                self.keep(tensors, f"{what} joins them along an axis of unknown position")
                return _Value(None)
            dim -= rank
        if all(layout.axis != dim for layout in layouts):
            return self.elementwise(tensors, {}, what)
        if len(layouts) != len(tensors) or any(la.axis != dim or la.block != 1 for la in layouts):
            self.keep(tensors, f"{what} joins them with tensors whose units the analysis does not track")
            return _Value(rank)
        segments = tuple(segment for layout in layouts for segment in layout.segments)
        return _Value(rank, _Layout(dim, segments))

    # ------------------------------------------------------------------------------------------- result
    def result(self) -> UnitAnalysis:
        notes: list[str] = []
        removable: list[UnitGroup] = []
        kept_layers: dict[str, list[str]] = {}
        for index, group in enumerate(self.groups):
            if self.find(index) != index:
                continue
            if group.reasons:
                for slot in group.producers:
                    kept_layers.setdefault(slot.parameter, []).extend(group.reasons)
                continue
            removable.append(
                UnitGroup(
                    name=group.producers[0].parameter,
                    units=group.units,
                    producers=tuple(group.producers),
                    consumers=tuple(group.consumers),
                    norms=tuple(dict.fromkeys(group.norms)),
                )
            )
        for name, reasons in self.layer_reasons.items():
            kept_layers.setdefault(name, []).extend(reasons)
        for name in self.masked:  # forward-independent, stable order: the order of named_modules
            reasons = list(dict.fromkeys(kept_layers.get(name, [])))
            if reasons:
                notes.append(f"{_layer_label(self.model, name)}: all units kept: {'; '.join(reasons)}")
        return UnitAnalysis(tuple(removable), tuple(notes))


def _norm_dims(module: nn.Module) -> int:
    """Spatial dimensions of a BatchNorm{1,2,3}d (subclasses included), 0 for anything else."""
    return next((dims for kind, dims in _BATCH_NORMS.items() if isinstance(module, kind)), 0)


def _positional(args: list[Any], kwargs: dict[str, Any], *spec: tuple[str, Any]) -> list[Any]:
    """Arguments ``spec`` (name, default) from positional ``args`` then ``kwargs``."""
    return [args[i] if i < len(args) else kwargs.get(name, default) for i, (name, default) in enumerate(spec)]


def _layouts_in(value: Any) -> list[_Layout]:
    return list(_iter_layouts(value))


def _iter_layouts(value: Any) -> Iterator[_Layout]:
    if isinstance(value, _Value):
        if value.layout is not None:
            yield value.layout
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _iter_layouts(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _iter_layouts(item)


def find_unit_groups(model: nn.Module) -> UnitAnalysis:
    """The groups of units of ``model`` that can be removed together, and a note for every layer kept whole.

    Works on any ``nn.Module`` that ``torch.fx`` can trace; see the module docstring for the rules.
    """
    try:
        graph = _Tracer().trace(model)
    except Exception as error:  # fx raises many types (TraceError, TypeError, RuntimeError ...)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        notes = tuple(
            f"{_layer_label(model, name)}: all units kept: torch.fx cannot trace {type(model).__name__} "
            f"({type(error).__name__}: {reason})"
            for name in default_sparsifiable_parameters(model)
        )
        return UnitAnalysis((), notes)
    return _Analysis(model, graph).run()
