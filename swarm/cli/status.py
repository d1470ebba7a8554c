"""`swarm status`: the route, the nodes (layers, memory, measured speed), the sessions and the recoveries.

The same fields as the web page (swarm/http/static/app.js), as tables drawn by rich; `--json` prints the
status as the coordinator reports it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .talk import client_of


RATE_WINDOW_S = 1.0


def cmd_status(args: argparse.Namespace) -> int:
    with client_of(args) as client:
        status = client.status()
        if args.json:
            print(json.dumps(status, indent=2))
            return 0
        rates = {}
        if status["sessions"]:  # tokens/s of each running session: what it generated in the next second
            time.sleep(RATE_WINDOW_S)
            later = client.status()
            before = {s["session_id"]: s["generated"] for s in status["sessions"]}
            rates = {s["session_id"]: (s["generated"] - before[s["session_id"]]) / RATE_WINDOW_S
                     for s in later["sessions"] if s["session_id"] in before}
            status = later
    # Piped or captured output keeps whole lines: the width of a terminal only where there is one.
    console = Console(width=None if sys.stdout.isatty() else 200, highlight=False, markup=False)
    show(console, status, rates)
    return 0


def _span(r: dict) -> str:
    return f"{r['start']}:{r['end']}"


def _mb(value) -> str:
    return f"{int(value) >> 20:,} MB"


def show(console: Console, status: dict, rates: dict[str, float] | None = None) -> None:
    """Print a status dict (as `client.status()` returns it); `rates`: tokens/s by session id.

    Names and details come from the network: printed as plain text, never read as rich markup."""
    console.print(Text.assemble("swarm ", (repr(status["swarm"]), "bold"), f": {status['state']} - {status['detail']}"),
                  soft_wrap=True)
    console.print(f"model {status['model_name']} ({status['n_layer']} layers), context {status['n_ctx']} x "
                  f"{status['max_sessions']} sessions", soft_wrap=True)
    nodes = sorted(status["nodes"], key=lambda n: (n["layers"]["start"] if n["has_layers"] else 1 << 30))
    relayed = {n["name"] for n in nodes if n.get("outbound_only")}
    spans = sorted([(n["layers"], n["name"], "") for n in nodes if n["has_layers"]]
                   + [(r, n["name"], " (taken over)") for n in nodes for r in n.get("extra_layers", [])],
                   key=lambda x: x[0]["start"])
    spans = [(r, name, how + (" (relayed)" if name in relayed else "")) for r, name, how in spans]
    console.print("route: " + (" -> ".join(f"{_span(r)} on {name}{how}" for r, name, how in spans) or "none yet"),
                  soft_wrap=True)
    console.print(_nodes_table(nodes))
    console.print("(c) coordinator, * pinned with --layers, +A:B taken over from a node that failed or left"
                  + (", (r) outbound-only: reached through the coordinator's relay, its hops marked (relayed)"
                     if any(n.get("outbound_only") for n in nodes) else ""), style="dim", soft_wrap=True)
    console.print(_measured_table(nodes))
    console.print("decode and prefill: cost per byte of weights; a fixed cost per step; the link to the coordinator",
                  style="dim", soft_wrap=True)
    for n in nodes:
        devices = ", ".join(f"{d['name']} ({d['type']})" for d in n["resources"].get("devices", []))
        relayed = n.get("outbound_only") and (f"outbound-only: {n.get('relayed_because') or 'reached through a relay'}; "
                                               "every hop into it and out of it goes through the coordinator's relay")
        notes = [x for x in ((n.get("profile") or {}).get("reason"), n.get("detail"), devices and f"devices {devices}",
                             relayed) if x]
        for note in notes:
            console.print(f"  {n['name']}: {note}", soft_wrap=True)
    if status["predicted_decode_tps"]:
        measured = (f"{status['measured_decode_tps']:.1f} measured over {status['measured_sessions']} session(s)"
                    if status["measured_sessions"] else "not measured yet")
        console.print(f"decode: {status['predicted_decode_tps']:.1f} tokens/s predicted, {measured}", soft_wrap=True)
    if status["sessions"]:
        console.print(_sessions_table(status["sessions"], rates or {}))
    else:
        console.print("no sessions running")
    recoveries = status.get("recoveries", [])
    if recoveries:
        console.print("recoveries", style="bold")
    for r in recoveries:
        when = time.strftime("%H:%M:%S", time.localtime(r["at_unix"]))
        span = _span(r["layers"]) if r.get("layers") else "no layers"
        console.print(
            f"recovery {when}: node {r['node']} ({r['address']}, {span}) {r['detection']}; path {r['path']}, "
            f"{r['sessions']} session(s), stall {r['stall_ms']:.0f} ms, successor {r['successor'] or '-'}"
            + (f", {r['replayed_positions']} positions replayed" if r["replayed_positions"] else "")
            + (f"; {r['detail']}" if r.get("detail") else ""), soft_wrap=True)
    for b in status.get("standbys", []):
        console.print(f"standby: {b['node']} holds layers {_span(b['layers'])} for {b['guards']} "
                      f"({b['state']}, {int(b['bytes']) >> 20} MB, {int(b['checkpoints'])} checkpoints received)",
                      soft_wrap=True)
    c = {k: int(v) for k, v in (status.get("checkpoints") or {}).items()}
    if c.get("full") or c.get("deltas"):
        console.print(f"KV checkpoints: {c.get('full', 0)} full ({c.get('full_bytes', 0) / 1e6:.1f} MB), "
                      f"{c.get('deltas', 0)} deltas ({c.get('delta_bytes', 0) / 1e6:.1f} MB)"
                      + (f", {c['refused']} refused (base gone; a full one followed)" if c.get("refused") else ""),
                      soft_wrap=True)


def _table(*columns: str, text_columns: int = 2) -> Table:
    """A table whose first `text_columns` columns are text (left), the rest figures (right)."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for i, name in enumerate(columns):
        table.add_column(name, justify="left" if i < text_columns else "right", no_wrap=True)
    return table


