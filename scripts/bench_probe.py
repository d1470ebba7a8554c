#!/usr/bin/env python3
"""What the compute probe sees against what real shards cost, on this machine, in one process.

Times decode steps (at ~128 positions of context, like the probe and a short generation) of real
shards of the model: middle slices like the probe's, a middle and a last shard of equal blocks (their
difference is the output head), and the whole model. Compares them with the planner's prediction from
the probe three ways: the head charged at the blocks' cost per byte (the model before the head was
probed), at their cost per weight (`planner.head_cost_factor`, used when the head was not probed) and
at the probed head's own cost. Then probes while nodes start beside it: once at once
(what a coordinator measuring itself while its nodes start used to record), once waiting for quiet.
The load is what a node starting beside the probe does: Python importing the swarm and loading
llama.cpp, again and again.

    python scripts/bench_probe.py                 # Gemma 3 270M (gemma3-270m), 2 threads, 5 repetitions (medians)
    python scripts/bench_probe.py --threads 1 --reps 3
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import statistics
import subprocess
import sys
import time

# What a node starting beside the probe does: import the swarm and load llama.cpp, over and over.
NODE_START = "import swarm.coordinator, swarm.node, swarm.engine as e; e._llama()"
START = ("import subprocess, sys, time\nt = time.time()\nwhile time.time() - t < {s}:\n"
         f"    subprocess.run([sys.executable, '-c', {NODE_START!r}])")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--unbound", action="store_true", help="do not bind the OpenMP team as a node does")
    args = ap.parse_args()

    from swarm import engine, planner, profiling
    from swarm.gguf_file import read_gguf
    from swarm.layers import LayerRange
    from swarm.models import resolve_model
    from swarm.placement import footprint
    from swarm.slicing import slice_model

    if not args.unbound:
        engine.plan_threads(args.threads)  # what `swarm join --threads N` does before llama.cpp loads
    model = resolve_model(args.model)
    fp = footprint(read_gguf(model))
    L = fp.n_layer
    head_b = fp.output_bytes or fp.embed_bytes
    k = min(6, L - 2)
    mid, tail = LayerRange(L - 2 * k, L - k), LayerRange(L - k, L)  # equal blocks; the tail has the head
    probe = [LayerRange(1, 2), LayerRange(1, 1 + k)]  # what the coordinator sends (small budget aside)
    head_probe = LayerRange(L - 2, L)  # a last shard of two layers (one global Gemma layer alone aborts)
    timed = probe + [mid, tail, LayerRange(0, L)]
    path = {r: slice_model(model, r).path for r in timed + [head_probe]}
    byte = {r: sum(fp.layer_bytes[r.start:r.end]) for r in timed}
    weights = {r: sum(fp.layer_params[r.start:r.end]) for r in timed}

    steps: dict[LayerRange, list[float]] = {r: [] for r in timed}
    probes = []
    for _ in range(args.reps):
        for r in timed:
            steps[r].append(profiling._time_shards([path[r]], args.threads, 32, 128)[0][0])
        probes.append(profiling.measure_compute([path[r] for r in probe + [head_probe]], args.threads, 32, 128))
    t = {r: statistics.median(v) for r, v in steps.items()}
    per_byte = statistics.median(p.decode_s_per_byte for p in probes)
    overhead = statistics.median(p.step_overhead_s for p in probes)
    head_rate = statistics.median(p.head_s_per_byte for p in probes)
    head_t = t[tail] - t[mid]
    print(f"model {model.name}, {args.threads} thread(s){' unbound' if args.unbound else ''}, "
          f"median of {args.reps}; steps at ~128 positions\n")
    print(f"probe (slices {probe[0]} and {probe[1]}, last shard {head_probe}): {1e9 * per_byte:.4f} ns/byte, "
          f"{1e3 * overhead:.3f} ms per step; output head {1e9 * head_rate:.4f} ns/byte "
          f"(each probe: {', '.join(f'{1e9 * p.decode_s_per_byte:.3f}' for p in probes)} ns/byte)")
    print(f"blocks {mid}: {1e9 * t[mid] / byte[mid]:.4f} ns/byte, {1e12 * t[mid] / weights[mid]:.1f} ps/weight; "
          f"head ({tail} less {mid}, {head_b / 1e6:.0f} MB): {1e3 * head_t:.2f} ms, "
          f"{1e9 * head_t / head_b:.4f} ns/byte, {1e12 * head_t / fp.head_params:.1f} ps/weight\n")

    node = planner.NodeProfile("n", 1 << 40, per_byte, 0.0, step_overhead_s=overhead)
    flat = planner.Footprint(**{**fp.__dict__, "layer_params": (), "head_params": 0})  # no counts: per byte
    print("| shard | MB read | measured ms | head per byte as blocks | per weight as blocks | head probed |")
    print("|---|---|---|---|---|---|")
    for r in timed:
        read = byte[r] + (head_b if r.end == L else 0)
        preds = [planner.hop_decode_s(flat, node, r), planner.hop_decode_s(fp, node, r),
                 planner.hop_decode_s(fp, planner.NodeProfile("n", 1 << 40, per_byte, 0.0, step_overhead_s=overhead,
                                                              head_s_per_byte=head_rate), r)]
        cells = " | ".join(f"{1e3 * p:.2f} ({(p - t[r]) / t[r]:+.0%})" for p in preds)
        print(f"| {r} | {read / 1e6:.1f} | {1e3 * t[r]:.2f} | {cells} |")

    # What the gap between steps costs: a 1-layer slice's steps back to back against spaced like a pipeline's.
    one = path[probe[0]]
    spaced = statistics.median(profiling._time_shards([one], args.threads, 32, 128)[0][0] for _ in range(3))
    gap, profiling.STEP_GAP_S = profiling.STEP_GAP_S, 0.0
    packed = statistics.median(profiling._time_shards([one], args.threads, 32, 128)[0][0] for _ in range(3))
    profiling.STEP_GAP_S = gap
    print(f"\n{probe[0]}: {1e3 * packed:.3f} ms a step back to back, {1e3 * spaced:.3f} ms with "
          f"{1e3 * gap:.0f} ms between steps (the team sleeps in between, as on a pipeline hop)")

    print("\nprobing while nodes start beside it:")
    logging.basicConfig(level=logging.WARNING, format="    %(message)s")
    logging.getLogger("swarm.profiling").setLevel(logging.INFO)  # shows each disturbed attempt
    for wait, spin_s in ((0.0, 20.0), (profiling.QUIET_WAIT_S, 4.0)):
        spinner = subprocess.Popen([sys.executable, "-c", START.format(s=spin_s)], start_new_session=True)
        time.sleep(0.5)
        t0 = time.monotonic()
        p = profiling.measure_compute([path[r] for r in probe], args.threads, 32, 128, quiet_wait_s=wait)
        took = time.monotonic() - t0
        os.killpg(spinner.pid, signal.SIGTERM)  # the loop and the import it is running
        spinner.wait()
        c = "unknown" if p.contention is None else f"{100 * p.contention:.0f}%"
        print(f"  {'at once' if not wait else 'waiting for quiet'} ({spin_s:.0f} s of load): "
              f"{1e9 * p.decode_s_per_byte:.4f} ns/byte ({p.decode_s_per_byte / per_byte:.2f}x the quiet probe), "
              f"others took {c} of its CPU time, {took:.1f} s, trusted later: {profiling.trusted(p, time.time())}")
    return 0 if math.isfinite(per_byte) else 1


if __name__ == "__main__":
    sys.exit(main())
