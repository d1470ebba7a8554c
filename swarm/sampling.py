"""Choosing the next token from logits: greedy, or seeded sampling with the usual filters."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable

import numpy as np

from .errors import BadInputError


@dataclass(frozen=True)
class SamplingParams:
    """temperature <= 0 means greedy (argmax), which is what 'identical output' is measured with."""

    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None

    def __post_init__(self) -> None:
        if not np.isfinite(self.temperature):
            raise BadInputError("temperature must be a finite number (0 for greedy)")
        if self.top_k < 0:
            raise BadInputError("top_k must be 0 (off) or positive")
        if not 0.0 < self.top_p <= 1.0:
            raise BadInputError("top_p must be in (0, 1]")
        if not 0.0 <= self.min_p < 1.0:
            raise BadInputError("min_p must be in [0, 1)")
        if self.repeat_penalty <= 0:
            raise BadInputError("repeat_penalty must be positive (1.0 is off)")
        if self.repeat_last_n < 0:
            raise BadInputError("repeat_last_n must be 0 or positive")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


# What a chat uses when the user names no sampling options: Ollama's defaults (a small model sampled
# greedily tends to loop). Raw completion stays greedy by default; `temperature=0` is greedy anywhere.
CHAT_DEFAULTS = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, min_p=0.0, repeat_penalty=1.1,
                               repeat_last_n=64)


def chat_sampling(**given) -> SamplingParams:
    """A chat's sampling: CHAT_DEFAULTS with the options the user named (None: not named) put in their place.

    `temperature=0` asks for greedy, the mode "identical output" is measured in: the other defaults are then
    SamplingParams' (no repeat penalty) unless named too, so it matches llama-cpp-python's greedy answer.
    """
    given = {k: v for k, v in given.items() if v is not None}
    base = SamplingParams() if given.get("temperature", 1.0) <= 0 else CHAT_DEFAULTS
    return replace(base, **given)


class Sampler:
    """Stateful per session: remembers recent tokens for the repeat penalty and owns the RNG."""

    def __init__(self, params: SamplingParams, history: Iterable[int] = ()):
        self.params = params
        self.recent = list(history)
        self.end: int | None = None  # the position after the last observed token, once known
        self.rng = np.random.default_rng(params.seed)
        # Draws made with a position come from (seed, position) alone, so a sampler rebuilt on another
        # node after a failure draws exactly what this one would have.
        self.seed = params.seed if params.seed is not None else int(self.rng.integers(1 << 63))

    def observe(self, tokens: Iterable[int], start: int | None = None) -> None:
        """Remember tokens fed to the model (for the repeat penalty).

        With `start` (the position of the first), tokens observed before at that position or later
        are forgotten first: a step that was undone and runs again is counted once.
        """
        if start is not None:
            self.rewind(start)
        tokens = [int(t) for t in tokens]
        self.recent.extend(tokens)
        if start is not None:
            self.end = start + len(tokens)
        elif self.end is not None:
            self.end += len(tokens)
        keep = max(self.params.repeat_last_n, 64) + 1024  # room for undoing a whole prompt batch
        if len(self.recent) > 2 * keep:
            del self.recent[:-keep]

    def rewind(self, length: int) -> None:
        """Forget tokens observed at positions `length` and later."""
        if self.end is not None and length < self.end:
            del self.recent[max(0, len(self.recent) - (self.end - length)):]
            self.end = length

    def sample(self, logits: np.ndarray, remember: bool = True, position: int | None = None) -> int:
        """Pick the next token; `remember=False` when the caller will `observe` it once it is fed back.

        With `position` (the row's position in the session) a random draw depends only on the seed and
        that position, not on how many draws this sampler made before.
        """
        p = self.params
        logits = np.asarray(logits, dtype=np.float32)
        if p.repeat_penalty != 1.0 and p.repeat_last_n:
            logits = logits.copy()
            seen = np.unique(np.asarray(self.recent[-p.repeat_last_n:], dtype=np.int64))
            seen = seen[(seen >= 0) & (seen < logits.size)]
            vals = logits[seen]
            # llama.cpp's rule: shrink positive logits, grow negative ones.
            logits[seen] = np.where(vals > 0, vals / p.repeat_penalty, vals * p.repeat_penalty)
        if p.greedy:
            token = int(np.argmax(logits))
        else:
            rng = self.rng if position is None else np.random.default_rng([self.seed, position])
            token = self._draw(logits, rng)
        if remember:
            self.recent.append(token)
        return token

    def _draw(self, logits: np.ndarray, rng: np.random.Generator) -> int:
        p = self.params
        order = np.argsort(-logits, kind="stable")
        if p.top_k:
            order = order[: p.top_k]
        cand = logits[order].astype(np.float64)
        probs = np.exp(cand - cand[0])
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            order, cand, probs = order[:keep], cand[:keep], probs[:keep]
        if p.min_p > 0.0:
            mask = probs >= p.min_p * probs[0]
            order, cand = order[mask], cand[mask]
        scaled = (cand - cand[0]) / p.temperature
        weights = np.exp(scaled)
        weights /= weights.sum()
        return int(order[rng.choice(len(order), p=weights)])
