"""Running a study's trials on a Ray cluster (``executor = "ray"`` in the study file).

With ``ray_address`` unset, Ray starts a local cluster with one CPU per worker; with ``ray_address = "auto"``
or ``"ray://host:10001"`` the trials spread over the machines of an existing cluster (each machine needs
sparsearch installed and the study's data: MNIST-1D is generated locally, Fashion-MNIST needs its package).
Epochs stream back through a Ray queue, and this process alone writes the store, as with the local pool.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Sequence
from typing import Any

from sparsearch.study.config import StudyConfig
from sparsearch.study.runner import (
    EpochDone,
    EventHandler,
    TrialFailed,
    TrialFinished,
    TrialStarted,
    run_trial_single_threaded,
)
from sparsearch.study.store import TrialOutcome, TrialSpec


def _ray_trial(config: StudyConfig, spec: TrialSpec, events: Any) -> TrialOutcome:
    events.put(TrialStarted(spec.key, time.time()))
    return run_trial_single_threaded(config, spec, lambda row: events.put(EpochDone(spec.key, row)))


class RayExecutor:
    """Trials as Ray tasks of one CPU each; ``workers`` caps the CPUs of a local cluster started here."""

    def __init__(self, workers: int, *, address: str | None = None) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.workers = workers
        self.address = address

    def run(self, config: StudyConfig, trials: Sequence[TrialSpec], handle: EventHandler) -> None:
        if not trials:
            return
        import ray
        from ray.util.queue import Empty, Queue

        started_here = not ray.is_initialized()
        if started_here:
            local = {"num_cpus": self.workers} if self.address is None else {}
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False, **local)
        try:
            # zero CPUs: an actor needs a CPU to be placed by default, and with every CPU taken by trials that
            # block on their first events.put, it would wait for one (minutes, until Ray's lease timeout)
            events = Queue(actor_options={"num_cpus": 0})
            task = ray.remote(num_cpus=1)(_ray_trial)
            references = {task.remote(config, spec, events): spec for spec in trials}
            waiting = list(references)
            while waiting:
                finished, waiting = ray.wait(waiting, num_returns=1, timeout=0.25)
                self._drain(events, Empty, handle)
                for reference in finished:
                    spec = references[reference]
                    try:
                        outcome = ray.get(reference)
                    except Exception:
                        handle(TrialFailed(spec.key, traceback.format_exc()))
                    else:
                        self._drain(events, Empty, handle)
                        handle(TrialFinished(spec.key, outcome))
            events.shutdown()
        finally:
            if started_here:
                ray.shutdown()

    @staticmethod
    def _drain(events: Any, empty: type[Exception], handle: EventHandler) -> None:
        while True:
            try:
                event = events.get_nowait()
            except empty:
                return
            handle(event)
