"""Membership: who is in the swarm, whether they are alive, and who keeps dropping out.

Nodes join (their names made unique), heartbeat every HEARTBEAT_S, and are declared lost after
LOST_AFTER_S of silence; a node lost repeatedly is kept out of plans for a while, longer each time
(flapping). Everything about a member's identity and health lives here, under one lock; what it holds
is the placement's business (planning.py), what it measured the measurer's (measuring.py).
"""

from __future__ import annotations

import collections
import itertools
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from .. import failover
from .. import messages as m
from ..errors import BadInputError, ShardRangeError
from ..layers import LayerRange

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.5
LOST_AFTER_S = 2.5  # five missed heartbeats: a hung node is noticed within 3 s
RETRY_S = 30.0  # a node that failed to be measured or to load is planned for again after this


@dataclass
class Member:
    """A node as the coordinator knows it. Mutable, guarded by its Membership's lock."""

    node_id: str
    name: str
    address: str
    steps: str  # HOST:PORT of its step stream
    resources: m.Resources
    pin: LayerRange | None
    is_self: bool = False
    last_seen: float = field(default_factory=time.monotonic)
    state: str = "joining"  # joining, loading, ready, idle, failed, backoff, leaving
    detail: str = ""
    excluded_until: float = 0.0  # failed to be measured or to load: left out of plans until then
    leaves_at: float = 0.0  # time.monotonic() of its --leave-after deadline (0: none)
    relay_token: str = ""  # outbound-only: reached at the relay's ports for it (its address and steps)
    relay_reason: str = ""  # why it is relayed (shown by `swarm status`)

    def __post_init__(self) -> None:
        # Plan with what the node had free when it joined: once it holds a shard, its free memory
        # no longer counts that shard, and re-plans would shrink it for nothing.
        self.plan_resources = self.resources

    def usable_memory(self) -> int:
        """What the planner may fill: the cap when given (never more than is free), else 90% of free."""
        return self.plan_resources.usable_memory()


# Called once a member is removed: (member, why, how it was detected).
Gone = Callable[[Member, str, str], None]


