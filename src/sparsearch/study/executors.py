"""Where a study's trials run: ``inline`` (this process), ``process`` (a local pool of worker processes) or
``ray`` (a Ray cluster, local or remote). Every executor reports each trial's events (started, epoch done,
finished, failed) to a handler in the calling process, which alone writes the store.

Each trial runs with one torch thread wherever it runs, so its numbers do not depend on the executor or the
worker count. The study's :class:`~sparsearch.study.inputs.StudyInputs` (config, model, data) go to each
worker once, not with every trial.

Ray: with ``ray_address`` unset, Ray starts a local cluster with one CPU per worker; with ``"auto"`` or
``"ray://host:10001"`` the trials spread over the machines of an existing cluster (each machine needs
sparsearch installed, the study's data and the user's model code importable). Epochs stream back through a
Ray queue.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from sparsearch.study.inputs import StudyInputs
from sparsearch.study.store import EpochRow, TrialOutcome, TrialSpec
from sparsearch.study.trial import run_trial


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

    def run(self, inputs: StudyInputs, trials: Sequence[TrialSpec], handle: EventHandler) -> None: ...


def run_trial_single_threaded(
    inputs: StudyInputs, spec: TrialSpec, on_epoch: Callable[[EpochRow], None]
) -> TrialOutcome:
    """Run one trial with one torch thread (restored afterwards), as every executor does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_trial(inputs, spec, on_epoch)
    finally:
        torch.set_num_threads(threads)


class InlineExecutor:
    """Run trials one after another in this process (no start-up cost; handy for debugging)."""

    def run(self, inputs: StudyInputs, trials: Sequence[TrialSpec], handle: EventHandler) -> None:
        for spec in trials:
            handle(TrialStarted(spec.key, time.time()))
            try:
                outcome = run_trial_single_threaded(inputs, spec, lambda row, key=spec.key: handle(EpochDone(key, row)))
            except Exception:
                handle(TrialFailed(spec.key, traceback.format_exc()))
            else:
                handle(TrialFinished(spec.key, outcome))


# ------------------------------------------------------------------------------- local process pool
_worker_events: multiprocessing.Queue | None = None
_worker_inputs: StudyInputs | None = None


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


def _init_worker(events: multiprocessing.Queue, inputs: StudyInputs, study_pid: int, path: list[str]) -> None:
    global _worker_events, _worker_inputs
    # the study's sys.path (the CLI adds the current folder), so the user's model and data code imports here
    sys.path[:0] = [entry for entry in path if entry not in sys.path]
    _worker_events, _worker_inputs = events, inputs
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


def _run_in_worker(spec: TrialSpec) -> TrialOutcome:
    events, inputs = _worker_events, _worker_inputs
    assert events is not None and inputs is not None, "worker was not initialised"
    events.put(TrialStarted(spec.key, time.time()))
    return run_trial_single_threaded(inputs, spec, lambda row: events.put(EpochDone(spec.key, row)))


class ProcessExecutor:
    """A pool of worker processes on this machine, one trial per worker at a time (see ``worker_context``)."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.workers = workers

    def run(self, inputs: StudyInputs, trials: Sequence[TrialSpec], handle: EventHandler) -> None:
        if not trials:
            return
        context = worker_context()
        events: multiprocessing.Queue = context.Queue()
        pool = ProcessPoolExecutor(
            max_workers=min(self.workers, len(trials)),
            mp_context=context,
            initializer=_init_worker,
            initargs=(events, inputs, os.getpid(), list(sys.path)),
        )
        try:
            futures: dict[Future[TrialOutcome], TrialSpec] = {
                pool.submit(_run_in_worker, spec): spec for spec in trials
            }
            running = set(futures)
            while running:
                finished, running = wait(running, timeout=0.25, return_when=FIRST_COMPLETED)
                _drain(events.get_nowait, queue.Empty, handle)
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


def _drain(get_nowait: Callable[[], Any], empty: type[Exception], handle: EventHandler) -> None:
    while True:
        try:
            event = get_nowait()
        except empty:
            return
        handle(event)


# ------------------------------------------------------------------------------------------------ Ray
def _ray_trial(inputs: StudyInputs, spec: TrialSpec, events: Any) -> TrialOutcome:
    events.put(TrialStarted(spec.key, time.time()))
    return run_trial_single_threaded(inputs, spec, lambda row: events.put(EpochDone(spec.key, row)))


class RayExecutor:
    """Trials as Ray tasks of one CPU each; ``workers`` caps the CPUs of a local cluster started here."""

    def __init__(self, workers: int, *, address: str | None = None) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.workers = workers
        self.address = address

    def run(self, inputs: StudyInputs, trials: Sequence[TrialSpec], handle: EventHandler) -> None:
        if not trials:
            return
        # imported here: Ray is an optional extra and takes seconds to import
        import ray
        from ray.util.queue import Empty, Queue

        started_here = not ray.is_initialized()
        if started_here:
            local: dict[str, Any] = {}
            if self.address is None:
                # a local cluster's workers import the user's model and data code from this process's path
                path = os.pathsep.join(entry or os.getcwd() for entry in sys.path)
                local = {"num_cpus": self.workers, "runtime_env": {"env_vars": {"PYTHONPATH": path}}}
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False, **local)
        try:
            # zero CPUs: an actor needs a CPU to be placed by default, and with every CPU taken by trials that
            # block on their first events.put, it would wait for one (minutes, until Ray's lease timeout)
            events = Queue(actor_options={"num_cpus": 0})
            task = ray.remote(num_cpus=1)(_ray_trial)
            shared_inputs = ray.put(inputs)
            references = {task.remote(shared_inputs, spec, events): spec for spec in trials}
            waiting = list(references)
            while waiting:
                finished, waiting = ray.wait(waiting, num_returns=1, timeout=0.25)
                _drain(events.get_nowait, Empty, handle)
                for reference in finished:
                    spec = references[reference]
                    try:
                        outcome = ray.get(reference)
                    except Exception:
                        handle(TrialFailed(spec.key, traceback.format_exc()))
                    else:
                        _drain(events.get_nowait, Empty, handle)
                        handle(TrialFinished(spec.key, outcome))
            events.shutdown()
        finally:
            if started_here:
                ray.shutdown()


def make_executor(kind: str, workers: int, *, ray_address: str | None = None) -> Executor:
    """The executor a study asks for (``"process"`` or ``"ray"``) with ``workers`` parallel trials."""
    if kind == "ray":
        return RayExecutor(workers, address=ray_address)
    if kind != "process":
        raise ValueError(f"unknown executor {kind!r}; allowed: process, ray")
    if workers == 1:
        return InlineExecutor()
    return ProcessExecutor(workers)
