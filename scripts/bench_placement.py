#!/usr/bin/env python3
"""Placement by measurement on localhost: the planner's predicted decode speed against the measured one.

Each configuration starts a swarm on this machine (this process coordinates; the other nodes are
`swarm join` processes, none pinned), lets the coordinator measure every node and plan, then generates
and compares the prediction shown by `swarm status` with the decode tokens/s the sessions achieved.

    python scripts/bench_placement.py            # default model, 3 generations of 128 tokens each
"""

from __future__ import annotations

import argparse
import sys

PROMPT = "Llamas are domesticated South American camelids, widely used as meat and pack animals by Andean cultures"

# (label, coordinator --max-memory in MB or 0, [[join options of each other node]])
CONFIGS = [
    ("coordinator alone would fit: 1 extra node", 0, [["--threads", "2"]]),
    ("coordinator capped at 300 MB, one 2-thread node", 300, [["--threads", "2"]]),
    ("coordinator capped at 300 MB, a 1-thread and a 2-thread node", 300, [["--threads", "1"], ["--threads", "2"]]),
    ("coordinator capped at 250 MB, two nodes capped at 250 MB", 250,
     [["--threads", "2", "--max-memory", "250MB"], ["--threads", "2", "--max-memory", "250MB"]]),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--decode", type=int, default=128)
    args = ap.parse_args()

    from swarm.local import LocalSwarm
    from swarm.models import resolve_model

    model = resolve_model(args.model)
    rows = []
    for label, cap_mb, node_args in CONFIGS:
        with LocalSwarm(model, ctx=1024, max_sessions=1, node_args=node_args, max_memory=cap_mb << 20) as swarm:
            swarm.client.complete("Hello", max_tokens=4)  # warm-up
            for _ in range(args.runs):
                swarm.client.complete(PROMPT, max_tokens=args.decode)
            status = swarm.client.status()
        layout = ", ".join(
            f"{n['layers']['start']}:{n['layers']['end']} {n['name']}"
            for n in sorted((n for n in status["nodes"] if n["has_layers"]), key=lambda n: n["layers"]["start"]))
        idle = [n["name"] for n in status["nodes"] if not n["has_layers"]]
        predicted, measured = status["predicted_decode_tps"], status["measured_decode_tps"]
        rows.append((label, layout + (f" (idle: {', '.join(idle)})" if idle else ""), predicted, measured))
        print(f"{label}: {rows[-1][1]}: predicted {predicted:.1f}, measured {measured:.1f}", file=sys.stderr)

    print(f"model {model.name}, {args.runs} generations of {args.decode} tokens per configuration (median)\n")
    print("| configuration | plan | predicted tok/s | measured tok/s | error |")
    print("|---|---|---|---|---|")
    for label, layout, predicted, measured in rows:
        print(f"| {label} | {layout} | {predicted:.1f} | {measured:.1f} | {(predicted - measured) / measured:+.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
