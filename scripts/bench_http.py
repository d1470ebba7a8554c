#!/usr/bin/env python3
"""The HTTP API against the gRPC client on the same swarm: time to first token and decode tokens/s.

One swarm of `swarm join` processes on 127.0.0.1 (the coordinator with the model and the first range,
the others pinned to an even split, the HTTP API on), and two clients in this process that take turns
round by round, each going first in turn: `swarm.client.SwarmClient` (gRPC) and a streaming
`POST /v1/completions` read as server-sent events with the standard library's `http.client` (so the
client's own parsing costs little). Both are timed the same way, by the client: first token from
sending the request to the first text; decode tokens/s from the first text to the last, over the
tokens in between; the median step is the median time between two text pieces (one per token as a
rule), which a shared machine's occasional stalls move less. Ratios are speed against the gRPC client
(for steps: the gRPC step over the HTTP step), as a ratio of medians and, in brackets, the median of
each round's ratio. Greedy, so both must give the same text, which is checked. Before each request
the script waits until no session runs and the swarm is ready (a session's end may re-plan or re-probe
the nodes, and the next request would wait for that, whichever client sent it).

    python scripts/bench_http.py                    # default model, 3 nodes, 5 rounds, 128 tokens
    python scripts/bench_http.py --rounds 9 --model path/to/model.gguf
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = (
    "Llamas are domesticated South American camelids, widely used as meat and pack animals by Andean cultures "
    "since the pre-Columbian era. They are social animals and live with others as a herd. Their wool is soft "
    "and contains only a small amount of lanolin. Llamas can learn simple tasks after a few repetitions. When "
    "using a pack, they can carry about 25 to 30 percent of their body weight for 8 to 13 km. The name llama "
    "was adopted by European settlers from native Peruvians."
)


def start_swarm(model: Path, nodes: int, threads: int, log_dir: Path):
    from swarm import wire
    from swarm.client import SwarmClient
    from swarm.gguf_file import read_gguf
    from swarm.layers import split_evenly
    from swarm.local import free_port
    from swarm.slicing import model_layer_count

    ranges = split_evenly(model_layer_count(read_gguf(model)), nodes)
    port, http_port, key = free_port(), free_port(), wire.new_key()
    address = f"127.0.0.1:{port}"
    common = ["--host", "127.0.0.1", "--mdns-interface", "off", "--threads", str(threads)]
    commands = [["--model", str(model), "--port", str(port), "--http-port", str(http_port), "--key", key, "--ctx",
                 "1024", "--max-sessions", "1", "--swarm", f"bench-http-{os.getpid()}", "--name", "coordinator",
                 "--layers", str(ranges[0])]]
    commands += [["--coordinator", address, "--key", key, "--name", f"node{i}", "--layers", str(r)]
                 for i, r in enumerate(ranges[1:], start=1)]
    procs = []
    for i, args in enumerate(commands):
        with open(log_dir / f"bench-http-{i}.log", "wb") as out:
            procs.append(subprocess.Popen([sys.executable, "-m", "swarm.cli", "join", *args, *common], stdout=out,
                                          stderr=subprocess.STDOUT))
    client = SwarmClient(address, key=key)
    deadline = time.monotonic() + 600
    while True:
        try:
            status = client.status()
            if status["state"] == "ready" and len(status["nodes"]) == nodes and all(
                    n["state"] in ("ready", "idle") for n in status["nodes"]):
                return procs, client, http_port, key
        except Exception:
            pass  # not listening yet
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            stop(procs, client)
            raise SystemExit(f"the swarm did not start; see {log_dir}")
        time.sleep(0.3)


def stop(procs, client) -> None:
    from swarm.local import stop_processes

    stop_processes(procs)
    client.close()


def settle(client, timeout: float = 120.0) -> None:
    """Wait until no session runs and the swarm is ready: a session's end may re-plan or re-probe, and the
    next request would wait for that whichever client sent it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.status()
        if status["state"] == "ready" and not status["sessions"]:
            return
        time.sleep(0.05)
    raise SystemExit(f"the swarm did not settle between rounds: {status['detail']}")


