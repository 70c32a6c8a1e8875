"""sparsearch.study: reproducible sparse-architecture studies. A validated TOML study file expands into
trials (arm x sparsity x seed) that run on a local process pool (or Ray), stream their numbers into a
SQLite store, and resume after any interruption."""

from sparsearch.study.config import BASE_ARMS, StudyConfig, default_study_config, known_arms, load_study_config
from sparsearch.study.runner import StudyRun, expand_trials, run_study
from sparsearch.study.store import StudyStore, TrialOutcome, TrialSpec

__all__ = [
    "BASE_ARMS",
    "StudyConfig",
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
