"""A node's KV checkpoints: exported when a step asks, handed to the coordinator from a background thread.

After the first checkpoint of a session a node sends only what changed since the last one the
coordinator took (a delta, `kvstate.py`); when the coordinator no longer holds that one, or a checkpoint
could not be taken or delivered, the next is a whole state again.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from typing import Callable

from .. import messages as m
from .shards import LoadedShard

log = logging.getLogger(__name__)

_MAX_PENDING = 8


class Outbox:
    """Checkpoints on their way to `sink(checkpoint, blob) -> taken` (False: send a whole state next)."""

    def __init__(self, sink: Callable[[m.Checkpoint, bytes], bool]):
        self._sink = sink
        # (checkpoint, KV blob, shard entry, session id) of each checkpoint waiting to be pushed
        self._queue: queue.Queue[tuple[m.Checkpoint, bytes, LoadedShard, str] | None] = queue.Queue(
            maxsize=_MAX_PENDING)
        self._pusher: threading.Thread | None = None
        self._start = threading.Lock()

    def take(self, entry: LoadedShard, sid: str, locked: bool = False) -> None:
        """Export a session's KV state and queue it for the coordinator (never blocks on the network).

        `locked`: the caller already took `entry.lock` for this; it is released here."""
        held = locked

        def taken() -> None:  # the state is copied out: the next step may run
            nonlocal held
            if held:
                held = False
                entry.lock.release()

        try:
            if not locked:
                entry.lock.acquire()
                held = True
            # Only what changed since the last checkpoint the coordinator took, when it took one.
            blob, positions, base = entry.shard.checkpoint_kv(sid, entry.bases.get(sid), taken=taken)
        except Exception as e:  # a checkpoint never fails the step; the next one starts a new chain
            entry.bases.pop(sid, None)
            log.warning("could not checkpoint session %s: %s", sid, e)
            return
        finally:
            taken()
        checkpoint = m.Checkpoint(sid, entry.shard.layers, positions)
        with self._start:
            if self._pusher is None:
                self._pusher = threading.Thread(target=self._push_loop, name="checkpoints", daemon=True)
                self._pusher.start()
        with entry.lock:  # before the pusher can answer for this one; not for a session dropped meanwhile
            old = entry.bases.get(sid)
            if base is None or sid not in entry.steps:
                entry.bases.pop(sid, None)
            elif old is None or old.edit != base.edit or old.n_past <= base.n_past:
                entry.bases[sid] = base
        try:
            self._queue.put_nowait((checkpoint, blob, entry, sid))  # the newest few; a slow link drops
        except queue.Full:
            entry.bases.pop(sid, None)  # the next one cannot build on this one
            log.warning("checkpoints are not getting through to the coordinator; dropped one of session %s", sid)

    def _push_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            checkpoint, blob, entry, sid = item
            try:
                taken = self._sink(checkpoint, blob)
            except Exception as e:  # the coordinator is away: the next checkpoint will do
                log.warning("checkpoint of session %s not delivered: %s", checkpoint.session, e)
                taken = False
            if not taken:  # the coordinator lacks what a delta would build on: send a full state next
                entry.bases.pop(sid, None)

    def close(self) -> None:
        if self._pusher is not None:
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(None)
