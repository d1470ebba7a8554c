"""The shard files the coordinator cuts from its model and serves to the nodes that lack them."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator

from .. import messages as m
from .. import shardcache
from ..cache import file_digest
from ..errors import BadInputError
from ..layers import LayerRange
from ..slicing import slice_model
from ..transfer import fault_chunks_from_env, iter_chunks


class ShardFiles:
    """Cut (or reuse) the shard of a range, remember it, and stream its bytes on request."""

    def __init__(self, model_path: Path, n_layer: int, model_url: str = ""):
        self.model_path, self.n_layer, self.model_url = model_path, n_layer, model_url
        self._lock = threading.Lock()
        self._files: dict[str, Path] = {}
        self._ids: dict[LayerRange, str] = {}  # the shard file cut for each range
        self._held: dict[str, shardcache.Hold] = {}  # the files offered: never evicted while offered
        self._faults = fault_chunks_from_env()

    def spec(self, layers: LayerRange) -> m.ShardSpec:
        """The shard of `layers`, cut on first use, offered for fetching from then on."""
        shard = slice_model(self.model_path, layers)
        held = shardcache.hold(shard.path)  # nodes fetch it from here: not evicted while this coordinator runs
        spec = m.ShardSpec(shard.shard_id, shard.path.name, shard.path.stat().st_size, file_digest(shard.path),
                           layers, self.n_layer, self.model_url)
        with self._lock:
            self._files[spec.shard_id] = shard.path
            earlier, self._held[spec.shard_id] = self._held.get(spec.shard_id), held
            self._ids[layers] = spec.shard_id
        if earlier is not None:
            earlier.release()
        return spec

    def shard_id(self, layers: LayerRange) -> str | None:
        with self._lock:
            return self._ids.get(layers)

    def path(self, shard_id: str) -> Path | None:
        """Where a shard offered here lies on this machine (the coordinator's own node loads it in place)."""
        with self._lock:
            return self._files.get(shard_id)

    def chunks(self, shard_id: str, offset: int) -> Iterator[m.ShardChunk]:
        """A shard file this coordinator offers, from `offset` on."""
        with self._lock:
            path = self._files.get(shard_id)
            faults, self._faults = self._faults, frozenset()  # injected corruption happens once
        if path is None:
            raise BadInputError(f"no shard {shard_id[:16]!r} here; it is not part of the current plan")
        return iter_chunks(path, offset, corrupt_chunks=faults)

    def close(self) -> None:
        with self._lock:
            held, self._held = list(self._held.values()), {}
        for h in held:
            h.release()
