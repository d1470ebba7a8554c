"""The `swarm` command line: the only module that prints."""

from __future__ import annotations

import argparse
import codecs
import json
import logging
import shlex
import sys
import time

from . import __version__
from .errors import BadInputError, SwarmError
from .layers import LayerRange

DEFAULT_PROMPT = "The three most useful things to know about llamas are"


def _ranges(text: str) -> list[LayerRange]:
    return [LayerRange.parse(part) for part in text.split(",") if part.strip()]


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default="default", help="a GGUF path, or `default` for Gemma 3 270M (default)")


def _add_sampling(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("-n", "--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def _sampling_options(args: argparse.Namespace) -> dict:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repeat_penalty=args.repeat_penalty, seed=args.seed)


def cmd_run(args: argparse.Namespace) -> int:
    from .chain import LocalChain
    from .models import resolve_model
    from .sampling import SamplingParams

    model = resolve_model(args.model)
    ranges = _ranges(args.split) if args.split else args.shards
    sampling = SamplingParams(**_sampling_options(args))
    with LocalChain(model, ranges, n_ctx=args.ctx, n_threads=args.threads) as chain:
        layout = ", ".join(f"{s.layers} ({s.role.value}, {s.path.stat().st_size / 1e6:.0f} MB)" for s in chain.shards)
        print(f"model {model.name} cut into {len(chain.shards)} shards: {layout}", file=sys.stderr)
        tokens = chain.tokenizer.tokenize(args.prompt)
        if len(tokens) + args.max_tokens > args.ctx:
            raise BadInputError(
                f"the prompt ({len(tokens)} tokens) plus --max-tokens {args.max_tokens} exceeds the context of "
                f"{args.ctx}; raise --ctx or lower --max-tokens"
            )
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
        t0 = time.perf_counter()
        first = None
        n = 0
        for token in chain.generate(tokens, max_tokens=args.max_tokens, sampling=sampling):
            if first is None:
                first = time.perf_counter()
            n += 1
            sys.stdout.write(decoder.decode(chain.tokenizer.piece(token)))
            sys.stdout.flush()
        sys.stdout.write(decoder.decode(b"", final=True) + "\n")
        if args.stats and first is not None:
            end = time.perf_counter()
            rate = (n - 1) / (end - first) if n > 1 else 0.0
            print(
                f"prompt {len(tokens)} tokens, first token after {1000 * (first - t0):.0f} ms, "
                f"{n} tokens, decode {rate:.1f} tokens/s",
                file=sys.stderr,
            )
    return 0


def cmd_shard(args: argparse.Namespace) -> int:
    from .models import resolve_model
    from .slicing import slice_model

    shard = slice_model(resolve_model(args.model), LayerRange.parse(args.layers), args.output_dir)
    print(shard.path)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .gguf_file import read_gguf
    from .models import resolve_model
    from .slicing import SUPPORTED, shard_info

    path = resolve_model(args.model)
    model = read_gguf(path)
    info = shard_info(path)
    arch = model.arch
    print(f"file          {path} ({path.stat().st_size / 1e6:.1f} MB)")
    print(f"architecture  {arch} ({'can be split' if arch in SUPPORTED else 'cannot be split'})")
    print(f"layers        {info.layers} of {info.n_layer_total} ({info.role.value})")
    print(f"n_embd        {model.get(f'{arch}.embedding_length')}")
    print(f"tensors       {len(model.tensors)}")
    return 0


# ---------------------------------------------------------------- the swarm


def _add_client(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator", "-c", help="HOST:PORT of the coordinator (default: find it by mDNS)")
    p.add_argument("--key", help="the swarm key (default: $SWARM_KEY, or the key of a coordinator on this machine)")
    p.add_argument("--swarm", default="default", help="the swarm's name, to find it by mDNS (default: default)")
    p.add_argument("--mdns-interface", default=None,
                   help="address of the interface to use for mDNS, `all` (default for clients) or `off`")


def _client(args: argparse.Namespace):
    from .client import SwarmClient

    return SwarmClient(args.coordinator, key=args.key, swarm=args.swarm, mdns_interface=args.mdns_interface)


def cmd_join(args: argparse.Namespace) -> int:
    import os
    import signal
    import socket
    import threading

    from . import join, shardcache
    from .cache import local_key
    from .models import resolve_model

    pin = LayerRange.parse(args.layers) if args.layers else None
    max_memory = join.parse_size(args.max_memory) if args.max_memory else 0
    leave_after_s = join.parse_duration(args.leave_after) if args.leave_after else None
    if leave_after_s and args.model:
        raise BadInputError("--leave-after is for nodes; the coordinator holds the model and cannot hand it over")
    if args.cache_limit is not None:
        shardcache.parse_limit(args.cache_limit)  # refused here, before anything starts
        os.environ[shardcache.LIMIT_ENV] = args.cache_limit  # what every eviction in this process reads
    shardcache.limit_from_env_or_default()  # a bad $SWARM_CACHE_LIMIT too
    key = args.key or os.environ.get("SWARM_KEY")
    name = args.name or socket.gethostname()
    stop = threading.Event()
    interrupts = []

    def on_signal(signum, _frame):
        interrupts.append(signum)
        if len(interrupts) > 1:
            os._exit(130)  # a second Ctrl-C leaves at once
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    if args.model:
        running = join.start_coordinator(
            resolve_model(args.model), swarm=args.swarm, key=key, name=name, host=args.host,
            port=join.DEFAULT_PORT if args.port is None else args.port, max_memory=max_memory, pin=pin,
            threads=args.threads, n_ctx=args.ctx, max_sessions=args.max_sessions, mdns_interface=args.mdns_interface,
            reprofile=args.reprofile, failover=not args.no_failover, step_port=args.step_port,
        )
        print(f"swarm {args.swarm!r}: coordinator at {running.address}, model {running.coordinator.model_path.name}",
              file=sys.stderr)
        print("on each other machine, run:", file=sys.stderr)
        key_arg = f"--key={shlex.quote(running.key)}"  # also right for a key of the user's that starts with "-"
        print(f"  swarm join --coordinator {running.address} {key_arg}", file=sys.stderr)
        if running.advertiser is not None:
            print(f"  (or on this network: swarm join --swarm {shlex.quote(args.swarm)} {key_arg})", file=sys.stderr)
        print("and chat with `swarm chat` here; Ctrl-C stops the swarm", file=sys.stderr)
        sys.stderr.flush()
        stop.wait()
        running.stop()
        return 0
    key = key or local_key(args.swarm)
    if not key:
        raise BadInputError("a node needs the swarm key: pass --key KEY (the coordinator printed it) or set SWARM_KEY")
    node = join.start_node(
        coordinator=args.coordinator, swarm=args.swarm, key=key, name=name, host=args.host,
        port=args.port or 0, max_memory=max_memory, pin=pin, threads=args.threads, mdns_interface=args.mdns_interface,
        reprofile=args.reprofile, step_port=args.step_port,
    )
    print(f"node {name} serving on port {node.port} (steps on {node.step_port}); looking for the coordinator of "
          f"swarm {args.swarm!r}" + (f" at {args.coordinator}" if args.coordinator else " by mDNS"), file=sys.stderr)
    sys.stderr.flush()
    leave_at = time.monotonic() + leave_after_s if leave_after_s else None
    while not stop.wait(0.5):
        if node.wait(0):
            node.stop()
            return 1  # refused for good (wrong key, bad pin): the log said why
        if leave_at is not None and time.monotonic() >= leave_at:
            print(f"node {name}: --leave-after {args.leave_after} is up; handing over and leaving", file=sys.stderr)
            break
    # Ctrl-C, SIGTERM or --leave-after: hand the sessions over first (a second Ctrl-C leaves at once).
    print(f"node {name}: leaving; handing its sessions over (Ctrl-C again to leave at once)", file=sys.stderr)
    sys.stderr.flush()
    node.leave()
    node.stop()
    return 0


def _cache_limit(args: argparse.Namespace) -> tuple[int | None, str]:
    """The shard cache's cap for `swarm cache`, and where it comes from."""
    import os

    from . import shardcache

    if args.cache_limit is not None:
        return shardcache.parse_limit(args.cache_limit), "--cache-limit"
    if os.environ.get(shardcache.LIMIT_ENV, "").strip():
        return shardcache.limit_from_env_or_default(), f"${shardcache.LIMIT_ENV}"
    return shardcache.default_limit(), "default: 20 GB, or half the space the cache could take on a smaller disk"


def _age(text: str) -> float:
    """'7d', '12h', '1d12h', '90m' -> seconds."""
    import re

    from .join import parse_duration

    days = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*d\s*(.*)", text, re.IGNORECASE)
    try:
        rest = days[2] if days else text
        seconds = (float(days[1]) * 86400 if days else 0.0) + (parse_duration(rest) if rest.strip() else 0.0)
    except BadInputError:
        seconds = -1.0
    if seconds <= 0:
        raise BadInputError(f"cannot read --older-than {text!r}; write a positive age like 7d, 12h or 1d12h")
    return seconds


def cmd_cache(args: argparse.Namespace) -> int:
    from . import shardcache

    if args.action == "list" and (args.all or args.older_than or args.dry_run):
        raise BadInputError("--all, --older-than and --dry-run are for `swarm cache prune`")
    limit, source = _cache_limit(args)
    cap = f"a {shardcache.human(limit)} cap ({source})" if limit is not None else f"no cap ({source})"
    head = {"dir": str(shardcache.shards_dir()), "limit": limit, "limit_source": source}
    if args.action == "list":
        return _cache_list(args, head, limit, cap)
    if limit is None and not args.all and not args.older_than:
        raise BadInputError(f"the shard cache has no cap ({source}), so there is nothing to prune it down to; "
                            "use --all, --older-than AGE or --cache-limit SIZE")
    older_than = _age(args.older_than) if args.older_than else None
    result = shardcache.evict(0 if args.all else limit, older_than=older_than, dry_run=args.dry_run)
    if args.json:
        print(json.dumps({**head, "total": result.total, "dry_run": args.dry_run,
                          "removed": [_cache_record(e) for e in result.removed],
                          "in_use": [_cache_record(e) for e in result.in_use]}, indent=2))
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for e in result.removed:
        print(f"{verb} {e.name} ({shardcache.human(e.size)}, last used {_when(e.last_used)})")
    for e in result.in_use:
        print(f"kept {e.name} ({shardcache.human(e.size)}): in use by a running node")
    freed = shardcache.human(sum(e.size for e in result.removed))
    print(f"{verb} {len(result.removed)} file(s) ({freed}); {shardcache.human(result.total)} left, {cap}")
    if result.over:
        print("still over the cap: the rest is in use; stop the nodes that use it, or raise --cache-limit")
    return 0


def _cache_list(args: argparse.Namespace, head: dict, limit: int | None, cap: str) -> int:
    from . import shardcache

    found = shardcache.entries()[::-1]  # most recently used first
    total = sum(e.size for e in found)
    records = [_cache_record(e) for e in found]
    if args.json:
        print(json.dumps({**head, "total": total, "shards": records}, indent=2))
        return 0
    print(f"shard cache {head['dir']}: {len(found)} file(s), {shardcache.human(total)} of {cap}")
    rows = [("NAME", "MODEL", "LAYERS", "SIZE", "LAST USED", "")]
    for r in records:
        layers = f"{r['layers'][0]}:{r['layers'][1]}" if r["layers"] else "?"
        layers += f" of {r['n_layer_total']}" if r["n_layer_total"] else ""
        model = f"{r['model']} ({r['arch']})" if r["model"] else r["arch"] or "?"
        state = ("downloading" if r["in_use"] else "partial download") if r["partial"] else (
            "in use" if r["in_use"] else "")
        rows.append((r["name"], model, layers, shardcache.human(r["size"]), _when(r["last_used_unix"]), state))
    if len(rows) > 1:
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(c.rjust(w) if i == 3 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    if limit is not None and total > limit:
        print("over the cap: `swarm cache prune` removes the least recently used shards that no node uses")
    return 0


def _cache_record(e) -> dict:
    from .shardcache import describe

    return {"name": e.name, "path": str(e.path), "size": e.size, "last_used_unix": e.last_used, "in_use": e.in_use,
            "partial": e.partial, **describe(e)}


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def _stream(gen, args: argparse.Namespace) -> None:
    for piece in gen:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    r = gen.result
    if getattr(args, "stats", False):
        print(f"prompt {r.prompt_tokens} tokens, first token after {r.first_token_ms:.0f} ms, {len(r.tokens)} tokens, "
              f"decode {r.tokens_per_s:.1f} tokens/s ({r.finish_reason})", file=sys.stderr)


def _client_options(args: argparse.Namespace) -> dict:
    return dict(max_tokens=args.max_tokens, stop=args.stop or [], **_sampling_options(args))


def cmd_generate(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _stream(client.generate(args.text, **_client_options(args)), args)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _chat(client, args)


def _chat(client, args: argparse.Namespace) -> int:
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt:
        _stream(client.chat(history + [{"role": "user", "content": args.prompt}], **_client_options(args)), args)
        return 0
    print("chat with the swarm; /reset forgets the conversation, /quit (or Ctrl-D) leaves", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print("", file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return 0
        if text == "/reset":
            history = history[:1] if args.system else []
            print("(conversation forgotten)", file=sys.stderr)
            continue
        if text.startswith("/"):
            print("commands: /reset, /quit", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        gen = client.chat(history, **_client_options(args))
        try:
            _stream(gen, args)
        except KeyboardInterrupt:
            gen.cancel()
            print("\n(interrupted)", file=sys.stderr)
        history.append({"role": "assistant", "content": gen.result.text})


def cmd_status(args: argparse.Namespace) -> int:
    import json

    with _client(args) as client:
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
    c = {k: int(v) for k, v in (status.get("checkpoints") or {}).items()}
    if c.get("full") or c.get("deltas"):
        print(f"KV checkpoints: {c.get('full', 0)} full ({c.get('full_bytes', 0) / 1e6:.1f} MB), {c.get('deltas', 0)} "
              f"deltas ({c.get('delta_bytes', 0) / 1e6:.1f} MB)"
              + (f", {c['refused']} refused (base gone; a full one followed)" if c.get("refused") else ""))
    if not status["sessions"]:
        print("no sessions running")
    return 0


def cmd_local(args: argparse.Namespace) -> int:
    from .local import LocalSwarm
    from .models import resolve_model

    model = resolve_model(args.model)
    print(f"starting a local swarm: a coordinator and {args.nodes - 1} more node(s) on this machine ...", file=sys.stderr)
    with LocalSwarm(model, nodes=args.nodes, threads=args.threads, ctx=args.ctx) as swarm:
        status = swarm.client.status()
        print("layer map: " + ", ".join(
            f"{n['layers']['start']}:{n['layers']['end']} on {n['name']}" for n in sorted(
                (n for n in status["nodes"] if n["has_layers"]), key=lambda n: n["layers"]["start"])),
            file=sys.stderr)
        print(f"node logs: {swarm.log_dir}", file=sys.stderr)
        return _chat(swarm.client, args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarm", description="Pool several machines to run one GGUF model.")
    parser.add_argument("--version", action="version", version=f"swarm {__version__}")
    parser.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"],
                        help="default: info for `swarm join`, warning otherwise; debug adds llama.cpp's own log")
    sub = parser.add_subparsers(dest="command", required=True)

    join = sub.add_parser("join", help="start a node on this machine (with --model: the coordinator)")
    join.add_argument("--model", "-m", default=None,
                      help="a GGUF path, or `default` for Gemma 3 270M: this node becomes the coordinator")
    join.add_argument("--coordinator", "-c", help="HOST:PORT of the coordinator where mDNS cannot reach it")
    join.add_argument("--key", help="the swarm key (default: $SWARM_KEY; a coordinator makes one if none is given)")
    join.add_argument("--swarm", default="default", help="the swarm's name on mDNS (default: default)")
    join.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0: every interface)")
    join.add_argument("--port", type=int, default=None, help="port (coordinator default 7700; nodes: any free port)")
    join.add_argument("--step-port", type=int, default=None,
                      help="port for pipeline steps from other nodes (default: --port + 1, or any free port "
                           "when --port is not fixed)")
    join.add_argument("--name", default=None, help="this node's name (default: the host name)")
    join.add_argument("--max-memory", default=None, help="the most memory this node gives the swarm, e.g. 4GB")
    join.add_argument("--layers", default=None, help="pin this node's layers by hand, START:END (e.g. 0:6)")
    join.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: the physical cores)")
    join.add_argument("--ctx", type=int, default=2048, help="context length per session (coordinator; default 2048)")
    join.add_argument("--max-sessions", type=int, default=4, help="sessions at once (coordinator; default 4)")
    join.add_argument("--mdns-interface", default=None,
                      help="interface address for mDNS, `all` or `off` (default: derived from --host)")
    join.add_argument("--reprofile", action="store_true",
                      help="measure this node's compute again instead of using its cached profile")
    join.add_argument("--no-failover", action="store_true",
                      help="coordinator: keep no states for recovery; a node that fails ends its sessions")
    join.add_argument("--leave-after", default=None, metavar="DURATION",
                      help="leave gracefully after this long, e.g. 11h30m for a notebook session (nodes)")
    _add_cache_limit(join)
    join.set_defaults(func=cmd_join)

    gen = sub.add_parser("generate", help="raw completion of a text through the swarm, streamed")
    gen.add_argument("text")
    _add_client(gen)
    _add_sampling(gen, 128)
    gen.add_argument("--stop", action="append", help="stop at this string (repeatable)")
    gen.add_argument("--stats", action="store_true", help="print time to first token and decode speed to stderr")
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="chat with the swarm in the terminal (or answer once with -p)")
    _add_client(chat)
    _add_chat(chat)
    chat.set_defaults(func=cmd_chat)

    status = sub.add_parser("status", help="the swarm's nodes, layer map and sessions")
    _add_client(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)

    local = sub.add_parser("local", help="start a coordinator and more nodes on this machine, and chat through them")
    _add_model(local)
    local.add_argument("--nodes", type=int, default=3, help="processes to split the model over (default 3)")
    local.add_argument("--threads", type=int, default=None, help="llama.cpp threads per node")
    local.add_argument("--ctx", type=int, default=2048)
    _add_chat(local)
    local.set_defaults(func=cmd_local)

    run = sub.add_parser("run", help="cut the model into shards and generate through them in this one process")
    _add_model(run)
    run.add_argument("-p", "--prompt", default=DEFAULT_PROMPT)
    group = run.add_mutually_exclusive_group()
    group.add_argument("--shards", type=int, default=3, help="cut into this many equal ranges (default 3)")
    group.add_argument("--split", help="explicit ranges, e.g. 0:6,6:12,12:18")
    _add_sampling(run, 64)
    run.add_argument("--ctx", type=int, default=512, help="context length per session (default 512)")
    run.add_argument("--threads", type=int, default=None)
    run.add_argument("--stats", action="store_true", help="print time to first token and decode speed to stderr")
    run.set_defaults(func=cmd_run)

    shard = sub.add_parser("shard", help="write the shard GGUF for a layer range and print its path")
    _add_model(shard)
    shard.add_argument("--layers", required=True, help="START:END, half-open, e.g. 0:6")
    shard.add_argument("--output-dir", "-o", default=None, help="where to write it (default: the cache)")
    shard.set_defaults(func=cmd_shard)

    info = sub.add_parser("info", help="describe a model or shard file")
    _add_model(info)
    info.set_defaults(func=cmd_info)

    cached = sub.add_parser("cache", help="list the cached shard files (`list`, the default) or evict them (`prune`)")
    cached.add_argument("action", nargs="?", choices=["list", "prune"], default="list",
                        help="list (the default): the shard files, the total and the cap; prune: evict down to the cap")
    cached.add_argument("--all", action="store_true", help="prune: every shard file no running node uses")
    cached.add_argument("--older-than", default=None, metavar="AGE",
                        help="prune: also every shard file not used for this long, e.g. 7d or 12h")
    cached.add_argument("--dry-run", action="store_true", help="prune: say what would go, remove nothing")
    cached.add_argument("--json", action="store_true", help="machine-readable output")
    _add_cache_limit(cached)
    cached.set_defaults(func=cmd_cache)
    return parser


def _add_cache_limit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-limit", default=None, metavar="SIZE",
                   help="the most disk the shard cache may take, e.g. 20GB; `none` or 0: no cap (default: "
                        "$SWARM_CACHE_LIMIT, else 20GB, or half the space the cache could take on a smaller disk); "
                        "the least recently used shards go first, shards in use never")


def _add_chat(p: argparse.ArgumentParser) -> None:
    p.add_argument("-p", "--prompt", default=None, help="answer this once and exit (default: interactive)")
    p.add_argument("--system", default=None, help="a system message to start the conversation with")
    _add_sampling(p, 256)
    p.add_argument("--stop", action="append", help="stop at this string (repeatable)")
    p.add_argument("--stats", action="store_true", help="print time to first token and decode speed to stderr")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = args.log_level or ("info" if args.command == "join" else "warning")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
                        if args.command == "join" else "%(message)s", datefmt="%H:%M:%S")
    for flag, low in (("max_tokens", 0), ("ctx", 1), ("threads", 1), ("shards", 1), ("nodes", 1), ("max_sessions", 1)):
        value = getattr(args, flag, None)
        if value is not None and value < low:
            print(f"error: --{flag.replace('_', '-')} must be at least {low}", file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except SwarmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
