"""Fuzzing the byte formats: KV blobs and deltas (swarm/engine/kvblob.py, swarm/kvstate.py) and GGUF headers
(swarm/gguf_file.py). Shared by tests/test_fuzz_files.py and scripts/fuzz.py.

A damaged or forged input must raise the format's own error (KVStateError, ModelFileError) quickly and
without a large allocation; a KV blob the Python checks let through is imported into llama.cpp only in a
child process (`ImportWorker`), so a crash there is seen as the child's death, not ours.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

from swarm import kvstate
from swarm.engine.kvblob import _pack_kv, _parse_kv_blob, join_kv, kv_header
from swarm.errors import KVStateError, ModelFileError
from swarm.gguf_file import _Cursor, _parse

N_CTX, MAX_SESSIONS = 128, 2
SLOW_S = 2.0  # a parse of these small inputs takes milliseconds; this long is a hang
MAX_ALLOC = 32 << 20  # bytes a parse of a small input may allocate at its peak


def kv_material(model: Path) -> dict:
    """Real blobs from the tiny model: a full state, the delta after it, and both payloads."""
    from swarm.engine import Shard

    with Shard(model, n_ctx=N_CTX, max_sessions=MAX_SESSIONS, n_batch=64) as shard:
        shard.open_session("a")
        shard.forward("a", [1, 5, 9, 14, 20, 27])
        full, _, base = shard.checkpoint_kv("a")
        shard.forward("a", [33, 40, 41])
        delta, _, _ = shard.checkpoint_kv("a", base)
        shard_id = shard.info.shard_id
    return {"full": full, "delta": delta, "full_payload": _parse_kv_blob(full)[1],
            "delta_payload": _parse_kv_blob(delta)[1], "shard_id": shard_id}


def forge(blob_head: dict, payload: bytes, head_edits: dict | None = None) -> bytes:
    """A blob with a correct checksum around any payload: what a peer holding the key can send."""
    head = {k: v for k, v in blob_head.items() if k != "sha256"}
    head.update(head_edits or {})
    return _pack_kv(head, payload)


def shift_positions(payload: bytes, stream: int, by: int) -> bytes:
    """The state with every cell of one stream moved `by` positions (still consecutive: past the checks that
    single edits trip)."""
    try:
        lay = kvstate.layout(payload)
    except KVStateError:
        return payload  # (damaged already: nothing to shift)
    streams = [s for c in lay.caches for s in c if s.cells and s.uniform]
    if not streams:
        return payload
    s = streams[stream % len(streams)]
    out = bytearray(payload)
    for i in range(s.cells):
        at = s.meta[0] + 12 * i
        (p,) = struct.unpack_from("<i", out, at)
        struct.pack_into("<i", out, at, max(-(1 << 31), min((1 << 31) - 1, p + by)))
    return bytes(out)


def bounded(fn, *args):
    """Run a parser: (result or the exception it raised, seconds, peak bytes allocated)."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        out = fn(*args)
    except Exception as e:  # judged by the caller
        out = e
    finally:
        took = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return out, took, peak


def check(out, took: float, peak: float, allowed: type, limit: int = MAX_ALLOC) -> str | None:
    """What is wrong with one parse, or None: only `allowed` may be raised, quickly and within `limit`."""
    if isinstance(out, Exception) and not isinstance(out, allowed):
        return f"{type(out).__name__}: {out}"
    if took > SLOW_S:
        return f"took {took:.1f} s"
    if peak > limit:
        return f"allocated {peak >> 20} MB"
    return None


def kv_checks(material: dict, payload: bytes, which: str) -> list[str]:
    """Every KV parser on a damaged `payload` (a mutated full state or delta): the problems found."""
    problems = []
    head = _parse_kv_blob(material["full"])[0]
    dhead = _parse_kv_blob(material["delta"])[0]
    limit = MAX_ALLOC + 8 * len(payload)
    if which == "blob":  # the whole envelope, checksum and all
        for fn in (kv_header, lambda b: kv_header(b, True), lambda b: join_kv([b]),
                   lambda b: join_kv([material["full"], b]), lambda b: join_kv([b, material["delta"]])):
            problems.append(check(*bounded(fn, payload), KVStateError, limit))
    elif which == "full":  # a forged full state: its layout, then as the base of a chain
        problems.append(check(*bounded(kvstate.layout, payload), KVStateError, limit))
        problems.append(check(*bounded(_fill, payload, head["n_past"]), KVStateError, limit))
        problems.append(check(*bounded(join_kv, [forge(head, payload), material["delta"]]), KVStateError, limit))
    else:  # a forged delta on the real full state
        problems.append(check(*bounded(join_kv, [material["full"], forge(dhead, payload)]), KVStateError, limit))
    return [p for p in problems if p]


def kv_fields(payload: bytes) -> list[int]:
    """Offsets of a state's counts, positions, sequence ids and layer headers (where edits hurt most)."""
    lay = kvstate.layout(payload)
    out, at = [], len(lay.prefix)
    for streams in lay.caches:
        out.append(at)  # stream count
        for s in streams:
            out.append(s.meta[0] - 4)  # cell count
            out += list(range(s.meta[0], s.meta[1], 4))[:48]  # positions, id counts, sequence ids
            out += [s.meta[1], s.meta[1] + 4]  # v_trans, layer count
            for b in s.blocks:
                out += [b.at - len(b.head) + k for k in range(0, len(b.head), 4)]
            at = (s.blocks[-1].at + s.blocks[-1].rows * s.cells * s.blocks[-1].width) if s.blocks else s.meta[1] + 8
    return out


