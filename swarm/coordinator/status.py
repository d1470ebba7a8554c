"""What `swarm status` shows: the nodes with their measurements and layers, the sessions, the recoveries,
the standbys."""

from __future__ import annotations

import time

from .. import messages as m
from .checkpoints import CheckpointDesk
from .measuring import Measurer
from .members import Membership
from .planning import Placement
from .sessions import Sessions
from .standbys import Standbys
from .succession import RecoveryLog


def report(swarm: str, model_name: str, n_layer: int, members: Membership, measurer: Measurer,
           placement: Placement, sessions: Sessions, recoveries: RecoveryLog, desk: CheckpointDesk,
           standbys: Standbys, chat_template: str = "") -> m.StatusReport:
    """The swarm's state now, read from each room."""
    now = time.monotonic()
    nodes = []
    for x in members.all():
        held, probed = placement.holding(x.node_id), measurer.probed(x.node_id)
        nodes.append(m.NodeReport(
            node_id=x.node_id, name=x.name, address=x.address, steps=x.steps, resources=x.resources, state=x.state,
            last_seen_s=0.0 if x.is_self else now - x.last_seen, is_coordinator=x.is_self, pinned=x.pin is not None,
            layers=held.layers, extra_layers=tuple(held.extra), detail=x.detail,
            profile=probed.profile if probed else None, profile_cached=bool(probed and probed.cached),
            link=measurer.link_to_me(x.node_id), reason=held.reason, outbound_only=bool(x.relay_token),
            relayed_because=x.relay_reason,
        ))
    state, detail, predicted, measured, n_measured = placement.report()
    s = placement.settings
    return m.StatusReport(
        swarm=swarm, model_name=model_name, n_layer=n_layer, state=state, detail=detail, n_ctx=s.n_ctx,
        max_sessions=s.max_sessions, nodes=tuple(nodes), sessions=tuple(x.report(now) for x in sessions.all()),
        predicted_decode_tps=predicted, measured_decode_tps=measured, measured_sessions=n_measured,
        recoveries=recoveries.reports(members.name_of), checkpoints=desk.counts(), standbys=standbys.reports(),
        chat_template=chat_template,
    )