def run_grpc(client, n: int) -> dict:
    t0 = time.perf_counter()
    gen = client.generate(PROMPT, max_tokens=n, temperature=0)
    times = []
    for _ in gen:
        times.append(time.perf_counter())
    return _timed(t0, times, len(gen.result.tokens), gen.result.text, n)


def run_http(port: int, key: str, n: int) -> dict:
    body = json.dumps({"prompt": PROMPT, "max_tokens": n, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Authorization": f"Bearer {key}",
                                                   "Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise SystemExit(f"HTTP {response.status}: {response.read()[:500]!r}")
    times, text, tokens = [], [], 0
    for line in response:  # server-sent events: "data: {...}" lines, blank lines between
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        for choice in chunk["choices"]:
            if choice["text"]:
                times.append(time.perf_counter())
                text.append(choice["text"])
    conn.close()
    return _timed(t0, times, tokens, "".join(text), n)


def _timed(t0: float, times: list[float], tokens: int, text: str, n: int) -> dict:
    if tokens != n:
        raise SystemExit(f"the answer stopped after {tokens} tokens; the benchmark needs {n}")
    gaps = sorted(b - a for a, b in zip(times, times[1:]))  # one text piece per token, as a rule
    return {"ttft_ms": 1e3 * (times[0] - t0), "decode_tps": (tokens - 1) / (times[-1] - times[0]),
            "step_ms": 1e3 * gaps[len(gaps) // 2], "text": text}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from swarm.models import resolve_model

    model = resolve_model(args.model)
    log_dir = Path(tempfile.mkdtemp(prefix="bench-http-"))
    procs, client, http_port, key = start_swarm(model, args.nodes, args.threads, log_dir)
    results: dict[str, list[dict]] = {"gRPC client": [], "HTTP API": []}
    runs = {"gRPC client": lambda: run_grpc(client, args.tokens),
            "HTTP API": lambda: run_http(http_port, key, args.tokens)}
    try:
        for run in runs.values():  # warm up both paths
            run()
        for r in range(args.rounds):
            order = list(runs) if r % 2 == 0 else list(reversed(runs))
            for name in order:
                settle(client)
                results[name].append(runs[name]())
            print(f"round {r + 1}: " + ", ".join(
                f"{name} {results[name][-1]['decode_tps']:.1f} tok/s, first {results[name][-1]['ttft_ms']:.0f} ms"
                for name in runs), file=sys.stderr, flush=True)
    finally:
        stop(procs, client)
    grpc_rows, http_rows = results["gRPC client"], results["HTTP API"]
    if {x["text"] for x in grpc_rows + http_rows} != {grpc_rows[0]["text"]}:
        raise SystemExit("the HTTP API and the gRPC client gave different greedy texts")
    paired = statistics.median(h["decode_tps"] / g["decode_tps"] for g, h in zip(grpc_rows, http_rows))
    paired_step = statistics.median(g["step_ms"] / h["step_ms"] for g, h in zip(grpc_rows, http_rows))
    base = statistics.median(g["decode_tps"] for g in grpc_rows)
    base_step = statistics.median(g["step_ms"] for g in grpc_rows)
    print(f"{args.nodes}-node swarm, {model.name}, {args.tokens} tokens, median of {args.rounds} rounds")
    print("| client | first token ms | decode tok/s | vs gRPC (paired) | median step ms | vs gRPC (paired) |")
    print("|---|---|---|---|---|---|")
    for name, rows in results.items():
        tps = statistics.median(x["decode_tps"] for x in rows)
        step = statistics.median(x["step_ms"] for x in rows)
        ratio = (f"{tps / base:.1%} ({paired:.1%}) | {step:.2f} | {base_step / step:.1%} ({paired_step:.1%})"
                 if name == "HTTP API" else f"100% | {step:.2f} | 100%")
        print(f"| {name} | {statistics.median(x['ttft_ms'] for x in rows):.0f} | {tps:.1f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