def _fill(payload: bytes, n_past: int):
    return kvstate.fill_window(payload, kvstate.layout(payload), n_past)


HEAD_EDITS = {"n_past": [-1, 0, 1, 7, 129, 1 << 40, "7", None, 2.5, True], "layers": [[0], [0, 1, 2], ["a", "b"], [-4, 99]],
              "shard_id": ["", "x", 7], "max_sessions": [0, 1, 2, -1, True, "2"], "flash_attn": [1, "no", None],
              "n_ctx": [0, -5, 1 << 62], "base": [0, 6, -1, "6", None], "lineage": ["", 3]}


# ---------------------------------------------------------------- KV blobs into llama.cpp, in a child


class ImportWorker:
    """A child process that imports blobs into a shard of `model` (what a node does with ImportKV) and says
    what happened to each: 'ok', or the error's type and message. Its death is a crash."""

    def __init__(self, model: Path):
        self.model = model
        self._start()

    def _start(self) -> None:
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
        self.p = subprocess.Popen([sys.executable, __file__, "import-worker", str(self.model)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)

    def load(self, blob: bytes, timeout: float = 20.0) -> str:
        """'ok', 'KVStateError: ...' and so on; 'crash: ...' when the child died (it is started again)."""
        try:
            self.p.stdin.write(struct.pack("<Q", len(blob)) + blob)
            self.p.stdin.flush()
            line = self.p.stdout.readline().decode()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            try:
                code = self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                code = "hang"
            self._start()
            return f"crash: the importing process ended ({code})"
        return line.strip()

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(10)


def _serve_imports(model: str) -> None:
    from swarm.engine import Shard
    from swarm.errors import SwarmError

    shard = Shard(model, n_ctx=N_CTX, max_sessions=MAX_SESSIONS, n_batch=64)
    src, out = sys.stdin.buffer, sys.stdout
    while True:
        head = src.read(8)
        if len(head) < 8:
            return
        blob = src.read(struct.unpack("<Q", head)[0])
        try:
            shard.import_kv("a", blob)
            shard.forward("a", [3])  # and the session still computes
            answer = "ok"
        except SwarmError as e:
            answer = f"{type(e).__name__}: {e}"
        except Exception as e:  # noqa: BLE001 - reported, judged by the parent
            answer = f"BUG {type(e).__name__}: {e}"
        try:
            shard.drop_session("a")
        except Exception as e:  # noqa: BLE001
            answer += f"; BUG dropping the session afterwards: {type(e).__name__}: {e}"
        left = [shard._llama.llama_memory_seq_pos_max(shard._mem, seq) + 1 for seq in range(MAX_SESSIONS)]
        if any(left):  # nothing of a refused or dropped state may stay in the cache
            answer += f"; BUG the cache still holds {left} positions per sequence after the session was dropped"
        out.write(answer.replace("\n", " ") + "\n")
        out.flush()


# ---------------------------------------------------------------- GGUF headers


def gguf_material(model: Path) -> tuple[bytes, int]:
    """A real model file's bytes and where its tensor data starts (the header is what gets mutated)."""
    data = model.read_bytes()
    return data, _parse(_Cursor(data, model), model, len(data)).data_start


def gguf_check(data: bytes) -> str | None:
    """read_gguf's parser on `data`: a ModelFileError or a result, fast. What it allocates follows the bytes
    really there: a file it refuses costs at most 1 MB and 8 times the input (a string that claims most of
    the file is copied and decoded, up to 4 bytes a character, before the next field is found wrong); one it
    reads, what its values take as Python objects. A count checked only against the whole file (an 8-byte
    index per claimed string) is pinned by its own test in test_fuzz_files.py."""
    path = Path("fuzzed.gguf")
    out, took, peak = bounded(lambda: _parse(_Cursor(data, path), path, len(data)))
    limit = (1 << 20) + 8 * len(data) if isinstance(out, Exception) else MAX_ALLOC + 48 * len(data)
    return check(out, took, peak, ModelFileError, limit)


_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_fields(data: bytes) -> list[int]:
    """Offsets of the header's counts and lengths (of its metadata), where a huge value hurts most."""
    out = [8, 16]  # tensor count, metadata count
    at = 24
    (n_kv,) = struct.unpack_from("<Q", data, 16)
    for _ in range(n_kv):
        out.append(at)  # key length
        at += 8 + struct.unpack_from("<Q", data, at)[0]
        (t,) = struct.unpack_from("<I", data, at)
        at += 4
        if t == 8:  # a string
            out.append(at)
            at += 8 + struct.unpack_from("<Q", data, at)[0]
        elif t == 9:  # an array: item type, count, items
            item, count = struct.unpack_from("<IQ", data, at)
            out += [at, at + 4]
            at += 12
            if item == 8:
                for i in range(count):
                    if i < 4:
                        out.append(at)
                    at += 8 + struct.unpack_from("<Q", data, at)[0]
            else:
                at += _SIZES[item] * count
        else:
            at += _SIZES[t]
    return out


if __name__ == "__main__" and sys.argv[1:2] == ["import-worker"]:
    _serve_imports(sys.argv[2])
