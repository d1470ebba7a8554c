"""Measure what decides a swarm's speed: a node's compute on the real model, and the links between nodes.

Compute is measured by running middle slices of the actual model (two sizes, so that a line through
their step times separates a fixed per-step cost from the cost per byte of weights: decoding is bound
by reading the weights), and, when the probe carries one, a last slice whose step less its blocks is
the output head's own cost (its tensor type, and so its cost per byte, often differs from the blocks').
A probe waits for the machine to be quiet and measures how much of its CPU time other processes took;
one measured beside other work is used but not trusted from the cache later, nor is one a week old.
Results are cached per device, model and thread count. Links are measured with gRPC payloads of
hidden-state size, spaced out the way pipeline steps are (a peer that has been idle answers slower
than one in a tight loop).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import __version__, cache
from .errors import BadInputError
from .gguf_file import read_gguf
from .messages import ComputeProfile, Device, Link
from .slicing import shard_info

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


# A probe counts as quiet when other processes took at most this share of its team's CPU time. On two
# cores, a coordinator that measured itself while a local swarm's nodes started recorded 0.20 ns/byte
# against 0.065-0.075 on the quiet machine; nodes starting over and over beside a probe took 30-35% of
# its team's CPU time and made it 1.4-2x slower (scripts/bench_probe.py, docs/benchmarks.md).
BUSY = 0.10
QUIET_WAIT_S = 10.0  # how long a probe waits, at most, for the machine to become quiet
QUIET_WINDOW_S = 0.3  # the window over which the machine's other load is judged before probing
PROBE_ROUNDS = 3  # rounds of decode steps and a prompt batch per shard (their median counts)
# Decode steps are spaced out the way a pipeline spaces them: a hop waits for the rest of the route
# between its steps, long enough for its OpenMP team to stop spinning and sleep, and pays the wake-up
# in its next step (a 1-layer slice on two cores: 0.01-0.03 ms more per step than back to back on the
# quiet machine, 0.15-0.2 ms on a busy one).
STEP_GAP_S = 0.001
PROBE_ATTEMPTS = 3  # probes run until one is quiet, at most this many times (the least disturbed wins)
PROFILE_MAX_AGE_S = 7 * 24 * 3600.0  # a cached profile older than this is measured again
PROFILE_FORMAT = 2  # in the cache key: bump when ComputeProfile's meaning or the probe's method changes


@dataclass(frozen=True)
class CpuSample:
    """Counters read at one moment: wall clock, this process's CPU time, busy time of its CPUs."""

    wall_s: float
    own_s: float  # CPU seconds of every thread of this process
    busy_s: float | None  # busy CPU seconds (user, system, irq, steal) of the CPUs this process may use
    cpus: int  # how many CPUs this process may use


def _allowed_cpus() -> set[int] | None:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return None


def _busy_seconds(cpus: set[int] | None) -> float | None:
    """Busy seconds since boot of these CPUs (/proc/stat), None where that cannot be read."""
    if cpus is None:
        return None
    try:
        lines = Path("/proc/stat").read_text().splitlines()
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    ticks = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            f = [int(x) for x in rest.split()]
            # user nice system idle iowait irq softirq steal ...: all but idle and iowait are busy; steal
            # is time the hypervisor gave this virtual CPU to someone else.
            ticks += sum(f[:3]) + sum(f[5:8])
    return ticks / hz if ticks else None


def cpu_sample() -> CpuSample:
    """The counters `contention` compares; read before and after a measurement."""
    cpus = _allowed_cpus()
    return CpuSample(time.perf_counter(), time.process_time(), _busy_seconds(cpus),
                     len(cpus) if cpus else (os.cpu_count() or 1))


def contention(before: CpuSample, after: CpuSample, threads: int) -> float | None:
    """Share (0..1) of a `threads`-thread team's CPU time that other processes took between two samples.

    Others' busy time beyond the CPUs the team leaves free is taken from the team: two cores, a
    2-thread team and another process using one core gives 0.5. None where the counters are unknown.
    """
    wall = after.wall_s - before.wall_s
    if before.busy_s is None or after.busy_s is None or wall <= 0:
        return None
    others = max(0.0, (after.busy_s - before.busy_s) - (after.own_s - before.own_s)) / wall  # in CPUs
    team = max(1, min(threads, after.cpus))
    return min(1.0, max(0.0, others - (after.cpus - team)) / team)


