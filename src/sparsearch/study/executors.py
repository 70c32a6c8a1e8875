"""Where a study's trials run: ``inline`` (this process), ``process`` (a local pool of worker processes) or
``ray`` (a Ray cluster, local or remote). Every executor reports each trial's events (started, epoch done,
finished, failed) to a handler in the calling process, which alone writes the store. Executors pull trials
from a ``TrialSource`` one free worker at a time, so a study's runner can claim each trial in the store just
before it runs (several study processes then share one store's work).

Each trial runs with one torch thread wherever it runs, so its numbers do not depend on the executor or the
worker count. The study's :class:`~sparsearch.study.inputs.StudyInputs` (config, model, data) go to each
worker once, not with every trial.

Ray: with ``ray_address`` unset, Ray starts a local cluster with one CPU per worker; with ``"auto"``,
``"host:port"`` (the head's GCS port) or ``"ray://host:10001"`` the trials spread over the machines of an
existing cluster (each machine needs sparsearch installed, the study's data and the user's model code
importable), ``workers`` trials at a time. Epochs stream back through a Ray queue that lives on the driver's
node, so losing a worker node loses only its running trials, which Ray runs again on another node.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import socket
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
    """A worker (``host:pid``) began a trial."""

    key: str
    time: float
    worker: str = ""


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


@dataclass(frozen=True)
class Notice:
    """Something the user should know while trials wait (no free CPU on the cluster, work held elsewhere)."""

    text: str
    key: str = ""


TrialEvent = TrialStarted | EpochDone | TrialFinished | TrialFailed | Notice
EventHandler = Callable[[TrialEvent], None]

# how often an idle executor asks its source again for work
POLL_SECONDS = 0.25


class TrialSource(Protocol):
    """Where an executor gets its trials, one free worker at a time."""

    def take(self) -> TrialSpec | None:
        """The next trial to run now, or None if none is available at the moment."""
        ...

    def exhausted(self) -> bool:
        """True once no trial will become available any more (asked after ``take`` returned None)."""
        ...


class ListSource:
    """A fixed list of trials, handed out in order."""

    def __init__(self, trials: Sequence[TrialSpec]) -> None:
        self._trials = list(trials)

    def take(self) -> TrialSpec | None:
        return self._trials.pop(0) if self._trials else None

    def exhausted(self) -> bool:
        return not self._trials


def as_source(trials: TrialSource | Sequence[TrialSpec]) -> TrialSource:
    """``trials`` itself if it is a source, else a ``ListSource`` of it."""
    return trials if hasattr(trials, "take") else ListSource(trials)  # type: ignore[return-value]


def worker_name() -> str:
    """``host:pid`` of this process, as trials report where they ran."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Executor(Protocol):
    """Runs trials somewhere and reports every event to ``handle`` in the calling process."""

    def run(self, inputs: StudyInputs, trials: TrialSource | Sequence[TrialSpec], handle: EventHandler) -> None: ...


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

    def run(self, inputs: StudyInputs, trials: TrialSource | Sequence[TrialSpec], handle: EventHandler) -> None:
        source = as_source(trials)
        while True:
            spec = source.take()
            if spec is None:
                if source.exhausted():
                    return
                time.sleep(POLL_SECONDS)
                continue
            handle(TrialStarted(spec.key, time.time(), worker_name()))
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
    events.put(TrialStarted(spec.key, time.time(), worker_name()))
    return run_trial_single_threaded(inputs, spec, lambda row: events.put(EpochDone(spec.key, row)))


