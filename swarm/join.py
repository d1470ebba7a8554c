"""`swarm join` as a library: start a coordinator or a node on this machine, keep it in the swarm, stop it.

The command line prints; this module only logs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil

from . import __version__, discovery, engine, profiling, wire
from . import messages as m
from .cache import key_file
from .coordinator import Coordinator
from .engine import default_threads
from .errors import AuthError, BadInputError, PeerError, SwarmError
from .http import HttpServer
from .layers import LayerRange
from .node import Node

log = logging.getLogger(__name__)

DEFAULT_PORT = 7700
HTTP_PORT_OFFSET = 80  # the HTTP API's default port is the coordinator's + 80: 7780
RELAY_PORT_OFFSET = 2  # the relay for outbound-only nodes: the coordinator's port + 2 (+1 is its step port)
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'8GB', '512M', '1.5GiB' or plain bytes -> bytes (K/M/G/T are powers of 1024)."""
    m = _SIZE.fullmatch(text or "")
    if not m:
        raise BadInputError(f"cannot read size {text!r}; write it like 4GB, 512MB or 1.5G")
    unit = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * unit)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([hms])", re.IGNORECASE)


def parse_duration(text: str) -> float:
    """'90s', '45m', '11h30m' or plain seconds -> seconds."""
    t = (text or "").strip()
    try:
        value = float(t)
    except ValueError:
        parts = _DURATION.findall(t)
        if not parts or "".join(a + b for a, b in parts).replace(" ", "").lower() != t.replace(" ", "").lower():
            raise BadInputError(f"cannot read duration {text!r}; write it like 90s, 45m or 11h30m") from None
        value = sum(float(a) * {"h": 3600, "m": 60, "s": 1}[b.lower()] for a, b in parts)
    if not 0 < value < 10 * 365 * 86400:
        raise BadInputError(f"duration {text!r} must be positive")
    return value


def resources(max_memory: int = 0, threads: int | None = None, with_devices: bool = False) -> m.Resources:
    """This machine's memory (within its cgroup limit, if any), what it gives the swarm, and its devices."""
    vm = psutil.virtual_memory()
    total, available = vm.total, vm.available
    limit, used = _cgroup_memory()
    if limit:
        total = min(total, limit)
        available = min(available, max(0, limit - used))
    return m.Resources(
        memory_total=total, memory_available=available, max_memory=max_memory,
        threads=threads or default_threads(), cpu_count=os.cpu_count() or 1,
        devices=tuple(profiling.devices()) if with_devices else (),
    )


def _cgroup_memory() -> tuple[int, int]:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        return (0, 0) if limit == "max" else (int(limit), used)
    except (OSError, ValueError):
        return 0, 0


def _step_server(host: str, port: int, step_port: int | None, key: str) -> wire.StepServer:
    """The step stream's listener: on --step-port, else on the port after a fixed --port, else any free one."""
    if step_port is None:
        step_port = port + 1 if 0 < port < 65535 else 0
    if not 0 <= step_port < 65536:
        raise BadInputError(f"--step-port {step_port} is not a TCP port (0 to 65535; 0: any free port)")
    return wire.StepServer(host, step_port, key)


def _reachable_host(host: str) -> str:
    """The address peers should dial for a server bound to `host`."""
    if host in ("", "0.0.0.0", "::"):
        return discovery.local_addresses()[0]
    return "127.0.0.1" if host == "localhost" else host


