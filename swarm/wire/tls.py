"""Mutual TLS for every link of the swarm, with a certificate authority that the swarm key stands for.

Every process that holds the swarm key computes the same certificate authority from it: the CA's
private key is derived from the key by scrypt (salted, so that it names this use only), and its
certificate is built from fixed fields. Each process then makes a key pair of its own (which never
leaves the process) and signs its own certificate with the CA. Every gRPC channel and server, and
every step connection, is TLS 1.3 with certificates required and checked on both ends against that CA:

- the key itself never crosses the wire, not in a join, a call, or the step stream's hello;
- a peer that completes a handshake has proven that it holds the key (its certificate is signed by the
  key's CA, and TLS makes it prove it holds the certificate's private key), in both directions: a node
  never talks to a coordinator, found by mDNS or by address, that cannot prove the key, and a coordinator
  never serves a peer that cannot;
- what a listener or an impostor sees is a TLS handshake: nothing it can replay or use to join. An
  impostor that takes a connection learns only the CA's public key; finding the key from it means
  guessing the key, each guess costing a scrypt, which is why keys are long random strings
  (`new_key`) and a key chosen by hand must be long too (`check_key`).

The design differs from a CA stored on the coordinator with certificates handed out at join: there is
nothing to store, to hand out or to lose, any process with the key can start at any time (a restarted
coordinator, a node that joins by mDNS, a client), and the join command stays the key alone. The
trust model is the same: holding the key is membership. See docs/security.md.

Only standard constructions from well-kept libraries: `cryptography` for keys and certificates,
OpenSSL (through Python's `ssl`) and gRPC's BoringSSL for TLS.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import socket
import logging
import ssl
import threading
import time

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from cryptography.x509.oid import NameOID

from .. import discovery
from ..errors import BadInputError

log = logging.getLogger(__name__)

PEER_NAME = "swarm-peer"  # every certificate's DNS name; peers are named by their membership, not address
_SALT = b"swarm-llm/ca/v1"
_CURVE = ec.SECP256R1()
_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # of P-256
MIN_KEY_CHARS = 16
# gRPC checks the server's name in its certificate against the address dialled; every peer's
# certificate carries PEER_NAME, whatever address (a LAN address, a relay's) reaches it.
CHANNEL_OPTIONS = [("grpc.ssl_target_name_override", PEER_NAME), ("grpc.default_authority", PEER_NAME)]


def check_key(key: str) -> str:
    """A key good enough to stand for the swarm's authority; a clear error otherwise."""
    if not isinstance(key, str) or not key.strip():
        raise BadInputError("the swarm key is empty; pass the key the coordinator printed (--key KEY)")
    if len(key) < MIN_KEY_CHARS:
        raise BadInputError(
            f"a swarm key must be at least {MIN_KEY_CHARS} characters (a short one can be guessed); "
            "leave --key out on the coordinator and it makes a random one")
    if len(key) > 1024:
        raise BadInputError("a swarm key is at most 1024 characters")
    return key


class Credentials:
    """This process's certificate, its private key and the swarm's CA, in the forms TLS stacks take."""

    def __init__(self, ca_pem: bytes, cert_pem: bytes, key_pem: bytes, fingerprint: str):
        self.ca_pem, self.cert_pem, self.key_pem, self.fingerprint = ca_pem, cert_pem, key_pem, fingerprint
        self._lock = threading.Lock()
        self._server_ctx: ssl.SSLContext | None = None
        self._client_ctx: ssl.SSLContext | None = None

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)], root_certificates=self.ca_pem,
                                           require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca_pem, private_key=self.key_pem,
                                            certificate_chain=self.cert_pem)

    def _context(self, purpose: int) -> ssl.SSLContext:
        server = purpose == ssl.PROTOCOL_TLS_SERVER
        ctx = ssl.SSLContext(purpose)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False  # a peer is whoever holds a certificate of this swarm's CA
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.options |= ssl.OP_IGNORE_UNEXPECTED_EOF  # a peer that died reads as a closed connection
        ctx.load_verify_locations(cadata=self.ca_pem.decode())
        _load_chain(ctx, self.cert_pem, self.key_pem)
        if server:
            ctx.num_tickets = 0  # no session tickets: nothing arrives after the handshake unasked
        return ctx

    def server_context(self) -> ssl.SSLContext:
        with self._lock:
            if self._server_ctx is None:
                self._server_ctx = self._context(ssl.PROTOCOL_TLS_SERVER)
            return self._server_ctx

    def client_context(self) -> ssl.SSLContext:
        with self._lock:
            if self._client_ctx is None:
                self._client_ctx = self._context(ssl.PROTOCOL_TLS_CLIENT)
            return self._client_ctx

    def wrap_client(self, sock: socket.socket) -> ssl.SSLSocket:
        """TLS over a connected socket, as the side that dialled; the handshake is done on return."""
        return self.client_context().wrap_socket(sock, server_side=False)

    def wrap_server(self, sock: socket.socket) -> ssl.SSLSocket:
        """TLS over an accepted socket; the handshake is done on return (the socket's timeout bounds it)."""
        return self.server_context().wrap_socket(sock, server_side=True)


