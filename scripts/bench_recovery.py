#!/usr/bin/env python3
"""Failover on localhost: stall per recovery path against context length, detection time, and the
steady-state cost of fault tolerance.

This process coordinates (hosting no layers, so it can take any range over: it has every shard file);
three `swarm join` processes hold 0:6, 6:12 and 12:18. Each trial streams a greedy generation whose
context holds about C positions when a node is broken, checks the text against the same swarm's
uninterrupted run, reads the coordinator's recovery record, and restarts the broken node:

- replay: kill -9 of a node (its shard file is on the coordinator: no transfer); the lost range is
  loaded there, its KV cache restored from the last checkpoint and the steps since replayed;
- recompute: the same failure with rebuilding from kept states switched off (everything from tokens);
- migrate: SIGTERM, the node hands each session's KV state to its successor between two steps;
- standby (part `standby`): kill -9 of each range's node with and without standbys (the coordinator,
  which has the memory, holds a loaded replica of every range and is sent its checkpoints as they are
  taken, which it holds and imports at the takeover; off: the coordinator loads the lost range, as in
  replay). `--cold` makes that load read the disk (see `--help`).

Stall is the coordinator's figure: from detecting the failure to the first token after it.
Detection is measured from the signal: kill -9 (a dead process) and SIGSTOP (a hung one).
The steady-state cost compares decode tokens/s with failover on and off (`swarm join --no-failover`),
alternating round by round on one swarm (each arm first in half the rounds), at a short and a long
context, and times the steps that took a checkpoint against the others inside each generation.
`--control` runs both arms with failover on, to show how much the comparison scatters by itself.
Part `standby-cost` compares decode with standbys on and off the same way (failover on in both arms).

    python scripts/bench_recovery.py                      # contexts 128,512,2048, 3 rounds
    python scripts/bench_recovery.py --parts cost --contexts 128,2048 --rounds 24
    python scripts/bench_recovery.py --parts standby,standby-cost --contexts 128,512,2048 --rounds 3
    python scripts/large_random_model.py /tmp/large-random.gguf
    python scripts/bench_recovery.py --model /tmp/large-random.gguf --parts standby --contexts 128 --cold /tmp/cold
    git worktree add /tmp/old REV && python scripts/bench_recovery.py --parts stalls,detection --baseline /tmp/old

With `--baseline DIR` this script only drives: each round runs this checkout's bench and DIR's (its own
script on its own code) one after the other, first in turn, each a fresh process doing one round, and
the stall and detection tables of both come out side by side (medians over the rounds).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import statistics
import subprocess
import sys
import time

TEXT = (
    "The history of the llama begins in the high Andes, where people first kept these animals for their wool, "
    "their meat and their strength as pack animals. Over many centuries the herds grew, and trade routes "
    "followed the paths the llamas could walk. "
)
KILL_AT = 32  # tokens generated before the failure
CTX = 2304  # room for a 2048-position context and the tokens after it
NODES = ["0:6", "6:12", "12:18"]


class Bench:
    def __init__(self, model, threads: int, cold: str | None = None):
        from swarm import join
        from swarm.client import SwarmClient

        self.model, self.threads, self.cold = model, threads, cold
        self.running = join.start_coordinator(
            model, swarm=f"bench-recovery-{os.getpid()}", host="127.0.0.1", port=0, threads=threads, n_ctx=CTX,
            max_sessions=2, mdns_interface="off", name="coordinator", standbys=False)
        self.coordinator = self.running.coordinator
        self.logs = open(os.environ.get("BENCH_NODE_LOG", os.devnull), "ab")
        self.procs: dict[str, subprocess.Popen] = {}
        for layers in NODES:
            self.start_node(layers)
        self.client = SwarmClient(self.running.address, key=self.running.key)
        self.wait_ready()

    def start_node(self, layers: str) -> None:
        cmd = [sys.executable, "-m", "swarm.cli", "join", "--coordinator", self.running.address, "--host", "127.0.0.1",
               "--mdns-interface", "off", "--name", f"node-{layers}", "--layers", layers, "--threads", str(self.threads)]
        env = dict(os.environ, SWARM_KEY=self.running.key)
        if self.cold:  # a copy of its own, as on another machine: the coordinator's copy is not mapped by it
            env["SWARM_CACHE_DIR"] = os.path.join(self.cold, f"node-{layers.replace(':', '-')}")
        self.procs[layers] = subprocess.Popen(cmd, stdout=self.logs, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            status = self.client.status()
            held = {n["name"]: f"{n['layers']['start']}:{n['layers']['end']}" for n in status["nodes"] if n["has_layers"]}
            guarded = {f"{b['layers']['start']}:{b['layers']['end']}" for b in status.get("standbys", [])
                       if b["state"] == "ready"}
            if status["state"] == "ready" and held == {f"node-{r}": r for r in NODES} and not any(
                    n["extra_layers"] for n in status["nodes"]) and (
                    guarded == set(NODES) or not self.coordinator.standbys.enabled):
                return  # every node back on its own range (and every range guarded, with standbys on)
            if time.monotonic() > deadline:
                raise SystemExit(f"the swarm did not get ready: {status['detail']}")
            time.sleep(0.2)

    def prompt(self, context: int) -> str:
        """A prompt of context - KILL_AT tokens, so the session holds about `context` positions at the failure."""
        tok = self.coordinator.tokenizer
        words = (TEXT * (1 + context // 20)).split(" ")
        lo, hi = 1, len(words)
        while lo < hi:  # the longest prefix that stays within the budget
            mid = (lo + hi + 1) // 2
            if len(tok.tokenize(" ".join(words[:mid]))) <= context - KILL_AT:
                lo = mid
            else:
                hi = mid - 1
        return " ".join(words[:lo])

    def trial(self, prompt: str, n: int, layers: str, sig: int, expected: list[int]) -> dict:
        before = len(self.client.status()["recoveries"])
        if self.cold:  # what no process maps leaves the page cache: the successor's copy comes from the disk
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1")
        gen = self.client.generate(prompt, max_tokens=n)
        signalled = None
        for _ in gen:
            if signalled is None and len(gen.result.tokens) >= KILL_AT:
                signalled = time.time()
                self.procs[layers].send_signal(sig)
        if sig == signal.SIGTERM:
            self.procs[layers].wait(60)  # it hands over, then exits by itself
        records = self.client.status()["recoveries"][before:]
        if gen.result.tokens != expected:
            raise SystemExit(f"the text after the failure of {layers} differs from the uninterrupted run")
        if len(records) != 1:
            raise SystemExit(f"expected one recovery record, got {records}")
        self.procs[layers].kill()
        self.procs[layers].wait()
        self.start_node(layers)
        self.wait_ready()
        r = records[0]
        return {"stall_ms": r["stall_ms"], "detect_ms": 1e3 * (r["at_unix"] - signalled), "path": r["path"],
                "replayed": r["replayed_positions"], "detail": r["detail"]}

    def decode(self, prompt: str, n: int) -> dict:
        """One generation: decode tokens/s, the checkpoints held (at their largest) and shipped, and how much
        longer the steps that took a checkpoint (and the step after each) ran than the others."""
        steps: list[tuple[float, bool]] = []
        stepper = self.coordinator.stepper
        message = stepper.message

        def traced(session, tokens, start, sample):  # when each step starts, and whether it checkpoints
            step = message(session, tokens, start, sample)
            steps.append((time.perf_counter(), step.checkpoint or any(h.checkpoint for h in step.next)))
            return step

        before = self.client.status().get("checkpoints", {})
        stepper.message = traced
        try:
            gen = self.client.generate(prompt, max_tokens=n)
            held = 0
            for i, _ in enumerate(gen):
                if i % 32 == 31:
                    held = max(held, sum(int(s["checkpoint_bytes"]) for s in self.client.status()["sessions"]))
        finally:
            del stepper.message
        after = self.client.status().get("checkpoints", {})
        shipped = sum(int(after.get(k, 0)) - int(before.get(k, 0)) for k in ("full_bytes", "delta_bytes"))
        decode = steps[-(n - 1):]  # the decode steps (after the prompt's)
        dts = [(b[0] - a[0], a[1]) for a, b in zip(decode, decode[1:])]
        marked = ({i for i, (_, c) in enumerate(dts) if c} | {i + 1 for i, (_, c) in enumerate(dts) if c}) & set(
            range(len(dts)))
        plain = [dt for i, (dt, _) in enumerate(dts) if i not in marked]
        extra = 0.0
        if marked and plain:  # how much longer those steps ran than the others, on average, times their number
            extra = len(marked) * (statistics.mean(dts[i][0] for i in marked) - statistics.mean(plain))
        total = sum(dt for dt, _ in dts) or 1.0
        return {"tps": gen.result.tokens_per_s, "first_ms": gen.result.first_token_ms, "held": held,
                "shipped": shipped, "extra": extra / total, "checkpoints": sum(c for _, c in dts)}

    def set_standbys(self, on: bool) -> None:
        """Standbys on (every range guarded, wait for it) or off (their memory given back)."""
        if self.coordinator.standbys.enabled != on:
            self.coordinator.standbys.enabled = on
            self.wait_ready()

    def paired(self, prompt: str, rounds: int, arm, context: int) -> tuple:
        """Decode tokens/s with arm(True) and arm(False), alternating which goes first, on this one swarm; and
        the CPU the standbys' forwarding took here, as a share of the "on" generations' wall time."""
        on, off, cpu, wall = [], [], 0.0, 0.0
        for r in range(rounds + rounds % 2):  # an even count: each arm goes first equally often
            got = {}
            for enabled in (True, False) if r % 2 else (False, True):
                arm(enabled)
                cpu0, t0 = self.coordinator.standbys.forward_cpu_s, time.monotonic()
                got[enabled] = self.decode(prompt, 128)["tps"]
                if enabled:
                    cpu += self.coordinator.standbys.forward_cpu_s - cpu0
                    wall += time.monotonic() - t0
            on.append(got[True]), off.append(got[False])
            print(f"context {context}, round {r}: on {got[True]:.1f} tok/s, off {got[False]:.1f} tok/s", file=sys.stderr)
        logs = [math.log(a / b) for a, b in zip(on, off)]
        spread = 2 * statistics.stdev(logs) / math.sqrt(len(logs)) if len(logs) > 1 else 0.0
        mean = statistics.mean(logs)
        return (context, statistics.median(on), statistics.median(off),
                (math.exp(mean), math.exp(mean - spread), math.exp(mean + spread)), cpu / max(wall, 1e-9))

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        self.client.close()
        self.running.stop()


def main() -> int:
    import logging

    if os.environ.get("BENCH_LOG"):
        logging.basicConfig(filename=os.environ["BENCH_LOG"], level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--contexts", default="128,512,2048")
    ap.add_argument("--control", action="store_true",
                    help="cost part: run both arms with failover on, to see the method's own scatter")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cold", metavar="DIR", help="give each node a shard cache of its own under DIR and empty the "
                    "page cache before each trial (Linux, as root), so that a successor reads the lost range from "
                    "the disk, as a machine that did not just use the file would")
    ap.add_argument("--parts", default="stalls,detection,cost", help="which measurements to run")
    ap.add_argument("--baseline", metavar="DIR", help="also run the bench of this checkout (stalls and detection), "
                    "round by round in turn with this code")
    args = ap.parse_args()
    if args.baseline:
        return compare(args)

    from swarm.engine import default_threads
    from swarm.models import resolve_model

    model = resolve_model(args.model)
    threads = args.threads or default_threads()
    contexts = [int(c) for c in args.contexts.split(",")]
    if args.cold and not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        raise SystemExit("--cold empties the page cache through /proc/sys/vm/drop_caches: run it as root on Linux")
    bench = Bench(model, threads, args.cold)
    n = KILL_AT + 96  # enough steps after the signal for a leaving node's handover to land mid-generation
    rows, detect, cost = [], {"kill -9": [], "SIGSTOP": []}, []
    standby_rows, standby_cost = [], []
    try:
        parts = set(args.parts.split(","))
        for context in contexts if "stalls" in parts else ():
            prompt = bench.prompt(context)
            expected = bench.client.complete(prompt, max_tokens=n).tokens
            cases = [("replay", "6:12", signal.SIGKILL), ("replay", "12:18", signal.SIGKILL),
                     ("recompute", "6:12", signal.SIGKILL), ("migrate", "6:12", signal.SIGTERM),
                     ("migrate", "12:18", signal.SIGTERM)]
            for path, layers, sig in cases:
                runs = []
                for _ in range(args.rounds):
                    bench.coordinator.recovery.recompute_only = path == "recompute"
                    try:
                        runs.append(bench.trial(prompt, n, layers, sig, expected))
                    finally:
                        bench.coordinator.recovery.recompute_only = False
                    if sig == signal.SIGKILL and path == "replay":
                        detect["kill -9"].append(runs[-1]["detect_ms"])
                got = {r["path"] for r in runs}
                if got != {path}:
                    raise SystemExit(f"expected path {path}, the swarm took {got}")
                rows.append((context, path, layers, statistics.median(r["stall_ms"] for r in runs),
                             statistics.median(r["replayed"] for r in runs), runs[-1]["detail"]))
                print(f"context {context}: {path} of {layers}: {rows[-1][3]:.0f} ms", file=sys.stderr)
        for context in contexts if "standby" in parts else ():
            prompt = bench.prompt(context)
            expected = bench.client.complete(prompt, max_tokens=n).tokens
            for layers in NODES:
                for on in (False, True):
                    bench.set_standbys(on)
                    runs = [bench.trial(prompt, n, layers, signal.SIGKILL, expected) for _ in range(args.rounds)]
                    path = "standby" if on else "replay"
                    if {r["path"] for r in runs} != {path}:
                        raise SystemExit(f"expected path {path}, the swarm took {[r['path'] for r in runs]}")
                    standby_rows.append((context, layers, on, statistics.median(r["stall_ms"] for r in runs),
                                         max(r["stall_ms"] for r in runs),
                                         statistics.median(r["replayed"] for r in runs), runs[-1]["detail"]))
                    print(f"context {context}: {layers} lost, standby {'on' if on else 'off'}: "
                          f"{standby_rows[-1][3]:.0f} ms", file=sys.stderr)
            bench.set_standbys(False)
        for context in (contexts[0], contexts[-1]) if "standby-cost" in parts else ():
            standby_cost.append(bench.paired(bench.prompt(context), args.rounds, bench.set_standbys, context))
        bench.set_standbys(False)
        prompt = bench.prompt(contexts[0])
        expected = bench.client.complete(prompt, max_tokens=n).tokens
        for _ in range(args.rounds if "detection" in parts else 0):
            detect["SIGSTOP"].append(bench.trial(prompt, n, "6:12", signal.SIGSTOP, expected)["detect_ms"])
        for context in (contexts[0], contexts[-1]) if "cost" in parts else ():
            prompt = bench.prompt(context)
            on, off, runs, first_off = [], [], [], []
            for r in range(args.rounds + args.rounds % 2):  # an even count: each arm goes first equally often
                got = {}
                for enabled in (True, False) if r % 2 else (False, True):
                    # --control: both arms run with failover on, which shows how much the method itself scatters
                    bench.coordinator.failover_enabled = enabled or args.control
                    got[enabled] = bench.decode(prompt, 128)
                on.append(got[True]["tps"]), off.append(got[False]["tps"]), runs.append(got[True])
                first_off.append(got[False]["first_ms"])
                print(f"context {context}, round {r}: on {got[True]['tps']:.1f} tok/s, off {got[False]['tps']:.1f} "
                      f"tok/s; {got[True]['checkpoints']} checkpoint steps, {got[True]['extra']:.1%} extra time",
                      file=sys.stderr)
            bench.coordinator.failover_enabled = True
            logs = [math.log(a / b) for a, b in zip(on, off)]
            spread = 2 * statistics.stdev(logs) / math.sqrt(len(logs))  # two standard errors
            ratio = (math.exp(statistics.mean(logs)), math.exp(statistics.mean(logs) - spread),
                     math.exp(statistics.mean(logs) + spread))
            cost.append((context, statistics.median(on), statistics.median(off), ratio,
                         statistics.median(r["extra"] for r in runs), statistics.median(r["checkpoints"] for r in runs),
                         statistics.median(r["shipped"] for r in runs), max(r["held"] for r in runs),
                         statistics.median(r["first_ms"] for r in runs), statistics.median(first_off)))
    finally:
        bench.close()

    print(f"model {model.name}, {threads} threads per process, median of {args.rounds} rounds; "
          f"failure after {KILL_AT} generated tokens\n")
    print("| context at failure | path | lost range | stall ms | positions replayed | breakdown |")
    print("|---|---|---|---|---|---|")
    for context, path, layers, stall, replayed, detail in rows:
        print(f"| {context} | {path} | {layers} | {stall:.0f} | {replayed:.0f} | {detail} |")
    print("\n| failure | detected after (ms), median | max |")
    print("|---|---|---|")
    for what, values in detect.items():
        if values:
            print(f"| {what} | {statistics.median(values):.0f} | {max(values):.0f} |")
    if standby_rows:
        print("\n| context at failure | lost range | standby | stall ms, median | slowest | positions replayed "
              "| breakdown |")
        print("|---|---|---|---|---|---|---|")
        for context, layers, on, stall, worst, replayed, detail in standby_rows:
            print(f"| {context} | {layers} | {'on' if on else 'off'} | {stall:.0f} | {worst:.0f} | {replayed:.0f} "
                  f"| {detail} |")
    if standby_cost:
        print(f"\nstandbys on | off, failover on in both, {args.rounds + args.rounds % 2} rounds, each arm first in "
              "half of them; on / off: geometric mean of the rounds' ratios (plus or minus two standard errors)")
        print("\n| context | decode tok/s, standbys on (median) | off (median) | on / off | 95% interval "
              "| forwarding CPU, share of one core |")
        print("|---|---|---|---|---|---|")
        for context, on, off, (ratio, low, high), cpu in standby_cost:
            print(f"| {context} + 128 | {on:.1f} | {off:.1f} | {ratio:.1%} | {low:.1%}-{high:.1%} | {cpu:.1%} |")
    if not cost:
        return 0
    arms = "on, and on again (--control)" if args.control else "on | off"
    print(f"\nfailover {arms}, {args.rounds + args.rounds % 2} rounds, each arm first in half of them; on / off: "
          "geometric mean of the rounds' ratios (interval: plus or minus two standard errors); checkpoint steps: "
          "how much longer the steps that took a checkpoint, "
          "and the step after each, ran than the other steps on average, times their number, as a share of decode time "
          "(failover on, median)")
    print("\n| context | decode tok/s, on (median) | off (median) | on / off | 95% interval of on / off "
          "| checkpoint steps' extra time | checkpoints in decode | shipped per generation (MB) | held per session (MB) "
          "| first token ms, on | off |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for context, on, off, (ratio, low, high), extra, count, shipped, held, first_on, first_off in cost:
        print(f"| {context} + 128 | {on:.1f} | {off:.1f} | {ratio:.1%} | {low:.1%}-{high:.1%} | {extra:.1%} | {count:.0f} "
              f"| {shipped / 1e6:.2f} | {held / 1e6:.1f} | {first_on:.0f} | {first_off:.0f} |")
    return 0


def _tables(out: str) -> dict:
    """The stall rows {(context, path, layers): ms} and detection rows {failure: ms} of one run's output."""
    got = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0].isdigit():
            got[(int(cells[0]), cells[1], cells[2])] = float(cells[3])
        elif len(cells) == 3 and cells[0] in ("kill -9", "SIGSTOP"):
            got[cells[0]] = float(cells[1])
    return got


