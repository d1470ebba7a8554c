#!/usr/bin/env python3
"""Prefill and decode speed and peak memory: unsplit model against in-process shard chains.

Every configuration runs in its own fresh process (so peak RSS is its own), and the configurations
take turns round by round, so machine noise falls on all of them alike. Medians are reported.

    python scripts/bench_engine.py                 # Gemma 3 270M (gemma3-270m), 5 rounds
    python scripts/bench_engine.py --rounds 9 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

PROMPT = (
    "Llamas are domesticated South American camelids, widely used as meat and pack animals by Andean cultures "
    "since the pre-Columbian era. They are social animals and live with others as a herd. Their wool is soft "
    "and contains only a small amount of lanolin. Llamas can learn simple tasks after a few repetitions. When "
    "using a pack, they can carry about 25 to 30 percent of their body weight for 8 to 13 km. The name llama "
    "was adopted by European settlers from native Peruvians. The ancestors of llamas are thought to have "
    "originated from the Great Plains of North America about 40 million years ago, and subsequently migrated "
    "to South America about three million years ago during the Great American Interchange."
)
CONFIGS = ["llama-cpp-python", "1 shard", "2 shards", "3 shards"]
# Each shard of the 3-way split in a process of its own: what one machine of a swarm holds.
ALONE = ["shard 1 of 3 alone", "shard 2 of 3 alone", "shard 3 of 3 alone"]


def measure(config: str, model: str, threads: int, n_decode: int) -> dict:
    """Runs inside a child process: load, warm up, time prefill and decode."""
    import numpy as np

    if config == "llama-cpp-python":
        import llama_cpp

        llm = llama_cpp.Llama(model_path=model, n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False)
        tokens = llm.tokenize(PROMPT.encode(), add_bos=True, special=True)
        llm.eval(tokens[:8])  # warm-up
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(tokens)
        t1 = time.perf_counter()
        # Decode with the library's own loop (sample greedily, feed one token per step). generate()
        # finds the evaluated prompt in its cache and starts sampling at position len(tokens).
        n = 0
        for _ in llm.generate(tokens, temp=0.0, top_k=1, repeat_penalty=1.0):
            n += 1
            if n == 1:
                t2 = time.perf_counter()
            if n > n_decode:
                break
        t3 = time.perf_counter()
    elif config in ALONE:
        from swarm.engine import Shard, Tokenizer
        from swarm.layers import split_evenly
        from swarm.slicing import model_layer_count, slice_model
        from swarm.gguf_file import read_gguf

        index = ALONE.index(config)
        tok = Tokenizer(model)
        tokens = tok.tokenize(PROMPT)
        tok.close()
        r = split_evenly(model_layer_count(read_gguf(model)), 3)[index]
        shard = Shard(slice_model(model, r).path, n_ctx=1024, n_threads=threads)
        n_embd = shard.n_embd

        def inputs(ids):  # activations are zeros here: this run measures memory and time, not text
            return np.asarray(ids, np.int32) if shard.role.takes_tokens else np.zeros((len(ids), n_embd), np.float32)

        shard.open_session("w")
        shard.forward("w", inputs(tokens[:8]))
        shard.drop_session("w")
        shard.open_session("s")
        t0 = time.perf_counter()
        shard.forward("s", inputs(tokens))
        t1 = t2 = time.perf_counter()
        for _ in range(n_decode):
            shard.forward("s", inputs([5]))
        t3 = time.perf_counter()
    else:
        from swarm.chain import LocalChain

        parts = int(config.split()[0])
        chain = LocalChain(model, parts, n_ctx=1024, n_threads=threads)
        tokens = chain.tokenizer.tokenize(PROMPT)
        sid = chain.open_session()
        chain.prefill(sid, tokens[:8])  # warm-up
        chain.drop_session(sid)
        sid = chain.open_session()
        t0 = time.perf_counter()
        logits = chain.prefill(sid, tokens)
        t1 = time.perf_counter()
        token = int(np.argmax(logits))
        t2 = time.perf_counter()
        for _ in range(n_decode):
            token = int(np.argmax(chain.step(sid, [token])))
        t3 = time.perf_counter()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "prompt_tokens": len(tokens),
        "prefill_tps": len(tokens) / (t1 - t0),
        "decode_tps": n_decode / (t3 - t2),
        "peak_rss_mb": peak_mb,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="threads for every configuration (default: physical cores)")
    ap.add_argument("--decode", type=int, default=128, help="decode steps timed per run")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()

    from swarm.engine import default_threads
    from swarm.models import resolve_model

    model = str(resolve_model(args.model))
    threads = args.threads or default_threads()
    if args.child:
        print(json.dumps(measure(args.child, model, threads, args.decode)))
        return 0

    results: dict[str, list[dict]] = {c: [] for c in CONFIGS + ALONE}
    for r in range(args.rounds):
        for config in CONFIGS + ALONE:
            out = subprocess.run(
                [sys.executable, __file__, "--child", config, "--model", model, "--threads", str(threads),
                 "--decode", str(args.decode)],
                capture_output=True, text=True, check=True,
            ).stdout
            results[config].append(json.loads(out.strip().splitlines()[-1]))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    med = {c: {k: statistics.median(run[k] for run in runs) for k in runs[0]} for c, runs in results.items()}
    base = med["llama-cpp-python"]
    print(f"model {os.path.basename(model)}, prompt {int(base['prompt_tokens'])} tokens, {args.decode} decode steps, "
          f"{threads} threads, median of {args.rounds} rounds\n")
    print("| configuration | prefill tok/s | decode tok/s | decode vs unsplit | peak RSS MB |")
    print("|---|---|---|---|---|")
    for c in CONFIGS:
        m = med[c]
        print(f"| {c} | {m['prefill_tps']:.0f} | {m['decode_tps']:.1f} | {m['decode_tps'] / base['decode_tps']:.0%} "
              f"| {m['peak_rss_mb']:.0f} |")
    print("\nThe 3-way split with each shard in a process of its own (as on three machines):\n")
    print("| shard | prefill ms | decode ms/step | peak RSS MB |")
    print("|---|---|---|---|")
    for c in ALONE:
        m = med[c]
        print(f"| {c.replace(' alone', '')} | {1000 * m['prompt_tokens'] / m['prefill_tps']:.0f} "
              f"| {1000 / m['decode_tps']:.2f} | {m['peak_rss_mb']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