def _load_chain(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    # ssl loads a certificate chain from files only: hand it a pipe-free temporary file, removed at once.
    import os
    import tempfile

    fd, path = tempfile.mkstemp(prefix="swarm-tls-", suffix=".pem")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(cert_pem + key_pem)
        ctx.load_cert_chain(path)
    finally:
        os.unlink(path)


@functools.lru_cache(maxsize=8)
def _authority(key: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The swarm's CA: the same private key and name for everyone with the same key."""
    seed = Scrypt(salt=_SALT, length=48, n=1 << 14, r=8, p=1).derive(key.encode())
    private = ec.derive_private_key(int.from_bytes(seed, "big") % (_ORDER - 1) + 1, _CURVE)
    public_id = hashlib.sha256(private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()[:16]
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "swarm"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"swarm authority {public_id}")])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
        .serial_number(int(public_id, 16)).not_valid_before(datetime.datetime(2020, 1, 1))
        .not_valid_after(datetime.datetime(2120, 1, 1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(private.public_key()), critical=False)
        .sign(private, hashes.SHA256())
    )
    return private, cert


def fingerprint(key: str) -> str:
    """The CA's public-key fingerprint (sha256 of its SubjectPublicKeyInfo): the same for every holder."""
    _, cert = _authority(key)
    der = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(der).hexdigest()


@functools.lru_cache(maxsize=8)
def credentials(key: str, name: str = "peer") -> Credentials:
    """This process's credentials in the swarm of `key` (cached: one key pair per process and key)."""
    check_key(key)
    ca_key, ca_cert = _authority(key)
    own = ec.generate_private_key(_CURVE)
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "swarm"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, name[:64] or "peer")]))
        .issuer_name(ca_cert.subject).public_key(own.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(PEER_NAME)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
                                              x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return Credentials(
        ca_cert.public_bytes(pem), cert.public_bytes(pem),
        own.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        fingerprint(key),
    )


def probe_handshake(address: tuple[str, int], creds: Credentials, timeout: float = 3.0) -> str | None:
    """Why a TLS handshake with a peer fails, in words ("" when it succeeds); None when it cannot be reached.

    gRPC reports a handshake refused for a wrong key as the peer being unavailable; this tells the two apart.
    """
    try:
        sock = socket.create_connection(address, timeout=timeout)
    except OSError:
        return None
    try:
        sock.settimeout(timeout)
        with creds.wrap_client(sock) as tls:
            # TLS 1.3: the server checks our certificate after our handshake ends; a refusal is an alert
            # on the first read. A server that waits for us to speak first times out here: accepted.
            tls.settimeout(min(timeout, 0.5))
            try:
                tls.recv(1)
            except TimeoutError:
                pass
        return ""
    except ssl.SSLCertVerificationError:
        return "its certificate is not signed by this key's authority"
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as e:
        return f"it refused this key's certificate ({getattr(e, 'reason', None) or e})"
    except OSError as e:
        return f"the handshake failed ({e})"
    finally:
        sock.close()


def find_coordinator(swarm: str, interfaces: list[str] | None, key: str, timeout: float = 5.0,
                     impostors: set[str] | None = None) -> str:
    """HOST:PORT of a coordinator of `swarm` found by mDNS that proves the key in a TLS handshake.

    Anyone on the network may answer for a swarm's name. One that cannot prove the key learns nothing
    from us (in TLS 1.3 we check its certificate before we show ours), is added to `impostors` and passed
    over; DiscoveryError when no coordinator that proves it answers within `timeout`."""
    impostors = set() if impostors is None else impostors
    deadline = time.monotonic() + timeout
    creds = credentials(key)
    while True:
        found = discovery.find_coordinator(swarm, interfaces, timeout=max(deadline - time.monotonic(), 0.5),
                                           exclude=frozenset(impostors))
        why = probe_handshake((found.host, found.port), creds)
        if not why:  # "": it proved the key; None: unreachable just now, and the caller's call will say so
            log.info("found the coordinator of swarm %r at %s by mDNS", swarm, found.address)
            return found.address
        impostors.add(found.address)
        log.warning("%s answers for swarm %r on mDNS but %s: another swarm, or an impostor; passed over",
                    found.address, swarm, why)
