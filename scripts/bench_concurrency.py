#!/usr/bin/env python3
"""Several sessions at once on a 3-node localhost swarm: aggregate decode speed, with the nodes' OpenMP
teams bound one thread per CPU (the default where a team fills the machine) and left to the kernel
(`SWARM_BIND_THREADS=0`), against single-process llama-cpp-python generating the same prompts one
after the other (a single llama_cpp.Llama holds one sequence).

Each round starts N generations at once (different prompt lengths, greedy, M tokens each) and counts
generated tokens over the wall time from the first request to the last token; the configurations take
turns round by round, each going first in turn. Medians are reported.

    python scripts/bench_concurrency.py                       # 4 sessions, 96 tokens each, 6 rounds
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time

from bench_swarm import PROMPT, ProcSwarm, take_turns

# One line per round in, one JSON line out: the prompts generated one after the other.
REFERENCE = r"""
import json, sys, time
import llama_cpp
model, n_decode, threads, prompts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
llm = llama_cpp.Llama(model_path=model, n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False)
print("ready", flush=True)
for _ in sys.stdin:
    t0, n = time.perf_counter(), 0
    for p in prompts:
        llm.reset()
        tokens = llm.tokenize(p.encode(), add_bos=True, special=True)
        for i, _t in enumerate(llm.generate(tokens, temp=0.0, top_k=1, repeat_penalty=1.0)):
            n += 1
            if i + 1 >= n_decode:
                break
    print(json.dumps({"tps": n / (time.perf_counter() - t0)}), flush=True)
"""


def run_at_once(client, prompts: list[str], n_decode: int) -> float:
    counts: list[int] = []
    errors: list[BaseException] = []

    def one(prompt: str) -> None:
        try:
            counts.append(len(client.complete(prompt, max_tokens=n_decode).tokens))
        except BaseException as e:  # reported below
            errors.append(e)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"a session failed: {errors[0]}")
    return sum(counts) / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--decode", type=int, default=96, help="tokens generated per session")
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads everywhere (default: physical cores)")
    args = ap.parse_args()

    from swarm import cache
    from swarm.engine import default_threads
    from swarm.models import resolve_model

    model = resolve_model(args.model)
    threads = args.threads or default_threads()
    prompts = [PROMPT[: 160 + 40 * i] for i in range(args.sessions)]
    ref = subprocess.Popen([sys.executable, "-c", REFERENCE, str(model), str(args.decode), str(threads),
                            json.dumps(prompts)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    swarms = {}
    try:
        assert ref.stdout.readline().strip() == "ready"
        for name, env in (("3-node swarm, teams bound", {}), ("3-node swarm, SWARM_BIND_THREADS=0",
                                                               {"SWARM_BIND_THREADS": "0"})):
            swarms[name] = ProcSwarm(model, 3, threads, cache.subdir("logs"), max_sessions=args.sessions, env=env,
                                     label=f"-{len(swarms)}-concurrent")
        refs, runs = take_turns(ref, swarms, args.rounds, lambda client: run_at_once(client, prompts, args.decode))
        results = {"llama-cpp-python, one after the other": [x["tps"] for x in refs]} | runs
    finally:
        for s in swarms.values():
            s.close()
        ref.kill()

    base = statistics.median(results["llama-cpp-python, one after the other"])
    print(f"model {model.name}, {args.sessions} sessions of {args.decode} tokens, {threads} threads per process, "
          f"median of {args.rounds} rounds\n")
    print("| configuration | tokens/s, all sessions | vs llama-cpp-python |")
    print("|---|---|---|")
    for name, runs in results.items():
        m = statistics.median(runs)
        print(f"| {name} | {m:.1f} | {m / base:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
