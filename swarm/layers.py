"""Layer ranges and shard roles: the vocabulary shared by slicer, engine and planner."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from .errors import ShardRangeError


class ShardRole(str, enum.Enum):
    """Where a shard sits in the pipeline; decides its inputs and outputs."""

    WHOLE = "whole"    # token ids in, logits out
    FIRST = "first"    # token ids in, hidden states out
    MIDDLE = "middle"  # hidden states in, hidden states out
    LAST = "last"      # hidden states in, logits out

    @property
    def takes_tokens(self) -> bool:
        return self in (ShardRole.WHOLE, ShardRole.FIRST)

    @property
    def gives_logits(self) -> bool:
        return self in (ShardRole.WHOLE, ShardRole.LAST)


@dataclass(frozen=True, order=True)
class LayerRange:
    """Half-open range [start, end) of transformer blocks."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.end <= self.start:
            raise ShardRangeError(
                f"layer range {self.start}:{self.end} is empty or negative; "
                "give START:END with 0 <= START < END"
            )

    @property
    def count(self) -> int:
        return self.end - self.start

    def role(self, n_layer: int) -> ShardRole:
        """The role of this range in a model of n_layer blocks."""
        self.check_within(n_layer)
        first, last = self.start == 0, self.end == n_layer
        if first and last:
            return ShardRole.WHOLE
        if first:
            return ShardRole.FIRST
        if last:
            return ShardRole.LAST
        return ShardRole.MIDDLE

    def check_within(self, n_layer: int) -> None:
        if self.end > n_layer:
            raise ShardRangeError(
                f"layer range {self} is outside the model, which has {n_layer} layers "
                f"(valid ranges lie within 0:{n_layer})"
            )

    @classmethod
    def parse(cls, text: str) -> "LayerRange":
        """Parse 'A:B' (half-open, like a Python slice)."""
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
        if not m:
            raise ShardRangeError(f"cannot read layer range {text!r}; write it as START:END, e.g. 0:6")
        return cls(int(m.group(1)), int(m.group(2)))

    def __str__(self) -> str:
        return f"{self.start}:{self.end}"


def split_evenly(n_layer: int, parts: int) -> list[LayerRange]:
    """Cut n_layer blocks into `parts` contiguous ranges whose sizes differ by at most one."""
    if parts < 1 or parts > n_layer:
        raise ShardRangeError(f"cannot cut {n_layer} layers into {parts} shards; use 1 to {n_layer}")
    base, extra = divmod(n_layer, parts)
    ranges, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        ranges.append(LayerRange(start, start + size))
        start += size
    return ranges
