"""Save and load sparse models with safetensors: weights, masks, sparsifier and optimizer state, metadata.

One ``.safetensors`` file, no pickle anywhere. Tensor names: ``model/<state_dict key>`` (the model's own keys,
unchanged), ``mask/<parameter name>`` (bool), ``sparsifier/<path>`` and ``optimizer/<path>`` for resumable
training state. Everything that is not a tensor (format version, algorithm and its config, step, optimizer
hyper-parameters) is JSON in the safetensors metadata under the key ``"sparsearch"``.

``load`` checks names and shapes of weights and masks against the model, and that the weights are zero
wherever a mask says so (for algorithms that mask the weights), and raises a ValueError naming the first
mismatch instead of loading part of a checkpoint.

Why the ``model/`` prefix (and why plain ``safetensors.torch.load_model`` does not read these files): one file
holds four namespaces, and a model's own keys may be anything, including ``mask.weight`` or
``optimizer.state`` (a submodule named ``mask``); unprefixed, they could collide with the masks and state.
Without sparsearch, read the weights with::

    tensors = safetensors.torch.load_file(path)
    model.load_state_dict({k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")})

A tied weight (a head sharing its embedding's tensor) is stored under each of its state-dict keys, as
``model.state_dict()`` lists it; its mask, if any, under its canonical name (the one ``named_parameters()``
gives).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from sparsearch.engine.sparsifier import Sparsifier

FORMAT_VERSION = 1
METADATA_KEY = "sparsearch"


@dataclass
class Checkpoint:
    """What ``load`` found besides the weights: masks, metadata (algorithm, config, step, user metadata)."""

    masks: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def step(self) -> int | None:
        return self.metadata.get("step")


def _flatten(prefix: str, value: Any, tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    if torch.is_tensor(value):
        tensors[prefix] = value.detach().cpu().contiguous().clone()
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(f"{prefix}/{key}", item, tensors, plain)
    else:
        plain[prefix] = value


def _unflatten(prefix: str, tensors: Mapping[str, torch.Tensor], plain: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in [*tensors.items(), *plain.items()]:
        if not path.startswith(prefix + "/"):
            continue
        *parents, leaf = path[len(prefix) + 1 :].split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between a checkpoint's sparsifier config and the given sparsifier's."""
    current = json.loads(json.dumps(current))  # the same JSON types as the stored config (tuples -> lists)
    return [
        f"{key}: checkpoint {saved.get(key)!r}, this sparsifier {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        # the seed does not matter once loaded: the checkpoint's random state replaces the seeded one
        if key != "seed" and saved.get(key) != current.get(key)
    ]


