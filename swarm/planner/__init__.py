"""Plan shards by measured speed: the contiguous layer split that minimises predicted time per token.

Planner (`plan_measured`): among all routes (which free nodes take part, in which order, with which
contiguous split; pinned nodes hold exactly their pins; every shard fits its node's memory by
`Footprint.shard_bytes`), choose the lowest predicted decode latency, then the lowest prefill time,
then the fewest layers moved away from `current`, then the route whose (node id, range end) sequence
sorts first.

One job per module:

* `cost`: the cost model: `NodeProfile`, `Prediction`, links and `predict`, the time of a given route.
* `instance`: the fleet and the model as tables of exact integer costs, which the searches share.
* `exact`: the exact search, a dynamic programme over sets of free nodes (up to `EXACT_LIMIT` of them).
* `heuristic`: the search for more free nodes: the same programme over a few fixed orders of them.
* `reasons`: why each node got its range or was left out, and why a model cannot be placed.
* `plan`: `plan_measured`, which ties them together, and `MeasuredPlan`, what it returns.
* `baselines`: the reference rules `exo_plan` and `llamacpp_plan` (layers in proportion to memory).
"""

from .baselines import exo_plan, llamacpp_plan
from .cost import Links, NodeProfile, Prediction, head_cost_factor, hop_decode_s, predict
from .heuristic import HEURISTIC_EVALS
from .plan import EXACT_LIMIT, MeasuredPlan, plan_measured

__all__ = [
    "EXACT_LIMIT", "HEURISTIC_EVALS", "Links", "MeasuredPlan", "NodeProfile", "Prediction", "exo_plan",
    "head_cost_factor", "hop_decode_s", "llamacpp_plan", "plan_measured", "predict",
]
