"""What a study trains: its validated config plus the parent model and the data, built-in or the user's own.

:class:`StudyInputs` is what every executor sends to its workers (it pickles: the user's functions must be
importable, module-level functions). The model is ``model(seed) -> nn.Module`` (a Python callable, or the
study file's ``model = "package.module:function"``), or a registered architecture (``[model] arch``); the data
is a :class:`~sparsearch.data.DataSplits`, a mapping of splits, a function ``data(seed)`` returning one of
those, or a registered data set name. :func:`check_inputs` builds both once before the store is touched, so
an entry point that does not import, returns the wrong type, a model with nothing to mask or data that does
not fit the model fails with a message naming it and what was expected.
"""

from __future__ import annotations

import functools
import hashlib
import json
import pickle
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from sparsearch.data import DataSplits, as_splits, load_dataset
from sparsearch.engine.sparsifier import default_sparsifiable_parameters
from sparsearch.models import build_model
from sparsearch.registry import resolve_reference
from sparsearch.search import make_space
from sparsearch.study.config import ModelSpec, StudyConfig, is_reference, split_mask_arm

ModelFactory = Callable[[int], nn.Module]
"""The user's parent network: ``factory(seed) -> nn.Module`` (same seed -> same weights)."""


def _qualified_name(function: object) -> str:
    """``module:qualname`` of a function; a ``functools.partial`` also shows its bound arguments."""
    if isinstance(function, functools.partial):
        bound = [repr(arg) for arg in function.args] + [f"{k}={v!r}" for k, v in function.keywords.items()]
        return f"{_qualified_name(function.func)}({', '.join(bound)})"
    module = getattr(function, "__module__", None) or "?"
    name = getattr(function, "__qualname__", None) or type(function).__qualname__
    return f"{module}:{name}"


class StudyInputs:
    """A study's config with its model and data sources; loads data and builds parents (in any process).

    Args:
        config: the validated study.
        model: the user's ``model(seed) -> nn.Module``; None: the config's model.
        data: the user's data (``DataSplits``, a mapping of splits, or ``data(seed)`` returning one);
            None: the config's data set.
        search_workers: processes each search evaluates its candidates on (``run_study`` sets it from
            ``[search] workers`` and the executor; 1 = one after another in the trial's process).
        search_workers_note: why candidates run in order although more were asked for ("" if they do not);
            every search trial records it.
    """

    def __init__(
        self,
        config: StudyConfig,
        model: ModelFactory | None = None,
        data: object | None = None,
        *,
        search_workers: int = 1,
        search_workers_note: str = "",
    ) -> None:
        if model is not None and not callable(model):
            raise ValueError(
                f"model must be a function of the seed returning a torch.nn.Module, got {type(model).__name__}"
            )
        self.config = config
        self.model = model
        self.data = data
        self.search_workers = search_workers
        self.search_workers_note = search_workers_note
        self._data_cache: dict[int, DataSplits] = {}

    # pickled for workers without the data cache (each process loads its own once)
    def __getstate__(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "model": self.model,
            "data": self.data,
            "search_workers": self.search_workers,
            "search_workers_note": self.search_workers_note,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(  # type: ignore[misc]
            state["config"],
            state["model"],
            state["data"],
            search_workers=state["search_workers"],
            search_workers_note=state["search_workers_note"],
        )

    # ------------------------------------------------------------------------------ descriptions
    @property
    def model_label(self) -> str:
        """How errors and the store name the model: the user's function or the registered architecture."""
        if self.model is not None:
            return f"model {_qualified_name(self.model)!r}"
        if isinstance(self.config.model, str):
            return f"model {self.config.model!r}"
        return f"model arch {self.config.model.arch!r}"

    @property
    def data_label(self) -> str:
        """How errors and the store name the data."""
        if self.data is None:
            return f"dataset {self.config.dataset!r}"
        if callable(self.data):
            return f"data {_qualified_name(self.data)!r}"
        return f"data ({type(self.data).__name__})"

    def content(self) -> dict[str, Any]:
        """The config's content with the Python model and data recorded (the store's identity of the study)."""
        content = self.config.content()
        if self.model is not None:
            content["model"] = f"python:{_qualified_name(self.model)}"
        if self.data is not None:
            if callable(self.data):
                content["dataset"] = f"python:{_qualified_name(self.data)}"
            else:
                content["dataset"] = f"tensors:{fingerprint(self.load_data(self.config.seeds[0]))}"
        return content

    def config_hash(self) -> str:
        """Stable hash of :meth:`content`; equals ``config.config_hash()`` for a study without Python inputs."""
        if self.model is None and self.data is None:
            return self.config.config_hash()
        return _hash_content(self.content())

    # -------------------------------------------------------------------------------- building
    def load_data(self, seed: int) -> DataSplits:
        """The data splits for ``seed`` (loaded once per process and seed)."""
        if seed not in self._data_cache:
            self._data_cache[seed] = self._load_data(seed)
        return self._data_cache[seed]

    def _load_data(self, seed: int) -> DataSplits:
        config = self.config
        if self.data is None and not is_reference(config.dataset):
            root = str(config.data_dir) if config.data_dir is not None else None
            return load_dataset(config.dataset, seed=seed, root=root)
        source = self.data if self.data is not None else resolve_reference(config.dataset, what="dataset")
        label = self.data_label
        if callable(source):
            try:
                source = source(seed)
            except Exception as error:
                raise ValueError(
                    f"{label} raised {type(error).__name__} when called with seed={seed}: {error}"
                ) from error
        return as_splits(source, seed=seed, name=_data_name(source, label), what=f"{label} (called with seed={seed})")

    def build_model(self, seed: int, data: DataSplits) -> nn.Module:
        """A fresh parent network initialised from ``seed``."""
        model_spec = self.config.model
        if self.model is None and isinstance(model_spec, ModelSpec):
            return build_model(model_spec.arch, data.input_shape, data.num_classes, widths=model_spec.widths, seed=seed)
        factory = self.model if self.model is not None else resolve_reference(str(model_spec), what="model")
        # seeded here too, so that a factory that ignores its seed still gives every arm the same parent
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                model = factory(seed)  # type: ignore[operator]
            except Exception as error:
                raise ValueError(
                    f"{self.model_label} raised {type(error).__name__} when called with seed={seed}: {error}"
                ) from error
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"{self.model_label} returned {type(model).__name__}, expected a torch.nn.Module "
                "(the study calls it as model(seed))"
            )
        return model


