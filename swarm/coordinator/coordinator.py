"""The coordinator: the rooms of the swarm's brain, put together, and the calls the wire hands it.

It owns the model file and the tokenizer, and hosts layers itself through a node of its own (`local`).
Each concept lives in a room of this package (docs/architecture.md has the map):

    members.py      who is in the swarm and alive          measuring.py   what each node measured
    shardfiles.py   the shard files it cuts and serves     planning.py    the route, and what each node holds
    sessions.py     the running sessions and their slots   generation.py  one session's loop
    stepping.py     one step along a route                 checkpoints.py the KV checkpoints kept for recovery
    recovery.py     carrying a session over a failure      succession.py  who takes a lost range; the record
    migration.py    a node that leaves on purpose          peers.py       reaching each node
    standbys.py     replicas that take a lost range over   status.py      what `swarm status` shows
"""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path
from typing import Callable, Iterator

from .. import messages as m
from .. import placement as footprints
from ..engine import Tokenizer
from ..errors import BadInputError
from ..failover import replay_budget_from_env
from ..gguf_file import read_gguf
from ..layers import LayerRange
from ..node import Node
from ..slicing import model_layer_count
from ..wire import NodeRegistry, Relay, check_address, split_address
from . import status
from .checkpoints import CheckpointDesk
from .generation import Generation
from .measuring import Measurer
from .members import HEARTBEAT_S, Member, Membership, check_join
from .migration import Migration
from .peers import Peers, RouteHop
from .planning import Placement
from .recovery import Recovery
from .sessions import Sessions
from .shardfiles import ShardFiles
from .standbys import Standbys
from .stepping import Stepper
from .succession import RecoveryLog, Succession

log = logging.getLogger(__name__)


REACH_S = 1.5  # a joining node that does not take a TCP connection this fast is reached through the relay


def _answers(host: str, port: int) -> bool:
    """Whether a TCP connection to host:port is taken within REACH_S."""
    try:
        socket.create_connection((host, port), timeout=REACH_S).close()
        return True
    except OSError:
        return False