def _write_private(path: Path, text: str) -> None:
    """Write a file only this user can read, created that way (never readable in between)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@dataclass
class RunningCoordinator:
    coordinator: Coordinator
    server: grpc.Server
    step_server: wire.StepServer
    address: str
    key: str
    swarm: str
    advertiser: discovery.Advertiser | None
    http: HttpServer | None = None  # the OpenAI-compatible API and the web page; None with --no-http
    host: str = "0.0.0.0"  # where it listens (--host)

    @property
    def relay_port(self) -> int:
        return self.coordinator.relay.port if self.coordinator.relay else 0

    def listening(self) -> list[str]:
        """The addresses other machines may dial (every interface's for 0.0.0.0)."""
        hosts = discovery.local_addresses() if self.host in ("", "0.0.0.0", "::") else [self.address.rsplit(":", 1)[0]]
        port = self.address.rsplit(":", 1)[1]
        return [f"{h}:{port}" for h in hosts]

    def loopback_only(self) -> bool:
        return all(a.startswith(("127.", "[::1]", "::1", "localhost")) for a in self.listening())

    def stop(self, grace: float = 1.0) -> None:
        if self.advertiser:
            self.advertiser.close()
        if self.http:
            self.http.stop()
        self.server.stop(grace).wait()
        self.step_server.close()
        self.coordinator.close()
        try:
            data = json.loads(key_file(self.swarm).read_text())
            if data.get("pid") == os.getpid():
                key_file(self.swarm).unlink()
        except (OSError, ValueError):
            pass


def start_coordinator(
    model_path: Path, *, swarm: str = "default", key: str | None = None, name: str | None = None,
    host: str = "0.0.0.0", port: int = DEFAULT_PORT, max_memory: int = 0, pin: LayerRange | None = None,
    threads: int | None = None, n_ctx: int = 2048, max_sessions: int = 4, mdns_interface: str | None = None,
    reprofile: bool = False, failover: bool = True, step_port: int | None = None, http: bool = True,
    http_port: int | None = None, standbys: bool = True, standbys_on_route: bool = False,
    http_host: str = "127.0.0.1", relay_port: int | None = None, model_url: str = "",
) -> RunningCoordinator:
    """Start the coordinator (it may host layers too) and advertise it on mDNS.

    With `http` the OpenAI-compatible API and the web page listen on `http_host`:`http_port` (plain HTTP,
    so this machine only unless asked); port None: --port + 80 (7780 by default), or any free port when
    --port is 0. Nodes that cannot be reached (behind NAT) are relayed through `relay_port`; None: --port + 2
    (7702 by default), or any free port when --port is 0.
    """
    engine.plan_threads(threads)
    key = key or wire.new_key()
    server, bound = wire.server(host, port, key)
    address = f"{_reachable_host(host)}:{bound}"
    step_server = web = coordinator = relay = None
    try:
        step_server = _step_server(host, bound if port else 0, step_port, key)
        try:
            relay = wire.Relay(host, relay_port if relay_port is not None else (
                bound + RELAY_PORT_OFFSET if port else 0), key)
        except OSError as e:
            raise BadInputError(f"cannot listen for outbound-only nodes: {e}; pick another port with --relay-port"
                                ) from None
        if http:  # bound before the model loads: a port in use is refused at once
            web = HttpServer(http_host, http_port if http_port is not None else (bound + HTTP_PORT_OFFSET if port else 0))
        coordinator = Coordinator(
            model_path, swarm=swarm, key=key, name=name or socket.gethostname(), address=address,
            resources=resources(max_memory, threads, with_devices=True), pin=pin, n_ctx=n_ctx,
            max_sessions=max_sessions, threads=threads, reprofile=reprofile, failover=failover,
            step_address=f"{_reachable_host(host)}:{step_server.port}", standbys=standbys,
            standbys_on_route=standbys_on_route, relay=relay, model_url=model_url,
        )
        if web:
            web.serve(coordinator, key)
    except BaseException:
        if web is not None:
            web.stop()
        if coordinator is not None:
            coordinator.close()
        elif relay is not None:
            relay.close()
        if step_server is not None:
            step_server.close()
        server.stop(0)
        raise
    step_server.start(coordinator.local.step)
    wire.CoordinatorServicer.add_to(server, coordinator)
    wire.NodeServicer.add_to(server, coordinator.local)
    server.start()
    interfaces = discovery.interfaces_for(host, mdns_interface)
    advertiser = None
    if interfaces != []:
        addresses = [address.rsplit(":", 1)[0]] if host not in ("", "0.0.0.0") else discovery.local_addresses()
        advertiser = discovery.Advertiser(swarm, name or socket.gethostname(), bound, addresses, interfaces)
    _write_private(key_file(swarm), json.dumps({"address": address, "key": key, "pid": os.getpid()}))
    log.info("coordinator of swarm %r listening on %s", swarm, address)
    return RunningCoordinator(coordinator, server, step_server, address, key, swarm, advertiser, web, host)


class RunningNode:
    """A node in the swarm: serves its shard, heartbeats, re-joins a restarted coordinator, leaves on stop."""

    def __init__(
        self, *, coordinator: str | None, swarm: str, key: str, name: str, host: str, port: int,
        max_memory: int, pin: LayerRange | None, threads: int | None, mdns_interface: str | None,
        reprofile: bool = False, step_port: int | None = None, leave_at: float | None = None,
        outbound_only: bool = False,
    ):
        engine.plan_threads(threads)
        self.leave_at = leave_at  # time.monotonic() of --leave-after's deadline (told to the coordinator)
        self.swarm, self.key, self.name = swarm, key, name
        self.outbound_only = outbound_only  # --outbound-only: peers reach it through the coordinator's relay
        self.relay: wire.RelayClient | None = None  # while the coordinator relays for it
        self.pin, self.max_memory, self.threads = pin, max_memory, threads
        self.interfaces = discovery.interfaces_for(host, mdns_interface)
        self._fixed_coordinator = wire.check_address(coordinator) if coordinator else None
        self.coordinator_address: str | None = self._fixed_coordinator
        self._link: wire.CoordinatorLink | None = None
        self._impostors: set[str] = set()  # found by mDNS, could not prove the key
        self._peers = wire.NodeRegistry(key)
        self.service = Node(self._peers, fetcher=self._fetcher, threads=threads, reprofile=reprofile,
                            checkpoint_sink=self._store_checkpoint)
        self.heartbeat_s = 1.0  # until the coordinator says
        self.server, self.port = wire.server(host, port, key)
        try:
            self.step_server = _step_server(host, port, step_port, key)
        except BaseException:
            self.server.stop(0)
            raise
        self.step_port = self.step_server.port
        self.step_server.start(self.service.step)
        self.host = "" if host in ("", "0.0.0.0", "::") else _reachable_host(host)
        self._local_host = self.host or "127.0.0.1"  # where reverse connections reach this node's servers
        wire.NodeServicer.add_to(self.server, self.service)
        self.server.start()
        self.node_id: str | None = None
        self._failing_since: float | None = None  # heartbeats to the coordinator failing since then
        self._leaving = False  # handing over: keep heartbeating, never join again
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._membership_loop, name="membership", daemon=True)
        self._thread.start()

    def _fetcher(self):
        return self._coordinator().fetch

    def _store_checkpoint(self, checkpoint: m.Checkpoint, blob: bytes) -> bool:
        return self._coordinator().store_checkpoint(checkpoint, blob)

    def _coordinator(self) -> wire.CoordinatorLink:
        if self._link is None:
            if self.coordinator_address is None:
                self.coordinator_address = wire.tls.find_coordinator(self.swarm, self.interfaces, self.key,
                                                                     impostors=self._impostors)
            self._link = wire.CoordinatorLink(self.coordinator_address, self.key)
        return self._link

    def _forget_coordinator(self) -> None:
        if self._link is not None:
            self._link.close()
        self._link = None
        self.coordinator_address = self._fixed_coordinator
        self.node_id = None

    def _join(self) -> None:
        welcome = self._coordinator().join(m.JoinRequest(
            name=self.name, port=self.port, step_port=self.step_port, host=self.host, pin=self.pin,
            resources=resources(self.max_memory, self.threads, with_devices=True), version=__version__,
            leave_after_s=max(0.001, self.leave_at - time.monotonic()) if self.leave_at is not None else 0.0,
            outbound_only=self.outbound_only))
        self._use_relay(welcome)
        self.node_id = welcome.node_id
        self.heartbeat_s = welcome.heartbeat_s or 1.0
        named = f" as {welcome.name}" + (f" (another node is {self.name})" if welcome.name != self.name else "")
        log.info("joined swarm %r at %s%s (model %s)", self.swarm, self.coordinator_address, named,
                 welcome.model_name)

    def _use_relay(self, welcome: m.Welcome) -> None:
        """Keep reverse connections to the relay the coordinator named (none when it reaches this node)."""
        if self.relay is not None and (not welcome.relay_port or self.relay.token != welcome.relay_token):
            self.relay.close()
            self.relay = None
            wire.dialout.set_via(None)
        if welcome.relay_port and self.relay is None:
            host = welcome.relay_host or wire.split_address(self.coordinator_address)[0]
            self.relay = wire.RelayClient((host, welcome.relay_port), welcome.relay_token, self.key,
                                          {"grpc": self.port, "steps": self.step_port}, local_host=self._local_host)
            # ... and it reaches every peer but the coordinator through the relay too (dialout.py): behind NAT,
            # the coordinator's LAN and its addresses there are out of reach.
            wire.dialout.set_via(wire.dialout.Via((host, welcome.relay_port), welcome.relay_token,
                                                  frozenset({self.coordinator_address})))
            log.info("the coordinator cannot reach this node%s: peers reach it through the relay at %s:%d, and "
                     "it reaches them through the relay too", " (--outbound-only)" if self.outbound_only else "",
                     host, welcome.relay_port)

    def _membership_loop(self) -> None:
        failing_since = None
        while not self._stop.is_set():
            try:
                if self.node_id is None:
                    if self._leaving:
                        self._stop.wait(0.1)
                        continue
                    self._join()
                if not self._coordinator().heartbeat(self.node_id, resources(self.max_memory, self.threads)):
                    log.warning("the coordinator no longer knows this node; joining again")
                    self.node_id = None
                    continue
                failing_since = self._failing_since = None
            except (AuthError, BadInputError) as e:
                log.error("%s", e)  # retrying cannot help; say so and stop
                self._stop.set()
                return
            except PeerError as e:
                if failing_since is None:
                    failing_since = self._failing_since = time.monotonic()
                    log.warning("%s; retrying", e)
                elif time.monotonic() - failing_since > 10.0 and self._fixed_coordinator is None:
                    self._forget_coordinator()  # it may have restarted elsewhere: look again
                    failing_since = None
                elif time.monotonic() - failing_since > 5.0 and self._fixed_coordinator is not None:
                    # It has declared this node lost by now; a fresh channel finds it as soon as it is back
                    # (a channel that kept failing once waited two minutes to dial a restarted one again).
                    self._link.close()
                    self._link = None
                    failing_since = time.monotonic()
            except SwarmError as e:
                log.warning("%s", e)
            self._stop.wait(self.heartbeat_s)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the node stops (True) or `timeout` passes (False)."""
        return self._stop.wait(timeout)

    def leave(self, timeout: float = 120.0) -> int:
        """Leave gracefully: the coordinator moves this node's sessions to a successor (their KV states
        shipped from here) and answers once they run there; this node keeps serving until then.
        Returns how many sessions moved."""
        node_id, link = self.node_id, self._link
        self._leaving = True  # heartbeats go on while the sessions move, so a death meanwhile is noticed
        if not node_id or link is None:
            self._stop.set()
            return 0
        if self._failing_since is not None:
            timeout = 3.0  # the coordinator has not answered lately: do not wait long for it
        try:
            farewell = link.leave(node_id, graceful=True, timeout=timeout)
        except SwarmError as e:
            log.warning("leaving: %s", e)
            return 0
        finally:
            self._stop.set()
        if farewell.detail:
            log.warning("leaving: %s", farewell.detail)
        log.info("left the swarm; %d session(s) handed over", farewell.migrated_sessions)
        self.node_id = None
        return farewell.migrated_sessions

    def stop(self, grace: float = 1.0) -> None:
        """Leave the swarm at once (telling the coordinator) and shut down."""
        self._stop.set()
        if self.node_id and self._link is not None:
            try:
                self._link.leave(self.node_id, timeout=2.0)
            except SwarmError:
                pass
        if self.relay is not None:
            self.relay.close()
        self.server.stop(grace).wait()
        self.step_server.close()
        self.service.close()
        self._peers.close()
        if self._link is not None:
            self._link.close()


def start_node(**kwargs) -> RunningNode:
    """Start a node that gives this machine's memory and compute to a swarm (see RunningNode)."""
    return RunningNode(**kwargs)