def trusted(profile: ComputeProfile, now: float, max_age_s: float = PROFILE_MAX_AGE_S, busy: float = BUSY) -> bool:
    """Whether a cached profile may be used: measured on a quiet machine, recently, and not in the future."""
    if profile.contention is not None and profile.contention > busy:
        return False
    return 0.0 < profile.measured_at <= now + 60.0 and now - profile.measured_at <= max_age_s


def weight_bytes(path: Path) -> int:
    """Bytes of a shard's transformer blocks (what a step reads)."""
    return sum(t.nbytes for t in read_gguf(path).tensors if t.name.startswith("blk."))


def head_bytes(path: Path) -> int:
    """Bytes of a shard's output head (output.weight, or the token embeddings tied to it); 0 without one."""
    if not shard_info(path).role.gives_logits:
        return 0
    sizes = {t.name: t.nbytes for t in read_gguf(path).tensors}
    return sizes.get("output.weight") or sizes.get("token_embd.weight", 0)


def _fit(sizes: Sequence[int], times: Sequence[float]) -> tuple[float, float]:
    """(overhead, per-byte) of a line through (size, time) points; never negative."""
    (b1, t1), (b2, t2) = (sizes[0], times[0]), (sizes[-1], times[-1])
    if b2 > b1 and t2 > t1:
        slope = (t2 - t1) / (b2 - b1)
        return max(0.0, t1 - slope * b1), slope
    return 0.0, t2 / b2  # noise flattened the line: charge everything per byte


def _time_shards(paths: Sequence[Path], threads: int | None, decode_steps: int,
                 prefill_tokens: int) -> list[tuple[float, float]]:
    """(seconds per decode step, seconds per prompt batch) of each shard: the median of PROBE_ROUNDS rounds.

    The shards are loaded together and take turns round by round, so that a slow spell of the machine
    (seconds long on a shared virtual machine, even with no other process busy) falls on all of them
    alike instead of bending the line through their times. A round's decode cost is the mean of its
    steps, as tokens per second are.
    """
    from .engine import Shard

    with contextlib.ExitStack() as stack:
        shards = [stack.enter_context(Shard(p, n_ctx=prefill_tokens + decode_steps + 16, n_batch=prefill_tokens,
                                            n_threads=threads)) for p in paths]
        batches = []
        for shard in shards:
            if shard.role.takes_tokens:
                batches.append(np.zeros(prefill_tokens, np.int32))  # token 0: any valid id costs the same
            else:
                batches.append(np.zeros((prefill_tokens, shard.n_embd), np.float32))
            shard.open_session("warm")
            shard.forward("warm", batches[-1][:8])
            shard.drop_session("warm")
        decode: list[list[float]] = [[] for _ in shards]
        prefill: list[list[float]] = [[] for _ in shards]
        for r in range(PROBE_ROUNDS):
            for shard, batch, dec, pre in zip(shards, batches, decode, prefill):
                shard.open_session(f"p{r}")
                t0 = time.perf_counter()
                shard.forward(f"p{r}", batch)
                pre.append(time.perf_counter() - t0)
                steps = []
                for _ in range(decode_steps):
                    time.sleep(STEP_GAP_S)
                    t = time.perf_counter()
                    shard.forward(f"p{r}", batch[:1])
                    steps.append(time.perf_counter() - t)
                dec.append(statistics.fmean(steps))
                shard.drop_session(f"p{r}")
    return [(statistics.median(d), statistics.median(p)) for d, p in zip(decode, prefill)]


def wait_quiet(threads: int, deadline: float) -> float | None:
    """Wait until other processes leave a `threads`-thread team its CPUs (or the monotonic deadline
    passes); the contention last seen, None where it cannot be measured."""
    while True:
        before = cpu_sample()
        time.sleep(QUIET_WINDOW_S)
        seen = contention(before, cpu_sample(), threads)
        if seen is None or seen <= BUSY or time.monotonic() >= deadline:
            return seen
        log.debug("waiting to probe: other processes use %.0f%% of the team's CPUs", 100 * seen)


