"""Find a swarm's coordinator on the local network by mDNS (DNS-SD over multicast, via python-zeroconf).

A coordinator registers one `_llmswarm._tcp.local.` service whose TXT properties carry the swarm's name
and role; nodes and clients browse for that type and take the first coordinator of their swarm.
Multicast goes only where `interfaces` says: `interfaces_for` derives that from the address a server
binds to, so a server on 127.0.0.1 never announces itself on the outer network, and `--mdns-interface
off` turns discovery off entirely. mDNS stays inside one link: across subnets, VPNs and tunnels the
user passes `--coordinator HOST:PORT` instead, and the errors here say so.

No secret is ever published: the TXT record holds the swarm name, the role and the version only.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import queue
import re
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import psutil
from zeroconf import (
    InterfaceChoice,
    IPVersion,
    NonUniqueNameException,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)

from . import __version__
from .errors import BadInputError, SwarmError

log = logging.getLogger(__name__)

SERVICE_TYPE = "_llmswarm._tcp.local."
ROLE_COORDINATOR = "coordinator"
LOOPBACK = "127.0.0.1"
RESOLVE_TIMEOUT = 1.5  # seconds one service may take to resolve, so a dead record cannot eat the whole timeout
MAX_TXT_VALUE = 200  # bytes; DNS caps a TXT string at 255 including "swarm="
_ALL_HOSTS = ("", "0.0.0.0", "::", "[::]")


class DiscoveryError(SwarmError):
    """No coordinator of the swarm was found by mDNS, or mDNS could not be used."""


@dataclass(frozen=True)
class Found:
    """A coordinator found by mDNS: where to dial it."""

    swarm: str  # the swarm's name from the TXT properties
    host: str  # an IPv4 address to dial
    port: int
    name: str  # the advertised instance name (node name)

    @property
    def address(self) -> str:
        """HOST:PORT to dial."""
        return f"{self.host}:{self.port}"


def _ipv4(text: str) -> ipaddress.IPv4Address | None:
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        return None


def _from_address(addr: ipaddress.IPv4Address) -> list[str] | None:
    if addr.is_unspecified:
        return None
    # Every 127.x address is the same lo interface; one spelling lets advertiser and browser meet.
    return [LOOPBACK] if addr.is_loopback else [str(addr)]


def interfaces_for(host: str, mdns_interface: str | None = None) -> list[str] | None:
    """Which addresses zeroconf should use: mdns_interface when given ('all' -> None meaning every interface, 'off' -> [] meaning no mDNS), else derived from host: '0.0.0.0' or '' -> None (all), '127.x' or 'localhost' -> ['127.0.0.1'], any other IPv4 -> [host]."""
    if mdns_interface is not None:
        choice = mdns_interface.strip()
        if choice.lower() == "all":
            return None
        if choice.lower() == "off":
            return []
        addr = _ipv4(choice)
        if addr is not None:
            return _from_address(addr)
        # An interface name (eth0, wlan0) is easier to type than its address; use its IPv4 addresses.
        nics = psutil.net_if_addrs()
        if choice in nics:
            found = [a.address for a in nics[choice] if a.family == socket.AF_INET]
            if found:
                return [LOOPBACK] if all(_ipv4(a).is_loopback for a in found) else found
            raise BadInputError(f"interface {choice!r} has no IPv4 address; pick another --mdns-interface")
        raise BadInputError(
            f"--mdns-interface {mdns_interface!r} is not 'all', 'off', an IPv4 address or an interface name "
            f"({', '.join(sorted(nics)) or 'none found'})"
        )
    if not isinstance(host, str):
        raise BadInputError(f"host must be a string, got {type(host).__name__}")
    host = host.strip()
    if host in _ALL_HOSTS:
        return None
    if host.lower() == "localhost" or host in ("::1", "[::1]"):
        return [LOOPBACK]
    addr = _ipv4(host)
    if addr is None:
        # A host name: mDNS here is IPv4-only, so it must resolve to an IPv4 address we can multicast from.
        try:
            addr = ipaddress.IPv4Address(socket.gethostbyname(host))
        except (OSError, UnicodeError, ValueError):
            raise BadInputError(
                f"cannot tell which interface mDNS should use for host {host!r}; "
                "pass --mdns-interface (an IPv4 address, 'all' or 'off')"
            ) from None
    return _from_address(addr)


def local_addresses() -> list[str]:
    """Non-loopback IPv4 addresses of this machine (psutil.net_if_addrs), or ['127.0.0.1'] if none."""
    found: list[str] = []
    for nic in psutil.net_if_addrs().values():
        for a in nic:
            addr = _ipv4(a.address) if a.family == socket.AF_INET else None
            # Link-local (169.254.x) addresses are only self-assigned fallbacks; peers rarely reach them.
            if addr is None or addr.is_loopback or addr.is_link_local or str(addr) in found:
                continue
            found.append(str(addr))
    return found or [LOOPBACK]


def _check_swarm(swarm: str) -> str:
    if not isinstance(swarm, str) or not swarm.strip():
        raise BadInputError("the swarm name must be a non-empty string")
    if len(swarm.encode()) > MAX_TXT_VALUE:
        raise BadInputError(f"the swarm name is {len(swarm.encode())} bytes; mDNS allows at most {MAX_TXT_VALUE}")
    return swarm


def _check_interfaces(interfaces: Sequence[str] | None) -> list[str] | None:
    if interfaces is None:
        return None
    if isinstance(interfaces, str) or not all(isinstance(i, str) and _ipv4(i) for i in interfaces):
        raise BadInputError(f"interfaces must be None or a list of IPv4 addresses, got {interfaces!r}")
    return list(interfaces)


def _open(interfaces: list[str] | None) -> Zeroconf:
    """A zeroconf instance on exactly these interfaces (None: all), IPv4 only."""
    try:
        return Zeroconf(
            interfaces=InterfaceChoice.All if interfaces is None else interfaces, ip_version=IPVersion.V4Only
        )
    except OSError as e:
        where = "every interface" if interfaces is None else ", ".join(interfaces)
        raise DiscoveryError(
            f"cannot start mDNS on {where}: {e}; pick another --mdns-interface, or pass --mdns-interface off "
            "and --coordinator HOST:PORT"
        ) from e


def _label(name: str, port: int) -> str:
    """An mDNS-safe instance label, unique per process and port, at most 63 bytes."""
    suffix = f"-{os.getpid()}-{port}"
    base = re.sub(r"[^A-Za-z0-9-]+", "-", name).strip("-") or "swarm"
    return base[: 63 - len(suffix)].rstrip("-") + suffix


class Advertiser:
    """Announces a coordinator on mDNS until closed."""

    def __init__(self, swarm: str, name: str, port: int, addresses: list[str], interfaces: list[str] | None):
        self.swarm = _check_swarm(swarm)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise BadInputError(f"port must be 1..65535, got {port!r}")
        if isinstance(addresses, str) or not addresses or not all(isinstance(a, str) and _ipv4(a) for a in addresses):
            raise BadInputError(f"addresses must be a non-empty list of IPv4 addresses, got {addresses!r}")
        self.interfaces = _check_interfaces(interfaces)
        self._lock = threading.Lock()
        self._zc: Zeroconf | None = None
        self._info: ServiceInfo | None = None
        if self.interfaces == []:
            log.info("mDNS is off; swarm %r is not advertised", swarm)
            return
        label = _label(str(name), port)
        self._info = ServiceInfo(
            SERVICE_TYPE,
            f"{label}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(a) for a in addresses],
            port=port,
            # Public facts only: anyone on the link can read these. The swarm key never goes here.
            properties={"swarm": swarm, "role": ROLE_COORDINATOR, "version": __version__},
            server=f"{label}.local.",
        )
        self._zc = _open(self.interfaces)
        try:
            # Blocks for the probe (about a second): once it returns, browsers can find us.
            self._zc.register_service(self._info)
        except (NonUniqueNameException, OSError) as e:
            self._zc.close()
            self._zc = None
            raise DiscoveryError(f"cannot advertise swarm {swarm!r} on mDNS: {e}") from e
        log.info(
            "advertising coordinator of swarm %r as %s at %s port %d on %s", swarm, label, ", ".join(addresses),
            port, "every interface" if self.interfaces is None else ", ".join(self.interfaces),
        )

    def close(self) -> None:
        """Send the goodbye, unregister and stop zeroconf; safe to call twice."""
        with self._lock:
            zc, self._zc = self._zc, None
        if zc is None:
            return
        try:
            # The goodbye (TTL 0) makes browsers drop us now instead of when their cache expires.
            zc.unregister_service(self._info)
        except Exception as e:  # noqa: BLE001 - closing must not fail because the network went away
            log.debug("mDNS unregister of swarm %r failed: %s", self.swarm, e)
        finally:
            zc.close()

    def __enter__(self) -> Advertiser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _pick_host(addresses: list[str], interfaces: list[str] | None) -> str:
    """The advertised address most likely to be reachable from here."""
    if interfaces and all(_ipv4(i).is_loopback for i in interfaces) and LOOPBACK in addresses:
        return LOOPBACK  # found over loopback: the coordinator is on this machine
    # Prefer an address on one of our own subnets; a coordinator with several NICs publishes all of them.
    nets = []
    for nic in psutil.net_if_addrs().values():
        for a in nic:
            if a.family == socket.AF_INET and a.netmask and not _ipv4(a.address).is_loopback:
                nets.append(ipaddress.IPv4Network(f"{a.address}/{a.netmask}", strict=False))
    for a in addresses:
        if any(ipaddress.IPv4Address(a) in net for net in nets):
            return a
    non_loopback = [a for a in addresses if not ipaddress.IPv4Address(a).is_loopback]
    return (non_loopback or addresses)[0]


def find_coordinator(swarm: str, interfaces: list[str] | None, timeout: float = 5.0,
                     exclude: frozenset[str] = frozenset()) -> Found:
    """Browse for a coordinator advertising `swarm`; the first one found wins; DiscoveryError after timeout with a message telling the user to pass --coordinator HOST:PORT (mDNS does not cross subnets or tunnels) and naming any other swarms seen.

    Anyone can answer for a swarm's name: the caller proves the coordinator by its TLS handshake, and
    passes the HOST:PORT of any that failed as `exclude`."""
    _check_swarm(swarm)
    interfaces = _check_interfaces(interfaces)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise BadInputError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if interfaces == []:
        raise DiscoveryError(
            f"mDNS is off, so the coordinator of swarm {swarm!r} cannot be discovered; pass --coordinator HOST:PORT"
        )
    deadline = time.monotonic() + timeout
    # The browser calls back on zeroconf's own thread, where resolving would block its event loop;
    # names go through a queue and are resolved here.
    names: queue.Queue[str] = queue.Queue()

    def on_change(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
            names.put(name)

    others: set[str] = set()
    zc = _open(interfaces)
    browser = None
    try:
        browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
        while (left := deadline - time.monotonic()) > 0:
            try:
                name = names.get(timeout=left)
            except queue.Empty:
                break
            # At least 100 ms: an answer already in the cache returns at once, a late one still gets a chance.
            wait = max(min(deadline - time.monotonic(), RESOLVE_TIMEOUT), 0.1)
            info = zc.get_service_info(SERVICE_TYPE, name, timeout=int(wait * 1000))
            if info is None or not info.port:
                log.debug("mDNS service %s did not resolve", name)
                continue
            props = info.decoded_properties
            seen_swarm, role = props.get("swarm"), props.get("role")
            addresses = info.parsed_addresses(IPVersion.V4Only)
            if seen_swarm != swarm or role != ROLE_COORDINATOR or not addresses:
                log.debug("mDNS service %s is swarm %r role %r; not ours", name, seen_swarm, role)
                if seen_swarm and seen_swarm != swarm:
                    others.add(seen_swarm)
                continue
            label = name[: -len(SERVICE_TYPE) - 1] if name.endswith("." + SERVICE_TYPE) else name
            found = Found(swarm=swarm, host=_pick_host(addresses, interfaces), port=info.port, name=label)
            if found.address in exclude:
                log.debug("mDNS service %s at %s failed to prove the swarm key before; skipped", name, found.address)
                continue
            log.info("found coordinator of swarm %r at %s (%s, version %s)", swarm, found.address, label,
                     props.get("version"))
            return found
    finally:
        if browser is not None:
            browser.cancel()
        zc.close()
    where = "every interface" if interfaces is None else ", ".join(interfaces)
    seen = f"other swarms seen: {', '.join(repr(s) for s in sorted(others))}" if others else "no other swarms seen"
    raise DiscoveryError(
        f"no coordinator of swarm {swarm!r} answered on mDNS within {timeout:g} s (on {where}; {seen}). "
        "mDNS does not cross subnets, VPNs or tunnels: pass --coordinator HOST:PORT, or check the swarm name "
        "and --mdns-interface"
    )
