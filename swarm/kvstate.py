"""llama.cpp's per-sequence KV state, cut by cells: what lets a checkpoint carry only what is new.

`llama_state_seq_get_data` writes one sequence's cache as: an 8-byte tag, then for each cache of the
model (two for interleaved sliding-window models such as Gemma 3: the full-attention layers' and the
window layers'), the number of streams and for each stream its cell count, then per cell its position
and sequence ids, then per layer the K rows of those cells (`type, row size, rows`) and the V values:
rows as well, or, when V is stored transposed (flash attention off), for each of the layer's V
components the values of those cells (`type, element size, components, values`).

A session's cells keep their data once written (nothing here shifts positions), and a window cache drops
its oldest cells as new ones come, so a later state of the same session is an earlier one minus some
cells plus some new ones. `delta` writes just that: the positions the later state holds, in its order
(as runs of consecutive positions), and the new cells as a state of the same layout; `apply` puts a
state and its deltas back together, byte for byte what llama.cpp exported at the end. Both check the
layout (types, sizes, layer counts, which cells exist) and raise KVStateError on anything that does not
fit, so damaged bytes never reach llama.cpp.

Pure bytes and numpy; nothing here talks to llama.cpp.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from .errors import KVStateError

_U32, _I32, _U64 = struct.Struct("<I"), struct.Struct("<i"), struct.Struct("<Q")
_MAX_SEQ_IDS = 1 << 16  # per cell; llama.cpp has at most a few hundred sequences


@dataclass(frozen=True)
class _Block:
    """One layer's K or V data in one stream: `head` (type and sizes, verbatim) and the data laid out as
    `rows` x (cells x `width`) bytes: one row for K and untransposed V, one per component when transposed."""

    head: bytes
    at: int  # where the data starts
    rows: int
    width: int  # bytes per cell in each row


@dataclass(frozen=True)
class _Stream:
    cells: int
    meta: tuple[int, int]  # (start, end) of the cells' positions and sequence ids
    tag: bytes  # v_trans and the layer count, verbatim
    blocks: tuple[_Block, ...]
    uniform: bool = True  # every cell belongs to exactly one sequence: 12 bytes of meta each


@dataclass(frozen=True)
class Layout:
    """Where everything sits in one exported state."""

    prefix: bytes
    caches: tuple[tuple[_Stream, ...], ...]
    size: int

    @property
    def cells(self) -> tuple[int, ...]:
        """Cell count of every stream, in order."""
        return tuple(s.cells for streams in self.caches for s in streams)


class _Reader:
    def __init__(self, data):
        self.data, self.at = memoryview(data), 0

    def take(self, fmt: struct.Struct) -> int:
        if self.at + fmt.size > len(self.data):
            raise KVStateError("KV state is truncated (it ends inside a header); export it again")
        (value,) = fmt.unpack_from(self.data, self.at)
        self.at += fmt.size
        return value

    def skip(self, n: int) -> int:
        start = self.at
        if n < 0 or start + n > len(self.data):
            raise KVStateError("KV state is truncated (its data runs past the end); export it again")
        self.at += n
        return start


def layout(payload) -> Layout:
    """Parse an exported sequence state (llama.cpp's bytes, without the swarm header)."""
    r = _Reader(payload)
    if len(r.data) == 0:
        return Layout(b"", (), 0)
    prefix = bytes(r.data[r.skip(8):8])
    caches = []
    while r.at < len(r.data):
        n_stream = r.take(_U32)
        if not 1 <= n_stream <= 4096:
            raise KVStateError(f"KV state names {n_stream} streams; it is damaged or from another llama.cpp")
        streams = []
        for _ in range(n_stream):
            cells = r.take(_U32)
            if cells == 0:
                streams.append(_Stream(0, (r.at, r.at), b"", ()))
                continue
            start = r.at
            uniform = _uniform(r.data, start, cells)
            if uniform:  # the usual case, checked in one go: (position, 1, sequence id) per cell
                r.skip(12 * cells)
            else:
                for _ in range(cells):
                    r.take(_I32)
                    n_ids = r.take(_U32)
                    if n_ids > _MAX_SEQ_IDS:
                        raise KVStateError("KV state has a cell with too many sequence ids; it is damaged")
                    r.skip(4 * n_ids)
            meta = (start, r.at)
            tag_at = r.skip(8)
            v_trans, n_layer = struct.unpack_from("<II", r.data, tag_at)
            if v_trans > 1 or n_layer > 4096:
                raise KVStateError("KV state header is damaged (layer count or V layout out of range)")
            blocks = []
            for _ in range(n_layer):  # K: type, row size, then one row per cell
                head_at = r.at
                r.take(_I32)
                row = r.take(_U64)
                blocks.append(_Block(bytes(r.data[head_at:r.at]), r.skip(_checked(row * cells)), 1, row))
            for _ in range(n_layer):
                head_at = r.at
                r.take(_I32)
                if v_trans:  # type, element size, components; then per component a value per cell
                    el = r.take(_U32)
                    comps = r.take(_U32)
                    blocks.append(_Block(bytes(r.data[head_at:r.at]), r.skip(_checked(el * comps * cells)), comps, el))
                else:
                    row = r.take(_U64)
                    blocks.append(_Block(bytes(r.data[head_at:r.at]), r.skip(_checked(row * cells)), 1, row))
            streams.append(_Stream(cells, meta, bytes(r.data[tag_at:tag_at + 8]), tuple(blocks), uniform))
        caches.append(tuple(streams))
    return Layout(prefix, tuple(caches), len(r.data))


def _uniform(data: memoryview, at: int, cells: int) -> bool:
    """Whether every one of `cells` cells from `at` names exactly one sequence. If the first does, the
    second starts 12 bytes on, and so on: reading every 12th word finds out without walking them."""
    if at + 12 * cells > len(data):
        return False
    return bool(np.all(np.frombuffer(data, "<u4", 3 * cells, at)[1::3] == 1))


def _checked(n: int) -> int:
    if n > 1 << 40:
        raise KVStateError("KV state header is damaged (a block larger than 1 TB)")
    return n


def positions(payload, lay: Layout) -> list[np.ndarray] | None:
    """Each stream's cell positions in export order; None unless every cell names exactly one sequence."""
    if not all(s.uniform for streams in lay.caches for s in streams):
        return None
    return [np.frombuffer(payload, "<i4", 3 * s.cells, s.meta[0])[0::3].copy() for streams in lay.caches
            for s in streams]


def _pick(parts: list[tuple[memoryview, Layout]], picks: list[np.ndarray], prefix: bytes) -> bytes:
    """A state in the layout of `parts` holding, per stream, the cells `picks[i]` indexes in the cells of
    all parts laid end to end."""
    out = [prefix]
    base = parts[0][1]
    i = 0
    for c, streams in enumerate(base.caches):
        out.append(_U32.pack(len(streams)))
        for k in range(len(streams)):
            pick = picks[i]
            i += 1
            out.append(_U32.pack(len(pick)))
            if not len(pick):
                continue
            pieces = [(data, lay.caches[c][k]) for data, lay in parts if lay.caches[c][k].cells]
            first = pieces[0][1]
            for _, s in pieces[1:]:
                if s.tag != first.tag or [(b.head, b.rows, b.width) for b in s.blocks] != [
                        (b.head, b.rows, b.width) for b in first.blocks]:
                    raise KVStateError("these KV states do not fit together (layer types or sizes differ); "
                                       "take a full checkpoint again")
            meta = _joined([np.frombuffer(d, np.uint8, 12 * s.cells, s.meta[0]).reshape(s.cells, 12)
                            for d, s in pieces], axis=0)
            out.append(meta[pick])
            out.append(first.tag)
            for j, b in enumerate(first.blocks):
                out.append(b.head)
                cells = _joined([np.frombuffer(d, np.uint8, b.rows * s.cells * b.width, s.blocks[j].at)
                                 .reshape(b.rows, s.cells, b.width) for d, s in pieces], axis=1)
                out.append(np.ascontiguousarray(cells[:, pick, :]))
    return b"".join(out)


def _joined(arrays: list[np.ndarray], axis: int) -> np.ndarray:
    """The arrays laid end to end; a single one as it is (a delta reads one state: no copy of it)."""
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=axis)


