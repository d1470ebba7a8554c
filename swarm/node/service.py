"""A node: the shards it serves and the sessions on them, behind one object the wire's servicer calls.

The parts are rooms of their own: `shards.py` (what is loaded), `stepping.py` (a pipeline step),
`handover.py` (sessions moving between nodes), `checkpoints.py` (KV checkpoints to the coordinator).
This module adds sessions' lifetimes and the measurements the coordinator asks a node for.

The node never imports the wire: whoever builds it hands it `peers` (`get(address, steps_address)`
returns something with `start_step`, `replay`, `import_state`; `transient(address)` one with `ping` to
close afterwards), `fetcher` (the coordinator's shard file fetch) and `checkpoint_sink`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Callable

from .. import messages as m
from .. import shardcache
from ..errors import BadInputError, NotReadyError, PeerError, SwarmError
from ..sampling import Sampler
from ..transfer import Fetch
from .checkpoints import Outbox
from .handover import Handover
from .shards import Shelf
from .stepping import Onward, Stepper, check_session_id

log = logging.getLogger(__name__)

# A session nobody has stepped for this long was abandoned (its coordinator crashed or lost the
# network before closing it); its KV sequence is freed when a new session needs room.
SESSION_IDLE_S = 600.0
MAX_PING = 16 << 20


class Node:
    """One node's shards and sessions; thread-safe."""

    def __init__(
        self,
        peers,
        fetcher: Callable[[], Fetch] | None = None,
        threads: int | None = None,
        shard_dir: Path | None = None,
        progress: bool = True,
        reprofile: bool = False,
        checkpoint_sink: Callable[[m.Checkpoint, bytes], bool] | None = None,
        local_file: Callable[[str], Path | None] | None = None,
    ):
        self._peers, self._threads = peers, threads
        self._reprofile = reprofile  # measure compute again once, ignoring the cache (--reprofile)
        self.shelf = Shelf(fetcher, threads, shard_dir, progress, local_file)
        self._last_used: dict[str, float] = {}
        self._used_lock = threading.Lock()
        self._outbox = Outbox(checkpoint_sink) if checkpoint_sink is not None else None
        self._stepper = Stepper(self.shelf, peers, self._outbox.take if self._outbox else None, self._touch)
        self._handover = Handover(self.shelf, peers, self._touch)

    def _touch(self, session: str) -> None:
        with self._used_lock:
            self._last_used[session] = time.monotonic()

    def ranges(self):
        """The layer ranges this node serves, in order."""
        return self.shelf.ranges()

    def sessions(self) -> dict[str, int]:
        return self.shelf.sessions()

    # ------------------------------------------------------------ assignment and measurement

    def load(self, order: m.Load) -> m.Loaded:
        loaded = self.shelf.load(order)
        if not self.shelf.ranges():
            with self._used_lock:
                self._last_used.clear()
        return loaded

    def probe(self, order: m.ProbeOrder) -> m.ProbeResult:
        """Measure this node's compute on the given middle slices of the model (cached)."""
        from ..engine import default_threads
        from ..profiling import cached_compute, measure_compute

        if not 1 <= len(order.shards) <= 4:
            raise BadInputError("a probe takes 1 to 4 shards")
        if not (1 <= order.decode_steps <= 256 and 1 <= order.prefill_tokens <= 512):
            raise BadInputError("a probe runs 1 to 256 decode steps and 1 to 512 prompt tokens")
        if self.sessions():
            raise NotReadyError("this node is serving sessions; measure it between sessions")

        def measure():  # only when the cache has no answer: fetching the slices is the slow part
            with contextlib.ExitStack() as held:
                fetched = (self.shelf.file(spec)[0] for spec in order.shards)
                # A generator: each slice is held before the next fetch, whose eviction could take it.
                paths = [held.enter_context(shardcache.hold(path)) for path in fetched]
                return measure_compute(paths, self._threads, order.decode_steps, order.prefill_tokens)

        with self.shelf.lock:  # one measurement at a time, and not while a shard is being loaded
            profile, cached = cached_compute(
                [s.shard_id for s in order.shards], self._threads or default_threads(), measure,
                refresh=order.refresh or self._reprofile, params=(order.decode_steps, order.prefill_tokens),
            )
            self._reprofile = False
        return m.ProbeResult(profile, cached)

    @staticmethod
    def ping(reply_bytes: int) -> bytes:
        if not 0 <= reply_bytes <= MAX_PING:
            raise BadInputError(f"a ping reply is 0 to {MAX_PING} bytes, not {reply_bytes}")
        return bytes(reply_bytes)

    def measure_link(self, address: str, payload_bytes: int, count: int) -> m.Link:
        """The link from here to the node at `address`."""
        from ..profiling import measure_link

        # Small bounds: a keyed peer should not be able to turn this node into a traffic source.
        if not (0 < payload_bytes <= 1 << 16 and 0 < count <= 32):
            raise BadInputError("a link measurement sends 1 to 65536 bytes, 1 to 32 times")
        peer = self._peers.transient(address)  # closed afterwards: measuring leaves no connection behind
        try:
            return measure_link(lambda payload, reply: peer.ping(payload, reply, timeout=2.0), payload_bytes, count)
        except SwarmError as e:
            raise PeerError(f"could not measure the link to {address}: {e}") from None
        finally:
            peer.close()

    # ------------------------------------------------------------ sessions

    def open_session(self, order: m.OpenSession) -> None:
        """Open a session on one shard (starting it again from empty if it was open)."""
        entry = self.shelf.entry(order.layers)
        sid = check_session_id(order.session)
        if len(order.history) > entry.settings.n_ctx:
            raise BadInputError(f"a session's history is at most n_ctx ({entry.settings.n_ctx}) tokens")
        sampler = Sampler(order.sampling, history=list(order.history)) if entry.shard.role.gives_logits else None
        self._drop_idle()
        with entry.lock:
            entry.forget(sid)
            entry.shard.open_session(sid)
            entry.epochs[sid] = order.epoch
            self._touch(sid)
            if sampler is not None:
                entry.samplers[sid] = sampler

    def _drop_idle(self) -> None:
        """Close the sessions no order has named for SESSION_IDLE_S (abandoned by their coordinator?)."""
        now = time.monotonic()
        with self._used_lock:
            idle = [old for old, used in self._last_used.items() if now - used > SESSION_IDLE_S]
        for old in idle:
            log.warning("dropping session %s: unused for %.0f s (abandoned by its coordinator?)", old,
                        now - self._last_used.get(old, now))
            self.close_session(old)

    def close_session(self, session: str) -> None:
        with self._used_lock:
            self._last_used.pop(session, None)
        for entry in self.shelf.entries():
            entry.forget(session)
            entry.held.drop(session)

    def start_step(self, step: m.Step, caller=None) -> Onward:
        """Run this node's layers for one step and send it on (see `Stepper.start`)."""
        return self._stepper.start(step, caller)

    def step(self, step: m.Step, caller=None) -> m.StepResult:
        """Run one step through this node and the rest of the route; the sampled token, if any."""
        return self._stepper.start(step, caller).result()

    def cancel(self, session: str) -> None:
        """Stop waiting for the next hop on a session's step (it hung); the step fails with PeerError."""
        self._stepper.cancel(session)

    # ------------------------------------------------------------ recovery and migration

    def rewind(self, order: m.Rewind) -> int:
        return self._handover.rewind(order)

    def import_state(self, state: m.ImportState, blob: bytes) -> int:
        if state.mode == m.HOLD:  # a standby opens no sessions: what it holds ages out here
            self._drop_idle()
        return self._handover.import_state(state, blob)

    def resend(self, order: m.Resend) -> int:
        return self._handover.resend(order)

    def handoff(self, order: m.Handoff) -> int:
        return self._handover.handoff(order)

    def replay(self, step: m.Step) -> m.StepResult:
        """A replay step (the same as `step`: the step says it is one)."""
        return self.step(step)

    def close(self) -> None:
        if self._outbox is not None:
            self._outbox.close()
        self.shelf.close()
