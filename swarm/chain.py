"""An in-process pipeline: a model cut into shards, run one after another on this machine.

This is the swarm's compute path without the network: the same shards, the same batch composition
(the prompt in n_batch pieces, then one position per step), so its text is the unsplit model's.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .engine import Shard, Tokenizer
from .errors import BadInputError
from .layers import LayerRange, split_evenly
from .sampling import SamplingParams, Sampler
from .slicing import model_layer_count, slice_model
from .gguf_file import read_gguf



@dataclass(frozen=True)
class StepTrace:
    """What one pipeline step sent into each shard (for replay), in shard order."""

    start: int
    inputs: tuple[np.ndarray, ...]


class LocalChain:
    """Shards of one model loaded in this process, run in order for each step."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        ranges: Sequence[LayerRange] | int = 1,
        *,
        n_ctx: int = 512,
        n_batch: int = 512,
        max_sessions: int = 1,
        n_threads: int | None = None,
        shard_dir: str | os.PathLike | None = None,
        lookahead: bool | None = None,
    ):
        self.model_path = Path(model_path)
        n_layer = model_layer_count(read_gguf(self.model_path))
        if isinstance(ranges, int):
            ranges = split_evenly(n_layer, ranges)
        _check_cover(ranges, n_layer)
        self.ranges = list(ranges)
        self.n_batch = min(n_batch, n_ctx)
        self.tokenizer = Tokenizer(self.model_path)
        self.shards: list[Shard] = []
        try:
            for r in self.ranges:
                shard_path = slice_model(self.model_path, r, shard_dir, lookahead).path
                self.shards.append(
                    Shard(shard_path, n_ctx=n_ctx, n_batch=self.n_batch, max_sessions=max_sessions, n_threads=n_threads)
                )
        except Exception:
            self.close()
            raise
        self._ids = itertools.count()

    def open_session(self) -> str:
        sid = f"s{next(self._ids)}"
        for shard in self.shards:
            shard.open_session(sid)
        return sid

    def drop_session(self, sid: str) -> None:
        for shard in self.shards:
            shard.drop_session(sid)

    def step(self, sid: str, tokens: Sequence[int], trace: list[StepTrace] | None = None) -> np.ndarray:
        """Run one batch of tokens through every shard; returns the last position's logits."""
        x: object = np.asarray(tokens, dtype=np.int32)
        start = self.shards[0].session_length(sid)
        sent = []
        try:
            for shard in self.shards:
                sent.append(x)
                x = shard.forward(sid, x, start)
        except Exception:
            for shard in self.shards[: len(sent) - 1]:  # keep every shard at the same position
                shard.rollback(sid, start)
            raise
        if trace is not None:
            trace.append(StepTrace(start, tuple(sent)))
        return x  # logits from the final shard

    def prefill(self, sid: str, tokens: Sequence[int]) -> np.ndarray:
        """Feed a prompt in pieces of n_batch, like llama.cpp's own eval; returns the last logits."""
        if not tokens:
            raise BadInputError("the prompt is empty; give at least one token")
        logits = None
        for i in range(0, len(tokens), self.n_batch):
            logits = self.step(sid, tokens[i:i + self.n_batch])
        return logits

    def generate(
        self,
        prompt: str | Sequence[int],
        max_tokens: int = 64,
        sampling: SamplingParams | None = None,
        stop_at_eog: bool = True,
    ) -> Iterator[int]:
        """Yield generated token ids for `prompt` (text, or token ids used as given)."""
        tokens = self.tokenizer.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        sampler = Sampler(sampling or SamplingParams(), history=tokens)
        sid = self.open_session()
        try:
            logits = self.prefill(sid, tokens)
            for i in range(max_tokens):
                token = sampler.sample(logits)
                if stop_at_eog and self.tokenizer.is_eog(token):
                    return
                yield token
                if i + 1 < max_tokens:  # no step for a token that will not be followed
                    logits = self.step(sid, [token])
        finally:
            self.drop_session(sid)

    def close(self) -> None:
        for shard in self.shards:
            shard.close()
        self.shards = []
        if getattr(self, "tokenizer", None):
            self.tokenizer.close()

    def __enter__(self) -> "LocalChain":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_cover(ranges: Sequence[LayerRange], n_layer: int) -> None:
    """The ranges must tile 0..n_layer in order with no gap or overlap."""
    at = 0
    for r in ranges:
        if r.start != at:
            raise BadInputError(
                f"shard ranges must cover layers 0:{n_layer} in order without gaps or overlaps; "
                f"expected a range starting at {at}, got {r}"
            )
        at = r.end
    if at != n_layer:
        raise BadInputError(f"shard ranges end at layer {at}, but the model has {n_layer} layers")
