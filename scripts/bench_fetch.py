"""Time for a node to get its shard: from the coordinator over a capped uplink, or by Range requests from the model's URL.

Both sides run on this machine. The coordinator's side is the real transfer code (`transfer.fetch_shard`
reading `iter_chunks`) with each 1 MiB chunk held back to the uplink's rate (`--uplink-mbit`); the URL side
is `rangefetch.fetch_from_url` against a local threaded HTTP server with Range support, throttled to
`--url-mbit` (0: no cap). Each round starts from an empty node cache. Prints a Markdown table of medians.

    python scripts/bench_fetch.py [--rounds 3] [--layers 9:18] [--uplink-mbit 100] [--url-mbit 0]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swarm import rangefetch  # noqa: E402
from swarm.cache import file_digest  # noqa: E402
from swarm.layers import LayerRange  # noqa: E402
from swarm.messages import ShardSpec  # noqa: E402
from swarm.models import gemma_path  # noqa: E402
from swarm.slicing import slice_model  # noqa: E402
from swarm.transfer import fetch_shard, iter_chunks  # noqa: E402
from tests.test_range_fetch import Handler, RangeServer  # noqa: E402


class Throttled:
    """Sleep so that bytes passed through `take` never run ahead of `mbit`."""

    def __init__(self, mbit: float):
        self.rate = mbit * 1e6 / 8 if mbit else 0.0
        self.t0, self.sent = time.monotonic(), 0

    def take(self, n: int) -> None:
        self.sent += n
        if self.rate:
            ahead = self.sent / self.rate - (time.monotonic() - self.t0)
            if ahead > 0:
                time.sleep(ahead)


class CappedHandler(Handler):
    def setup(self):
        super().setup()
        if not self.server.mbit:
            return
        cap = Throttled(self.server.mbit)
        raw = self.wfile

        class W:
            closed = False

            def write(self, b):
                for i in range(0, len(b), 65536):
                    cap.take(len(b[i:i + 65536]))
                    raw.write(b[i:i + 65536])

            def flush(self):
                raw.flush()

        self.wfile = W()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", default="9:18")
    ap.add_argument("--uplink-mbit", type=float, default=100.0)
    ap.add_argument("--url-mbit", type=float, default=0.0)
    args = ap.parse_args()
    model = gemma_path()
    layers = LayerRange.parse(args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shard = slice_model(model, layers, tmp / "coord")
        spec = ShardSpec(shard.shard_id, shard.path.name, shard.path.stat().st_size, file_digest(shard.path),
                         layers, shard.n_layer_total)
        srv = RangeServer(model)
        srv.RequestHandlerClass, srv.mbit = CappedHandler, args.url_mbit

        def from_coordinator(dest: Path) -> None:
            cap = Throttled(args.uplink_mbit)

            def fetch(_sid, offset):
                for chunk in iter_chunks(shard.path, offset):
                    cap.take(len(chunk.data))
                    yield chunk
            fetch_shard(fetch, spec, dest, progress=False)

        times: dict[str, list[float]] = {"coordinator": [], "url": []}
        for r in range(args.rounds):
            for name, run in (("coordinator", from_coordinator),
                              ("url", lambda d: rangefetch.fetch_from_url(srv.url, spec, d, progress=False))):
                dest = tmp / f"{name}{r}"
                t0 = time.perf_counter()
                run(dest)
                times[name].append(time.perf_counter() - t0)
                assert file_digest(dest / spec.file_name) == spec.sha256
        srv.shutdown()
    mb = spec.size / 1e6
    url_cap = f"{args.url_mbit:g} Mbit/s" if args.url_mbit else "uncapped (loopback)"
    print(f"shard {spec.file_name} (layers {layers}, {mb:.1f} MB), {args.rounds} rounds, medians\n")
    print("| source | link | time (s) | MB/s |")
    print("|---|---|---|---|")
    for name, link in (("coordinator (FetchShard code)", f"{args.uplink_mbit:g} Mbit/s"), ("model URL (Range)", url_cap)):
        t = statistics.median(times["coordinator" if name.startswith("coord") else "url"])
        print(f"| {name} | {link} | {t:.2f} | {mb / t:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