class Coordinator:
    """The swarm's brain; thread-safe. `join.start_coordinator` puts it on the network."""

    def __init__(
        self,
        model_path: Path,
        *,
        swarm: str,
        key: str,
        name: str,
        address: str,
        resources: m.Resources,
        pin: LayerRange | None = None,
        n_ctx: int = 2048,
        max_sessions: int = 4,
        n_batch: int = 512,
        threads: int | None = None,
        default_max_tokens: int = 256,
        reprofile: bool = False,
        failover: bool = True,
        step_address: str = "",
        standbys: bool = True, standbys_on_route: bool = False,
        relay: Relay | None = None,
        model_url: str = "",
    ):
        self.model_path = Path(model_path)
        self.swarm = swarm
        # Outbound-only nodes (behind NAT) are reached through this relay: their address -> its endpoint.
        self.relay, self._relayed, self._host = relay, {}, split_address(address)[0]
        self._relay_lock = threading.Lock()
        if relay is not None:
            relay.allowed = self._is_member_address  # where relayed nodes may dial out through it
        model = read_gguf(self.model_path)
        self.n_layer = model_layer_count(model)
        if self.n_layer < 3:
            raise BadInputError(f"{self.model_path.name} has {self.n_layer} layers; a swarm needs a model of at least 3")
        if pin is not None:
            pin.check_within(self.n_layer)
        self.tokenizer = Tokenizer(self.model_path)
        settings = m.ContextSettings(n_ctx, max_sessions, min(n_batch, n_ctx))
        self.files = ShardFiles(self.model_path, self.n_layer, model_url)
        registry = NodeRegistry(key)
        self.local = Node(registry, threads=threads, progress=False, local_file=self.files.path)
        self.peers = Peers(self.local, registry)
        me = Member("n0", name, address, step_address, resources, pin, is_self=True)
        self.members = Membership(me, self._member_gone, lambda: self.placement.mark_dirty())
        self.measurer = Measurer(footprints.footprint(model), self.n_layer, self.files, self.members, self.local,
                                 self.peers, reprofile)
        self.sessions = Sessions(max_sessions, lambda: self.placement.poke())
        self.placement = Placement(self.members, self.measurer, self.files, self.peers, settings, self.sessions.busy,
                                   self._new_route)
        self.standbys = Standbys(self.members, self.placement, self.measurer, self.files, self.peers,
                                 self.sessions.get, enabled=standbys and failover, on_route_too=standbys_on_route)
        self.succession = Succession(self.members, self.placement, self.measurer, self.files, self.peers,
                                     self.standbys)
        self.stepper = Stepper(self.peers, failover, replay_budget_from_env(), lambda: self.standbys.guarded())
        self.recoveries = RecoveryLog()
        self.recovery = Recovery(self.members, self.placement, self.succession, self.recoveries, self.peers,
                                 self.stepper, settings.n_batch, self.standbys)
        self.migration = Migration(self.members, self.placement, self.sessions, self.succession, self.recoveries,
                                   self.peers, self.stepper, self.recovery)
        self.desk = CheckpointDesk(self.sessions.get, self.files.shard_id, settings.n_batch, self.standbys.offer)
        self.generation = Generation(self.tokenizer, settings, default_max_tokens, self.placement, self.sessions,
                                     self.stepper, self.recovery, self.migration, self.recoveries, self.measurer,
                                     self.members)
        self._stop = threading.Event()
        self.standbys.start()
        self.placement.start()
        threading.Thread(target=self._watch_loop, name="heartbeats", daemon=True).start()

    # ------------------------------------------------------------ what the wire hands in

    def join(self, request: m.JoinRequest, peer_host: str) -> m.Welcome:
        check_join(request, self.n_layer)
        host = request.host or peer_host
        address = check_address(f"{host}:{request.port}")
        steps = check_address(f"{host}:{request.step_port}")
        endpoint = None
        if self.relay is not None and (request.outbound_only or not _answers(host, request.port)):
            # Peers reach it at the relay's ports for it; the same node joining again keeps them.
            with self._relay_lock:
                endpoint = self._relayed.get(address) or self._relayed.setdefault(
                    address, self.relay.open(request.name.strip()))
            origin = address
            address, steps = (f"{self._host}:{endpoint.ports[t]}" for t in ("grpc", "steps"))
        try:
            member = self.members.admit(request, address, steps,
                                        lambda x: bool(self.recovery.unreachable((self._hop_of(x),))))
        except BaseException:
            if endpoint is not None and not any(y.address == address for y in self.members.all()):
                self._drop_relayed(endpoint.token)
            raise
        if endpoint is not None:
            member.relay_token = endpoint.token
            member.relay_reason = ("it asked to be (--outbound-only)" if request.outbound_only else
                                   f"the coordinator could not reach it at {origin} when it joined (behind NAT "
                                   "or a firewall?)")
            log.info("node %s at %s is outbound-only%s: relayed at %s (steps %s)", member.name, origin,
                     "" if request.outbound_only else " (it did not answer)", address, steps)
        log.info("node %s joined from %s (%s MB for the swarm%s)", member.name, address, member.usable_memory() >> 20,
                 f", pinned to {request.pin}" if request.pin else "")
        return m.Welcome(member.node_id, HEARTBEAT_S, self.model_path.name, member.name,
                         relay_port=self.relay.port if endpoint else 0, relay_token=endpoint.token if endpoint else "")

    def heartbeat(self, node_id: str, resources: m.Resources | None) -> bool:
        return self.members.heartbeat(node_id, resources)

    def leave(self, node_id: str, graceful: bool = False) -> m.Farewell:
        return self.migration.leave(node_id, graceful)

    def store_checkpoint(self, checkpoint: m.Checkpoint, blob: bytes) -> bool:
        return self.desk.store(checkpoint, blob)

    def fetch_chunks(self, shard_id: str, offset: int) -> Iterator[m.ShardChunk]:
        return self.files.chunks(shard_id, offset)

    def generate(self, request: m.GenerateRequest, is_active: Callable[[], bool], wait_s: float = 120.0
                 ) -> Iterator[m.GenerateEvent]:
        return self.generation.generate(request, is_active, wait_s)

    def status(self) -> m.StatusReport:
        return status.report(self.swarm, self.model_path.name, self.n_layer, self.members, self.measurer,
                             self.placement, self.sessions, self.recoveries, self.desk, self.standbys,
                             self.tokenizer.chat_format)

    def wait_ready(self, timeout: float):
        return self.placement.wait_ready(timeout)

    # ------------------------------------------------------------ losses

    def _new_route(self) -> None:
        """A plan was loaded: the successors of earlier losses are part of it or gone, and so are the standbys."""
        self.succession.clear()
        self.standbys.replanned()

    def _is_member_address(self, host: str, port: int) -> bool:
        """Whether HOST:PORT is where a member of the swarm (this coordinator's own node included) serves."""
        target = f"{host}:{port}"
        return any(target in (x.address, x.steps) for x in self.members.all())

    def _drop_relayed(self, token: str) -> None:
        with self._relay_lock:
            self._relayed = {a: e for a, e in self._relayed.items() if e.token != token}
        self.relay.drop(token)

    @staticmethod
    def _hop_of(x: Member) -> RouteHop:
        return RouteHop(x.node_id, x.address, x.pin or LayerRange(0, 1), x.is_self, x.steps)

    def _member_gone(self, x: Member, why: str, detection: str) -> None:
        """A member was removed (lost, left, restarted): stop what ran through it, plan around it."""
        self.peers.forget(x)
        if x.relay_token and not any(y.address == x.address for y in self.members.all()):
            self._drop_relayed(x.relay_token)  # its relay ports close; joining again opens new ones
        self.measurer.forget(x.node_id)
        self.standbys.forget(x.node_id)
        held = self.placement.forget(x.node_id).hosted()
        log.log(logging.INFO if why in ("left", "restarted") else logging.WARNING, "node %s (%s) %s%s", x.name,
                x.address, why, f"; it held layers {', '.join(map(str, held))}" if held else "")
        in_use = self.sessions.using(x.node_id)
        if held:
            self.recoveries.open(x, held, detection, "" if in_use else "no session was running; layers re-planned")
        if in_use:
            # Running sessions carry on: each one stops its step and rebuilds the lost range elsewhere.
            for s in in_use:
                s.interrupt(f"node {x.name} ({x.address}) {why}", self.local.cancel)
        elif held:
            self.placement.drop_route_through(x.node_id, f"node {x.name} {why}; re-planning layers {held[0]}")
        self.placement.mark_dirty()

    def _watch_loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_S / 2):
            for node_id in self.members.sweep():
                self.measurer.forget(node_id)  # measure it again from scratch
            for s in self.sessions.all():
                if s.interrupted:  # a cancel can race with the step's start: repeat it until seen
                    s.interrupt("", self.local.cancel)

    # ------------------------------------------------------------ settings benchmarks change

    @property
    def failover_enabled(self) -> bool:
        """Off: nodes keep no outputs and hand in no checkpoints; a failed node ends its sessions."""
        return self.stepper.failover_enabled

    @failover_enabled.setter
    def failover_enabled(self, on: bool) -> None:
        self.stepper.failover_enabled = on

    def close(self) -> None:
        self._stop.set()
        if self.relay is not None:
            self.relay.close()
        self.standbys.stop()
        self.placement.stop()
        self.peers.close()
        self.local.close()
        self.files.close()
        self.tokenizer.close()