class ProcessExecutor:
    """A pool of worker processes on this machine, one trial per worker at a time (see ``worker_context``)."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.workers = workers

    def run(self, inputs: StudyInputs, trials: TrialSource | Sequence[TrialSpec], handle: EventHandler) -> None:
        source = as_source(trials)
        context = worker_context()
        events: multiprocessing.Queue = context.Queue()
        pool: ProcessPoolExecutor | None = None  # started with the first trial: a finished study costs nothing
        futures: dict[Future[TrialOutcome], TrialSpec] = {}
        try:
            while True:
                while len(futures) < self.workers and (spec := source.take()) is not None:
                    if pool is None:
                        pool = ProcessPoolExecutor(
                            max_workers=self.workers,
                            mp_context=context,
                            initializer=_init_worker,
                            initargs=(events, inputs, os.getpid(), list(sys.path)),
                        )
                    futures[pool.submit(_run_in_worker, spec)] = spec
                if not futures:
                    if source.exhausted():
                        return
                    time.sleep(POLL_SECONDS)
                    continue
                finished, _ = wait(futures, timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
                _drain(events.get_nowait, queue.Empty, handle)
                for future in finished:
                    spec = futures.pop(future)
                    try:
                        outcome = future.result()
                    except Exception:
                        handle(TrialFailed(spec.key, traceback.format_exc()))
                    else:
                        handle(TrialFinished(spec.key, outcome))
        finally:
            if pool is not None:
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
# Ray runs a task again (on any node) when its worker process or node dies; after that the trial is stored as
# failed and the next run retries it
RAY_TASK_RETRIES = 3
# a claimed trial that has found no CPU on the cluster for this long gets a notice, repeated at this interval
RAY_WAIT_NOTICE_SECONDS = 10.0
CONNECT_TIMEOUT_SECONDS = 5.0


def check_ray_address(address: str) -> None:
    """Fail within seconds, naming the address, if nothing listens at a ``host:port`` or ``ray://host:port``.

    ``ray.init`` itself retries an unreachable address for a minute or more before it gives up.
    """
    if address == "auto":
        return  # Ray looks up the cluster started on this machine and fails at once if there is none
    target = address.removeprefix("ray://")
    host, _, port_text = target.rpartition(":")
    if not host or not port_text.isdigit():
        raise ValueError(
            f"ray_address {address!r} is not 'auto', 'host:port' (the head's GCS port, 6379 by default) or "
            "'ray://host:port' (Ray Client, 10001 by default)"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port_text)), timeout=CONNECT_TIMEOUT_SECONDS).close()
    except OSError as error:
        raise ValueError(
            f"cannot reach the Ray cluster at ray_address {address!r} ({error}); start its head with "
            f"`ray start --head --port={port_text}` on {host}, or fix ray_address in the study file"
        ) from None


def _ray_trial(inputs: StudyInputs, spec: TrialSpec, events: Any) -> TrialOutcome:
    events.put(TrialStarted(spec.key, time.time(), worker_name()))
    return run_trial_single_threaded(inputs, spec, lambda row: events.put(EpochDone(spec.key, row)))


class RayExecutor:
    """Trials as Ray tasks of one CPU each, at most ``workers`` at a time (the CPUs of a local cluster)."""

    def __init__(self, workers: int, *, address: str | None = None) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.workers = workers
        self.address = address

    def run(self, inputs: StudyInputs, trials: TrialSource | Sequence[TrialSpec], handle: EventHandler) -> None:
        source = as_source(trials)
        if self.address is not None:
            check_ray_address(self.address)
        first = source.take()
        if first is None and source.exhausted():
            return
        # imported here: Ray is an optional extra and takes seconds to import
        import ray
        from ray.util.queue import Empty, Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        started_here = not ray.is_initialized()
        if started_here:
            local: dict[str, Any] = {}
            if self.address is None:
                # a local cluster's workers import the user's model and data code from this process's path
                path = os.pathsep.join(entry or os.getcwd() for entry in sys.path)
                local = {"num_cpus": self.workers, "runtime_env": {"env_vars": {"PYTHONPATH": path}}}
            try:
                ray.init(address=self.address, include_dashboard=False, log_to_driver=False, **local)
            except ConnectionError as error:
                message = f"cannot connect to the Ray cluster at ray_address {self.address!r}: {error}"
                raise ValueError(message) from None
        try:
            # zero CPUs: an actor needs a CPU to be placed by default, and with every CPU taken by trials that
            # block on their first events.put, it would wait for one (minutes, until Ray's lease timeout);
            # pinned to the driver's node: a worker node that dies must not take the queue with it
            here = ray.get_runtime_context().get_node_id()
            events = Queue(
                actor_options={"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(here, soft=False)}
            )
            task = ray.remote(num_cpus=1, max_retries=RAY_TASK_RETRIES)(_ray_trial)
            shared_inputs = ray.put(inputs)
            waiting = _CpuWait(handle, self.address)
            references: dict[Any, TrialSpec] = {}
            spec: TrialSpec | None = first
            while True:
                while len(references) < self.workers and (spec := spec or source.take()) is not None:
                    references[task.remote(shared_inputs, spec, events)] = spec
                    spec = None
                if not references:
                    if source.exhausted():
                        break
                    time.sleep(POLL_SECONDS)
                    continue
                finished, _ = ray.wait(list(references), num_returns=1, timeout=POLL_SECONDS)
                _drain(events.get_nowait, Empty, waiting)
                for reference in finished:
                    key = references.pop(reference).key
                    try:
                        outcome = ray.get(reference)
                    except Exception:
                        waiting.handle(TrialFailed(key, traceback.format_exc()))
                    else:
                        _drain(events.get_nowait, Empty, waiting)
                        waiting.handle(TrialFinished(key, outcome))
                waiting.check({claimed.key for claimed in references.values()}, ray)
            events.shutdown()
        finally:
            if started_here:
                ray.shutdown()


class _CpuWait:
    """Passes events on and says so when claimed trials have waited long for a CPU with none of them running."""

    def __init__(self, handle: EventHandler, address: str | None) -> None:
        self.handle, self.address = handle, address
        self.running: set[str] = set()
        self.idle_since: float | None = None
        self.next_notice = 0.0

    def __call__(self, event: TrialEvent) -> None:
        if isinstance(event, TrialStarted):
            self.running.add(event.key)
        self.handle(event)

    def check(self, in_flight: set[str], ray: Any) -> None:
        self.running &= in_flight
        now = time.monotonic()
        if not in_flight or self.running:
            self.idle_since = None
            return
        if self.idle_since is None:
            self.idle_since, self.next_notice = now, now + RAY_WAIT_NOTICE_SECONDS
        if now < self.next_notice:
            return
        self.next_notice = now + 3 * RAY_WAIT_NOTICE_SECONDS
        free, total = ray.available_resources().get("CPU", 0.0), ray.cluster_resources().get("CPU", 0.0)
        if free >= 1 or (total >= 1 and total - free <= len(in_flight)):
            return  # a CPU is free, or every busy CPU may be ours, its worker still starting (slow, not stuck)
        where = f"at {self.address}" if self.address else "started here"
        self.handle(
            Notice(
                f"waiting {now - self.idle_since:.0f} s for a free CPU on the Ray cluster {where} ({free:g} of "
                f"{total:g} CPUs free, {len(in_flight)} trials claimed); they start when a CPU frees up or a node "
                "joins (`ray start --address=HEAD:PORT --num-cpus=N`); Ctrl-C gives the claims back"
            )
        )


def make_executor(kind: str, workers: int, *, ray_address: str | None = None) -> Executor:
    """The executor a study asks for (``"process"`` or ``"ray"``) with ``workers`` parallel trials."""
    if kind == "ray":
        return RayExecutor(workers, address=ray_address)
    if kind != "process":
        raise ValueError(f"unknown executor {kind!r}; allowed: process, ray")
    if workers == 1:
        return InlineExecutor()
    return ProcessExecutor(workers)
