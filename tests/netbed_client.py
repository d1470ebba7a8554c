"""A client run inside a test bed host's namespace (tests/netbed.py), driven over its stdin and stdout:
one JSON command a line in, JSON lines out. Used by tests/test_nat.py and scripts/bench_wan.py, whose
own process cannot reach the namespaces.

    {"op": "wait", "address": A, "key": K, "nodes": N}   -> {"ready": true, "status": ...} once N nodes are
                                                           ready (or {"error": ...} after `timeout`, 300 s)
    {"op": "generate", "address": A, "key": K, "prompt": P, "n": N, "timings": false}
                                                        -> {"n": k} per text piece, then {"tokens": [...],
                                                           "decode_tps": ..., "timings": {...}}
    {"op": "status", "address": A, "key": K}            -> {"status": ...}

An error in a command answers {"error": "..."} and the client goes on reading.
"""

import json
import sys
import time

from swarm.client import SwarmClient

clients: dict[tuple[str, str], SwarmClient] = {}


def client(cmd: dict) -> SwarmClient:
    key = (cmd["address"], cmd["key"])
    if key not in clients:
        clients[key] = SwarmClient(cmd["address"], key=cmd["key"])
    return clients[key]


def say(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def wait(cmd: dict) -> None:
    deadline = time.monotonic() + cmd.get("timeout", 300)
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            status = client(cmd).status()
            # Every node has joined and holds what the plan gave it: a session begun while the coordinator is
            # ready on its own keeps that first route.
            if status["state"] == "ready" and len(status["nodes"]) >= cmd["nodes"] and all(
                    n["state"] in ("ready", "idle") for n in status["nodes"]):
                say({"ready": True, "status": status})
                return
            last = status["detail"]
        except Exception as e:  # not listening yet
            last = repr(e)
        time.sleep(0.3)
    say({"error": f"the swarm did not get ready: {last}"})


def generate(cmd: dict) -> None:
    gen = client(cmd).generate(cmd["prompt"], max_tokens=cmd["n"], timings=cmd.get("timings", False))
    for _ in gen:
        say({"n": len(gen.result.tokens)})
    r = gen.result
    say({"tokens": r.tokens, "decode_tps": r.tokens_per_s, "first_token_ms": r.first_token_ms,
         "timings": r.timings})


for line in sys.stdin:
    cmd = json.loads(line)
    try:
        if cmd["op"] == "wait":
            wait(cmd)
        elif cmd["op"] == "generate":
            generate(cmd)
        elif cmd["op"] == "status":
            say({"status": client(cmd).status()})
        else:
            say({"error": f"unknown op {cmd['op']!r}"})
    except Exception as e:
        say({"error": repr(e)})
