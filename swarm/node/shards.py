"""The shards a node serves: loading them (fetching the file when it is not here), and what each keeps.

A node usually holds one shard; after taking over a failed or departed node's range it holds that one
too, until the next full plan. Everything per session that belongs to one shard (its sampler, the
outputs it sent onward, its step count and attempt, its last checkpoint) lives in its `LoadedShard`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import cache
from .. import messages as m
from ..engine import KVBase, Shard
from ..errors import BadInputError, NotReadyError
from ..layers import LayerRange
from ..sampling import Sampler
from ..slicing import shard_info
from ..rangefetch import fetch_shard_via_url
from ..transfer import Fetch
from .held import HeldStates
from .kept import OutputLog

log = logging.getLogger(__name__)

_MAX_N_CTX = 1 << 20
_MAX_SESSIONS = 256


@dataclass
class LoadedShard:
    """A shard this node serves, with what it keeps per session."""

    spec_id: str
    shard: Shard
    settings: m.ContextSettings
    samplers: dict[str, Sampler] = field(default_factory=dict)
    kept: OutputLog = field(default_factory=OutputLog)  # outputs sent onward, for the next hop's recovery
    steps: dict[str, int] = field(default_factory=dict)  # per session, bumped by every step and rewind
    epochs: dict[str, int] = field(default_factory=dict)  # per session, the newest attempt seen
    bases: dict[str, KVBase] = field(default_factory=dict)  # per session, what its last checkpoint held
    # Held across (attempt check, compute, step count) and across rewinds, so a stale step cannot slip
    # between a recovery's rewind and the retried step.
    lock: threading.Lock = field(default_factory=threading.Lock)
    # A standby's checkpoints of each session, not imported yet (kept when a session is opened again).
    held: HeldStates = field(init=False)

    def __post_init__(self):
        # Twice the slots: an ended session's chain is dropped within a second, maybe after the next began.
        self.held = HeldStates(self.shard.check_kv_header, 2 * self.settings.max_sessions)

    def bump(self, session: str) -> int:
        self.steps[session] = n = self.steps.get(session, 0) + 1
        return n

    def enter(self, session: str, epoch: int) -> None:
        """Refuse a step of an older attempt (it was overtaken by a recovery); call with `lock` held."""
        current = self.epochs.get(session, 0)
        if epoch < current:
            raise BadInputError(f"stale step of session {session!r} (attempt {epoch}, the session is at attempt "
                                f"{current}); it was overtaken by a recovery")
        self.epochs[session] = epoch

    def forget(self, session: str) -> None:
        """Close the session on this shard (what a standby holds of it stays: `held.drop`)."""
        self.samplers.pop(session, None)
        self.steps.pop(session, None)
        self.epochs.pop(session, None)
        self.bases.pop(session, None)
        self.kept.drop(session)
        self.shard.drop_session(session)


class Shelf:
    """The shards of one node, by layer range.

    `fetcher` returns the coordinator's fetch when a file must be transferred; `local_file` (the
    coordinator's own node) names a shard's file where it already lies on this machine, so it is used
    in place instead of copied into the cache.
    """

    def __init__(self, fetcher: Callable[[], Fetch] | None, threads: int | None, shard_dir: Path | None = None,
                 progress: bool = True, local_file: Callable[[str], Path | None] | None = None):
        self._fetcher, self._threads, self._dir, self._progress = fetcher, threads, shard_dir, progress
        self._local_file = local_file
        self._shards: dict[LayerRange, LoadedShard] = {}
        self.lock = threading.Lock()  # one load or measurement at a time

    def ranges(self) -> list[LayerRange]:
        """The layer ranges this node serves, in order."""
        return sorted(self._shards, key=lambda r: r.start)

    def entries(self) -> list[LoadedShard]:
        return [self._shards[r] for r in self.ranges() if r in self._shards]

    def entry(self, want: LayerRange) -> LoadedShard:
        """The loaded shard of `want`; NotReadyError (saying what this node holds) when there is none."""
        loaded = self._shards.get(want)
        if loaded is None:
            if not self._shards:
                raise NotReadyError("this node holds no shard yet; is it still loading? (see `swarm status`)")
            held = ", ".join(str(r) for r in self.ranges())
            raise NotReadyError(f"this node holds layers {held}, not {want}; the route is out of date, re-plan")
        return loaded

    def file(self, spec: m.ShardSpec) -> tuple[Path, bool]:
        """The shard's file on this machine, fetched if needed; (path, whether bytes were transferred)."""
        local = self._local_file(spec.shard_id) if self._local_file is not None else None
        if local is not None:
            return local, False
        if self._fetcher is None:
            raise NotReadyError("this node has no coordinator to fetch shard files from")
        return fetch_shard_via_url(spec.model_url, self._fetcher(), spec, self._dir or cache.subdir("shards"),
                                   progress=self._progress)

    def load(self, order: m.Load) -> m.Loaded:
        """Load the shard of `order` beside the others (`extra`) or instead of them; or drop every shard, or
        only `order.drop`."""
        with self.lock:
            if order.shard is None:
                if order.drop is not None and order.drop not in self._shards:
                    return m.Loaded()  # (a standby dropped before: nothing to give back)
                self.unload(order.drop)
                return m.Loaded()
            spec, s = order.shard, order.settings
            if not (0 < s.n_ctx <= _MAX_N_CTX and 0 < s.max_sessions <= _MAX_SESSIONS and 0 < s.n_batch <= s.n_ctx):
                raise BadInputError(f"impossible shard settings n_ctx={s.n_ctx}, max_sessions={s.max_sessions}, "
                                    f"n_batch={s.n_batch}")
            layers = spec.layers
            current = self._shards.get(layers)
            if current is not None and (current.spec_id, current.settings) == (spec.shard_id, s):
                if not order.extra:  # the range stays loaded; ranges taken over and standbys go
                    for other in [r for r in self._shards if r != layers]:
                        self.unload(other)
                return m.Loaded()
            for other in self._shards:
                if other != layers and other.start < layers.end and layers.start < other.end and order.extra:
                    raise BadInputError(f"layers {layers} overlap layers {other} that this node already serves")
            t0 = time.perf_counter()
            path, fetched = self.file(spec)
            info = shard_info(path)
            if info.shard_id != spec.shard_id or info.layers != layers:
                raise BadInputError(
                    f"{path.name} holds shard {info.shard_id[:12]} ({info.layers}), not the assigned "
                    f"{spec.shard_id[:12]} ({layers}); delete it and join again"
                )
            self.unload(layers if order.extra else None)
            shard = Shard(path, n_ctx=s.n_ctx, max_sessions=s.max_sessions, n_batch=s.n_batch,
                          n_threads=self._threads)
            self._shards[layers] = LoadedShard(spec.shard_id, shard, s)
            load_s = time.perf_counter() - t0
            log.info("serving layers %s (%s; %.1f s to %s)%s", shard.layers, shard.role.value, load_s,
                     "fetch and load" if fetched else "load", " beside " + ", ".join(
                         str(r) for r in self.ranges() if r != layers) if len(self._shards) > 1 else "")
            return m.Loaded(fetched, load_s)

    def unload(self, only: LayerRange | None = None) -> None:
        for layers in [only] if only is not None else list(self._shards):
            loaded = self._shards.pop(layers, None)
            if loaded:
                loaded.shard.close()

    def sessions(self) -> dict[str, int]:
        """Open sessions and how many positions each holds (on the first shard that has it)."""
        out: dict[str, int] = {}
        for entry in reversed(self.entries()):
            out.update(entry.shard.sessions())
        return out

    def close(self) -> None:
        with self.lock:
            self.unload()
