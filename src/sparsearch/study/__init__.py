"""sparsearch.study: reproducible sparse-architecture studies. A validated study (TOML file, mapping or
``StudyConfig``) with the package's or your own model and data expands into trials (arm x sparsity x seed)
that run on an executor (inline, a local process pool or Ray), stream their numbers into a SQLite store, and
resume after any interruption. ``run_study(config, model=..., data=...)`` is the Python entry point."""

from sparsearch.study.config import (
    BASE_ARMS,
    DEFAULT_STORE_DIR,
    StudyConfig,
    default_study_config,
    known_arms,
    load_study_config,
)
from sparsearch.study.executors import InlineExecutor, ProcessExecutor, RayExecutor
from sparsearch.study.inputs import ModelFactory, StudyInputs
from sparsearch.study.runner import StudyRun, expand_trials, run_study
from sparsearch.study.store import StudyStore, TrialOutcome, TrialSpec

__all__ = [
    "BASE_ARMS",
    "DEFAULT_STORE_DIR",
    "InlineExecutor",
    "ModelFactory",
    "ProcessExecutor",
    "RayExecutor",
    "StudyConfig",
    "StudyInputs",
    "StudyRun",
    "StudyStore",
    "TrialOutcome",
    "TrialSpec",
    "default_study_config",
    "expand_trials",
    "known_arms",
    "load_study_config",
    "run_study",
]
