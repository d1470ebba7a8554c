#!/usr/bin/env python3
"""A TCP relay that adds a fixed delay in each direction: a stand-in for a long network path.

It listens at one address and, for each connection it accepts, dials the target and copies bytes both
ways, holding every chunk for DELAY ms before passing it on. Each direction has a queue of
(due time, chunk): the reader keeps reading while earlier chunks wait, so the delay adds latency but
does not cut throughput to one chunk per delay, and chunks leave in the order they came.

A process is given the relay's address instead of the target's, e.g. a node told to reach its
coordinator through the relay. Run it where the listening address lives, e.g. in a network namespace:

    ip netns exec NS python3 scripts/delay_relay.py --listen 10.0.0.1:0 --to 10.0.0.2:7700 --delay-ms 20

It prints `listening HOST:PORT` (the port chosen if 0 was asked) once it accepts connections, and runs
until killed. Tests and benchmarks can also import `DelayRelay` and run it in their own process.
"""

from __future__ import annotations

import argparse
import queue
import socket
import sys
import threading
import time

CHUNK = 65536
QUEUED_CHUNKS = 512  # per direction: the reader waits when this many chunks are held


def split_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


class DelayRelay:
    """Listens at `listen` and relays each connection to `target`, each direction delayed by `delay_ms`."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], delay_ms: float):
        self.target = target
        self.delay = delay_ms / 1000.0
        self.server = socket.create_server(listen)
        self.address = self.server.getsockname()[:2]
        self._closed = False

    def serve_forever(self) -> None:
        """Accept connections until `close`; each gets its own pair of pumps."""
        while not self._closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def start(self) -> DelayRelay:
        """Serve in a background thread (for use inside a test or benchmark process)."""
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def close(self) -> None:
        self._closed = True
        try:
            self.server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.server.close()

    def _connect(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=10)
            upstream.settimeout(None)
        except OSError:
            client.close()
            return
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        done = threading.Barrier(2, action=lambda: (client.close(), upstream.close()))
        for src, dst in ((client, upstream), (upstream, client)):
            held: queue.Queue = queue.Queue(QUEUED_CHUNKS)
            threading.Thread(target=self._read, args=(src, dst, held), daemon=True).start()
            threading.Thread(target=self._write, args=(dst, src, held, done), daemon=True).start()

    def _read(self, src: socket.socket, dst: socket.socket, held: queue.Queue) -> None:
        """Stamp each chunk read from `src` with its due time; an empty chunk stands for the end."""
        while True:
            try:
                data = src.recv(CHUNK)
            except OSError:
                data = b""
            held.put((time.monotonic() + self.delay, data))
            if not data:
                return

    def _write(self, dst: socket.socket, src: socket.socket, held: queue.Queue, done: threading.Barrier) -> None:
        """Send each chunk to `dst` when it falls due; at the end, pass the half-close on. Once a send fails,
        both sockets are shut (which ends both readers) and what is still queued is dropped."""
        broken = False
        while True:
            due, data = held.get()
            if not broken:
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                try:
                    if data:
                        dst.sendall(data)
                    else:
                        dst.shutdown(socket.SHUT_WR)
                except OSError:
                    broken = True
                    for s in (src, dst):
                        try:
                            s.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
            if not data:
                break
        try:
            done.wait()  # the second direction to finish closes both sockets
        except threading.BrokenBarrierError:
            pass


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", required=True, help="HOST:PORT to accept connections at (port 0: any free)")
    ap.add_argument("--to", required=True, help="HOST:PORT to relay each connection to")
    ap.add_argument("--delay-ms", type=float, required=True, help="added delay in each direction")
    args = ap.parse_args(argv)
    relay = DelayRelay(split_address(args.listen), split_address(args.to), args.delay_ms)
    print("listening %s:%d" % relay.address, flush=True)
    relay.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
