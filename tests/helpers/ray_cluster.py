"""A real multi-node Ray cluster on this machine, for tests (tests/search/test_ray_cluster.py).

:class:`LocalCluster` starts a head and further nodes as separate ``ray start --block``
processes, each in a session of its own, with:

- a temporary dir of its own (short, so Ray's socket paths fit) and free ports for every port a
  node opens, so that it never meets another Ray on the machine (other users may run one);
- token authentication with a fresh token passed in the environment (``RAY_AUTH_MODE=token``,
  ``RAY_AUTH_TOKEN``), so nothing is read from or written to ``~/.ray``;
- one custom resource per node (``{"<node name>": 1}``) that names it, so a trial can tell
  which node ran it;
- an environment marker (``NASFCOS_TEST_CLUSTER=<id>``) that every process of the cluster
  inherits (raylet, GCS, Ray workers).

:meth:`LocalCluster.stop` ends exactly those processes: the ``ray start`` process of each node
gets SIGTERM (it shuts its node down), then any process that still carries the marker gets
SIGKILL by process id. :meth:`LocalCluster.leftover` lists them (empty after ``stop``). Never
``ray stop``: that would stop every Ray on the machine.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

MARKER = "NASFCOS_TEST_CLUSTER"
PORT_OPTIONS = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_command() -> list[str]:
    ray = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    return [ray] if ray else [sys.executable, "-m", "ray.scripts.scripts"]


@dataclass
class Node:
    name: str
    process: subprocess.Popen
    log: Path
    temp_dir: Path


@dataclass
class LocalCluster:
    """Head and worker nodes of one test cluster; use as a context manager."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="nfr-", dir="/tmp")))
    marker: str = field(default_factory=lambda: secrets.token_hex(6))
    token: str = field(default_factory=lambda: secrets.token_hex(32))
    nodes: dict[str, Node] = field(default_factory=dict)
    port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a cluster process, or of a driver joining the cluster."""
        env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, MARKER: self.marker,
               "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
        env.pop("RAY_ADDRESS", None)
        env.update(extra)
        return env

    # -------------------------------------------------------------- start
    def start_head(self, name: str = "head", cpus: int = 1, port: int | None = None, **env: str) -> Node:
        """Start the head (on ``port``, default a free one: a restarted head can take its old port)."""
        self.port = port or free_port()
        return self._start(name, cpus, ["--head", f"--port={self.port}", "--include-dashboard=false"], env)

    def add_node(self, name: str, cpus: int = 1, hide: Path | None = None, **env: str) -> Node:
        """Start a worker node; ``hide``: the node sees an empty folder there (its own mount
        namespace with a tmpfs over that path), like a machine that does not mount a shared disk."""
        return self._start(name, cpus, [f"--address={self.address}"], env, hide)

    def _start(self, name: str, cpus: int, args: list[str], env: dict[str, str], hide: Path | None = None) -> Node:
        temp_dir = self.root / name
        temp_dir.mkdir(parents=True, exist_ok=True)
        ports = [f"{option}={free_port()}" for option in PORT_OPTIONS]
        log = self.root / f"{name}.log"
        command = [*ray_command(), "start", "--block", *args, f"--num-cpus={cpus}", "--num-gpus=0",
                   f"--resources={json.dumps({name: 1})}", f"--node-name={name}", f"--temp-dir={temp_dir}",
                   "--disable-usage-stats", *ports]
        if hide is not None:
            script = f'mount -t tmpfs nasfcos-hidden "$0" && exec "$@"'
            command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(hide), *command]
        with open(log, "wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=self.env(**env),
                                       start_new_session=True, cwd=self.root)
        node = self.nodes[name] = Node(name, process, log, temp_dir)
        return node

    def wait_for_nodes(self, timeout: float = 120.0) -> None:
        """Wait until every node started so far has joined (its ``ray start`` printed
        "Ray runtime started", which a worker node prints once its raylet registered at the head)."""
        deadline = time.monotonic() + timeout
        for node in self.nodes.values():
            while "Ray runtime started" not in node.log.read_text(errors="replace"):
                if node.process.poll() is not None:
                    raise RuntimeError(f"ray start of node {node.name} exited {node.process.returncode}:\n"
                                       + node.log.read_text(errors="replace")[-3000:])
                if time.monotonic() > deadline:
                    raise TimeoutError(f"node {node.name} did not start in {timeout:.0f} s:\n"
                                       + node.log.read_text(errors="replace")[-3000:])
                time.sleep(0.3)

    # -------------------------------------------------------------- stop
    def leftover(self) -> list[int]:
        """Process ids of every process still carrying this cluster's marker."""
        found = []
        needle = f"{MARKER}={self.marker}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if needle in environ.split(b"\0"):
                found.append(int(entry.name))
        return found

    def kill_node(self, name: str) -> list[int]:
        """SIGKILL every process of one node (its ``ray start`` and everything in its session)."""
        node = self.nodes[name]
        pids = [pid for pid in self.leftover() if _session(pid) == node.process.pid]
        for pid in pids:
            _kill(pid, signal.SIGKILL)
        node.process.wait(timeout=30)
        del self.nodes[name]
        return pids

    def stop(self, timeout: float = 30.0) -> None:
        for node in reversed(list(self.nodes.values())):
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for node in self.nodes.values():
            try:
                node.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill(node.process.pid, signal.SIGKILL)
                node.process.wait(timeout=10)
        while (pids := self.leftover()) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in self.leftover():
            _kill(pid, signal.SIGKILL)
        time.sleep(0.2)

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def can_hide_paths() -> bool:
    """Whether this machine lets us start a node in its own mount namespace (root, unshare)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    return probe.returncode == 0


def _session(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[3])  # fields after the name: state ppid pgrp session


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
