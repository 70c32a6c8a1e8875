"""The study file: a validated description of one sparse-architecture study (data, model, sparsities, arms,
seeds, budgets, search settings, store and executor), read from TOML and checked with pydantic.

The model is a registered architecture (``[model] arch = "cnn"``, see ``sparsearch.models.MODELS``) or the
user's own factory ``model = "package.module:function"`` (``function(seed) -> nn.Module``); the data set is a
registered name (``sparsearch.data.DATASETS``) or ``dataset = "package.module:function"``
(``function(seed)`` returning a ``DataSplits`` or a mapping of splits, see ``sparsearch.data.as_splits``).
References are imported from the environment or the current directory when the file is read.

Every problem in a study file becomes one line naming the key, the bad value and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sparsearch.algorithms import ARMS
from sparsearch.data import DATASETS
from sparsearch.models import MODELS
from sparsearch.registry import resolve_reference
from sparsearch.search import SCORERS, SEARCH_METHODS, SPACES, built_in_order, check_method_fits
from sparsearch.sparsity.distribution import DISTRIBUTIONS
from sparsearch.training import TrainBudget

BASE_ARMS = ("dense", "random-node", "random-weight", "search-node", "search-weight")
"""The default study's arms: the dense parent, random sparse sub-networks, and Random-Search winners."""

DEFAULT_STORE_DIR = Path("sparsearch-runs")
# keys that choose where and how a study runs, not what it computes: they stay out of the config hash
# (sparse_kernels computes the same masked training summed in another order: like the thread count, it changes
# results at float rounding only)
RUN_ONLY_KEYS = frozenset({"store", "workers", "executor", "ray_address", "sparse_kernels"})
RUN_ONLY_SEARCH_KEYS = frozenset({"workers"})


def search_spaces() -> tuple[str, ...]:
    """Names of the search spaces a mask arm (``random-<space>`` / ``<method>-<space>``) may use."""
    return SPACES.names()


def search_methods() -> tuple[str, ...]:
    """Names of the search methods (``sparsearch.search.SEARCH_METHODS``); ``random`` is the unscored sample."""
    return tuple(sorted(SEARCH_METHODS, key=built_in_order))


def mask_arm_kinds() -> tuple[str, ...]:
    """What may stand before the space in a mask arm: ``random`` or a search method."""
    return ("random", *search_methods())


def split_mask_arm(arm: str) -> tuple[str, str] | None:
    """``(kind, space)`` of a mask arm such as ``sh-node`` (kind "random" or a search method), else None."""
    for kind in mask_arm_kinds():
        if arm.startswith(f"{kind}-") and len(arm) > len(kind) + 1:
            return kind, arm[len(kind) + 1 :]
    return None


def mask_arms() -> tuple[str, ...]:
    """Every ``random-<space>`` and ``<method>-<space>`` arm whose method fits its space."""
    arms = [f"random-{space}" for space in search_spaces()]
    for method in search_methods():
        fits = SEARCH_METHODS.get(method).spaces
        arms += [f"{method}-{space}" for space in search_spaces() if fits is None or space in fits]
    return tuple(arms)


def algorithm_arms() -> tuple[str, ...]:
    """Arms registered in ``sparsearch.algorithms.ARMS`` (built-ins, user code and entry points)."""
    return tuple(name for name in ARMS.names() if name != "dense" and split_mask_arm(name) is None)


def is_reference(name: str) -> bool:
    """Whether ``name`` is a ``"package.module:function"`` reference rather than a registered name."""
    return ":" in name


def _check_reference(reference: str, what: str) -> str:
    target = resolve_reference(reference, what=what)
    if not callable(target):
        raise ValueError(f"{what} {reference!r} is a {type(target).__name__}, expected a function of the seed")
    return reference


def known_arms() -> tuple[str, ...]:
    """Every arm name a study file may list."""
    return ("dense", *mask_arms(), *algorithm_arms())


