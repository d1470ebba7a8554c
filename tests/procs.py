"""Real `swarm join` processes on 127.0.0.1 for the network tests: start, wait until ready, stop, read logs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from swarm.client import SwarmClient
from swarm.local import free_port  # noqa: F401 (tests import it from here)


class Proc:
    """One `swarm join` process with its log file."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None, prefix: list[str] | None = None):
        self.log = log
        self.args = args
        full_env = dict(os.environ, **(env or {}))
        with open(log, "wb") as out:  # `prefix` runs it elsewhere, e.g. in a network namespace
            self.p = subprocess.Popen([*(prefix or []), sys.executable, "-m", "swarm.cli", "join", *args], stdout=out,
                                      stderr=subprocess.STDOUT, env=full_env)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(15)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)


class Swarm:
    """A coordinator process and node processes; `client` talks to the coordinator."""

    def __init__(self, tmp: Path, model: Path, coordinator_args: list[str], nodes: list[list[str]],
                 key: str = "test-key-123-swarm-tests", coordinator_env: dict | None = None, ctx: int = 512,
                 via_mdns: str | None = None):
        self.tmp, self.key = tmp, key
        self.started = time.monotonic()
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.procs: list[Proc] = []
        mdns = [] if via_mdns else ["--mdns-interface", "off"]
        if not {"--http-port", "--no-http"} & set(coordinator_args):
            # Any free port: the default (--port + 80) may be taken by chance on a busy machine.
            coordinator_args = [*coordinator_args, "--http-port", "0"]
        self.coordinator = Proc(
            ["--model", str(model), "--host", "127.0.0.1", "--port", str(self.port), "--key", key, "--ctx", str(ctx),
             "--name", "coord", *mdns, *coordinator_args], tmp / "coordinator.log", coordinator_env)
        self.procs.append(self.coordinator)
        for i, extra in enumerate(nodes):
            where = ["--swarm", via_mdns] if via_mdns else ["--coordinator", self.address, "--mdns-interface", "off"]
            cache = tmp / f"node{i}-cache"  # its own cache: shard files must come over the wire
            self.procs.append(Proc(["--host", "127.0.0.1", "--key", key, "--name", f"node{i}", *where, *extra],
                                   tmp / f"node{i}.log", {"SWARM_CACHE_DIR": str(cache)}))
        self.client = None

    def wait_ready(self, timeout: float = 240.0) -> SwarmClient:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.p.poll() is not None:
                    raise AssertionError(f"{p.log.name} exited with {p.p.returncode}:\n{p.text()[-3000:]}")
            try:
                if self.client is None:
                    self.client = SwarmClient(self.address, key=self.key)
                status = self.client.status()
                # Every node started has joined and holds what the plan gave it: the coordinator is "ready"
                # on its own for a moment before the others join, and a session begun then keeps that route.
                if status["state"] == "ready" and len(status["nodes"]) >= len(self.procs) and all(
                        n["state"] in ("ready", "idle") for n in status["nodes"]):
                    return self.client
                last = status["detail"]
            except Exception as e:  # not listening yet
                last = repr(e)
            time.sleep(0.3)
        raise AssertionError(f"swarm not ready after {timeout} s: {last}\n" + "\n".join(
            f"--- {p.log.name}\n{p.text()[-2000:]}" for p in self.procs))

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        for p in reversed(self.procs):
            p.stop()
