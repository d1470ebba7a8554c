"""`swarm status`: the nodes, what each measured and holds, the sessions and the recoveries."""

from __future__ import annotations

import argparse
import json
import time

from .talk import client_of


def cmd_status(args: argparse.Namespace) -> int:
    with client_of(args) as client:
        status = client.status()
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"swarm {status['swarm']!r}: {status['state']} - {status['detail']}")
    print(f"model {status['model_name']} ({status['n_layer']} layers), context {status['n_ctx']} x "
          f"{status['max_sessions']} sessions")
    print(f"{'node':<16} {'address':<22} {'layers':<8} {'state':<8} {'memory free/total':>18} {'cap':>8} {'threads':>7}")
    for n in sorted(status["nodes"], key=lambda n: (n["layers"]["start"] if n["has_layers"] else 1 << 30)):
        r = n["resources"]
        layers = f"{n['layers']['start']}:{n['layers']['end']}" if n["has_layers"] else "-"
        layers += "*" if n["pinned"] else ""
        layers += "".join(f"+{e['start']}:{e['end']}" for e in n.get("extra_layers", []))
        cap = f"{int(r['max_memory']) >> 20} MB" if int(r["max_memory"]) else "-"
        name = n["name"] + (" (c)" if n["is_coordinator"] else "")
        print(f"{name:<16} {n['address']:<22} {layers:<8} {n['state']:<8} "
              f"{int(r['memory_available']) >> 20:>8}/{int(r['memory_total']) >> 20:<6} MB {cap:>8} {r['threads']:>7}")
    print("(c) coordinator, * pinned with --layers, +A:B taken over from a node that failed or left")
    print("\nmeasured (decode and prefill cost per byte of weights, fixed cost per step, link to the coordinator):")
    for n in status["nodes"]:
        p = n.get("profile") or {}
        devices = ", ".join(f"{d['name']} ({d['type']})" for d in n["resources"].get("devices", []))
        if p:
            bw = f"{p['bandwidth_mbps']:.0f} MB/s" if p["bandwidth_mbps"] else "local"
            print(f"  {n['name']:<14} decode {p['decode_ns_per_byte']:.2f} ns/byte, prefill "
                  f"{p['prefill_ns_per_byte']:.3f} ns/byte/token, {p['step_overhead_ms']:.2f} ms/step, "
                  f"rtt {p['rtt_ms']:.2f} ms, {bw}{', cached' if p['cached'] else ''}; {devices}")
            if p.get("reason"):
                print(f"  {'':<14} {p['reason']}")
        else:
            print(f"  {n['name']:<14} not measured yet; {devices}")
        if n.get("detail"):
            print(f"  {'':<14} {n['detail']}")
    if status["predicted_decode_tps"]:
        measured = (f"{status['measured_decode_tps']:.1f} measured over {status['measured_sessions']} session(s)"
                    if status["measured_sessions"] else "not measured yet")
        print(f"decode: {status['predicted_decode_tps']:.1f} tokens/s predicted, {measured}")
    for s in status["sessions"]:
        print(f"session {s['session_id']}: {s['positions']} positions, {s['generated']} generated, {s['age_s']:.0f} s")
    for r in status.get("recoveries", []):
        when = time.strftime("%H:%M:%S", time.localtime(r["at_unix"]))
        span = f"{r['layers']['start']}:{r['layers']['end']}" if r.get("layers") else "no layers"
        print(f"recovery {when}: node {r['node']} ({r['address']}, {span}) {r['detection']}; path {r['path']}, "
              f"{r['sessions']} session(s), stall {r['stall_ms']:.0f} ms, successor {r['successor'] or '-'}"
              + (f", {r['replayed_positions']} positions replayed" if r["replayed_positions"] else "")
              + (f"; {r['detail']}" if r.get("detail") else ""))
    for b in status.get("standbys", []):
        print(f"standby: {b['node']} holds layers {b['layers']['start']}:{b['layers']['end']} for {b['guards']} "
              f"({b['state']}, {int(b['bytes']) >> 20} MB, {int(b['checkpoints'])} checkpoints received)")
    c = {k: int(v) for k, v in (status.get("checkpoints") or {}).items()}
    if c.get("full") or c.get("deltas"):
        print(f"KV checkpoints: {c.get('full', 0)} full ({c.get('full_bytes', 0) / 1e6:.1f} MB), {c.get('deltas', 0)} "
              f"deltas ({c.get('delta_bytes', 0) / 1e6:.1f} MB)"
              + (f", {c['refused']} refused (base gone; a full one followed)" if c.get("refused") else ""))
    if not status["sessions"]:
        print("no sessions running")
    return 0
