#!/usr/bin/env python3
"""Swarms on localhost against single-process llama-cpp-python: time to first token and decode speed.

A 1-, 2- and 3-node swarm (every node a `swarm join` process, as a user starts them: the coordinator with
the model and the first range, the others pinned to an even split; this script is only the client) and a
llama-cpp-python process are all started first, then take turns round by round (the reference first, the
swarms each going first in turn), so machine noise falls on all of them alike. Medians are reported,
with the median of each round's ratio to that round's reference beside the ratio of medians, and each
swarm's per-token time split into compute (llama.cpp, summed over the hops), serialization (hidden
states to bytes and back), sampling, and network (everything else: gRPC, loopback, scheduling).

    python scripts/bench_swarm.py                  # Gemma 3 270M (gemma3-270m), 5 rounds, 128 decode tokens
    python scripts/bench_swarm.py --rounds 9 --nodes 2,3
    git worktree add /tmp/old REV && python scripts/bench_swarm.py --baseline /tmp/old   # this code against REV
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PROMPT = (
    "Llamas are domesticated South American camelids, widely used as meat and pack animals by Andean cultures "
    "since the pre-Columbian era. They are social animals and live with others as a herd. Their wool is soft "
    "and contains only a small amount of lanolin. Llamas can learn simple tasks after a few repetitions. When "
    "using a pack, they can carry about 25 to 30 percent of their body weight for 8 to 13 km. The name llama "
    "was adopted by European settlers from native Peruvians."
)

# The reference runs in a process of its own with the environment the user has, exactly as a user
# would run llama-cpp-python; it reads one line per round and answers with one JSON line.
REFERENCE = r"""
import json, sys, time
import llama_cpp
model, n_decode, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
llm = llama_cpp.Llama(model_path=model, n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False)
tokens = llm.tokenize(sys.argv[4].encode(), add_bos=True, special=True)
print("ready", flush=True)
for _ in sys.stdin:
    llm.reset()  # no prompt reuse between rounds: every round evaluates the whole prompt
    t0 = time.perf_counter()
    n, times = 0, []
    for _ in llm.generate(tokens, temp=0.0, top_k=1, repeat_penalty=1.0):
        n += 1
        times.append(time.perf_counter())
        if n >= n_decode:
            break
    t1, t2 = times[0], times[-1]
    steps = sorted(b - a for a, b in zip(times, times[1:]))
    print(json.dumps({"ttft_ms": 1e3 * (t1 - t0), "decode_tps": (n - 1) / (t2 - t1), "prompt_tokens": len(tokens),
                      "median_step_ms": 1e3 * steps[len(steps) // 2]}), flush=True)
"""


class ProcSwarm:
    """A swarm of `swarm join` processes on 127.0.0.1, pinned to an even split, and a client to it."""

    def __init__(self, model, nodes: int, threads: int, log_dir, code: str | None = None, max_sessions: int = 1,
                 env: dict | None = None, label: str = ""):
        from swarm import wire
        from swarm.client import SwarmClient
        from swarm.gguf_file import read_gguf
        from swarm.layers import split_evenly
        from swarm.local import free_port
        from swarm.slicing import model_layer_count

        ranges = split_evenly(model_layer_count(read_gguf(model)), nodes)
        port, key = free_port(), wire.new_key()
        self.address, self.key, self.code = f"127.0.0.1:{port}", key, code
        common = ["--host", "127.0.0.1", "--mdns-interface", "off", "--threads", str(threads)]
        commands = [["--model", str(model), "--port", str(port), "--key", key, "--ctx", "1024", "--max-sessions", str(max_sessions),
                     "--swarm", f"bench-{os.getpid()}-{nodes}", "--name", "coordinator", "--layers", str(ranges[0])]]
        commands += [["--coordinator", self.address, "--key", key, "--name", f"node{i}", "--layers", str(r)]
                     for i, r in enumerate(ranges[1:], start=1)]
        # `code`: a checkout of another version; its nodes run that code (the client is this one).
        # `env`: more environment for the nodes.
        env = {**os.environ, **(env or {}), **({"PYTHONPATH": code} if code else {})}
        label = label or ("-baseline" if code else "")
        self.procs = []
        t0 = time.monotonic()
        for i, args in enumerate(commands):
            with open(log_dir / f"bench-swarm{nodes}{label}-{i}.log", "wb") as out:
                self.procs.append(subprocess.Popen([sys.executable, "-m", "swarm.cli", "join", *args, *common],
                                                   stdout=out, stderr=subprocess.STDOUT, env=env, cwd=code))
        # A swarm of other code gets a client of that code (a process of its own): the wire may differ.
        self.client = CodeClient(code, self.address, key) if code else SwarmClient(self.address, key=key)
        deadline = time.monotonic() + 600
        while True:
            try:
                status = self.client.status()
                if status["state"] == "ready" and len(status["nodes"]) == nodes:
                    self.ready_s = time.monotonic() - t0  # processes started to every node joined and loaded
                    return
            except Exception:
                pass  # not listening yet
            if any(p.poll() is not None for p in self.procs) or time.monotonic() > deadline:
                self.close()
                raise SystemExit(f"the {nodes}-node swarm did not start; see {log_dir}")
            time.sleep(0.05)

    def close(self) -> None:
        from swarm.local import stop_processes

        stop_processes(self.procs)
        self.client.close()


# The client of another checkout's code: the same calls, made by that code in a process of its own.
CLIENT = r"""
import json, statistics, sys, time
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from swarm.client import SwarmClient
import bench_swarm
client = SwarmClient(sys.argv[3], key=sys.argv[4])
def answer(what, arg):
    if what == "status":
        return client.status()
    if what == "complete":
        return client.complete("Hello", max_tokens=4).tokens
    if what == "run":
        return bench_swarm.run_swarm(client, int(arg))
    return bench_swarm.connect_ms(SwarmClient, sys.argv[3], sys.argv[4], int(arg))
for line in sys.stdin:
    what, _, arg = line.strip().partition(" ")
    try:
        out = {"answer": answer(what, arg)}
    except Exception as e:
        out = {"error": repr(e)}
    print(json.dumps(out), flush=True)
"""


class CodeClient:
    """A SwarmClient of another checkout, in a process of its own, for the calls the benchmarks make."""

    def __init__(self, code: str, address: str, key: str):
        scripts = os.path.dirname(os.path.abspath(__file__))
        self._p = subprocess.Popen([sys.executable, "-c", CLIENT, code, scripts, address, key], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True, cwd=code)

    def _ask(self, line: str):
        self._p.stdin.write(line + "\n")
        self._p.stdin.flush()
        answer = self._p.stdout.readline()
        if not answer:
            raise RuntimeError("the other code's client ended")
        out = json.loads(answer)
        if "error" in out:
            raise RuntimeError(out["error"])
        return out["answer"]

    def status(self) -> dict:
        return self._ask("status")

    def complete(self, prompt: str, max_tokens: int = 4):
        return self._ask("complete")

    def run(self, n_decode: int) -> dict:
        return self._ask(f"run {n_decode}")

    def connect(self, n: int) -> dict:
        return self._ask(f"connect {n}")

    def close(self) -> None:
        self._p.kill()


def connect_ms(client_class, address: str, key: str, n: int) -> dict:
    """Time for a new client to be answered: a fresh channel (TCP, and TLS where the code has it) and one
    status call, `n` times. The process made its own client first, so what it does once per key (for
    TLS: deriving the swarm's authority and its own certificate) is not in these times; main() times it."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        with client_class(address, key=key) as c:
            c.status()
        times.append(1e3 * (time.perf_counter() - t0))
    return {"first_ms": times[0], "median_ms": statistics.median(times[1:] or times)}


def run_swarm(client, n_decode: int) -> dict:
    if isinstance(client, CodeClient):
        return client.run(n_decode)
    t0 = time.perf_counter()
    gen = client.generate(PROMPT, max_tokens=n_decode, timings=True)
    first = None
    seen = []  # (time, tokens so far) at each text piece
    for _ in gen:
        seen.append((time.perf_counter(), len(gen.result.tokens)))
        if first is None:
            first = seen[0][0]
    r = gen.result
    # Time between consecutive tokens (pieces that carry exactly one more): the median shows a step without
    # the stalls a shared machine adds now and then.
    gaps = sorted(b[0] - a[0] for a, b in zip(seen, seen[1:]) if b[1] - a[1] == 1)
    if len(r.tokens) != n_decode:
        raise SystemExit(f"the swarm stopped after {len(r.tokens)} tokens; the benchmark needs {n_decode}")
    steps = r.timings["steps"]
    return {
        "ttft_ms": 1e3 * (first - t0),
        "decode_tps": r.tokens_per_s,
        "median_step_ms": 1e3 * gaps[len(gaps) // 2],
        **{k: r.timings.get(k, 0.0) / steps for k in ("compute_ms", "serialization_ms", "network_ms", "sampling_ms")},
    }


def take_turns(ref: subprocess.Popen, swarms: dict[str, ProcSwarm], rounds: int, run) -> tuple[list, dict[str, list]]:
    """Warm every swarm up, then each round: one answer of the reference process (a JSON line per "go"
    line), then `run(client)` on every swarm, each going first in turn. Returns the reference's answers
    and each swarm's results, round by round."""
    for s in swarms.values():
        s.client.complete("Hello", max_tokens=4)
    refs: list = []
    results: dict[str, list] = {name: [] for name in swarms}
    names = list(swarms)
    for r in range(rounds):
        ref.stdin.write("go\n")
        ref.stdin.flush()
        refs.append(json.loads(ref.stdout.readline()))
        for name in names[r % len(names):] + names[:r % len(names)]:
            results[name].append(run(swarms[name].client))
        print(f"round {r + 1}/{rounds} done", file=sys.stderr)
    return refs, results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--nodes", default="1,2,3", help="swarm sizes to measure (default 1,2,3)")
    ap.add_argument("--decode", type=int, default=128, help="tokens generated per round")
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads everywhere (default: physical cores)")
    ap.add_argument("--connects", type=int, default=21, help="new channels timed per swarm (default 21)")
    ap.add_argument("--baseline", metavar="DIR", help="also run the swarms with the code of this checkout, in turn with "
                    "the others (e.g. a `git worktree` of an older commit)")
    args = ap.parse_args()

    from swarm import cache
    from swarm.engine import default_threads
    from swarm.models import resolve_model

    model = resolve_model(args.model)
    threads = args.threads or default_threads()
    sizes = [int(n) for n in args.nodes.split(",")]
    ref = subprocess.Popen([sys.executable, "-c", REFERENCE, str(model), str(args.decode), str(threads), PROMPT],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    swarms = {}
    try:
        assert ref.stdout.readline().strip() == "ready"
        for n in sizes:
            swarms[f"{n}-node swarm"] = ProcSwarm(model, n, threads, cache.subdir("logs"))
        if args.baseline:
            rev = subprocess.run(["git", "-C", args.baseline, "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip() or args.baseline
            for n in sizes:
                swarms[f"{n}-node swarm ({rev})"] = ProcSwarm(model, n, threads, cache.subdir("logs"),
                                                              code=os.path.abspath(args.baseline))
        refs, runs = take_turns(ref, swarms, args.rounds, lambda client: run_swarm(client, args.decode))
        results = {"llama-cpp-python": refs} | runs
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        connects, ready = {}, {name: s.ready_s for name, s in swarms.items()}
        for name, s in swarms.items():  # a fresh client process of each swarm's own code
            probe = CodeClient(s.code or here, s.address, s.key)
            try:
                connects[name] = probe.connect(args.connects)
            finally:
                probe.close()
    finally:
        for s in swarms.values():
            s.close()
        ref.kill()

    med = {c: {k: statistics.median(run[k] for run in runs) for k in runs[0]} for c, runs in results.items()}
    base = med["llama-cpp-python"]
    # The same round's reference as the yardstick: a machine that slows down for a while slows both.
    paired = {c: statistics.median(a["decode_tps"] / b["decode_tps"] for a, b in zip(runs, results["llama-cpp-python"]))
              for c, runs in results.items()}
    print(f"model {model.name}, prompt {int(base['prompt_tokens'])} tokens, {args.decode} tokens generated, "
          f"{threads} threads per process, median of {args.rounds} rounds\n")
    print("| configuration | first token ms | decode tok/s | decode vs llama-cpp-python (paired) | median step ms (vs) | "
          "per token: compute | serialization | sampling | network |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c, m in med.items():
        if c == "llama-cpp-python":
            print(f"| {c} | {m['ttft_ms']:.0f} | {m['decode_tps']:.1f} | 100% | {m['median_step_ms']:.2f} (100%) "
                  "| | | | |")
            continue
        print(f"| {c} | {m['ttft_ms']:.0f} | {m['decode_tps']:.1f} | {m['decode_tps'] / base['decode_tps']:.0%} "
              f"({paired[c]:.0%}) | "
              f"{m['median_step_ms']:.2f} ({base['median_step_ms'] / m['median_step_ms']:.0%}) | "
              f"{m['compute_ms']:.2f} ms | {m['serialization_ms']:.2f} ms | {m['sampling_ms']:.2f} ms | "
              f"{m['network_ms']:.2f} ms |")
    print(f"\nA new client process: its first answer (once per process), then the median of {args.connects - 1} "
          "new channels (TCP and TLS handshakes, one status call), in a process that already has its certificate\n")
    from swarm.wire import tls
    tls._authority.cache_clear()
    t0 = time.perf_counter()
    tls.credentials(tls.check_key(wire_key := "a-fresh-key-" + os.urandom(8).hex()))
    print(f"(this code, once per process and key: the swarm's authority and this process's certificate take "
          f"{1e3 * (time.perf_counter() - t0):.0f} ms; key {wire_key[:12]}...)\n")
    print("| configuration | first answer ms | new channel ms (median) | started to ready s (shards cached) |\n"
          "|---|---|---|---|")
    for c, t in connects.items():
        print(f"| {c} | {t['first_ms']:.1f} | {t['median_ms']:.2f} | {ready[c]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
