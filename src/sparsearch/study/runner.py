"""Running a study: expand the config into trials, skip the finished ones, claim the rest one at a time in the
store and run them on an executor (``sparsearch.study.executors``), and write every event to the store from
this process (its workers never write), with a Rich progress bar. Several study processes on one store share
its trials: each claims only pending ones, and waits at the end for trials other processes still run (taking
over those whose process died).

``run_study(config, model=..., data=...)`` is the Python entry point: the same store, resume, executors and
report as ``sparsearch study``, with your own model factory (``seed -> nn.Module``) and data (tensors,
torch Datasets or a ``DataSplits``; see ``sparsearch.study.inputs``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from sparsearch.study.config import StudyConfig, load_study_config, parse_study_config
from sparsearch.study.executors import (
    EpochDone,
    EventHandler,
    Executor,
    InlineExecutor,
    Notice,
    RayExecutor,
    TrialEvent,
    TrialFinished,
    TrialStarted,
    make_executor,
)
from sparsearch.study.inputs import ModelFactory, StudyInputs, check_inputs
from sparsearch.study.store import StudyStore, TrialSpec


def expand_trials(config: StudyConfig) -> list[TrialSpec]:
    """Every trial of the study: the dense parent once per seed, every other arm per sparsity and seed."""
    trials = []
    for seed in config.seeds:
        if "dense" in config.arms:
            trials.append(TrialSpec("dense", 0.0, seed))
        for sparsity in config.sparsities:
            trials.extend(TrialSpec(arm, sparsity, seed) for arm in config.arms if arm != "dense")
    return trials


def as_study_config(config: StudyConfig | Mapping[str, object] | str | Path) -> StudyConfig:
    """A ``StudyConfig`` from itself, a mapping of study-file keys, or the path of a TOML study file."""
    if isinstance(config, StudyConfig):
        return config
    if isinstance(config, Mapping):
        return parse_study_config(dict(config), "study config")
    if isinstance(config, str | Path):
        return load_study_config(config)
    raise ValueError(
        f"config must be a StudyConfig, a mapping of study-file keys or a TOML file path, got {type(config).__name__}"
    )


# ------------------------------------------------------------------------------------------ running
def search_workers_for(config: StudyConfig, executor: Executor, trials_left: int) -> tuple[int, str]:
    """Processes each search of this run evaluates its candidates on, and why 1 if more were asked ("" else).

    ``[search] workers`` as given, or for "auto" the machine's cores divided among the trials that run at
    once (the executor's trial workers, or fewer when fewer trials are left to run). Under the Ray executor
    every trial evaluates its candidates in order in its own task (candidates as Ray tasks are not built).
    """
    if isinstance(executor, RayExecutor):
        if config.search.workers == 1:
            return 1, ""
        return 1, (
            f"search workers = {config.search.workers!r} asked, candidates ran in order: under the Ray executor "
            "each trial evaluates its candidates in its own task"
        )
    trial_slots = 1 if isinstance(executor, InlineExecutor) else int(getattr(executor, "workers", 1))
    return config.search_worker_count(min(trial_slots, max(1, trials_left))), ""


@dataclass
class StudyRun:
    """What one invocation of a study did."""

    name: str
    store_path: Path
    total_trials: int
    already_done: int
    finished: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    by_others: int = 0  # trials that other processes on the same store finished while this one ran


class _ClaimSource:
    """Hands an executor the store's pending trials, each claimed for this process just before it runs."""

    def __init__(self, store: StudyStore, study: str, notify: EventHandler, poll_seconds: float = 1.0) -> None:
        self.store, self.study, self.notify, self.poll_seconds = store, study, notify, poll_seconds
        self.next_query = 0.0
        self.done = False
        self.told_about: set[str] = set()

    def take(self) -> TrialSpec | None:
        now = time.monotonic()
        if now < self.next_query:
            return None
        spec = self.store.claim_next(self.study)
        if spec is None:
            # nothing pending: the study is over for this process unless others still run trials, which it
            # waits for (and takes over if their process dies: claim_next releases their stale claims)
            self.next_query = now + self.poll_seconds
            elsewhere = self.store.running_elsewhere(self.study)
            self.done = not elsewhere and not self.store.status_counts(self.study).get("pending", 0)
            owners = set(elsewhere.values())
            if elsewhere and not owners <= self.told_about:
                self.told_about |= owners
                self.notify(
                    Notice(
                        f"waiting for {len(elsewhere)} trials that other processes on this store run "
                        f"({', '.join(sorted(owners))}); taken over here if their process dies"
                    )
                )
        return spec

    def exhausted(self) -> bool:
        return self.done


class _Recorder:
    """Writes events to the store and moves the progress bar (events for finished trials are ignored)."""

    def __init__(
        self,
        store: StudyStore,
        study: str,
        run: StudyRun,
        progress: Progress | None,
        epochs: int,
        console: Console | None = None,
    ) -> None:
        self.store, self.study, self.run, self.progress, self.epochs = store, study, run, progress, epochs
        self.console = progress.console if progress is not None else (console or Console(stderr=True))
        self.task = (
            progress.add_task("trials", total=run.total_trials, completed=run.already_done) if progress else None
        )
        self.closed: set[str] = set()
        self.epochs_seen: dict[str, int] = {}

    def __call__(self, event: TrialEvent) -> None:
        if isinstance(event, Notice):
            self.console.print(event.text, highlight=False, soft_wrap=True)
            return
        if event.key in self.closed:
            return
        if isinstance(event, TrialStarted):
            self.store.mark_running(self.study, event.key, event.time, event.worker)
        elif isinstance(event, EpochDone):
            self.store.add_epoch(self.study, event.key, event.row)
            self.epochs_seen[event.key] = self.epochs_seen.get(event.key, 0) + 1
            self._advance(1.0 / max(self.epochs, 1))
        else:
            self.closed.add(event.key)
            # False: this process lost its claim (it was silent past the claim timeout) and another owns the
            # trial now; the other's result stands
            if isinstance(event, TrialFinished):
                if self.store.finish_trial(self.study, event.key, event.outcome):
                    self.run.finished.append(event.key)
            elif self.store.fail_trial(self.study, event.key, event.error):
                self.run.failed[event.key] = event.error
            # the rest of this trial's share of the bar, whatever its epochs already moved
            self._advance(1.0 - min(self.epochs_seen.pop(event.key, 0), self.epochs) / max(self.epochs, 1))

    def _advance(self, amount: float) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.advance(self.task, amount)
            # counted in the store: other processes on it finish trials too
            done = self.store.status_counts(self.study).get("done", 0) + len(self.run.failed)
            bar = next(task for task in self.progress.tasks if task.id == self.task)
            completed = max(bar.completed, done)
            self.progress.update(
                self.task, completed=completed, description=f"{self.study}: {done}/{self.run.total_trials} trials"
            )


def run_study(
    config: StudyConfig | Mapping[str, object] | str | Path,
    *,
    model: ModelFactory | None = None,
    data: object | None = None,
    store_path: str | Path | None = None,
    workers: int | None = None,
    executor: Executor | None = None,
    console: Console | None = None,
    show_progress: bool = True,
) -> StudyRun:
    """Run every trial of the study that the store does not hold as done; return what happened.

    Re-running with the same config (and the same model and data) resumes: finished trials are kept as they
    are, unfinished ones (including one cut off by ``kill -9``) are run again from scratch. Several processes
    (or machines sharing the store's folder, see the README) may run the same study on one store at once: each
    trial is claimed and run by one of them, and each returns when the whole study is done.

    Args:
        config: a ``StudyConfig``, a mapping of study-file keys, or the path of a TOML study file.
        model: your parent network, ``model(seed) -> nn.Module``; default: the config's model. With more
            than one worker it must be a top-level function of an importable module (it is pickled).
        data: your data: a ``DataSplits``, a mapping ``{"train": (x, y), "test": (x, y)}`` (optionally
            "val"; a split may also be a torch Dataset of (input, label) items), or ``data(seed)`` returning
            one of those; default: the config's data set.
        store_path: the SQLite store (default: the config's ``store``, else ./sparsearch-runs/<name>.sqlite).
        workers: parallel trials (default: the config's ``workers``, else every core); each search trial
            evaluates its candidates on ``[search] workers`` processes (see :func:`search_workers_for`).
        executor: run trials on this executor instead of the config's.
        console: where the progress bar goes.
        show_progress: show a progress bar with ETA.

    Bad input (a model that does not build or has nothing to mask, data that does not fit it) raises
    ValueError before the store is created or changed.
    """
    started = time.perf_counter()
    config = as_study_config(config)
    inputs = StudyInputs(config, model=model, data=data)
    path = config.store_path(store_path)
    worker_count = config.worker_count(workers)
    trials = expand_trials(config)
    chosen = (
        executor
        if executor is not None
        else make_executor(config.executor, worker_count, ray_address=config.ray_address)
    )
    check_inputs(inputs, needs_pickling=not isinstance(chosen, InlineExecutor))
    with StudyStore(path) as store:
        store.register_study(config.name, inputs.content(), inputs.config_hash(), trials)
        store.release_stale_claims(config.name)
        # claims under this process's own id that no run of it holds any more (an earlier run_study in this
        # process that died without cleaning up)
        store.release_own_claims(config.name)
        store.retry_failed(config.name)
        done_before = store.status_counts(config.name).get("done", 0)
        run = StudyRun(config.name, path, len(trials), already_done=done_before)
        inputs.search_workers, inputs.search_workers_note = search_workers_for(
            config, chosen, len(trials) - done_before
        )
        progress = (
            Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.percentage:>3.0f}%"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=console,
            )
            if show_progress
            else None
        )
        recorder = _Recorder(store, config.name, run, progress, config.budget.epochs, console)
        source = _ClaimSource(store, config.name, recorder)
        try:
            with store.heartbeat():
                if progress is not None:
                    with progress:
                        chosen.run(inputs, source, recorder)
                else:
                    chosen.run(inputs, source, recorder)
        finally:
            # after Ctrl-C or an error, this process's unfinished trials go back to pending at once
            store.release_own_claims(config.name)
        run.by_others = store.status_counts(config.name).get("done", 0) - done_before - len(run.finished)
    run.seconds = time.perf_counter() - started
    return run