def _data_name(source: object, label: str) -> str:
    if isinstance(source, DataSplits):
        return source.name
    return label.partition(" ")[2].strip("'()") or "custom"


def _hash_content(content: Mapping[str, Any]) -> str:
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def fingerprint(data: DataSplits) -> str:
    """A hash of every split's tensors: a store refuses to mix trials trained on different data."""
    digest = hashlib.sha256()
    for tensor in (data.x_train, data.y_train, data.x_val, data.y_val, data.x_test, data.y_test):
        digest.update(str((tuple(tensor.shape), tensor.dtype)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def check_inputs(inputs: StudyInputs, *, needs_pickling: bool) -> None:
    """Fail before the store is touched if the data cannot be loaded, the parent cannot be built or masked,
    the data does not fit the model, or (``needs_pickling``) the inputs cannot be sent to worker processes.

    Also warms the data cache (MNIST-1D is generated once), so workers do not all generate it at once.
    """
    config = inputs.config
    data = inputs.load_data(config.seeds[0])
    model = inputs.build_model(config.seeds[0], data)
    if any(arm != "dense" for arm in config.arms) and not default_sparsifiable_parameters(model):
        raise ValueError(
            f"{inputs.model_label} ({type(model).__name__}) has nothing to mask: sparsearch masks the weights of "
            "nn.Linear and nn.Conv1d/2d/3d layers, and it has none (only the 'dense' arm could run)"
        )
    _check_fit(inputs, model, data)
    for arm in config.arms:
        mask_arm = split_mask_arm(arm)
        if mask_arm is not None:
            space_name = mask_arm[1]
            try:
                make_space(space_name, model, config.sparsities[0], distribution=config.search.distribution)
            except (TypeError, ValueError) as error:
                raise ValueError(f"arm {arm!r} cannot run on {inputs.model_label}: {error}") from None
    if needs_pickling:
        for what, source in ((inputs.model_label, inputs.model), (inputs.data_label, inputs.data)):
            if source is None or not callable(source):
                continue
            try:
                pickle.dumps(source)
            except Exception as error:
                raise ValueError(
                    f"{what} cannot be sent to worker processes ({type(error).__name__}: {error}); define it at "
                    "the top level of an importable module (not a lambda or a nested function), or run with "
                    "workers=1"
                ) from None


@torch.no_grad()
def _check_fit(inputs: StudyInputs, model: nn.Module, data: DataSplits) -> None:
    """One forward pass of two training samples: the model must map them to one score per class."""
    batch = data.x_train[:2]
    was_training = model.training
    model.eval()
    try:
        output = model(batch)
    except Exception as error:
        raise ValueError(
            f"{inputs.data_label} does not fit {inputs.model_label}: a batch of inputs of shape "
            f"{tuple(batch.shape)} (per sample {data.input_shape}) raised {type(error).__name__}: {error}"
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(output, torch.Tensor) or output.dim() != 2 or output.shape[0] != len(batch):
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ValueError(
            f"{inputs.model_label} must return class scores of shape (batch, classes); for a batch of "
            f"{len(batch)} it returned {shape}"
        )
    if output.shape[1] < data.num_classes:
        raise ValueError(
            f"{inputs.data_label} does not fit {inputs.model_label}: the labels go up to {data.num_classes - 1} "
            f"({data.num_classes} classes) but the model returns {output.shape[1]} scores per sample"
        )