def save(
    model: nn.Module,
    path: str | Path,
    *,
    sparsifier: Sparsifier | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` (and the attached or given sparsifier, and optionally the optimizer) to ``path``.

    ``metadata`` is any JSON-serialisable mapping stored alongside. Returns the path written.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a directory; pass a file path such as {str(path / 'model.safetensors')!r}")
    sparsifier = sparsifier if sparsifier is not None else getattr(model, "_sparsearch_sparsifier", None)
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {}
    for key, value in model.state_dict().items():
        tensors[f"model/{key}"] = value.detach().cpu().contiguous().clone()
    info: dict[str, Any] = {"format_version": FORMAT_VERSION, "user": dict(metadata or {})}
    if sparsifier is not None:
        state = sparsifier.state_dict()
        for name, mask in state.pop("masks").items():
            tensors[f"mask/{name}"] = mask.to(torch.bool).contiguous()
        _flatten("sparsifier", state, tensors, plain)
        info.update(
            algorithm=type(sparsifier).__name__,
            config=sparsifier.config(),
            step=sparsifier.step,
            weights_masked=sparsifier.masks_weights,
        )
    if optimizer is not None:
        optimizer_state = optimizer.state_dict()
        _flatten("optimizer/state", optimizer_state["state"], tensors, plain)
        info["optimizer"] = {"type": type(optimizer).__name__, "param_groups": optimizer_state["param_groups"]}
    info["plain"] = plain
    try:
        text = json.dumps(info)
    except TypeError as error:
        raise ValueError(f"metadata must be JSON-serialisable: {error}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={METADATA_KEY: text})
    return path


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{str(path)!r} is not a readable safetensors file: {error}") from None
    if METADATA_KEY not in header:
        raise ValueError(f"{str(path)!r} has no sparsearch metadata; write it with sparsearch.save")
    info = json.loads(header[METADATA_KEY])
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} has checkpoint format version {info.get('format_version')!r}; "
            f"this sparsearch reads version {FORMAT_VERSION}"
        )
    return tensors, info


def _check_model(model: nn.Module, saved: Mapping[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {str(path)!r} does not match the model: missing keys {missing}, unexpected keys {unexpected}"
        )
    for key, value in saved.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"checkpoint {str(path)!r}: {key!r} has shape {tuple(value.shape)}, "
                f"the model has {tuple(expected[key].shape)}"
            )


def _check_masks(
    model: nn.Module, masks: Mapping[str, torch.Tensor], saved: Mapping[str, torch.Tensor], info: Mapping[str, Any]
) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, mask in masks.items():
        if name not in params:
            raise ValueError(f"checkpoint has a mask for {name!r}, which is not a parameter of the model")
        if tuple(mask.shape) != tuple(params[name].shape):
            raise ValueError(
                f"checkpoint mask for {name!r} has shape {tuple(mask.shape)}, the parameter has "
                f"{tuple(params[name].shape)}"
            )
        if info.get("weights_masked", True) and bool((saved[name] != 0)[~mask].any()):
            raise ValueError(f"checkpoint weights of {name!r} are non-zero where its mask is zero")


def load(
    model: nn.Module,
    path: str | Path,
    *,
    sparsifier: Sparsifier | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    strict: bool = True,
) -> Checkpoint:
    """Load weights from ``path`` into ``model``; restore the sparsifier (the given one, or the one attached to
    the model) and the optimizer when given. Returns the masks and metadata.

    Everything is validated before anything is written into the model. A checkpoint written by a sparsifier
    configured differently (another algorithm, sparsity, distribution, ...) is refused with the differences
    named; ``strict=False`` loads it anyway (the masks and state are the checkpoint's) with a warning.
    """
    path = Path(path)
    tensors, info = _read(path)
    saved = {key[len("model/") :]: value for key, value in tensors.items() if key.startswith("model/")}
    masks = {key[len("mask/") :]: value for key, value in tensors.items() if key.startswith("mask/")}
    _check_model(model, saved, path)
    _check_masks(model, masks, saved, info)
    sparsifier = sparsifier if sparsifier is not None else getattr(model, "_sparsearch_sparsifier", None)
    if sparsifier is not None:
        if sparsifier.model is not model:
            raise ValueError("attach the sparsifier to this model before loading a checkpoint into it")
        if set(masks) != set(sparsifier.params):
            raise ValueError(
                f"checkpoint {str(path)!r} has masks for {sorted(masks)}, but the sparsifier masks "
                f"{sorted(sparsifier.params)}"
            )
        differences = config_differences(info.get("config", {}), sparsifier.config())
        if differences:
            message = f"checkpoint {str(path)!r} was written by a differently configured sparsifier: " + "; ".join(
                differences
            )
            if strict:
                raise ValueError(message + "; pass strict=False to load its masks and state anyway")
            warnings.warn(message, UserWarning, stacklevel=2)
    if optimizer is not None and "optimizer" not in info:
        raise ValueError(f"checkpoint {str(path)!r} holds no optimizer state (save it with optimizer=)")
    plain = info.get("plain", {})
    model.load_state_dict(saved)
    if sparsifier is not None:
        state = _unflatten("sparsifier", tensors, plain)
        state["masks"] = masks
        sparsifier.load_state_dict(state)
    if optimizer is not None:
        optimizer_state = _unflatten("optimizer/state", tensors, plain)
        optimizer.load_state_dict(
            {
                "state": {int(index): value for index, value in optimizer_state.items()},
                "param_groups": info["optimizer"]["param_groups"],
            }
        )
    metadata = {key: value for key, value in info.items() if key != "plain"}
    return Checkpoint(masks=masks, metadata=metadata)


def save_sparsifier_state(sparsifier: Sparsifier, path: str | Path) -> Path:
    """Write only the sparsifier's state (masks, step, random and algorithm state) and config to ``path``, e.g.
    beside a trainer's own checkpoint of the weights and optimizer (see ``sparsearch.integrations``)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a directory; pass a file path")
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {}
    state = sparsifier.state_dict()
    for name, mask in state.pop("masks").items():
        tensors[f"mask/{name}"] = mask.to(torch.bool).contiguous()
    _flatten("sparsifier", state, tensors, plain)
    info = {
        "format_version": FORMAT_VERSION,
        "algorithm": type(sparsifier).__name__,
        "config": sparsifier.config(),
        "step": sparsifier.step,
        "plain": plain,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(info)})
    return path


def read_sparsifier_state(path: str | Path, sparsifier: Sparsifier | None = None) -> dict[str, Any]:
    """The state written by :func:`save_sparsifier_state`, for ``sparsifier.attach(model, optimizer, state=...)``.

    With ``sparsifier`` given, a state written by a differently configured one is refused, naming the
    differences."""
    path = Path(path)
    tensors, info = _read(path)
    if sparsifier is not None:
        differences = config_differences(info.get("config", {}), sparsifier.config())
        if differences:
            raise ValueError(
                f"sparsifier state {str(path)!r} was written by a differently configured sparsifier: "
                + "; ".join(differences)
            )
    state = _unflatten("sparsifier", tensors, info.get("plain", {}))
    state["masks"] = {key[len("mask/") :]: value for key, value in tensors.items() if key.startswith("mask/")}
    return state