def _parts(payloads: list) -> list[tuple[memoryview, Layout]]:
    parts = [(memoryview(p), layout(p)) for p in payloads]
    first = parts[0][1]
    for _, lay in parts:  # (a stream without cells has no layer headers: those are compared in _pick)
        if lay.prefix != first.prefix or [len(c) for c in lay.caches] != [len(c) for c in first.caches]:
            raise KVStateError("these KV states do not fit together (another model, shard or layout); "
                               "take a full checkpoint again")
        if any(not s.uniform for c in lay.caches for s in c):
            raise KVStateError("KV state pieces must hold cells of one sequence each")
    return parts


def delta(payload, lay: Layout, base: list[np.ndarray]) -> bytes:
    """What a later state adds to an earlier one whose streams held the cells at `base` positions: every
    stream's positions in order, then (as a state of the same layout) the cells that are new."""
    now = positions(payload, lay)
    if now is None or len(now) != len(base):
        raise KVStateError("this KV state cannot be taken as a delta (its cells are shared between sequences)")
    picks = [np.flatnonzero(~np.isin(p, b)) for p, b in zip(now, base)]
    head = [_U32.pack(len(now))]
    for p in now:  # as runs of consecutive positions (usually one per stream)
        cut = np.flatnonzero(np.diff(p) != 1) + 1
        starts, ends = np.concatenate(([0], cut)), np.concatenate((cut, [len(p)]))
        runs = np.stack([p[starts], ends - starts], axis=1).astype("<i4") if len(p) else np.zeros((0, 2), "<i4")
        head.append(_U32.pack(len(runs)) + runs.tobytes())
    return b"".join(head) + _pick([(memoryview(payload), lay)], picks, lay.prefix)


