"""Commands that start a swarm: `swarm join` (a coordinator or a node) and `swarm local`."""

from __future__ import annotations

import argparse
import shlex
import sys
import time

from ..errors import BadInputError
from ..layers import LayerRange
from .talk import chat_session


LOCAL_HTTP_PORT = 7780


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _browser_host(address: str) -> str:
    host = address.rsplit(":", 1)[0]
    return f"[{host}]" if ":" in host else host


def cmd_join(args: argparse.Namespace) -> int:
    import os
    import signal
    import socket
    import threading

    from .. import join, shardcache
    from ..cache import local_key
    from ..models import resolve_model

    pin = LayerRange.parse(args.layers) if args.layers else None
    max_memory = join.parse_size(args.max_memory) if args.max_memory else 0
    leave_after_s = join.parse_duration(args.leave_after) if args.leave_after else None
    if leave_after_s and args.model:
        raise BadInputError("--leave-after is for nodes; the coordinator holds the model and cannot hand it over")
    if args.outbound_only and args.model:
        raise BadInputError("--outbound-only is for nodes; every node must be able to reach the coordinator")
    if args.model_url and not args.model:
        raise BadInputError("--model-url names the coordinator's model: give it with --model")
    if args.relay_port is not None and not args.model:
        raise BadInputError("--relay-port is for the coordinator (the node that runs with --model)")
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
            http=not args.no_http, http_port=args.http_port, http_host=args.http_host,
            standbys=not args.no_standbys, standbys_on_route=args.standbys_on_route, relay_port=args.relay_port,
            model_url=args.model_url,
        )
        print(f"swarm {args.swarm!r}: coordinator at {running.address}, model {running.coordinator.model_path.name}",
              file=sys.stderr)
        print(f"listening on {', '.join(running.listening())} (steps on port {running.step_server.port}, relay for "
              f"outbound-only nodes on port {running.relay_port})", file=sys.stderr)
        if running.loopback_only():
            print("warning: listening on the loopback interface only: no other machine can join; pass "
                  "--host 0.0.0.0 (or this machine's address) to let them", file=sys.stderr)
        print("on each other machine, run:", file=sys.stderr)
        key_arg = f"--key={shlex.quote(running.key)}"  # also right for a key of the user's that starts with "-"
        print(f"  swarm join --coordinator {running.address} {key_arg}", file=sys.stderr)
        if running.advertiser is not None:
            print(f"  (or on this network: swarm join --swarm {shlex.quote(args.swarm)} {key_arg})", file=sys.stderr)
        print(f"  (the same command works from behind NAT, e.g. a notebook: such a node is reached through this "
              f"coordinator's relay; it needs ports {running.address.rsplit(':', 1)[1]} and {running.relay_port} "
              "open here)", file=sys.stderr)
        if running.http:
            web_host = running.address if running.http.host in ("0.0.0.0", "", "::") else running.http.host + ":0"
            print(f"web page and OpenAI-compatible API: http://{_browser_host(web_host)}:{running.http.port}/ "
                  "(the swarm key is the API key)", file=sys.stderr)
        print("and chat with `swarm chat` here; Ctrl-C stops the swarm", file=sys.stderr)
        sys.stderr.flush()
        stop.wait()
        running.stop()
        return 0
    key = key or local_key(args.swarm)
    if not key:
        raise BadInputError("a node needs the swarm key: pass --key KEY (the coordinator printed it) or set SWARM_KEY")
    leave_at = time.monotonic() + leave_after_s if leave_after_s else None
    # An outbound-only node's servers take connections from its own reverse connections only.
    host = "127.0.0.1" if args.outbound_only and args.host in ("0.0.0.0", "::", "") else args.host
    node = join.start_node(
        coordinator=args.coordinator, swarm=args.swarm, key=key, name=name, host=host,
        port=args.port or 0, max_memory=max_memory, pin=pin, threads=args.threads, mdns_interface=args.mdns_interface,
        reprofile=args.reprofile, step_port=args.step_port, leave_at=leave_at, outbound_only=args.outbound_only,
    )
    print(f"node {name} serving on port {node.port} (steps on {node.step_port}); looking for the coordinator of "
          f"swarm {args.swarm!r}" + (f" at {args.coordinator}" if args.coordinator else " by mDNS"), file=sys.stderr)
    sys.stderr.flush()
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


def cmd_local(args: argparse.Namespace) -> int:
    from ..local import LocalSwarm
    from ..models import resolve_model

    model = resolve_model(args.model)
    print(f"starting a local swarm: a coordinator and {args.nodes - 1} more node(s) on this machine ...", file=sys.stderr)
    if args.no_http:
        http_port = None
    elif args.http_port is not None:
        http_port = args.http_port
    else:  # the usual port when it is free; a second `swarm local` on this machine takes any free one
        http_port = LOCAL_HTTP_PORT if _port_free(LOCAL_HTTP_PORT) else 0
    with LocalSwarm(model, nodes=args.nodes, threads=args.threads, ctx=args.ctx, http_port=http_port,
                    http_host=args.http_host) as swarm:
        status = swarm.client.status()
        print("layer map: " + ", ".join(
            f"{n['layers']['start']}:{n['layers']['end']} on {n['name']}" for n in sorted(
                (n for n in status["nodes"] if n["has_layers"]), key=lambda n: n["layers"]["start"])),
            file=sys.stderr)
        print(f"node logs: {swarm.log_dir}", file=sys.stderr)
        if swarm.running.http:
            print(f"web page and OpenAI-compatible API: http://{_browser_host(swarm.running.http.host + ':0')}:"
                  f"{swarm.running.http.port}/ (key: "
                  f"{swarm.running.key})", file=sys.stderr)
        return chat_session(swarm.client, args)
