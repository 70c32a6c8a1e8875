"""A real multi-node Ray cluster on this machine for tests and benchmarks: each node is a `ray start --block`
process in its own session with its own temp dir (so the node's processes can be found and killed together)
and its own ports, so that clusters of parallel tests (pytest-xdist) or other users of the
machine never collide. Never `ray stop`: it would stop every Ray cluster on the machine."""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
# the head notices a dead node within a few seconds instead of Ray's default of about half a minute
FAST_FAILURE_DETECTION = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def free_port_range(size: int) -> int:
    """The first of ``size`` consecutive free ports (for a node's worker processes)."""
    for _ in range(200):
        base = random.randrange(20000, 30000 - size)
        probes = []
        try:
            for port in range(base, base + size):
                probe = socket.socket()
                probes.append(probe)
                probe.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise RuntimeError("no free range of ports for Ray workers")


class RayNode:
    """One `ray start` node; ``kill()`` takes it down at once like a machine that loses power."""

    def __init__(self, name: str, arguments: list[str], temp_root: Path, environment: dict[str, str]) -> None:
        self.name = name
        self.killed = False
        self.temp_dir = temp_root / name
        worker_ports = free_port_range(24)
        command = ["ray", "start", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1"]
        command += [f"--temp-dir={self.temp_dir}", "--object-store-memory=80000000"]
        command += [
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            f"--min-worker-port={worker_ports}",
            f"--max-worker-port={worker_ports + 23}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            *arguments,
        ]
        self.log = temp_root / f"{name}.log"
        with self.log.open("w") as out:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=environment, start_new_session=True
            )

    def pids(self) -> set[int]:
        """Every live process of this node: its process group, and the Ray workers its raylet started (they
        run in sessions of their own but name the node's temp dir on their command line)."""
        found = set()
        marker = f"{self.temp_dir}/".encode()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                    if fields[0] == "Z":
                        continue
                    if int(fields[2]) == self.process.pid or marker in (entry / "cmdline").read_bytes():
                        found.add(int(entry.name))
        return found

    def kill(self) -> None:
        """SIGKILL every process of the node at once, like a machine that loses power."""
        self.killed = True
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        deadline = time.monotonic() + 10
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.1)


class RayCluster:
    """A head node (``head_cpus`` CPUs) on free ports; ``add_node`` starts worker nodes that join it."""

    def __init__(self, head_cpus: int) -> None:
        self.head_cpus = head_cpus
        # short: Ray's unix sockets live under the temp dir, and socket paths are limited to 107 characters
        self.temp_root = Path(tempfile.mkdtemp(prefix="sa-ray-", dir="/tmp"))
        self.environment = {
            **os.environ,
            **FAST_FAILURE_DETECTION,
            # a throw-away cluster on 127.0.0.1: no auth token to hand to its nodes and drivers
            "RAY_AUTH_MODE": "disabled",
            "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
        }
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[RayNode] = []

    def start(self) -> None:
        head = [
            "--head",
            f"--port={self.port}",
            f"--num-cpus={self.head_cpus}",
            "--include-dashboard=false",
            f"--ray-client-server-port={free_port()}",
        ]
        self.nodes.append(RayNode("head", head, self.temp_root, self.environment))
        self.wait_for_cpus(self.head_cpus, nodes=1)

    def add_node(self, name: str, cpus: int) -> RayNode:
        node = RayNode(name, [f"--address={self.address}", f"--num-cpus={cpus}"], self.temp_root, self.environment)
        self.nodes.append(node)
        return node

    def wait_for_cpus(self, cpus: int, nodes: int, timeout: float = 90.0) -> None:
        """Wait until ``nodes`` nodes are alive with ``cpus`` CPUs in all (asks the head with `ray status`)."""
        deadline = time.monotonic() + timeout
        status = ""
        while time.monotonic() < deadline:
            for node in self.nodes:
                if not node.killed and node.process.poll() is not None:
                    raise RuntimeError(f"ray node {node.name} exited: {node.log.read_text()[-3000:]}")
            result = subprocess.run(
                ["ray", "status", f"--address={self.address}"],
                capture_output=True,
                text=True,
                env=self.environment,
                timeout=60,
            )
            status = result.stdout + result.stderr[-1000:]
            if result.returncode == 0 and _alive_nodes(status) == nodes and _total_cpus(status) == cpus:
                return
            time.sleep(1.0)
        raise RuntimeError(f"Ray cluster at {self.address} did not reach {nodes} nodes, {cpus} CPUs: {status}")

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.kill()
        shutil.rmtree(self.temp_root, ignore_errors=True)


def _total_cpus(status: str) -> float:
    # "Total Usage:" holds " 0.0/2.0 CPU" when the cluster has CPUs, no CPU line when it has none
    found = re.search(r"/([0-9.]+) CPU", status)
    return float(found.group(1)) if found else 0.0


def _alive_nodes(status: str) -> int:
    # `ray status` lists one " 1 node_<id>" line per alive node under "Active:"
    active = status.split("Active:", 1)[-1].split("Pending:", 1)[0]
    return sum(1 for line in active.splitlines() if "node_" in line)


@contextlib.contextmanager
def ray_cluster(head_cpus: int) -> Iterator[RayCluster]:
    """A cluster that is always taken down, whatever happens in the block."""
    cluster = RayCluster(head_cpus)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
