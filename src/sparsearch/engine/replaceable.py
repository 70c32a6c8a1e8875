"""Which layers of a model may be replaced by another module (a sparse kernel, a Sparse-IFT family member).

A layer whose weight its parent reads itself (``nn.MultiheadAttention``'s ``out_proj``, the inference fast path
of ``nn.TransformerEncoderLayer``) or whose weight is tied to another module's breaks or unties when replaced.
"""

from __future__ import annotations

from torch import nn


def shared_parameters(model: nn.Module) -> dict[int, list[str]]:
    """Names of every parameter by tensor identity (a tied parameter has several)."""
    owners: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append(f"{module_name}.{param_name}" if module_name else param_name)
    return owners


def reason_to_keep_dense(model: nn.Module, name: str, owners: dict[int, list[str]] | None = None) -> str | None:
    """Why the Linear-like layer `name` of `model` must not be replaced by `SparseLinear` whatever the timings
    (its parent reads its weight, or the weight is tied to another module's), or None."""
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name)  # "" is the model itself
    if isinstance(parent, nn.MultiheadAttention):
        return "nn.MultiheadAttention reads out_proj.weight itself: replacing the layer would break it"
    if isinstance(parent, nn.TransformerEncoderLayer) and name.rpartition(".")[2] in ("linear1", "linear2"):
        return ("nn.TransformerEncoderLayer's inference fast path reads linear1/linear2 weights itself: replacing "
                "the layer would break it")
    owners = shared_parameters(model) if owners is None else owners
    weight = model.get_submodule(name).weight
    tied = [other for other in owners.get(id(weight), []) if other.rpartition(".")[0] != name]
    if tied:
        return f"weight is tied to {', '.join(sorted(tied))}: kept dense so that the tie holds"
    return None


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` where `model`'s submodule `name` is (`name` as `named_modules()` gives it)."""
    if not name:
        raise ValueError("a module cannot replace itself in place (it has no parent); wrap it first")
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
