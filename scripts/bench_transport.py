#!/usr/bin/env python3
"""Transports for the per-token step, on the real shards and nothing else of the swarm.

Three processes hold Gemma 3 270M's layers 0:6, 6:12 and 12:18 (this project's engine, 2 threads
each) and pass each step's hidden states along, the last one answering with the greedy token. Only the
transport between them differs: gRPC unary calls waited on as futures (as the swarm's nodes did), gRPC
unary blocking calls, one gRPC bidirectional stream per hop, or plain TCP sockets kept open (as the step
stream does). The unsplit model in one process is the reference. All chains are started first and take
turns round by round; medians and paired ratios are reported.

    python scripts/bench_transport.py                 # 6 rounds of 128 decoded tokens
    python scripts/bench_transport.py --rounds 10 --modes grpc_future,socket
"""

from __future__ import annotations

import argparse
import queue
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time

MODES = ["grpc_future", "grpc_blocking", "grpc_stream", "socket"]
RANGES = [(0, 6), (6, 12), (12, 18)]
PROMPT = list(range(2, 102))  # 100 token ids: the prompt is not what is measured
RESET = 0xFFFFFFFF


def load(role: int):
    from swarm.engine import Shard
    from swarm.layers import LayerRange
    from swarm.models import resolve_model
    from swarm.slicing import slice_model

    model = resolve_model("gemma3-270m")
    path = model if role < 0 else slice_model(model, LayerRange(*RANGES[role])).path
    return Shard(path, n_ctx=1024, n_threads=2)


class Hop:
    """One process of the chain: its shard, and a way to call the next hop (`onward`)."""

    def __init__(self, role: int):
        self.role, self.shard, self.onward, self.reset_onward = role, load(role), None, None

    def reset(self) -> None:
        if "s" in self.shard.sessions():
            self.shard.drop_session("s")
        self.shard.open_session("s")
        if self.reset_onward:
            self.reset_onward()

    def step(self, start: int, payload: bytes) -> bytes:
        import numpy as np

        if self.role == 0:
            x = list(struct.unpack(f"<{len(payload) // 4}i", payload))
        else:
            x = np.frombuffer(payload, dtype=np.float32).reshape(-1, self.shard.n_embd)
        out = self.shard.forward("s", x, start)
        if self.role == len(RANGES) - 1:
            return struct.pack("<i", int(np.argmax(out)))
        return self.onward(start, out.tobytes())


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf, got = bytearray(n), 0
    view = memoryview(buf)
    while got < n:
        k = conn.recv_into(view[got:])
        if not k:
            raise EOFError
        got += k
    return bytes(buf)


def serve(hop: Hop, mode: str, port: int) -> None:
    def handle(start: int, data: bytes) -> bytes:
        if start == RESET:
            hop.reset()
            return b"ok"
        return hop.step(start, data)

    if mode == "socket":
        srv = socket.create_server(("127.0.0.1", port))
        print("ready", flush=True)
        while True:
            conn, _ = srv.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def loop(c=conn):
                while True:
                    try:
                        start, n = struct.unpack("<II", _recv_exact(c, 8))
                    except EOFError:
                        return
                    out = handle(start, _recv_exact(c, n))
                    c.sendall(struct.pack("<I", len(out)) + out)

            threading.Thread(target=loop, daemon=True).start()
    import grpc
    from concurrent import futures

    def unary(request: bytes, _context) -> bytes:
        return handle(struct.unpack("<I", request[:4])[0], request[4:])

    def stream(requests, context):
        for r in requests:
            yield unary(r, context)

    server = grpc.server(futures.ThreadPoolExecutor(8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench", {
        "Step": grpc.unary_unary_rpc_method_handler(unary),
        "Steps": grpc.stream_stream_rpc_method_handler(stream),
    }),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