def compare(args) -> int:
    """Run this code's bench and the baseline's in turn, one round each, and put their medians side by side."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    codes = {"this code": here, "baseline": os.path.abspath(args.baseline)}
    rev = subprocess.run(["git", "-C", codes["baseline"], "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip() or args.baseline
    parts = ",".join(p for p in args.parts.split(",") if p in ("stalls", "detection"))
    results: dict[str, list[dict]] = {name: [] for name in codes}
    for r in range(args.rounds):
        for name in (list(codes) if r % 2 == 0 else list(codes)[::-1]):
            root = codes[name]
            cmd = [sys.executable, os.path.join(root, "scripts", "bench_recovery.py"), "--model", args.model,
                   "--rounds", "1", "--contexts", args.contexts, "--parts", parts]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            env = dict(os.environ, PYTHONPATH=root)
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
            if done.returncode:
                raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
            results[name].append(_tables(done.stdout))
            print(f"round {r}: {name} done", file=sys.stderr)
    keys = sorted({k for runs in results.values() for run in runs for k in run}, key=str)
    print(f"median of {args.rounds} rounds, each arm a fresh process per round, first in turn; baseline {rev}\n")
    print("| measurement | this code (ms) | baseline (ms) | this / baseline |")
    print("|---|---|---|---|")
    for k in keys:
        mine = statistics.median(run[k] for run in results["this code"] if k in run)
        theirs = statistics.median(run[k] for run in results["baseline"] if k in run)
        label = f"{k[1]} of {k[2]} at {k[0]}" if isinstance(k, tuple) else f"{k} detected"
        print(f"| {label} | {mine:.0f} | {theirs:.0f} | {mine / theirs:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
