#!/usr/bin/env python3
"""Placement by measurement on localhost: the planner's predicted decode speed against the measured one.

Each configuration starts a swarm on this machine (this process coordinates; the other nodes are
`swarm join` processes, none pinned), lets the coordinator measure every node and plan, then generates
and compares the prediction shown by `swarm status` with the decode tokens/s the sessions achieved.
The nodes' measured cost per byte, the split of a measured step (compute on the hops, the rest:
links and the coordinator's own work) and the CPU that processes other than the swarm's used while it
generated (on a shared machine, the load moves between the measurement and the generations) say where
an error comes from.

    python scripts/bench_placement.py            # Gemma 3 270M (gemma3-270m), 3 generations of 128 tokens each
    python scripts/bench_placement.py --fresh    # first forget this machine's cached compute profiles
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

PROMPT = "Llamas are domesticated South American camelids, widely used as meat and pack animals by Andean cultures"

# (label, coordinator --max-memory in MB or 0, [[join options of each other node]])
CONFIGS = [
    ("coordinator alone would fit: 1 extra node", 0, [["--threads", "2"]]),
    ("coordinator capped at 300 MB, one 2-thread node", 300, [["--threads", "2"]]),
    ("coordinator capped at 300 MB, a 1-thread and a 2-thread node", 300, [["--threads", "1"], ["--threads", "2"]]),
    ("coordinator capped at 250 MB, two nodes capped at 250 MB", 250,
     [["--threads", "2", "--max-memory", "250MB"], ["--threads", "2", "--max-memory", "250MB"]]),
]


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used so far; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _others_cpus(before, after, swarm_s: float) -> float | None:
    """CPUs' worth of work done by processes other than the swarm's between two `profiling.cpu_sample`s."""
    if before.busy_s is None or after.busy_s is None:
        return None
    busy = after.busy_s - before.busy_s
    return max(0.0, busy - (after.own_s - before.own_s) - swarm_s) / (after.wall_s - before.wall_s)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--fresh", action="store_true", help="delete the cached compute profiles first (of the "
                    "cache in use: $SWARM_CACHE_DIR or ~/.cache/swarm), so every node is measured")
    args = ap.parse_args()

    from swarm import cache, profiling
    from swarm.local import LocalSwarm
    from swarm.models import resolve_model

    if args.fresh:
        for old in cache.subdir("profiles").glob("*.json"):
            old.unlink()
    model = resolve_model(args.model)
    rows = []
    for label, cap_mb, node_args in CONFIGS:
        with LocalSwarm(model, ctx=1024, max_sessions=1, node_args=node_args, max_memory=cap_mb << 20) as swarm:
            swarm.client.complete("Hello", max_tokens=4)  # warm-up
            nodes = [p.pid for p in swarm.procs]
            before, nodes_s = profiling.cpu_sample(), sum(map(_cpu_s, nodes))
            runs = [swarm.client.complete(PROMPT, max_tokens=args.decode, timings=True) for _ in range(args.runs)]
            others = _others_cpus(before, profiling.cpu_sample(), sum(map(_cpu_s, nodes)) - nodes_s)
            status = swarm.client.status()
        layout = ", ".join(
            f"{n['layers']['start']}:{n['layers']['end']} {n['name']}"
            for n in sorted((n for n in status["nodes"] if n["has_layers"]), key=lambda n: n["layers"]["start"]))
        idle = [n["name"] for n in status["nodes"] if not n["has_layers"]]
        predicted, measured = status["predicted_decode_tps"], status["measured_decode_tps"]
        rates = ", ".join(f"{n['name']} {n['profile']['decode_ns_per_byte']:.3f}" for n in status["nodes"])
        per_step = [{k: v / r.timings["steps"] for k, v in r.timings.items() if k != "steps"}
                    for r in runs if r.timings.get("steps")]
        compute = rest = 0.0
        if per_step:  # compute on the hops; the rest is links, (de)serialisation, sampling, the coordinator
            compute = statistics.median(s.get("compute_ms", 0.0) for s in per_step)
            rest = statistics.median(sum(v for k, v in s.items() if k != "compute_ms") for s in per_step)
        rows.append((label, layout + (f" (idle: {', '.join(idle)})" if idle else ""), predicted, measured, rates,
                     compute, rest, "?" if others is None else f"{others:.2f}"))
        print(f"{label}: {rows[-1][1]}: predicted {predicted:.1f}, measured {measured:.1f}", file=sys.stderr)

    print(f"model {model.name}, {args.runs} generations of {args.decode} tokens per configuration (median)\n")
    print("| configuration | plan | predicted tok/s | measured tok/s | error | ns/byte measured | "
          "step: compute + rest, ms | other processes, CPUs |")
    print("|---|---|---|---|---|---|---|---|")
    for label, layout, predicted, measured, rates, compute, rest, others in rows:
        print(f"| {label} | {layout} | {predicted:.1f} | {measured:.1f} | {(predicted - measured) / measured:+.0%} | "
              f"{rates} | {compute:.1f} + {rest:.1f} | {others} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
