"""Encrypted, authenticated links: what crosses the wire, and who gets through.

- A packet capture of a whole run (the mDNS exchange, a join, a generation): no key, prompt or generated
  text appears in it.
- A rogue coordinator answering for the swarm's name on mDNS: the node passes it over, and the rogue
  never sees the node's certificate.
Refusals of a wrong key, no certificate or plain TCP on every gRPC method and the step port are in
test_swarm.py and test_steps.py.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
import time
import uuid

import pytest

from swarm import discovery
from swarm.client import SwarmClient
from swarm.wire import new_key, tls
from procs import Proc, Swarm

N = 24


def _tcpdump(path, interface: str = "lo") -> subprocess.Popen:
    assert shutil.which("tcpdump"), "tcpdump is missing: scripts/test.sh installs it (apt-get install tcpdump)"
    proc = subprocess.Popen(["tcpdump", "-i", interface, "-U", "-s", "0", "-w", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not (path.exists() and path.stat().st_size > 0):  # the file's header: capture has started
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "tcpdump did not start"
        time.sleep(0.1)
    time.sleep(0.5)
    return proc


def test_a_capture_of_a_whole_run_shows_no_key_prompt_or_generated_text(tmp_path, model_path, reference):
    name, key = f"cap-{uuid.uuid4().hex[:8]}", new_key()
    prompt = f"Secret plans {uuid.uuid4().hex[:6]}: the quick brown fox"
    pcap = tmp_path / "run.pcap"
    dump = _tcpdump(pcap)
    swarm = Swarm(tmp_path, model_path, ["--layers", "0:9", "--swarm", name, "--mdns-interface", "127.0.0.1"],
                  [["--layers", "9:18", "--mdns-interface", "127.0.0.1"]], key=key, via_mdns=name)
    try:
        swarm.wait_ready()
        assert "by mDNS" in swarm.procs[1].text()  # the join went over mDNS and TLS, inside the capture
        with SwarmClient(swarm=name, mdns_interface="127.0.0.1", key=key) as c:
            got = c.complete(prompt, max_tokens=N)
    finally:
        swarm.close()
        time.sleep(0.5)
        dump.terminate()
        dump.wait(10)
    _, expected, _ = reference.run(prompt, N)
    assert got.tokens == expected  # the run was a real generation
    text = got.text
    captured = pcap.read_bytes()
    assert name.encode() in captured  # the capture saw this run: the swarm's name is public in mDNS
    assert len(captured) > 100_000  # ... and its shard transfer and steps
    words = [w for w in text.split() if len(w) >= 6]
    for secret in [key, prompt, prompt.split(":")[0], text.strip(), *words]:
        for encoding in ("utf-8", "utf-16-le"):
            assert secret.encode(encoding) not in captured, f"{secret!r} crossed the wire in clear"


class RogueCoordinator:
    """Answers for a swarm's name on mDNS and takes TLS connections with another key's certificate,
    recording every certificate a peer shows it."""

    def __init__(self, swarm: str):
        self.creds = tls.credentials(new_key(), "rogue")
        self.ctx = self.creds.server_context()
        self.ctx.verify_mode = ssl.CERT_OPTIONAL  # ask for a peer's certificate, whoever signed it
        self.ctx.load_verify_locations(cadata=self.creds.ca_pem.decode())
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.attempts, self.certificates = 0, []
        self.advertiser = discovery.Advertiser(swarm, "rogue", self.port, ["127.0.0.1"], ["127.0.0.1"])
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.attempts += 1
            conn.settimeout(5)
            try:
                with self.ctx.wrap_socket(conn, server_side=True) as tls_conn:
                    cert = tls_conn.getpeercert(binary_form=True)
                    if cert:
                        self.certificates.append(cert)
                    tls_conn.recv(1024)
            except (OSError, ssl.SSLError):
                pass
            finally:
                conn.close()

    def close(self) -> None:
        self.advertiser.close()
        self.sock.close()


def test_a_rogue_coordinator_on_mdns_is_passed_over_and_learns_nothing(tmp_path, model_path):
    name, key = f"rogue-{uuid.uuid4().hex[:8]}", new_key()
    rogue = RogueCoordinator(name)
    node = None
    swarm = None
    try:
        node = Proc(["--host", "127.0.0.1", "--key", key, "--name", "careful", "--swarm", name,
                     "--mdns-interface", "127.0.0.1"], tmp_path / "node.log")
        deadline = time.monotonic() + 60
        while rogue.attempts == 0:  # the node found the rogue first (it is the only one answering yet)
            assert node.p.poll() is None, node.text()
            assert time.monotonic() < deadline, f"the node never tried the rogue:\n{node.text()}"
            time.sleep(0.2)
        swarm = Swarm(tmp_path, model_path, ["--layers", "0:18", "--swarm", name, "--mdns-interface", "127.0.0.1"],
                      [], key=key, via_mdns=name)
        swarm.wait_ready()
        deadline = time.monotonic() + 60
        while "careful" not in [n["name"] for n in swarm.client.status()["nodes"]]:
            assert node.p.poll() is None, node.text()
            assert time.monotonic() < deadline, f"the node never joined the real coordinator:\n{node.text()}"
            time.sleep(0.3)
        assert "passed over" in node.text()
        assert rogue.certificates == []  # the node never showed the rogue its certificate
        with pytest.raises(Exception):  # and the rogue's own key gets it nowhere in the real swarm
            SwarmClient(swarm.address, key=new_key()).status()
    finally:
        rogue.close()
        if node is not None:
            node.stop()
        if swarm is not None:
            swarm.close()


def test_abuse_meets_limits_with_clear_errors_and_the_running_session_goes_on(tmp_path, model_path, reference):
    from swarm.errors import BadInputError, NotReadyError

    swarm = Swarm(tmp_path, model_path, ["--layers", "0:9", "--max-sessions", "1"], [["--layers", "9:18"]])
    flood: list[socket.socket] = []
    try:
        client = swarm.wait_ready()
        node = next(n for n in client.status()["nodes"] if n["name"] == "node0")
        prompt = "The history of the printing press"
        gen = client.generate(prompt, max_tokens=48)
        pieces = iter(gen)
        next(pieces)  # the session runs
        for address in (swarm.address, node["address"], node["step_address"]):  # silent, half-open handshakes
            host, port = address.rsplit(":", 1)
            flood += [socket.create_connection((host, int(port)), timeout=10) for _ in range(60)]
        others: list = []

        def other(i):
            try:
                with SwarmClient(swarm.address, key=swarm.key) as c:
                    others.append(c.complete(f"Count to {i}:", max_tokens=2))
            except NotReadyError as e:
                others.append(e)

        threads = [threading.Thread(target=other, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        with SwarmClient(swarm.address, key=swarm.key) as c:
            with pytest.raises(BadInputError, match="longer than"):
                c.complete("x" * ((1 << 20) + 1), max_tokens=1)
            with pytest.raises(BadInputError, match="at most 1024 messages"):
                c.chat_complete([{"role": "user", "content": "hi"}] * 1025, max_tokens=1)
        for _ in pieces:
            pass
        for t in threads:
            t.join(120)
        assert any(isinstance(o, NotReadyError) and "busy" in str(o) for o in others), others
        _, expected, _ = reference.run(prompt, 48)
        assert gen.result.tokens == expected  # the session it had went on, token for token
    finally:
        for s in flood:
            s.close()
        swarm.close()
