"""Correct a node's probed speed by the steps it really runs, and say when to probe it again.

A probe times slices of the model in an otherwise idle process for a second or two; a node then serves
for hours, beside its own gRPC threads, other nodes of the same machine, or other people's work. The
coordinator sees, for every step, each hop's compute time (`HopTiming.compute_ms`, the node's
`Shard.forward`) and knows what the planner predicted for that hop from the node's probed profile
(`planner.hop_decode_s`). Everything here is a pure function of those numbers:

* `observe` keeps the last `window` ratios observed / predicted of a node's decode steps;
* `assess` turns them into a verdict: the median ratio, once `min_steps` were seen, becomes the scale
  applied to the node's decode cost (`corrected`), but only when it leaves the scale in use by more
  than `deadband` (so that noise does not re-plan the swarm at every session); and when the median
  parts from the probe by more than `reprobe_at` (25%: what the documentation promises for
  predictions), the verdict asks for a new probe, at most once per `cooldown_s` per node, and half
  as often after each new probe that the steps still disagreed with (a probe taken in a quiet moment
  of a machine that is busy while serving keeps disagreeing: the scale carries the correction, and
  the coordinator does not probe again and again);
* `probed` starts afresh once the coordinator has the new profile.

The ratios are always taken against the *probed* profile, never the corrected one, so corrections do
not compound.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass

from .planner import NodeProfile


@dataclass(frozen=True)
class CalibrationPolicy:
    """When observed steps correct a profile and when they call for a new probe."""

    window: int = 64  # recent decode steps kept per node
    min_steps: int = 16  # steps seen before the median counts
    deadband: float = 0.10  # the scale moves only when the median leaves it by more than this share
    reprobe_at: float = 0.25  # probe again when the median parts from 1 by more than this share
    cooldown_s: float = 600.0  # at most one re-probe per node in this many seconds ...
    max_cooldown_s: float = 6 * 3600.0  # ... doubled after each re-probe that did not settle it, up to this
    scale_range: tuple[float, float] = (0.1, 10.0)  # a ratio outside this is a broken measurement


DEFAULT_POLICY = CalibrationPolicy()


@dataclass(frozen=True)
class Calibration:
    """What the coordinator keeps per node between steps (start with `Calibration()`)."""

    ratios: tuple[float, ...] = ()  # observed / predicted compute of recent decode steps, oldest first
    scale: float = 1.0  # applied to the probed decode cost; 1: the probe is trusted as it is
    reprobed_at: float | None = None  # the `now` of the last probe this calibration started from
    unsettled: int = 0  # probes in a row after which the steps still parted from the prediction


@dataclass(frozen=True)
class Verdict:
    """What to do with a node now."""

    calibration: Calibration  # keep this for the node
    scale: float  # plan with `corrected(probed_profile, scale)`
    changed: bool  # the scale differs from the one in use: predict (and, between sessions, plan) again
    reprobe: bool  # drop the node's cached profile and probe it again, then call `probed`
    ratio: float | None  # median observed / predicted over the window; None before `min_steps`


def _ratio(predicted_s: float, observed_s: float) -> float | None:
    if not (math.isfinite(predicted_s) and math.isfinite(observed_s) and predicted_s > 0 and observed_s > 0):
        return None
    return observed_s / predicted_s


def observe(cal: Calibration, predicted_s: Iterable[float], observed_s: Iterable[float],
            policy: CalibrationPolicy = DEFAULT_POLICY) -> Calibration:
    """Add decode steps of one node: predicted (from its probed profile) and observed compute seconds, pairwise."""
    predicted_s, observed_s = list(predicted_s), list(observed_s)
    if len(predicted_s) != len(observed_s):
        raise ValueError(f"{len(predicted_s)} predicted against {len(observed_s)} observed steps; pair them")
    lo, hi = policy.scale_range
    new = [r for r in map(_ratio, predicted_s, observed_s) if r is not None and lo <= r <= hi]
    if not new:
        return cal
    return dataclasses.replace(cal, ratios=(cal.ratios + tuple(new))[-policy.window:])


def assess(cal: Calibration, now: float, policy: CalibrationPolicy = DEFAULT_POLICY) -> Verdict:
    """The scale to plan with and whether to probe again, from the steps observed so far (`now`: monotonic s)."""
    if len(cal.ratios) < policy.min_steps:
        return Verdict(cal, cal.scale, False, False, None)
    ratio = statistics.median(cal.ratios)
    scale = cal.scale
    if abs(math.log(ratio / scale)) > math.log1p(policy.deadband):
        scale = ratio
    far = abs(math.log(ratio)) > math.log1p(policy.reprobe_at)
    wait = min(policy.cooldown_s * 2 ** max(0, cal.unsettled - 1), policy.max_cooldown_s)
    rested = cal.reprobed_at is None or now - cal.reprobed_at >= wait
    new = dataclasses.replace(cal, scale=scale, unsettled=cal.unsettled if far else 0)
    return Verdict(new, scale, scale != cal.scale, far and rested, ratio)


def probed(cal: Calibration, now: float) -> Calibration:
    """The calibration to keep once a new probe replaced the node's profile: no steps, no scale.

    After a probe that a verdict asked for, the next one waits longer while the steps keep disagreeing.
    """
    return Calibration(reprobed_at=now, unsettled=cal.unsettled + 1)


def corrected(profile: NodeProfile, scale: float) -> NodeProfile:
    """`profile` with its decode costs (step overhead, per byte of blocks and of the head) times `scale`.

    The prefill cost per byte is left as probed: decode steps say nothing about it, and a new probe
    measures it again (the step overhead, which prompt batches pay too, is scaled).
    """
    if scale == 1.0:
        return profile
    return dataclasses.replace(
        profile,
        decode_s_per_byte=profile.decode_s_per_byte * scale,
        step_overhead_s=profile.step_overhead_s * scale,
        head_s_per_byte=None if profile.head_s_per_byte is None else profile.head_s_per_byte * scale,
    )