def measure_compute(paths: Sequence[Path], threads: int | None, decode_steps: int = 24,
                    prefill_tokens: int = 128, *, quiet_wait_s: float = QUIET_WAIT_S) -> ComputeProfile:
    """Time decode steps and one prompt batch on each probe shard; fit overhead and per-byte cost.

    Shards without the output head give the line; a shard with it (a last shard) gives the head's own
    cost per byte, what remains of its step after its blocks. The probe waits (up to `quiet_wait_s`)
    for the machine to be quiet and runs again if others took more than BUSY of its CPU time.
    """
    from .engine import default_threads

    team = threads or default_threads()
    heads = [head_bytes(p) for p in paths]
    if all(heads):
        raise BadInputError("a probe needs at least one shard without the output head (a middle slice)")
    plain = [i for i, h in enumerate(heads) if not h]
    deadline = time.monotonic() + quiet_wait_s
    best: tuple[list[tuple[float, float]], float | None] | None = None
    for attempt in range(PROBE_ATTEMPTS):
        wait_quiet(team, deadline)
        before = cpu_sample()
        # The middle slices together; a slice with the head (large) on its own, after them.
        got = dict(zip(plain, _time_shards([paths[i] for i in plain], threads, decode_steps, prefill_tokens)))
        got.update({i: _time_shards([paths[i]], threads, decode_steps, prefill_tokens)[0]
                    for i, h in enumerate(heads) if h})
        times = [got[i] for i in range(len(paths))]
        seen = contention(before, cpu_sample(), team)
        if best is None or (seen is not None and (best[1] is None or seen < best[1])):
            best = (times, seen)
        if seen is None or seen <= BUSY or time.monotonic() >= deadline:
            break
        log.info("probe %d disturbed: other processes took %.0f%% of its CPU time; measuring again",
                 attempt + 1, 100 * seen)
    times, seen = best
    sizes = [weight_bytes(paths[i]) for i in plain]
    overhead, per_byte = _fit(sizes, [times[i][0] for i in plain])
    _, prefill_per_byte = _fit(sizes, [times[i][1] for i in plain])
    head_rates = []
    for i, h in enumerate(heads):
        if h:
            # What the head adds to a step: the step less what its blocks cost by the line. A noisy
            # line could leave nothing; a tenth of the blocks' rate is a floor, not a measurement.
            rest = times[i][0] - overhead - per_byte * weight_bytes(paths[i])
            head_rates.append(max(rest / h, 0.1 * per_byte))
    profile = ComputeProfile(per_byte, prefill_per_byte / prefill_tokens, overhead,
                             statistics.median(head_rates) if head_rates else None, seen, time.time())
    log.info("probe: %.3f ns/byte decode%s, %.2f ms per step%s", 1e9 * per_byte,
             f", output head {1e9 * profile.head_s_per_byte:.3f} ns/byte" if head_rates else "",
             1e3 * overhead, "" if seen is None else f"; others took {100 * seen:.0f}% of its CPU time")
    return profile


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
    """A node's compute profile for these probe shards, threads and device, from the cache unless `refresh`
    or the cached one is not `trusted` (measured on a busy machine, or too long ago)."""
    key = hashlib.sha256(json.dumps([PROFILE_FORMAT, list(shard_ids), threads, list(params), machine_fingerprint(),
                                     __version__]).encode()).hexdigest()[:24]
    path = cache.subdir("profiles") / f"{key}.json"
    if not refresh:
        try:
            cached = ComputeProfile(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            cached = None
        if cached is not None:
            if trusted(cached, time.time()):
                return cached, True
            log.info("measuring again: the cached profile was measured %s", "while other processes took "
                     f"{100 * cached.contention:.0f}% of its CPU time" if (cached.contention or 0) > BUSY
                     else f"{(time.time() - cached.measured_at) / 86400:.1f} days ago")
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
