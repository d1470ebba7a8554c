"""Measure what decides a swarm's speed: a node's compute on the real model, and the links between nodes.

Compute is measured by running middle slices of the actual model (two sizes, so that a line through
their step times separates a fixed per-step cost from the cost per byte of weights: decoding is bound
by reading the weights). Results are cached per device, model and thread count. Links are measured with
gRPC payloads of hidden-state size, spaced out the way pipeline steps are (a peer that has been idle
answers slower than one in a tight loop).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import platform
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import __version__, cache
from .gguf_file import read_gguf
from .messages import ComputeProfile, Device, Link

log = logging.getLogger(__name__)

_DEV_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}


def devices() -> list[Device]:
    """The devices this build of llama.cpp can use, with their memory (llama.cpp's device API)."""
    try:
        from .engine.backend import _llama

        llama_cpp = _llama()  # loads the backends (first: it sets up the OpenMP runtime before loading it)
        libdir = Path(llama_cpp.__file__).parent / "lib"
        found = sorted(libdir.glob("libggml.so")) + sorted(libdir.glob("libggml.dylib")) + sorted(libdir.glob("ggml.dll"))
        if not found:
            log.debug("no ggml library in %s; no device list", libdir)
            return []
        lib = ctypes.CDLL(str(found[0]))
        lib.ggml_backend_dev_count.restype = ctypes.c_size_t
        lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
        lib.ggml_backend_dev_get.restype = ctypes.c_void_p
        lib.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
        lib.ggml_backend_dev_name.restype = ctypes.c_char_p
        lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
        lib.ggml_backend_dev_type.restype = ctypes.c_int
        lib.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                                ctypes.POINTER(ctypes.c_size_t)]
        out = []
        for i in range(lib.ggml_backend_dev_count()):
            dev = lib.ggml_backend_dev_get(i)
            free, total = ctypes.c_size_t(), ctypes.c_size_t()
            lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
            out.append(Device(name=(lib.ggml_backend_dev_name(dev) or b"").decode(errors="replace"),
                              type=_DEV_TYPES.get(lib.ggml_backend_dev_type(dev), "other"),
                              memory_free=free.value, memory_total=total.value))
        return out
    except (OSError, AttributeError) as e:  # an unusual build: report no devices rather than fail to join
        log.debug("device list unavailable: %s", e)
        return []


def weight_bytes(path: Path) -> int:
    """Bytes of a shard's transformer blocks (what a step reads)."""
    return sum(t.nbytes for t in read_gguf(path).tensors if t.name.startswith("blk."))


def _fit(sizes: Sequence[int], times: Sequence[float]) -> tuple[float, float]:
    """(overhead, per-byte) of a line through (size, time) points; never negative."""
    (b1, t1), (b2, t2) = (sizes[0], times[0]), (sizes[-1], times[-1])
    if b2 > b1 and t2 > t1:
        slope = (t2 - t1) / (b2 - b1)
        return max(0.0, t1 - slope * b1), slope
    return 0.0, t2 / b2  # noise flattened the line: charge everything per byte


def measure_compute(paths: Sequence[Path], threads: int | None, decode_steps: int = 24,
                    prefill_tokens: int = 128) -> ComputeProfile:
    """Time decode steps and one prompt batch on each probe shard; fit overhead and per-byte cost."""
    from .engine import Shard

    sizes, decode, prefill = [], [], []
    for path in paths:
        with Shard(path, n_ctx=prefill_tokens + decode_steps + 16, n_batch=prefill_tokens,
                   n_threads=threads) as shard:
            zeros = np.zeros((prefill_tokens, shard.n_embd), np.float32)
            shard.open_session("warm")
            shard.forward("warm", zeros[:8])
            shard.drop_session("warm")
            # Two rounds, keeping the faster: a burst of other load on the machine (a shared host,
            # another node starting) should not be mistaken for this node's speed.
            rounds_prefill, rounds_decode = [], []
            for r in range(2):
                shard.open_session(f"p{r}")
                t0 = time.perf_counter()
                shard.forward(f"p{r}", zeros)
                rounds_prefill.append(time.perf_counter() - t0)
                steps = []
                for _ in range(decode_steps):
                    t = time.perf_counter()
                    shard.forward(f"p{r}", zeros[:1])
                    steps.append(time.perf_counter() - t)
                rounds_decode.append(statistics.median(steps))
                shard.drop_session(f"p{r}")
            prefill.append(min(rounds_prefill))
            decode.append(min(rounds_decode))
        sizes.append(weight_bytes(path))
    overhead, per_byte = _fit(sizes, decode)
    _, prefill_per_byte = _fit(sizes, prefill)
    return ComputeProfile(per_byte, prefill_per_byte / prefill_tokens, overhead)


def machine_fingerprint() -> str:
    """What identifies this device's speed: CPU model and count, and llama.cpp's devices."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    devs = [(d.name, d.type, d.memory_total) for d in devices()]
    return json.dumps([cpu, os.cpu_count(), devs])


def cached_compute(shard_ids: Sequence[str], threads: int, measure: Callable[[], ComputeProfile],
                   refresh: bool = False, params: tuple = ()) -> tuple[ComputeProfile, bool]:
    """A node's compute profile for these probe shards, threads and device, from the cache unless `refresh`."""
    key = hashlib.sha256(json.dumps(
        [list(shard_ids), threads, list(params), machine_fingerprint(), __version__]).encode()).hexdigest()[:24]
    path = cache.subdir("profiles") / f"{key}.json"
    if not refresh:
        try:
            return ComputeProfile(**json.loads(path.read_text())), True
        except (OSError, ValueError, TypeError):
            pass
    profile = measure()
    cache.atomic_write_text(path, json.dumps(asdict(profile)))
    return profile, False


def measure_link(ping: Callable[[bytes, int], object], hidden_bytes: int, count: int = 8,
                 gap_s: float = 0.01, bulk_bytes: int = 1 << 20) -> Link:  # ~3 MiB sent in all
    """Round trip with a hidden-state payload and bandwidth in bytes/s of one link, over `ping(payload,
    reply_bytes)` calls."""
    small = bytes(hidden_bytes)
    ping(small, 8)  # connect
    rtts = []
    for _ in range(count):
        time.sleep(gap_s)  # a pipeline peer has been idle while the other shards computed
        t = time.perf_counter()
        ping(small, 8)
        rtts.append(time.perf_counter() - t)
    rtt = statistics.median(rtts)
    big = bytes(bulk_bytes)
    bulk = []
    for _ in range(3):
        t = time.perf_counter()
        ping(big, 8)
        bulk.append(time.perf_counter() - t)
    transfer = max(statistics.median(bulk) - rtt, 1e-6)
    return Link(rtt, bulk_bytes / transfer)
