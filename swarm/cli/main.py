"""The `swarm` command: its options, and the dispatch to each command's module."""

from __future__ import annotations

import argparse
import logging
import sys

from .. import __version__
from ..errors import SwarmError
from .cache import cmd_cache
from .model import DEFAULT_PROMPT, cmd_info, cmd_run, cmd_shard
from .options import add_cache_limit, add_chat, add_client, add_http, add_model, add_sampling
from .serve import cmd_join, cmd_local
from .status import cmd_status
from .talk import cmd_chat, cmd_generate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarm", description="Pool several machines to run one GGUF model.")
    parser.add_argument("--version", action="version", version=f"swarm {__version__}")
    parser.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"],
                        help="default: info for `swarm join`, warning otherwise; debug adds llama.cpp's own log")
    sub = parser.add_subparsers(dest="command", required=True)

    join = sub.add_parser("join", help="start a node on this machine (with --model: the coordinator)")
    join.add_argument("--model", "-m", default=None,
                      help="a GGUF path, or a packaged model (`default`: SmolLM2-135M-Instruct; `gemma3-270m`): "
                           "this node becomes the coordinator")
    join.add_argument("--model-url", default="",
                      help="the model's public HTTP(S) URL (coordinator): nodes fetch their tensors' byte ranges "
                           "from there instead of through the coordinator, and fall back to it")
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
    join.add_argument("--no-standbys", action="store_true",
                      help="coordinator: no node holds a loaded replica of a range it does not serve (standbys use "
                           "spare memory so that a lost range needs no load)")
    join.add_argument("--standbys-on-route", action="store_true",
                      help="coordinator: nodes that serve a range may stand by for another too (faster recovery "
                           "where no node is spare, at the cost of the imports on their cores: 4-10%% of decode "
                           "speed measured on one 2-core machine); by default only nodes off the route do")
    join.add_argument("--leave-after", default=None, metavar="DURATION",
                      help="leave gracefully after this long, e.g. 11h30m for a notebook session (nodes)")
    join.add_argument("--outbound-only", action="store_true",
                      help="node: accept no connection from other machines; peers reach this node through the "
                           "coordinator's relay over connections it opens (a notebook behind NAT; a node the "
                           "coordinator cannot reach is relayed without it)")
    join.add_argument("--relay-port", type=int, default=None,
                      help="coordinator: port outbound-only nodes connect to (default: --port + 2, so 7702); each "
                           "such node also gets two ports of its own, any free ones")
    add_http(join, "coordinator; default: --port + 80, so 7780")
    add_cache_limit(join)
    join.set_defaults(func=cmd_join)

    gen = sub.add_parser("generate", help="raw completion of a text through the swarm, streamed")
    gen.add_argument("text")
    add_client(gen)
    add_sampling(gen, 128)
    gen.add_argument("--stop", action="append", help="stop at this string (repeatable)")
    gen.add_argument("--stats", action="store_true", help="print time to first token and decode speed to stderr")
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="chat with the swarm in the terminal (or answer once with -p)")
    add_client(chat)
    add_chat(chat)
    chat.set_defaults(func=cmd_chat)

    status = sub.add_parser("status", help="the swarm's nodes, layer map and sessions")
    add_client(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)

    local = sub.add_parser("local", help="start a coordinator and more nodes on this machine, and chat through them")
    add_model(local)
    local.add_argument("--nodes", type=int, default=3, help="processes to split the model over (default 3)")
    local.add_argument("--threads", type=int, default=None, help="llama.cpp threads per node")
    local.add_argument("--ctx", type=int, default=2048)
    add_http(local, "default 7780, or any free port when 7780 is taken")
    add_chat(local)
    local.set_defaults(func=cmd_local)

    run = sub.add_parser("run", help="cut the model into shards and generate through them in this one process")
    add_model(run)
    run.add_argument("-p", "--prompt", default=DEFAULT_PROMPT)
    group = run.add_mutually_exclusive_group()
    group.add_argument("--shards", type=int, default=3, help="cut into this many equal ranges (default 3)")
    group.add_argument("--split", help="explicit ranges, e.g. 0:6,6:12,12:18")
    add_sampling(run, 64)
    run.add_argument("--ctx", type=int, default=512, help="context length per session (default 512)")
    run.add_argument("--threads", type=int, default=None)
    run.add_argument("--stats", action="store_true", help="print time to first token and decode speed to stderr")
    run.set_defaults(func=cmd_run)

    shard = sub.add_parser("shard", help="write the shard GGUF for a layer range and print its path")
    add_model(shard)
    shard.add_argument("--layers", required=True, help="START:END, half-open, e.g. 0:6")
    shard.add_argument("--output-dir", "-o", default=None, help="where to write it (default: the cache)")
    shard.set_defaults(func=cmd_shard)

    info = sub.add_parser("info", help="describe a model or shard file")
    add_model(info)
    info.set_defaults(func=cmd_info)

    cached = sub.add_parser("cache", help="list the cached shard files (`list`, the default) or evict them (`prune`)")
    cached.add_argument("action", nargs="?", choices=["list", "prune"], default="list",
                        help="list (the default): the shard files, the total and the cap; prune: evict down to the cap")
    cached.add_argument("--all", action="store_true", help="prune: every shard file no running node uses")
    cached.add_argument("--older-than", default=None, metavar="AGE",
                        help="prune: also every shard file not used for this long, e.g. 7d or 12h")
    cached.add_argument("--dry-run", action="store_true", help="prune: say what would go, remove nothing")
    cached.add_argument("--json", action="store_true", help="machine-readable output")
    add_cache_limit(cached)
    cached.set_defaults(func=cmd_cache)
    return parser


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
    except BrokenPipeError:  # the reader went away (`swarm cache | head`): nothing left to say
        sys.stdout = None
        return 0