class Membership:
    """The members of one swarm; thread-safe. `on_gone` hears of every removal, outside the lock."""

    def __init__(self, me: Member, on_gone: Gone, on_change: Callable[[], None]):
        self._lock = threading.Lock()
        self._members: dict[str, Member] = {me.node_id: me}
        self._ids = itertools.count(1)
        # Ids carry this coordinator's own random mark: a node that heartbeats with the id an earlier run of
        # the coordinator gave it must hear "unknown" and join again, not be taken for whoever holds that
        # number now (it once stayed out of a restarted swarm for good that way).
        self._mark = secrets.token_hex(3)
        self._losses: dict[str, list[float]] = {}  # address -> when it was lost (flapping back-off)
        self._former: collections.OrderedDict[str, Member] = collections.OrderedDict()  # recently removed
        self._on_gone, self._on_change = on_gone, on_change

    # ------------------------------------------------------------ reading

    def get(self, node_id: str) -> Member | None:
        with self._lock:
            return self._members.get(node_id)

    def alive(self, node_id: str) -> bool:
        with self._lock:
            return node_id in self._members

    def all(self) -> list[Member]:
        with self._lock:
            return list(self._members.values())

    def plannable(self, now: float | None = None) -> list[Member]:
        """Members not left out of plans at `now`."""
        now = time.monotonic() if now is None else now
        with self._lock:
            return [x for x in self._members.values() if x.excluded_until <= now]

    def silent_for(self, node_id: str) -> float | None:
        """Seconds since the member's last heartbeat (None: not a member)."""
        with self._lock:
            x = self._members.get(node_id)
            return None if x is None else time.monotonic() - x.last_seen

    def name_of(self, node_id: str) -> str:
        x = self.known(node_id)
        return x.name if x is not None else node_id

    def risk(self, node_id: str, address: str, now: float | None = None) -> int:
        """How unreliable a node is: its losses within the flapping window, plus one for a --leave-after
        deadline."""
        now = time.monotonic() if now is None else now
        with self._lock:
            x = self._members.get(node_id)
            lost = sum(1 for t in self._losses.get(address, ()) if now - t <= failover.FLAP_WINDOW_S)
            return lost + (1 if x is not None and x.leaves_at else 0)

    def known(self, node_id: str) -> Member | None:
        """A member, or one removed lately (errors and records still name it as it joined)."""
        with self._lock:
            return self._members.get(node_id) or self._former.get(node_id)

    # ------------------------------------------------------------ changing

    def admit(self, request: m.JoinRequest, address: str, steps: str,
              unreachable: Callable[[Member], bool]) -> Member:
        """Add a joining node. A node that restarts at the same address replaces its old self; a pin that
        overlaps another member's is refused, unless that member does not answer (`unreachable`)."""
        pin = request.pin
        if pin is not None:
            # A node restarted under the same pin may find its old self not yet declared lost: if that
            # one does not answer, the newcomer replaces it.
            with self._lock:
                rivals = [x for x in self._members.values() if not x.is_self and x.address != address
                          and x.pin is not None and pin.start < x.pin.end and x.pin.start < pin.end]
            for x in rivals:
                if unreachable(x):
                    self.remove(x.node_id, f"does not answer; {request.name} at {address} takes its pin {x.pin}",
                                "did not answer when a node with its pin joined")
        with self._lock:
            restarted = [x for x in self._members.values() if x.address == address and not x.is_self]
            for x in restarted:
                del self._members[x.node_id]
            for x in self._members.values():
                if pin is not None and x.pin is not None and pin.start < x.pin.end and x.pin.start < pin.end:
                    raise ShardRangeError(
                        f"layers {pin} overlap {x.pin}, already pinned to node {x.name} ({x.address}); "
                        "pin a range that no other node holds"
                    )
            member = Member(f"n{next(self._ids)}.{self._mark}", self._unique(request.name.strip()), address, steps,
                            request.resources, pin)
            if request.leave_after_s > 0:
                member.leaves_at = time.monotonic() + request.leave_after_s
            wait = failover.backoff_s(self._losses.get(address, []), time.monotonic())
            if wait:  # it keeps dropping out: plan without it for a while, longer each time
                member.excluded_until = time.monotonic() + wait
                member.state = "backoff"
                member.detail = f"lost {len(self._losses[address])} times; planned for again in {wait:.0f} s"
                log.warning("node %s at %s keeps dropping out; leaving it out of plans for %.0f s", member.name,
                            address, wait)
            self._members[member.node_id] = member
        for x in restarted:
            self._gone(x, "restarted", "")
        self._on_change()
        return member

    def _unique(self, name: str) -> str:
        """`name`, or `name-2`, `name-3`, ... when another member has it (lock held)."""
        taken = {x.name for x in self._members.values()}
        if name not in taken:
            return name
        return next(f"{name}-{i}" for i in itertools.count(2) if f"{name}-{i}" not in taken)

    def heartbeat(self, node_id: str, resources: m.Resources | None) -> bool:
        """Note a heartbeat; False when the member is unknown (it should join again)."""
        with self._lock:
            x = self._members.get(node_id)
            if x is None:
                return False
            x.last_seen = time.monotonic()
            if resources is not None:
                # Devices are sent once, at join.
                x.resources = resources if resources.devices else m.Resources(
                    resources.memory_total, resources.memory_available, resources.max_memory, resources.threads,
                    resources.cpu_count, x.resources.devices)
            return True

    def remove(self, node_id: str, why: str, detection: str = "") -> Member | None:
        """Take a member out (lost, left, restarted); None when it was already gone."""
        with self._lock:
            x = self._members.pop(node_id, None)
            if x is None or x.is_self:
                if x is not None:
                    self._members[node_id] = x
                return None
        self._gone(x, why, detection)
        return x

    def _gone(self, x: Member, why: str, detection: str) -> None:
        with self._lock:
            self._former[x.node_id] = x
            while len(self._former) > 256:
                self._former.popitem(last=False)
            if why not in ("left", "restarted"):
                self._losses.setdefault(x.address, []).append(time.monotonic())
        self._on_gone(x, why, detection or why)
        self._on_change()

    def mark(self, node_id: str, state: str, detail: str = "") -> None:
        with self._lock:
            x = self._members.get(node_id)
            if x is not None:
                x.state, x.detail = state, detail

    def exclude(self, node_id: str, detail: str, seconds: float = RETRY_S) -> None:
        """Leave a member out of plans for a while (it failed to be measured or to load), then try again."""
        with self._lock:
            x = self._members.get(node_id)
            if x is not None:
                x.state, x.detail = "failed", detail
                x.excluded_until = time.monotonic() + seconds

    def sweep(self) -> list[str]:
        """Declare members lost whose heartbeats stopped; the ids whose exclusion just ended (to measure
        them again from scratch)."""
        now = time.monotonic()
        retry, lost = [], []
        with self._lock:
            for x in self._members.values():
                if x.excluded_until and x.excluded_until <= now:
                    x.excluded_until = 0.0
                    retry.append(x.node_id)
                if not x.is_self and now - x.last_seen > LOST_AFTER_S:
                    lost.append((x.node_id, now - x.last_seen))
        for node_id, silent in lost:
            self.remove(node_id, f"missed its heartbeats for {silent:.1f} s", f"missed heartbeats for {silent:.1f} s")
        if retry:
            self._on_change()
        return retry


def check_join(request: m.JoinRequest, n_layer: int) -> None:
    """Refuse a join whose fields cannot be right, saying what to change."""
    name = request.name.strip()
    if not name or len(name) > 64:
        raise BadInputError("a node name is 1 to 64 characters (--name)")
    if not 0 < request.port < 65536:
        raise BadInputError(f"port {request.port} is not a TCP port")
    if not 0 < request.step_port < 65536:
        raise BadInputError(f"step port {request.step_port} is not a TCP port (a node older than this coordinator "
                            "sends none: upgrade it)")
    if request.pin is not None:
        request.pin.check_within(n_layer)
    if not 0 <= request.leave_after_s < 1e9:  # (NaN fails this too)
        raise BadInputError(f"a node's --leave-after is 0 or more seconds, got {request.leave_after_s}")
