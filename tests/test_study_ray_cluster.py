"""A study on a real multi-node Ray cluster on this machine (a head and two worker nodes, each started with
`ray start` with its own resources, temp dir and ports): the driver waits with a notice while the cluster has
no CPU, spreads the trials over the nodes once they join, and when one worker node is killed in the middle of a
trial, that trial runs again on the other node: every trial stored once, numbers identical to one machine,
progress, report and resume as usual. An unreachable Ray address is a clear error within seconds."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sparsearch.study.config import parse_study_config
from sparsearch.study.executors import InlineExecutor, RayExecutor
from sparsearch.study.runner import run_study
from sparsearch.study.store import StudyStore

STUDY = {
    "name": "cluster",
    "dataset": "digits",
    "sparsities": [0.5, 0.9],
    "arms": ["dense", "random-node", "random-weight"],
    "seeds": [0],
    "model": {"widths": [512, 512]},
    "budget": {"epochs": 6, "batch_size": 16},
}
TRIAL_COUNT = 5
VOLATILE = {"started", "finished", "train_seconds", "wall_seconds", "search_json", "owner", "heartbeat"}


def study_toml(address: str) -> str:
    return f"""name = "cluster"
dataset = "digits"
sparsities = [0.5, 0.9]
arms = ["dense", "random-node", "random-weight"]
seeds = [0]
executor = "ray"
ray_address = "{address}"
[model]
widths = [512, 512]
[budget]
epochs = 6
batch_size = 16
"""


def stable_numbers(path: Path):
    with StudyStore(path, create=False) as store:
        trials = {
            row["key"]: {k: v for k, v in row.items() if k not in VOLATILE} for row in store.trial_rows("cluster")
        }
        curves = {
            key: [(r.epoch, r.step, r.train_loss, r.val_accuracy, r.test_accuracy) for r in rows]
            for key, rows in store.epoch_rows("cluster").items()
        }
    return trials, curves


def wait_for(condition, timeout: float, what: str, process: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        assert process.poll() is None, f"the study ended while waiting for {what}: {log.read_text()}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}: {log.read_text()}")


def started_on(store: Path) -> dict[str, int]:
    """{trial key: pid of the worker that runs it} for the trials now running."""
    if not store.exists():
        return {}
    try:
        with sqlite3.connect(store, timeout=1) as connection:
            rows = connection.execute(
                "SELECT trial_key, worker FROM attempt WHERE ended IS NULL AND worker IS NOT NULL"
            ).fetchall()
    except sqlite3.OperationalError:
        return {}
    return {key: int(worker.rsplit(":", 1)[1]) for key, worker in rows}


@pytest.mark.slow
def test_a_study_survives_losing_a_worker_node_of_a_real_cluster(tmp_path):
    pytest.importorskip("ray")
    from ray_cluster import ray_cluster

    store = tmp_path / "cluster.sqlite"
    with ray_cluster(head_cpus=0) as cluster:
        study_file = tmp_path / "cluster.toml"
        study_file.write_text(study_toml(cluster.address))
        command = [sys.executable, "-m", "sparsearch.cli", "study", str(study_file), "--store", str(store)]
        command += ["--workers", "2"]
        log = tmp_path / "driver.log"
        spare_pids: set[int] = set()
        watching = threading.Event()
        with log.open("w") as out:
            driver = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=cluster.environment)
        try:
            # no CPU in the cluster yet: the driver says what it waits for instead of hanging silently
            wait_for(lambda: "for a free CPU on the Ray cluster" in log.read_text(), 120, "the notice", driver, log)
            assert f"at {cluster.address} (0 of 0 CPUs free, 2 trials claimed)" in log.read_text()
            doomed, spare = cluster.add_node("worker1", cpus=1), cluster.add_node("worker2", cpus=1)
            # a trial runs on each worker node; kill the first node in the middle of its trial
            doomed_pids = set()

            def trial_on_doomed_node() -> str | None:
                doomed_pids.update(doomed.pids())
                return next((key for key, pid in started_on(store).items() if pid in doomed_pids), None)

            # the spare node's Ray workers end with the driver's job: note their pids while they live
            def watch_spare() -> None:
                while not watching.wait(0.1):
                    spare_pids.update(spare.pids())

            watcher = threading.Thread(target=watch_spare, daemon=True)
            watcher.start()
            killed_trial = wait_for(trial_on_doomed_node, 150, "a trial on worker1", driver, log)
            doomed.kill()
            assert driver.wait(timeout=240) == 0, log.read_text()
        finally:
            watching.set()
            if driver.poll() is None:
                driver.kill()
        output = log.read_text()
        # resume: nothing left to do, nothing run again
        again = subprocess.run([*command, "--no-report"], capture_output=True, text=True, env=cluster.environment)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"0 trials run, {TRIAL_COUNT} already done" in again.stdout

    with StudyStore(store, create=False) as reader:
        attempts = reader.attempts("cluster")
        assert reader.status_counts("cluster") == {"done": TRIAL_COUNT}
    # one claim per trial, each done once; the killed trial finished on the other node
    assert sorted(a["trial_key"] for a in attempts) == sorted(stable_numbers(store)[0])
    assert {a["outcome"] for a in attempts} == {"done"}
    final_worker = {a["trial_key"]: int(a["worker"].rsplit(":", 1)[1]) for a in attempts}
    assert final_worker[killed_trial] in spare_pids
    # identical to the same study on one machine, in one process
    reference = tmp_path / "one-machine.sqlite"
    run_study(parse_study_config(STUDY), store_path=reference, executor=InlineExecutor(), show_progress=False)
    assert stable_numbers(store) == stable_numbers(reference)
    # progress and report as on one machine
    assert f"cluster: {TRIAL_COUNT}/{TRIAL_COUNT} trials" in output
    assert f"{TRIAL_COUNT} trials run, 0 already done, 0 failed" in output
    assert (tmp_path / "cluster" / "report.html").exists() or "report:" in output


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("127.0.0.1:{port}", "cannot reach the Ray cluster at ray_address '127.0.0.1:{port}'"),
        ("ray://127.0.0.1:{port}", "cannot reach the Ray cluster at ray_address 'ray://127.0.0.1:{port}'"),
        ("headnode", "ray_address 'headnode' is not 'auto', 'host:port'"),
    ],
)
def test_an_unreachable_ray_address_is_a_clear_error_within_seconds(tmp_path, address, message):
    from ray_cluster import free_port

    port = free_port()  # nothing listens there
    address, message = address.format(port=port), message.format(port=port)
    config = parse_study_config({**STUDY, "executor": "ray", "ray_address": address})
    started = time.monotonic()
    with pytest.raises(ValueError) as raised:
        run_study(
            config, store_path=tmp_path / "s.sqlite", executor=RayExecutor(2, address=address), show_progress=False
        )
    assert time.monotonic() - started < 15
    assert message in str(raised.value)
    # nothing claimed, nothing lost: every trial still pending for the next run
    with StudyStore(tmp_path / "s.sqlite", create=False) as reader:
        assert reader.status_counts("cluster") == {"pending": TRIAL_COUNT}
        assert reader.attempts("cluster") == []
