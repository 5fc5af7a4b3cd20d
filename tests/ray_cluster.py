"""A throw-away Ray cluster on 127.0.0.1 for tests: a head plus extra raylets, own temp dir and ports.

Only the processes this cluster started are stopped (found by their parent chain and by the
cluster's temp dir in their command line); never a machine-wide `ray stop`.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).with_name("ray"))
# the same auth mode for head, raylets and clients, whatever ~/.ray holds on this machine; a lost node is declared
# dead after about 3 s of failed health checks (Ray's default: 15 s)
ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ports(worker_base: int) -> list[str]:
    return [
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--min-worker-port={worker_base}",
        f"--max-worker-port={worker_base + 400}",
    ]


class LocalRayCluster:
    """`ray start --head --block` plus `ray start --address ... --block` per extra node."""

    def __init__(self, temp_dir: Path, num_nodes: int = 1, cpus_per_node: int = 4):
        self.temp_dir = Path(temp_dir)
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        # jobs run `python` from the raylets' PATH: this interpreter's environment
        self.env = {**os.environ, **ENV, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.procs: list[subprocess.Popen] = []
        self.nodes: dict[str, subprocess.Popen] = {}
        self.pids: set[int] = set()
        common = ["--block", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus_per_node}", "--num-gpus=0"]
        head = [
            RAY,
            "start",
            "--head",
            f"--port={self.gcs_port}",
            f"--temp-dir={self.temp_dir}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={free_port()}",
            "--include-dashboard=true",
            *common,
            *_node_ports(20000),
        ]
        self._start(head, "head")
        self.wait_for_nodes(1)
        for i in range(1, num_nodes):
            worker = [RAY, "start", f"--address={self.address}", *common, *_node_ports(20000 + 500 * i)]
            self._start(worker, f"node{i}")
        self.wait_for_nodes(num_nodes)
        self.wait_for_dashboard()

    def _start(self, cmd: list[str], name: str) -> None:
        log = open(self.temp_dir / f"{name}.log", "w")
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        self.nodes[name] = proc
        self.pids.add(proc.pid)

    def _ray(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def _probe(self, *args: str) -> subprocess.CompletedProcess | None:
        """A `ray` CLI call used to poll; None when it hangs (a starting cluster on a busy machine)."""
        try:
            return self._ray(*args, timeout=30)
        except subprocess.TimeoutExpired:
            return None

    def wait_for_nodes(self, n: int, timeout: float = 180) -> None:
        deadline, out = time.time() + timeout, None
        while time.time() < deadline:
            self._collect_pids()
            out = self._probe("status", f"--address={self.address}")
            if out is not None and out.returncode == 0 and out.stdout.count("node_") >= n:
                return
            time.sleep(1)
        raise TimeoutError(f"Ray cluster did not reach {n} nodes: {out and out.stdout}{out and out.stderr}")

    def wait_for_dashboard(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = self._probe("job", "list", f"--address={self.dashboard_url}")
            if out is not None and out.returncode == 0:
                return
            time.sleep(1)
        raise TimeoutError("Ray job server did not come up")

    def submit(self, entrypoint: list[str], working_dir: Path) -> str:
        """Submit a job; returns its id (`wait_job` waits for it)."""
        out = self._ray(
            "job",
            "submit",
            f"--address={self.dashboard_url}",
            f"--working-dir={working_dir}",
            "--no-wait",
            "--",
            *entrypoint,
            timeout=120,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        return re.search(r"raysubmit_[A-Za-z0-9]+", out.stdout).group(0)

    def wait_job(self, job_id: str, timeout: float = 600) -> tuple[str, str]:
        """Wait for a submitted job to end; returns (status, logs)."""
        deadline = time.time() + timeout
        status = "UNKNOWN"
        while time.time() < deadline:
            self._collect_pids()
            status_out = self._ray("job", "status", f"--address={self.dashboard_url}", job_id)
            assert status_out.returncode == 0, status_out.stdout + status_out.stderr
            text = (status_out.stdout + status_out.stderr).upper()  # e.g. "Job 'raysubmit_..' succeeded"
            status = next((s for s in ("SUCCEEDED", "FAILED", "STOPPED") if s in text), "RUNNING")
            if status != "RUNNING":
                break
            time.sleep(2)
        logs = self._ray("job", "logs", f"--address={self.dashboard_url}", job_id).stdout
        return status, logs

    def _collect_pids(self) -> None:
        for pid in list(self.pids):
            try:
                self.pids.update(c.pid for c in psutil.Process(pid).children(recursive=True))
            except psutil.NoSuchProcess:
                pass
        marker = str(self.temp_dir)
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if any(marker in part for part in proc.info["cmdline"] or ()):
                self.pids.add(proc.info["pid"])

    def kill_node(self, name: str) -> None:
        """SIGKILL a node (e.g. "node1"): its `ray start`, raylet and every worker process on it."""
        root = psutil.Process(self.nodes[name].pid)
        procs = [root, *root.children(recursive=True)]
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)

    def stop(self) -> None:
        """End every process this cluster started: SIGTERM, then SIGKILL what is left."""
        self._collect_pids()
        procs = []
        for pid in self.pids:
            try:
                procs.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                pass
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=3)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