def apply(full, deltas: list) -> bytes:
    """The state after `deltas` (each from `delta`, in order), starting from the state `full`."""
    if not deltas:
        return bytes(full)
    payloads, order = [full], None
    for d in deltas:
        r = _Reader(d)
        order = []
        for _ in range(r.take(_U32)):
            n = r.take(_U32)
            order.append(np.frombuffer(r.data, "<i4", 2 * n, r.skip(8 * n)).reshape(n, 2).astype(np.int64))
        payloads.append(r.data[r.at:])
    parts = _parts(payloads)
    if not parts[0][1].size or len(order) != len(parts[0][1].cells):
        raise KVStateError("a KV delta does not match its base's streams; take a full checkpoint again")
    held = [positions(d, lay) for d, lay in parts]
    picks = []
    for i, runs in enumerate(order):
        have = np.concatenate([h[i] for h in held])
        if np.any(runs[:, 1] < 0) or runs[:, 1].sum() > len(have):
            raise KVStateError("a KV delta names more cells than the pieces hold; take a full checkpoint again")
        want = np.concatenate([np.arange(a, a + k) for a, k in runs]) if len(runs) else np.zeros(0, np.int64)
        if len(np.unique(want)) != len(want):
            raise KVStateError("a KV delta names more cells than the pieces hold, or one cell twice; "
                               "take a full checkpoint again")
        if len(want) and not len(have):
            raise KVStateError("a KV delta names cells that none of the pieces holds; take a full checkpoint again")
        sorter = np.argsort(have, kind="stable")
        at = sorter[np.clip(np.searchsorted(have, want, sorter=sorter), 0, max(len(have) - 1, 0))] if len(want) else \
            np.zeros(0, np.intp)
        if len(want) and not np.array_equal(have[at], want):
            raise KVStateError("a KV delta names cells that none of the pieces holds; take a full checkpoint again")
        picks.append(at)
    return _pick(parts, picks, parts[0][1].prefix)


