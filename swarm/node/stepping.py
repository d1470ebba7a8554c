"""One pipeline step on a node: run its layers, keep what it sends on, send it on, or sample the token.

The final shard samples; the token travels back along the chain of calls to whoever started the step.
A node checks every step before llama.cpp sees it and keeps serving after a bad one. When the rest of
the route fails, the node rolls its own step back, so every hop stays at the same position.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable

import numpy as np

from .. import messages as m
from ..errors import BadInputError, CancelledError, SwarmError
from ..messages import KeptStep
from .shards import LoadedShard, Shelf

FORWARD_TIMEOUT_S = 120.0  # one step of a big prompt on a slow machine; a dead peer fails far sooner


def encode_hidden(x: np.ndarray) -> bytes:
    return np.ascontiguousarray(x, dtype="<f4").tobytes()


def decode_hidden(data: bytes, n_positions: int, n_embd: int) -> np.ndarray:
    """Hidden states from bytes, after checking the size matches the positions and the model width."""
    expected = n_positions * n_embd * 4
    if len(data) != expected:
        raise BadInputError(
            f"wrong hidden-state size: {len(data)} bytes for {n_positions} positions, but this model's "
            f"hidden states are {n_embd} float32 values ({n_embd * 4} bytes) per position, {expected} in all"
        )
    return np.frombuffer(data, dtype="<f4").reshape(n_positions, n_embd).astype(np.float32, copy=False)


def check_session_id(text: str) -> str:
    if not text or len(text) > 128:
        raise BadInputError("a session id is 1 to 128 characters")
    return text


class Onward:
    """A step this node has run: its result, or, when the route goes on, the wait for the rest of it."""

    def __init__(self, result: m.StepResult | None = None, finish: Callable[[], m.StepResult] | None = None,
                 cancel: Callable[[], object] | None = None):
        self._result, self._finish, self._cancel = result, finish, cancel

    def result(self) -> m.StepResult:
        if self._finish is not None:
            self._result, self._finish = self._finish(), None
        return self._result

    def cancel(self) -> None:
        """Stop waiting: the rest of the route is told, and `result()` raises CancelledError."""
        if self._cancel is not None:
            self._cancel()


class Stepper:
    """Runs steps on a node's shards. `peers.get(address, steps)` reaches the next hop; `checkpoint(entry,
    session, locked)` exports a checkpoint the step asks for; `touch(session)` marks a session in use."""

    def __init__(self, shelf: Shelf, peers, checkpoint: Callable[[LoadedShard, str, bool], None] | None,
                 touch: Callable[[str], None]):
        self._shelf, self._peers, self._checkpoint, self._touch = shelf, peers, checkpoint, touch
        self._inflight: dict[tuple[str, object], object] = {}  # steps waiting on the next hop

    def start(self, step: m.Step, caller=None) -> Onward:
        """Run this node's layers for one step and send it on; `result()` of what it returns waits for the
        rest of the route (so the caller can do something else meanwhile), `cancel()` gives up on it.
        `caller`: the context of the call that brought the step (its going away cancels the rest)."""
        t0 = time.perf_counter()
        entry = self._shelf.entry(step.layers)
        shard = entry.shard
        sid = check_session_id(step.session)
        n, start = step.n_positions, step.start
        if not 0 < n <= shard.n_batch:
            raise BadInputError(f"a step carries 1 to {shard.n_batch} positions (this shard's n_batch), got {n}")
        if step.next and not step.next[0].steps:
            raise BadInputError("the route's next hop has no step address (Hop.step_address, HOST:PORT)")
        if shard.role.takes_tokens:
            if step.hidden:
                raise BadInputError("a first shard takes token ids, not hidden states")
            x = list(step.tokens)
        else:
            x = decode_hidden(step.hidden, n, shard.n_embd)
        t1 = time.perf_counter()
        with entry.lock:
            entry.enter(sid, step.epoch)
            out = shard.forward(sid, x, start)
            count = entry.bump(sid)
        self._touch(sid)
        t2 = time.perf_counter()
        compute_ms, codec_ms = 1e3 * (t2 - t1), 1e3 * (t1 - t0)
        if shard.role.gives_logits:
            sampler = entry.samplers.get(sid)
            if sampler is None:  # the session was closed while this step ran
                raise BadInputError(f"unknown session {sid!r} on this node; open it first")
            sampler.observe(step.tokens, start)
            token = None
            if step.sample and not step.replay:
                token = sampler.sample(out, remember=False, position=start + n - 1)
            sample_ms = 1e3 * (time.perf_counter() - t2)
            if step.checkpoint and self._checkpoint is not None:
                # Exported while the token travels back and the first hops run the next step: the lock,
                # taken here and released by the exporting thread, holds this shard's next step until then.
                entry.lock.acquire()
                threading.Thread(target=self._checkpoint, args=(entry, sid, True), daemon=True).start()
            timing = m.HopTiming(step.layers, compute_ms, codec_ms, sample_ms,
                                 handler_ms=1e3 * (time.perf_counter() - t0))
            return Onward(m.StepResult(token, (timing,)))
        hidden = encode_hidden(out)
        if start >= step.keep_from:  # what the next hop's recovery would need
            entry.kept.add(sid, KeptStep(start, tuple(step.tokens), hidden), step.keep_from)
        if step.replay:
            return Onward(m.StepResult(None, (m.HopTiming(step.layers, compute_ms, codec_ms,
                                                          handler_ms=1e3 * (time.perf_counter() - t0)),)))
        if not step.next:
            self._undo(entry, sid, start, count)
            raise BadInputError(f"the route ends after layer {shard.layers.end}, but the model goes on; re-plan")
        hop = step.next[0]
        t3 = time.perf_counter()
        onward = m.Step(sid, start, step.tokens, hop.layers, hidden, step.next[1:], step.sample, False,
                        hop.checkpoint, hop.keep_from, step.epoch)
        t4 = time.perf_counter()
        if caller is not None and not caller.is_active():  # the caller gave up while this node computed
            self._undo(entry, sid, start, count)
            raise CancelledError("the step was cancelled by the previous hop")
        where = f"next hop {hop.address} (layers {hop.layers})"
        try:
            call = self._peers.get(hop.address, hop.steps).start_step(onward, FORWARD_TIMEOUT_S, caller=caller)
            self._inflight[(sid, shard.layers)] = call
            if step.checkpoint and self._checkpoint is not None:  # while the next hops compute
                self._checkpoint(entry, sid, False)
        except Exception as e:
            raise self._failed(e, entry, sid, start, count, where) from None

        def finish() -> m.StepResult:
            try:
                result = call.result()
            except Exception as e:
                raise self._failed(e, entry, sid, start, count, where) from None
            self._inflight.pop((sid, shard.layers), None)
            t5 = time.perf_counter()
            mine = m.HopTiming(step.layers, compute_ms, codec_ms + 1e3 * (t4 - t3), call_ms=1e3 * (t5 - t4),
                               handler_ms=1e3 * (t5 - t0))
            return m.StepResult(result.token, (mine,) + result.timings)

        return Onward(finish=finish, cancel=call.cancel)

    def _failed(self, e: Exception, entry: LoadedShard, sid: str, start: int, count: int, where: str) -> Exception:
        """The rest of the route failed: roll this hop back to stay in step with the ones after it; the
        error to raise."""
        self._inflight.pop((sid, entry.shard.layers), None)
        self._undo(entry, sid, start, count)
        if isinstance(e, CancelledError):
            return CancelledError(f"the step was cancelled while {where} had it")
        return e

    def _undo(self, entry: LoadedShard, sid: str, start: int, count: int) -> None:
        """Roll a failed step back, unless the session has moved on since (a recovery rewound it)."""
        with entry.lock:
            if entry.steps.get(sid) != count:
                return
            with contextlib.suppress(SwarmError):
                entry.shard.rollback(sid, start)
            entry.kept.truncate(sid, start)

    def cancel(self, session: str) -> None:
        """Stop waiting for the next hop on a session's step (it hung); the step fails with PeerError."""
        for (sid, _), call in list(self._inflight.items()):
            if sid == session:
                call.cancel()
