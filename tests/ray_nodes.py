"""A two-node Ray cluster on loopback, for the tests and the benchmarks.

A head node and a second node, one CPU each, each started with ``ray start
--block`` in a session of its own: stopping those commands stops every
process they started, and killing a node's process group is losing that
machine.  Token authentication is on, as a cluster on a network should have.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, what: str, deadline: float = 60.0) -> None:
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError(f"{what} did not happen within {deadline:.0f} s")
        time.sleep(0.2)


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


class TwoNodes:
    """A head node and a second node, one CPU each, on loopback."""

    def __init__(self, workdir: Path, cache: Path | None = None, pace_s: float = 0.0):
        token = workdir / "token"
        token.write_text(secrets.token_hex(32))
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                    "TF_CPP_MIN_LOG_LEVEL": "3",
                    # the time the paced-color test encoder takes for a batch of 8 on the nodes
                    "IMGSEARCH_TEST_PACE_S": str(pace_s)}
        if cache:  # where the nodes' workers find the encoders' exported models
            self.env["IMGSEARCH_CACHE_DIR"] = str(cache)
        self.env.pop("IMGSEARCH_TEST_DRIVER_ONLY", None)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[subprocess.Popen] = []

    def __enter__(self):
        common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats", "--block"]
        # A session of its own per node: killing its process group is
        # losing the machine.
        quiet = dict(env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            self.nodes.append(subprocess.Popen(
                [BIN / "ray", "start", "--head", "--port", str(self.port), "--include-dashboard=false",
                 "--ray-client-server-port", str(free_port()), *common], **quiet))
            wait_for(lambda: listening(self.port), "the Ray head node's start")
            self.nodes.append(subprocess.Popen([BIN / "ray", "start", "--address", self.address, *common], **quiet))
            wait_for(lambda: self.alive() == 2, "the second Ray node's joining")
        except BaseException:
            self.__exit__()
            raise
        return self

    def alive(self) -> int:
        count = [sys.executable, "-c", "import ray; ray.init(logging_level='ERROR'); "
                 "print(sum(n['Alive'] for n in ray.nodes()))"]
        out = subprocess.run(count, env={**self.env, "RAY_ADDRESS": self.address}, capture_output=True,
                             text=True, timeout=60).stdout.strip()
        return int(out) if out.isdigit() else 0

    def lose_second_node(self) -> None:
        """Kill every process of the second node at once, as a crash would."""
        node = self.nodes.pop()
        os.killpg(node.pid, signal.SIGKILL)
        node.wait()

    @staticmethod
    def _stop(node: subprocess.Popen) -> None:
        node.send_signal(signal.SIGTERM)  # 'ray start --block' then stops what it started
        try:
            node.wait(10)
        except subprocess.TimeoutExpired:  # it waits for drivers that were killed
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()

    def __exit__(self, *exc):
        for node in self.nodes:  # all at once: a head waits for its nodes otherwise
            node.send_signal(signal.SIGTERM)
        while self.nodes:
            self._stop(self.nodes.pop())