def connect(mode: str, port: int):
    """(call(start, bytes) -> bytes, reset()) reaching the hop listening on `port`."""
    if mode == "socket":
        conn = socket.create_connection(("127.0.0.1", port))
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def call(start: int, data: bytes) -> bytes:
            conn.sendall(struct.pack("<II", start, len(data)) + data)
            return _recv_exact(conn, struct.unpack("<I", _recv_exact(conn, 4))[0])
    else:
        import grpc

        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        if mode == "grpc_stream":
            requests: queue.SimpleQueue = queue.SimpleQueue()
            replies = channel.stream_stream("/bench/Steps")(iter(requests.get, None))

            def call(start: int, data: bytes) -> bytes:
                requests.put(struct.pack("<I", start) + data)
                return next(replies)
        else:
            method = channel.unary_unary("/bench/Step")
            if mode == "grpc_future":
                def call(start: int, data: bytes) -> bytes:
                    return method.future(struct.pack("<I", start) + data, timeout=60).result()
            else:
                def call(start: int, data: bytes) -> bytes:
                    return method(struct.pack("<I", start) + data, timeout=60)
    return call, lambda: call(RESET, b"")


def child(mode: str, role: int, base_port: int, n_decode: int) -> None:
    """One process of a chain (role 0 drives it and times the rounds; -1 is the unsplit reference)."""
    hop = Hop(role)
    if 0 <= role < len(RANGES) - 1:
        lazy = {}

        def onward(start, data):  # the next hop may start after this one
            if "c" not in lazy:
                lazy["c"] = connect(mode, base_port + role + 1)
            return lazy["c"][0](start, data)

        hop.onward = onward
        hop.reset_onward = lambda: (onward(RESET, b"") and None)
    if role > 0:
        serve(hop, mode, base_port + role)
        return
    print("ready", flush=True)
    for _ in sys.stdin:
        hop.reset()
        if role < 0:
            import numpy as np
            token = int(np.argmax(hop.shard.forward("s", PROMPT, 0)))
        else:
            token = struct.unpack("<i", hop.step(0, struct.pack(f"<{len(PROMPT)}i", *PROMPT)))[0]
        pos = len(PROMPT)
        t0 = time.perf_counter()
        for _ in range(n_decode):
            if role < 0:
                token = int(np.argmax(hop.shard.forward("s", [token], pos)))
            else:
                token = struct.unpack("<i", hop.step(pos, struct.pack("<i", token)))[0]
            pos += 1
        print(f"{n_decode / (time.perf_counter() - t0):.3f}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--child", nargs=3, metavar=("MODE", "ROLE", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]), args.decode)
        return 0
    modes = ["reference"] + args.modes.split(",")
    procs, drivers = [], {}
    try:
        for mode in modes:
            with socket.socket() as s:  # a base port with room for the hops after it
                s.bind(("127.0.0.1", 0))
                base = s.getsockname()[1]
            roles = [-1] if mode == "reference" else list(range(len(RANGES) - 1, -1, -1))
            for role in roles:  # the last hop first, so every hop finds the next one listening
                p = subprocess.Popen([sys.executable, __file__, "--decode", str(args.decode), "--child", mode,
                                      str(role), str(base)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                procs.append(p)
                if p.stdout.readline().strip() != "ready":
                    raise SystemExit(f"{mode} hop {role} did not start")
                if role <= 0:
                    drivers[mode] = p
        results = {m: [] for m in modes}
        for r in range(args.rounds):
            for mode in (modes if r % 2 == 0 else modes[::-1]):
                drivers[mode].stdin.write("go\n")
                drivers[mode].stdin.flush()
                results[mode].append(float(drivers[mode].stdout.readline()))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        for p in procs:
            p.kill()
    ref = results["reference"]
    print(f"{args.decode} decode steps, 2 threads per process, {args.rounds} rounds\n")
    print("| transport | decode tok/s (median) | vs one process (ratio of medians) | median of paired ratios |")
    print("|---|---|---|---|")
    for mode in modes:
        med = statistics.median(results[mode])
        paired = statistics.median(a / b for a, b in zip(results[mode], ref))
        print(f"| {mode} | {med:.1f} | {med / statistics.median(ref):.0%} | {paired:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
