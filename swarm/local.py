"""A whole swarm on this machine: this process coordinates, more `swarm join` processes host the other layers.

Used by `swarm local` (the quickest way to see the swarm work) and by the tests and benchmarks; the nodes
are real processes talking gRPC over loopback, pinned to an even split so the model is always cut.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from . import cache, join
from .client import SwarmClient
from .errors import NotReadyError
from .gguf_file import read_gguf
from .layers import split_evenly
from .slicing import model_layer_count

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A free port whose next one is free too (a node's step stream takes --port + 1 by default)."""
    while True:
        with socket.socket() as s, socket.socket() as t:
            s.bind((host, 0))
            port = s.getsockname()[1]
            try:
                t.bind((host, port + 1))
            except OSError:
                continue
            return port


def stop_processes(procs: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    """Ask node processes to leave (SIGTERM), then kill the ones still there after `grace_s`."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(grace_s)
        except subprocess.TimeoutExpired:
            p.kill()


class LocalSwarm:
    """A coordinator in this process and `nodes - 1` node processes on 127.0.0.1, pinned to an even split.

    With `node_args` (one list of `swarm join` options per extra node) nothing is pinned unless those
    options say so, and the planner decides; `max_memory` caps the coordinator. The HTTP API listens on
    `http_port` (0: any free port; None: off).
    """

    def __init__(self, model: Path, nodes: int = 3, threads: int | None = None, ctx: int = 2048,
                 max_sessions: int = 4, ready_timeout: float = 300.0, node_env: dict | None = None,
                 node_args: list[list[str]] | None = None, max_memory: int = 0, http_port: int | None = 0,
                 http_host: str = "127.0.0.1"):
        if node_args is None:
            ranges = split_evenly(model_layer_count(read_gguf(model)), nodes)
            pin, node_args = ranges[0], [["--layers", str(r)] for r in ranges[1:]]
        else:
            pin = None
        self.log_dir = cache.subdir("logs")
        self.procs: list[subprocess.Popen] = []
        self.running = join.start_coordinator(
            model, swarm=f"local-{os.getpid()}", host="127.0.0.1", port=0, pin=pin, threads=threads,
            n_ctx=ctx, max_sessions=max_sessions, mdns_interface="off", name="coordinator", max_memory=max_memory,
            http=http_port is not None, http_port=http_port, http_host=http_host,
        )
        try:
            for i, extra in enumerate(node_args, start=1):
                cmd = [sys.executable, "-m", "swarm.cli", "join", "--coordinator", self.running.address,
                       "--host", "127.0.0.1", "--mdns-interface", "off", "--name", f"node{i}", *extra]
                if threads and "--threads" not in extra:
                    cmd += ["--threads", str(threads)]
                env = dict(os.environ, SWARM_KEY=self.running.key, **(node_env or {}))
                with open(self.log_dir / f"local-node{i}.log", "wb") as out:
                    self.procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env))
            self.client = SwarmClient(self.running.address, key=self.running.key)
            self._wait_ready(ready_timeout)
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            status = self.client.status()
            if status["state"] == "ready" and len(status["nodes"]) == 1 + len(self.procs) and all(
                    n["state"] in ("ready", "idle") for n in status["nodes"]):
                return  # every node joined, measured, and the plan for all of them is loaded
            dead = [i + 1 for i, p in enumerate(self.procs) if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"node process(es) {dead} exited" if dead else f"not ready after {timeout:.0f} s"
                raise NotReadyError(f"the local swarm did not start: {why} ({status['detail']}); see {self.log_dir}")
            time.sleep(0.2)

    def close(self) -> None:
        stop_processes(self.procs)
        if getattr(self, "client", None):
            self.client.close()
        self.running.stop()

    def __enter__(self) -> "LocalSwarm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
