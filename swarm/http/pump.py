"""The coordinator's blocking event stream, run on a thread of its own and read from the event loop.

A session runs on the thread that iterates it (coordinator/generation.py); the HTTP server's event loop
must never block. `EventPump` iterates on a thread and hands each event to the loop through a queue;
`stop()` (a client gone) makes the session's `is_active` false and closes the stream, which frees the
session on every node, as the gRPC servicer does when its call is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Callable, Iterator

from .. import messages as m

_END = object()


class EventPump:
    """One generation's events, from a worker thread into the event loop; create it on the loop."""

    def __init__(self, generate: Callable[[Callable[[], bool]], Iterator[m.GenerateEvent]]):
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._active = True
        self._thread = threading.Thread(target=self._run, args=(generate,), name="http-session", daemon=True)
        self._thread.start()

    def is_active(self) -> bool:
        return self._active

    def stop(self) -> None:
        """The client is gone: end the session at its next token (or while it waits for a slot)."""
        self._active = False

    async def next(self) -> m.GenerateEvent | None:
        """The next event; None once the stream ended. Re-raises what the generation raised."""
        item = await self._queue.get()
        if item is _END:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def _put(self, item) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: the server is stopping
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def _run(self, generate) -> None:
        events = None
        try:
            events = generate(self.is_active)
            for event in events:
                if not self._active:
                    break
                self._put(event)
        except Exception as e:
            self._put(e)
        finally:
            if events is not None:
                with contextlib.suppress(Exception):
                    events.close()  # a stream left early: stop its step and close the session everywhere
            self._put(_END)
