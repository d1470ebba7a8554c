#!/usr/bin/env python3
"""A notebook behind NAT in a 3-node swarm, in network namespaces (tests/netbed.py): decode speed at 0, 5
and 40 ms of added delay, against the same swarm on a LAN, a LAN swarm whose last node is relayed
(`--outbound-only`), and single-process llama-cpp-python; then what the planner does with a far node.

Every swarm is a coordinator on home host h0 holding 0:6, a node on h1 pinned to 6:12 and a last node
pinned to 12:18: on h2 (LAN), on h2 with --outbound-only (LAN, relayed), or on a notebook behind a NAT
router (NAT). A delayed notebook dials the coordinator (its port and the relay's, +2) through delay
relays in its router's namespace, so its control and reverse connections, and with them every step into
it and every reply out of it, take the delay in each direction: one delayed round trip per token. All
swarms and the reference start first, then take turns round by round (scripts/bench_swarm.py).

Placement: unpinned swarms of a coordinator, a home node and a notebook 40 ms away; first the home
hosts can hold everything (the notebook should get no layers), then both are capped so the notebook is
needed. `swarm status` shows what the planner decided and why, and its prediction against the measured
decode speed.

    sudo python3 scripts/bench_wan.py --rounds 5     # needs root, iproute2, nftables
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "scripts")]

from bench_swarm import PROMPT, REFERENCE  # noqa: E402
from netbed import NetBed  # noqa: E402

KEY = "bench-wan-key-of-the-swarm"
DELAYS = [0, 5, 40]


class Client:
    """tests/netbed_client.py on a host of the bed, driven line by line."""

    def __init__(self, bed: NetBed, host):
        self.p = bed.spawn(host, [sys.executable, str(ROOT / "tests" / "netbed_client.py")],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, address: str, op: str, **cmd) -> dict:
        self.p.stdin.write(json.dumps({"op": op, "address": address, "key": KEY, **cmd}) + "\n")
        self.p.stdin.flush()
        for line in self.p.stdout:
            event = json.loads(line)
            if "n" not in event:
                if "error" in event:
                    raise SystemExit(f"{address}: {event['error']}")
                return event
        raise SystemExit("the client ended")


def start(bed: NetBed, port: int, log: Path, last, last_args=(), dial=None, pins=True, memory=(None, None)):
    """A coordinator on h0 at `port`, a node on h1 and `last` (a host) dialling `dial` (default: h0)."""
    h0, h1 = bed.home[0], bed.home[1]
    address = f"{h0.address}:{port}"
    common = ["--key", KEY, "--mdns-interface", "off"]

    def cap(i: int) -> list[str]:
        return ["--max-memory", memory[i]] if memory[i] else []

    spec = [(h0, ["--model", str(bed.model), "--host", h0.address, "--port", str(port), "--ctx", "1024",
                  "--name", "coord", "--no-standbys", "--no-http", *(["--layers", "0:6"] if pins else []), *cap(0)]),
            (h1, ["--host", h1.address, "--coordinator", address, "--name", "home1",
                  *(["--layers", "6:12"] if pins else []), *cap(1)]),
            (last, ["--coordinator", dial or address, "--name", "last", *(["--layers", "12:18"] if pins else []),
                    *last_args])]
    for i, (host, args) in enumerate(spec):
        with open(log / f"wan-{port}-{i}.log", "wb") as out:
            bed.spawn(host, [sys.executable, "-m", "swarm.cli", "join", *args, *common], stdout=out,
                      stderr=subprocess.STDOUT)
    return address


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--far-ms", type=float, default=40, help="the notebook's delay in the placement part")
    ap.add_argument("--cap", default="150MB", help="--max-memory of the home hosts when the notebook is needed")
    args = ap.parse_args()

    from swarm import cache
    from swarm.engine import default_threads
    from swarm.models import resolve_model

    model = resolve_model(args.model)
    log = cache.subdir("logs")
    ref = subprocess.Popen([sys.executable, "-c", REFERENCE, str(model), str(args.decode), str(default_threads()),
                            PROMPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    with NetBed(home=3, notebooks=len(DELAYS) + 2) as bed:
        bed.model = model
        h0, h2 = bed.home[0], bed.home[2]
        swarms = {"LAN": start(bed, 7700, log, h2, ["--host", h2.address]),
                  "LAN, last node relayed": start(bed, 7710, log, h2, ["--outbound-only"])}
        for k, delay in enumerate(DELAYS):
            port, router = 7720 + 10 * k, bed.routers[k]
            dial = None
            if delay:
                for p in (port, port + 2):
                    bed.delay(router, (h0.address, p), delay, port=p)
                dial = f"{router.address}:{port}"
            swarms[f"NAT, {delay} ms"] = start(bed, port, log, bed.notebooks[k], dial=dial)
        client = Client(bed, h0)
        assert ref.stdout.readline().strip() == "ready"
        predicted_before = {}
        for name, address in swarms.items():
            status = client.ask(address, "wait", nodes=3, timeout=600)["status"]
            predicted_before[name] = status["predicted_decode_tps"]
            client.ask(address, "generate", prompt="Hello", n=4)
        results = {"llama-cpp-python": []} | {name: [] for name in swarms}
        names = list(swarms)
        for r in range(args.rounds):
            ref.stdin.write("go\n")
            ref.stdin.flush()
            results["llama-cpp-python"].append(json.loads(ref.stdout.readline())["decode_tps"])
            for name in names[r % len(names):] + names[:r % len(names)]:
                out = client.ask(swarms[name], "generate", prompt=PROMPT, n=args.decode)
                results[name].append(out["decode_tps"])
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
        statuses = {name: client.ask(a, "status")["status"] for name, a in swarms.items()}
        ref.kill()

        base = results["llama-cpp-python"]
        lan = results["LAN"]
        print(f"model {model.name}, {args.decode} tokens per round, medians of {args.rounds} rounds\n")
        print("| configuration | decode tok/s | vs llama-cpp-python (paired) | vs LAN swarm (paired) | ms/token more "
              "than LAN (paired) | predicted tok/s (before, after the rounds) | predicted vs measured |")
        print("|---|---|---|---|---|---|---|")
        for name, tps in results.items():
            med = statistics.median(tps)
            pr = statistics.median(a / b for a, b in zip(tps, base))
            if name == "llama-cpp-python":
                print(f"| {name} | {med:.1f} | 100% | | | | |")
                continue
            pl = statistics.median(a / b for a, b in zip(tps, lan))
            extra = statistics.median(1e3 / a - 1e3 / b for a, b in zip(tps, lan))
            after = statuses[name]["predicted_decode_tps"]
            print(f"| {name} | {med:.1f} | {pr:.0%} | {pl:.0%} | {extra:+.2f} | {predicted_before[name]:.1f}, "
                  f"{after:.1f} | {(after - med) / med:+.0%} |")

        print("\nplacement with a notebook", args.far_ms, "ms away:")
        k = len(DELAYS)
        for label, memory, port in (("home hosts hold everything", (None, None), 7760),
                                    (f"home hosts capped at {args.cap}", (args.cap, args.cap), 7770)):
            router = bed.routers[k]
            for p in (port, port + 2):
                bed.delay(router, (h0.address, p), args.far_ms, port=p)
            address = start(bed, port, log, bed.notebooks[k], dial=f"{router.address}:{port}", pins=False,
                            memory=memory)
            k += 1
            client.ask(address, "wait", nodes=3, timeout=600)
            time.sleep(2)
            runs = [client.ask(address, "generate", prompt=PROMPT, n=args.decode)["decode_tps"] for _ in range(3)]
            status = client.ask(address, "status")["status"]
            print(f"- {label}: measured {statistics.median(runs):.1f} tok/s, predicted "
                  f"{status['predicted_decode_tps']:.1f}")
            for n in status["nodes"]:
                layers = f"{n['layers']['start']}:{n['layers']['end']}" if n["has_layers"] else "no layers"
                prof = n.get("profile") or {}  # the planner's word and the measured link are in "profile"
                print(f"  - {n['name']}{' (relayed)' if n['outbound_only'] else ''}: {layers}; "
                      f"{prof.get('reason', '')}; round trip {prof.get('rtt_ms', 0):.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