def _allowed(values: tuple[str, ...] | list[str]) -> str:
    return ", ".join(values)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """The over-parameterised parent network every arm starts from."""

    arch: str = "mlp"
    widths: tuple[int, ...] | None = Field(
        default=None, description="MLP hidden widths or CNN channels; default: the architecture's own"
    )

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        if arch not in MODELS:
            raise ValueError(
                f"unknown model arch {arch!r}; allowed: {_allowed(MODELS.names())} "
                '(or your own: model = "package.module:function" at the top level of the study file)'
            )
        return arch

    @field_validator("widths")
    @classmethod
    def _positive_widths(cls, widths: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if widths is not None and (not widths or any(w < 1 for w in widths)):
            raise ValueError(f"widths must be a non-empty list of positive integers, got {list(widths)}")
        return widths


class SearchSpec(_Strict):
    """How Random Search scores candidates, how the weight space spreads sparsity over layers, and how many
    candidates of one search are evaluated at a time (``workers``: 1 = one after another in the trial's
    process; N = up to N forked processes per search; "auto" = the cores the study's parallel trials leave
    free, see :meth:`StudyConfig.search_worker_count`). ``workers`` changes where candidates run, never
    what they score, so it stays out of the config hash."""

    n_candidates: int = Field(default=8, ge=1)
    scorer: str = "short-train"
    short_train_steps: int = Field(default=50, ge=1)
    batch_size: int = Field(default=128, ge=1)
    distribution: str = Field(
        default="erk", description="layer-wise distribution of the weight space (random and search arms alike)"
    )
    budget_flops: int | None = Field(
        default=None,
        description="FLOPs every search method may spend per search; default: what Random Search spends "
        "(n_candidates scored by the scorer) in the same space and cell",
    )
    workers: int | Literal["auto"] = Field(
        default=1, description='candidates of one search evaluated at a time: 1 (in order), N, or "auto"'
    )

    @field_validator("workers", mode="before")
    @classmethod
    def _valid_search_workers(cls, workers: object) -> object:
        if workers == "auto" or (isinstance(workers, int) and not isinstance(workers, bool) and workers >= 1):
            return workers
        raise ValueError(
            f"search workers must be a positive whole number of processes per search (1 = candidates one after "
            f'another) or "auto" (the cores that parallel trials leave free), got {workers!r}'
        )

    @field_validator("budget_flops", mode="before")
    @classmethod
    def _positive_budget(cls, budget: object) -> object:
        if budget is None:
            return None
        if isinstance(budget, bool) or not isinstance(budget, int | float) or budget != budget or budget < 1:
            raise ValueError(
                f"the search budget must be a positive number of FLOPs (e.g. 2e11), got {budget!r}; "
                "leave it out to give every method Random Search's budget"
            )
        if isinstance(budget, float) and not budget.is_integer():
            raise ValueError(f"the search budget must be a whole number of FLOPs, got {budget!r}")
        return int(budget)

    @field_validator("scorer")
    @classmethod
    def _known_scorer(cls, scorer: str) -> str:
        if scorer not in SCORERS:
            raise ValueError(f"unknown scorer {scorer!r}; allowed: {_allowed(SCORERS.names())}")
        return scorer

    @field_validator("distribution")
    @classmethod
    def _known_distribution(cls, distribution: str) -> str:
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown distribution {distribution!r}; allowed: {_allowed(DISTRIBUTIONS.names())}")
        return distribution


class StudyConfig(_Strict):
    """One study: every arm x sparsity x seed trained under the same budget on the same data."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100)
    dataset: str = "mnist1d"
    data_dir: Path | None = None
    model: ModelSpec | str = ModelSpec()
    sparsities: tuple[float, ...]
    arms: tuple[str, ...] = BASE_ARMS
    seeds: tuple[int, ...] = (0, 1, 2)
    budget: TrainBudget = TrainBudget()
    search: SearchSpec = SearchSpec()
    store: Path | None = None
    workers: int | None = Field(default=None, ge=1)
    executor: Literal["process", "ray"] = "process"
    ray_address: str | None = None
    sparse_kernels: bool = Field(
        default=False,
        description="train masked Linear layers kept at most 30% dense on the sparse kernels: the static-mask "
        "arms throughout, SET / RigL / GMP between their mask updates, the search arms' short trainings of "
        "candidates (the other masked layers masked as usual: sparsearch.training.train(sparse_kernels=True)); "
        "same results to float rounding",
    )

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, dataset: str) -> str:
        if is_reference(dataset):
            return _check_reference(dataset, "dataset")
        if dataset not in DATASETS:
            raise ValueError(
                f"unknown dataset {dataset!r}; allowed: {_allowed(DATASETS.names())} "
                'or your own as "package.module:function"'
            )
        return dataset

    @field_validator("model")
    @classmethod
    def _model_reference(cls, model: ModelSpec | str) -> ModelSpec | str:
        if isinstance(model, str):
            if not is_reference(model):
                raise ValueError(
                    f'model {model!r} is neither a [model] table nor a "package.module:function" reference; '
                    f"for a registered architecture write [model] arch = {model!r}"
                )
            return _check_reference(model, "model")
        return model

    @field_validator("sparsities")
    @classmethod
    def _valid_sparsities(cls, sparsities: tuple[float, ...]) -> tuple[float, ...]:
        if not sparsities:
            raise ValueError("sparsities is empty; give at least one sparsity in [0, 1), e.g. [0.5, 0.9]")
        for value in sparsities:
            if math.isnan(value) or not 0.0 <= value < 1.0:
                raise ValueError(
                    f"sparsity {value!r} is outside [0, 1); sparsity is the fraction of zero weights, "
                    "so use e.g. 0.9 for 90%"
                )
        if len(set(sparsities)) != len(sparsities):
            raise ValueError(f"sparsities has duplicates: {list(sparsities)}")
        return tuple(sorted(sparsities))

    @field_validator("arms")
    @classmethod
    def _known_arm_names(cls, arms: tuple[str, ...]) -> tuple[str, ...]:
        if not arms:
            raise ValueError(f"arms is empty; allowed: {_allowed(known_arms())}")
        allowed = known_arms()
        for arm in arms:
            if arm in allowed:
                continue
            parsed = split_mask_arm(arm)
            if parsed is not None:
                kind, space = parsed
                if space not in search_spaces():
                    raise ValueError(
                        f"unknown search space {space!r} in arm {arm!r}; allowed spaces: {_allowed(search_spaces())}"
                    )
                check_method_fits(kind, space)  # the only other reason: the method does not fit the space
                continue  # a space or method registered by the user
            method, dash, _ = arm.partition("-")
            if dash and method not in mask_arm_kinds() and method not in algorithm_arms():
                raise ValueError(
                    f"unknown arm {arm!r}: {method!r} is neither a search method nor 'random' "
                    f"(allowed: {_allowed(mask_arm_kinds())}) nor a training algorithm; allowed arms: "
                    f"{_allowed(allowed)}"
                )
            raise ValueError(f"unknown arm {arm!r}; allowed: {_allowed(allowed)}")
        if len(set(arms)) != len(arms):
            raise ValueError(f"arms has duplicates: {list(arms)}")
        return arms

    @field_validator("seeds")
    @classmethod
    def _valid_seeds(cls, seeds: tuple[int, ...]) -> tuple[int, ...]:
        if not seeds:
            raise ValueError("seeds is empty; give at least one seed, e.g. [0, 1, 2]")
        if any(seed < 0 for seed in seeds):
            raise ValueError(f"seeds must be non-negative integers, got {list(seeds)}")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds has duplicates: {list(seeds)}")
        return seeds

    @model_validator(mode="after")
    def _ray_address_needs_ray(self) -> StudyConfig:
        if self.ray_address is not None and self.executor != "ray":
            raise ValueError("ray_address is set but executor is 'process'; set executor = \"ray\" to use it")
        return self

    # ------------------------------------------------------------------------------------ derived
    def content(self) -> dict[str, Any]:
        """The settings that decide the study's results (JSON-ready; run-only keys such as store left out)."""
        run_only: dict[str, Any] = {**dict.fromkeys(RUN_ONLY_KEYS, True), "search": set(RUN_ONLY_SEARCH_KEYS)}
        content = self.model_dump(mode="json", exclude=run_only)
        if content["search"]["budget_flops"] is None:
            del content["search"]["budget_flops"]  # so stores made before the key existed still resume
        return content

    def config_hash(self) -> str:
        """Stable hash of ``content()``: a store refuses to mix trials of two different studies."""
        canonical = json.dumps(self.content(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def store_path(self, override: str | Path | None = None) -> Path:
        """Where the results go: ``override``, else the file's ``store``, else ./sparsearch-runs/<name>.sqlite."""
        if override is not None:
            return Path(override)
        return self.store if self.store is not None else DEFAULT_STORE_DIR / f"{self.name}.sqlite"

    def worker_count(self, override: int | None = None) -> int:
        """Parallel trials: ``override``, else the file's ``workers``, else every core."""
        if override is not None and override < 1:
            raise ValueError(f"workers must be at least 1, got {override}")
        return override or self.workers or os.cpu_count() or 1

    def search_worker_count(self, trials_in_flight: int, cores: int | None = None) -> int:
        """Processes each search evaluates its candidates on: ``[search] workers``, or for "auto" the
        ``cores`` (default: this machine's) divided among the trials that run at once, at least 1.

        ``trials_in_flight`` is the number of trials that run at the same time (the study's workers, or
        fewer when fewer trials are left): a study whose trial workers fill the cores gets 1 (in order), a
        single search on an idle machine gets every core.
        """
        if self.search.workers != "auto":
            return int(self.search.workers)
        return max(1, (cores or os.cpu_count() or 1) // max(1, trials_in_flight))


def _describe_location(location: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in location) if location else "(top level)"


def _keys_at(location: tuple[int | str, ...]) -> tuple[str, ...]:
    """Allowed keys of the (sub-)table at ``location`` in a study file."""
    model: type[BaseModel] = StudyConfig
    for part in location:
        annotation = model.model_fields[str(part)].annotation if str(part) in model.model_fields else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ()
        model = annotation
    return tuple(model.model_fields)


def describe_validation_error(error: ValidationError) -> list[str]:
    """One readable line per problem: which key, what value, what is allowed."""
    lines = []
    for problem in error.errors():
        location = tuple(problem["loc"])
        if problem["type"] == "extra_forbidden":
            where = f" in table '{_describe_location(location[:-1])}'" if len(location) > 1 else ""
            allowed = _allowed(_keys_at(location[:-1]))
            lines.append(f"unknown config key {location[-1]!r}{where}; allowed: {allowed}")
            continue
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] in ("value_error", "assertion_error"):
            lines.append(f"{_describe_location(location)}: {message}")
        else:
            lines.append(f"{_describe_location(location)}: {message} (got {problem.get('input')!r})")
    return lines


def parse_study_config(data: dict[str, Any], source: str = "study file") -> StudyConfig:
    """Validate a study given as a mapping; raise ValueError with one line per problem."""
    try:
        return StudyConfig.model_validate(data)
    except ValidationError as error:
        problems = "\n  ".join(describe_validation_error(error))
        raise ValueError(f"invalid {source}:\n  {problems}") from None


def load_study_config(path: str | Path) -> StudyConfig:
    """Read and validate a TOML study file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"study file {str(path)!r} does not exist (give the path of a .toml study file)")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"study file {str(path)!r} is not valid TOML: {error}") from None
    return parse_study_config(data, f"study file {str(path)!r}")


def default_study_config() -> StudyConfig:
    """The embedded default: the Random Search baseline study on MNIST-1D (see ``default.toml``)."""
    text = resources.files("sparsearch.study").joinpath("default.toml").read_text(encoding="utf-8")
    return parse_study_config(tomllib.loads(text), "embedded default study")