def _nodes_table(nodes: list[dict]) -> Table:
    table = _table("node", "layers", "address", "state", "memory free/total", "cap", "threads", text_columns=4)
    for n in nodes:
        r = n["resources"]
        layers = (_span(n["layers"]) if n["has_layers"] else "-") + ("*" if n["pinned"] else "")
        layers += "".join(f"+{_span(e)}" for e in n.get("extra_layers", []))
        colour = {"ready": "green", "idle": "green", "failed": "red", "backoff": "red"}.get(n["state"], "yellow")
        table.add_row(n["name"] + (" (c)" if n["is_coordinator"] else ""), layers,
                      n["address"] + (" (r)" if n.get("outbound_only") else ""),
                      Text(n["state"], style=colour),
                      f"{int(r['memory_available']) / (1 << 30):.1f}/{int(r['memory_total']) / (1 << 30):.1f} GB",
                      _mb(r["max_memory"]) if int(r["max_memory"]) else "-", str(r["threads"]))
    return table


def _measured_table(nodes: list[dict]) -> Table:
    table = _table("measured", "", "decode ns/byte", "prefill ns/byte/token", "ms/step", "rtt ms", "link")
    for n in nodes:
        p = n.get("profile") or {}
        if not p:
            table.add_row(n["name"], "not measured yet", "", "", "", "", "")
            continue
        table.add_row(n["name"], "cached" if p.get("cached") else "", f"{p['decode_ns_per_byte']:.2f}",
                      f"{p['prefill_ns_per_byte']:.3f}", f"{p['step_overhead_ms']:.2f}", f"{p['rtt_ms']:.2f}",
                      f"{p['bandwidth_mbps']:.0f} MB/s" if p["bandwidth_mbps"] else "local")
    return table


def _sessions_table(sessions: list[dict], rates: dict[str, float]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for name in ("session", "positions", "generated", "tokens/s", "age", "checkpoints"):
        table.add_column(name, justify="left" if name == "session" else "right", no_wrap=True)
    for s in sessions:
        rate = rates.get(s["session_id"])
        table.add_row(s["session_id"], str(s["positions"]), str(s["generated"]), "-" if rate is None else f"{rate:.1f}",
                      f"{s['age_s']:.0f} s", f"{int(s['checkpoint_bytes']) / 1e6:.1f} MB")
    return table
