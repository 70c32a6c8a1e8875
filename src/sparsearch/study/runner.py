"""Running a study: expand the config into trials, skip the finished ones, run the rest on an executor,
and write every event to the store from this (the only writing) process, with a Rich progress bar.

Executors are pluggable: ``inline`` (this process, one trial at a time), ``process`` (a local pool of worker
processes, one per core, started from a fork server) and ``ray`` (a Ray cluster, local or remote). Each trial
runs with one torch thread wherever it runs, so its numbers do not depend on the executor or worker count.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from sparsearch.study.config import StudyConfig
from sparsearch.study.store import EpochRow, StudyStore, TrialOutcome, TrialSpec


def expand_trials(config: StudyConfig) -> list[TrialSpec]:
    """Every trial of the study: the dense parent once per seed, every other arm per sparsity and seed."""
    trials = []
    for seed in config.seeds:
        if "dense" in config.arms:
            trials.append(TrialSpec("dense", 0.0, seed))
        for sparsity in config.sparsities:
            trials.extend(TrialSpec(arm, sparsity, seed) for arm in config.arms if arm != "dense")
    return trials


def check_study_inputs(config: StudyConfig) -> None:
    """Fail before the store is touched if the data cannot be loaded or the parent model cannot be built.

    Also warms the data cache (MNIST-1D is generated once), so workers do not all generate it at once.
    """
    from sparsearch.models import build_model
    from sparsearch.study.trial import load_trial_data

    data = load_trial_data(config, config.seeds[0])
    build_model(config.model.arch, data.input_shape, data.num_classes, widths=config.model.widths, seed=0)


# ------------------------------------------------------------------------------------------- events
@dataclass(frozen=True)
class TrialStarted:
    """A worker began a trial."""

    key: str
    time: float


@dataclass(frozen=True)
class EpochDone:
    """A running trial finished an epoch."""

    key: str
    row: EpochRow


@dataclass(frozen=True)
class TrialFinished:
    """A trial completed with its metrics."""

    key: str
    outcome: TrialOutcome


@dataclass(frozen=True)
class TrialFailed:
    """A trial raised; the text is stored and the trial re-runs on resume."""

    key: str
    error: str


TrialEvent = TrialStarted | EpochDone | TrialFinished | TrialFailed
EventHandler = Callable[[TrialEvent], None]


class Executor(Protocol):
    """Runs trials somewhere and reports every event to ``handle`` in the calling process."""

    def run(self, config: StudyConfig, trials: Sequence[TrialSpec], handle: EventHandler) -> None: ...


def run_trial_single_threaded(
    config: StudyConfig, spec: TrialSpec, on_epoch: Callable[[EpochRow], None]
) -> TrialOutcome:
    """Run one trial with one torch thread (restored afterwards), as every executor does."""
    from sparsearch.study.trial import run_trial

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_trial(config, spec, on_epoch)
    finally:
        torch.set_num_threads(threads)


class InlineExecutor:
    """Run trials one after another in this process (no start-up cost; handy for debugging)."""

    def run(self, config: StudyConfig, trials: Sequence[TrialSpec], handle: EventHandler) -> None:
        for spec in trials:
            handle(TrialStarted(spec.key, time.time()))
            try:
                outcome = run_trial_single_threaded(config, spec, lambda row, key=spec.key: handle(EpochDone(key, row)))
            except Exception:
                handle(TrialFailed(spec.key, traceback.format_exc()))
            else:
                handle(TrialFinished(spec.key, outcome))


# ------------------------------------------------------------------------------- local process pool
_worker_events: multiprocessing.Queue | None = None


def _study_process_alive(study_pid: int, parent_pid: int) -> bool:
    if os.getppid() != parent_pid:
        return False
    try:
        os.kill(study_pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exit_when_orphaned(study_pid: int, parent_pid: int) -> None:
    # a worker whose study process was killed (even with kill -9) stops instead of computing for nobody;
    # under forkserver the worker's parent is the fork server, which outlives the study while workers live
    while _study_process_alive(study_pid, parent_pid):
        time.sleep(0.5)
    os._exit(1)


def _init_worker(events: multiprocessing.Queue, study_pid: int) -> None:
    global _worker_events
    _worker_events = events
    torch.set_num_threads(1)
    threading.Thread(target=_exit_when_orphaned, args=(study_pid, os.getppid()), daemon=True).start()


def worker_context() -> multiprocessing.context.BaseContext:
    """Forkserver where the platform has it, else spawn; never plain fork (torch and fork mix badly).

    The fork server preloads torch and the trial code once, so each worker starts in milliseconds instead of
    re-importing everything (and the caller's ``__main__``), as spawn does.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["sparsearch.study.trial"])
        return context
    return multiprocessing.get_context("spawn")


def _run_in_worker(config: StudyConfig, spec: TrialSpec) -> TrialOutcome:
    events = _worker_events
    assert events is not None, "worker was not initialised"
    events.put(TrialStarted(spec.key, time.time()))
    return run_trial_single_threaded(config, spec, lambda row: events.put(EpochDone(spec.key, row)))


class ProcessExecutor:
    """A pool of worker processes on this machine, one trial per worker at a time (see ``worker_context``)."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.workers = workers

    def run(self, config: StudyConfig, trials: Sequence[TrialSpec], handle: EventHandler) -> None:
        if not trials:
            return
        context = worker_context()
        events: multiprocessing.Queue = context.Queue()
        pool = ProcessPoolExecutor(
            max_workers=min(self.workers, len(trials)),
            mp_context=context,
            initializer=_init_worker,
            initargs=(events, os.getpid()),
        )
        try:
            futures: dict[Future[TrialOutcome], TrialSpec] = {
                pool.submit(_run_in_worker, config, spec): spec for spec in trials
            }
            running = set(futures)
            while running:
                finished, running = wait(running, timeout=0.25, return_when=FIRST_COMPLETED)
                _drain(events, handle)
                for future in finished:
                    spec = futures[future]
                    try:
                        outcome = future.result()
                    except Exception:
                        handle(TrialFailed(spec.key, traceback.format_exc()))
                    else:
                        handle(TrialFinished(spec.key, outcome))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            events.close()


def _drain(events: multiprocessing.Queue, handle: EventHandler) -> None:
    while True:
        try:
            event = events.get_nowait()
        except queue.Empty:
            return
        handle(event)


def make_executor(config: StudyConfig, workers: int) -> Executor:
    """The executor the study asks for, with ``workers`` parallel trials."""
    if config.executor == "ray":
        from sparsearch.study.ray_executor import RayExecutor

        return RayExecutor(workers, address=config.ray_address)
    if workers == 1:
        return InlineExecutor()
    return ProcessExecutor(workers)


# ------------------------------------------------------------------------------------------ running
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


class _Recorder:
    """Writes events to the store and moves the progress bar (events for finished trials are ignored)."""

    def __init__(self, store: StudyStore, study: str, run: StudyRun, progress: Progress | None, epochs: int) -> None:
        self.store, self.study, self.run, self.progress, self.epochs = store, study, run, progress, epochs
        self.task = (
            progress.add_task("trials", total=run.total_trials, completed=run.already_done) if progress else None
        )
        self.closed: set[str] = set()
        self.epochs_seen: dict[str, int] = {}

    def __call__(self, event: TrialEvent) -> None:
        if event.key in self.closed:
            return
        if isinstance(event, TrialStarted):
            self.store.mark_running(self.study, event.key, event.time)
        elif isinstance(event, EpochDone):
            self.store.add_epoch(self.study, event.key, event.row)
            self.epochs_seen[event.key] = self.epochs_seen.get(event.key, 0) + 1
            self._advance(1.0 / max(self.epochs, 1))
        else:
            self.closed.add(event.key)
            if isinstance(event, TrialFinished):
                self.store.finish_trial(self.study, event.key, event.outcome)
                self.run.finished.append(event.key)
            else:
                self.store.fail_trial(self.study, event.key, event.error)
                self.run.failed[event.key] = event.error
            # the rest of this trial's share of the bar, whatever its epochs already moved
            self._advance(1.0 - min(self.epochs_seen.pop(event.key, 0), self.epochs) / max(self.epochs, 1))

    def _advance(self, amount: float) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.advance(self.task, amount)
            done = len(self.run.finished) + len(self.run.failed) + self.run.already_done
            self.progress.update(self.task, description=f"{self.study}: {done}/{self.run.total_trials} trials")


def run_study(
    config: StudyConfig,
    *,
    store_path: str | Path | None = None,
    workers: int | None = None,
    executor: Executor | None = None,
    console: Console | None = None,
    show_progress: bool = True,
) -> StudyRun:
    """Run every trial of ``config`` that the store does not hold as done; return what happened.

    Re-running with the same config resumes: finished trials are kept as they are, unfinished ones
    (including one cut off by ``kill -9``) are run again from scratch.
    """
    started = time.perf_counter()
    path = config.store_path(store_path)
    worker_count = config.worker_count(workers)
    trials = expand_trials(config)
    check_study_inputs(config)
    with StudyStore(path) as store:
        store.register_study(config.name, config.content(), config.config_hash(), trials)
        store.reset_unfinished(config.name)
        pending = store.trials_with_status(config.name, "pending")
        run = StudyRun(config.name, path, len(trials), already_done=len(trials) - len(pending))
        chosen = executor if executor is not None else make_executor(config, worker_count)
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
        recorder = _Recorder(store, config.name, run, progress, config.budget.epochs)
        if progress is not None:
            with progress:
                chosen.run(config, pending, recorder)
        else:
            chosen.run(config, pending, recorder)
    run.seconds = time.perf_counter() - started
    return run
