"""Turning a stream of token bytes into text pieces, holding back what may be the start of a stop string."""

from __future__ import annotations

import codecs
from typing import Sequence

from .errors import BadInputError

MAX_STOPS = 16
MAX_STOP_CHARS = 256


def check_stops(stops: Sequence[str]) -> list[str]:  # a Sequence: its length is known before copying
    """Stop strings as given by a client: a few, non-empty, of bounded length."""
    if len(stops) > MAX_STOPS:
        raise BadInputError(f"at most {MAX_STOPS} stop strings, got {len(stops)}")
    stops = list(stops)
    for s in stops:
        if not s or len(s) > MAX_STOP_CHARS:
            raise BadInputError(f"a stop string must be 1 to {MAX_STOP_CHARS} characters, got {s!r:.40}")
    return stops


class TextStream:
    """Feed token bytes in; get text out, never splitting a UTF-8 character or emitting part of a stop string."""

    def __init__(self, stops: Sequence[str] = ()):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = list(stops)
        self._held = ""  # decoded text not yet emitted because it may begin a stop string
        self.stopped = False

    def feed(self, data: bytes) -> str:
        """Text that is now safe to show; sets `stopped` when a stop string appeared (it is not shown)."""
        if self.stopped:
            return ""
        text = self._held + self._decoder.decode(data)
        cut = min((i for i in (text.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return text[:cut]
        keep = self._longest_stop_prefix_suffix(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """Whatever is still held (at the end of generation)."""
        if self.stopped:
            return ""
        text = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return text

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        best = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