def check_positions(payload, lay: Layout, n_past: int) -> list:
    """Refuse (KVStateError) a session's state with a cell outside positions 0..n_past-1, a position held
    twice, or a cell not of exactly one sequence: damaged or forged, it would hold what its header does not
    admit (llama.cpp's cache bookkeeping, reading such cells, can stay wrong after it refuses the state), and
    `fill_window` would put back as many placeholder cells as its first position says. The positions held, per
    stream (as `positions` gives them)."""
    held = positions(payload, lay)
    if held is None:
        raise KVStateError("KV state has a cell of no sequence or of several, but a session's state holds cells of its "
                           "own sequence only; it is damaged, export it again")
    for pos in held:
        if len(pos) and (int(pos.min()) < 0 or int(pos.max()) >= n_past):
            raise KVStateError(f"KV state holds a cell at position {int(pos.max()) if pos.max() >= n_past else int(pos.min())}"
                               f" but says it holds {n_past} positions; it is damaged, export it again")
        if len(np.unique(pos)) != len(pos):
            raise KVStateError("KV state holds one position in two cells; it is damaged, export it again")
    return held


def fill_window(payload, lay: Layout, n_past: int) -> tuple[bytes, int]:
    """The state with every window cache's dropped cells put back as placeholders; (payload, first real
    position of a window cache, 0 when none was filled).

    llama.cpp exports a window cache without the cells its window has left behind, and imports what it
    gets into the first free cells. The exporting context still had those old cells (masked), so each
    position p sat in cell p; in the importing one the window's cells would start at cell 0. Attention
    then sums the same values in other places of its vectors, and on some CPUs (AVX2) rounds differently.
    Placeholder cells for positions 0..first-1 (zero K and V, masked like the old ones: they lie outside
    the window of every position that follows) put each real cell back where it was, so the importer
    computes bit for bit what the exporter would. Streams whose cells are not consecutive ascending
    positions are left as they are. `n_past`: the positions the state holds (its header's), which bounds
    the placeholders; a state `check_positions` refuses is refused here too (KVStateError).
    """
    data = memoryview(payload)
    held = check_positions(payload, lay, n_past)
    out, i, filled = [lay.prefix], 0, 0
    at = len(lay.prefix)
    for streams in lay.caches:
        out.append(_U32.pack(len(streams)))
        at += 4
        for s in streams:
            pos = held[i]
            i += 1
            last = s.blocks[-1] if s.blocks else None  # a cache of this shard may have no layers at all
            end = (last.at + last.rows * s.cells * last.width) if last else s.meta[1] + len(s.tag)
            first = int(pos[0]) if len(pos) else 0
            if not len(pos) or first <= 0 or not np.array_equal(pos, np.arange(first, first + len(pos))):
                out.append(data[at:end])
                at = end
                continue
            filled = first if not filled else min(filled, first)
            seq = bytes(data[s.meta[0] + 4:s.meta[0] + 12])  # (1, sequence id) of the first cell
            meta = np.empty((first, 3), "<i4")
            meta[:, 0] = np.arange(first)
            meta[:, 1:] = np.frombuffer(seq, "<i4")
            out += [_U32.pack(first + s.cells), meta.tobytes(), data[s.meta[0]:s.meta[1]], s.tag]
            for b in s.blocks:
                out.append(b.head)
                zeros = bytes(first * b.width)
                for row in range(b.rows):
                    out += [zeros, data[b.at + row * s.cells * b.width:b.at + (row + 1) * s.cells * b.width]]
            at = end
    if at != len(data):
        raise KVStateError("KV state has bytes past its last cache; it is damaged")
    return b"".join(out), filled
