"""Which TLS version the swarm's links speak: TLS 1.3 between the swarm's own processes on gRPC, and only
TLS 1.3 on the step stream and the relay (Python's ssl, pinned). grpcio's Python API has no setting for
a minimum version, so a gRPC port also completes a TLS 1.2 handshake with a client that offers nothing
newer; that client still needs a certificate of the swarm's authority (docs/security.md). This test pins
that behaviour, so a grpcio that changes it is noticed. And a gRPC connection that never begins its
handshake is closed after the 10 s the server allows it."""

from __future__ import annotations

import socket
import ssl
import threading
import time

import pytest

from swarm.wire import channels, tls

KEY = "a-key-for-the-tls-version-tests"


def _client(creds: tls.Credentials, tmp_path, newest: ssl.TLSVersion) -> ssl.SSLContext:
    """A client holding this swarm's certificate that offers TLS 1.2 up to `newest`."""
    (tmp_path / "cert.pem").write_bytes(creds.cert_pem)
    (tmp_path / "key.pem").write_bytes(creds.key_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=creds.ca_pem.decode())
    ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    ctx.minimum_version, ctx.maximum_version = ssl.TLSVersion.TLSv1_2, newest
    ctx.set_alpn_protocols(["h2"])
    return ctx


def _version(ctx: ssl.SSLContext, port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock, ctx.wrap_socket(sock) as t:
        return t.version()


def test_grpc_links_speak_tls_1_3(tmp_path):
    server, port = channels.server("127.0.0.1", 0, KEY)
    server.start()
    try:
        creds = tls.credentials(KEY)
        assert _version(_client(creds, tmp_path, ssl.TLSVersion.TLSv1_3), port) == "TLSv1.3"
        # What grpcio allows and cannot be told otherwise: a TLS 1.2-only client holding the certificate.
        assert _version(_client(creds, tmp_path, ssl.TLSVersion.TLSv1_2), port) == "TLSv1.2"
    finally:
        server.stop(0)


def test_the_step_stream_and_the_relay_refuse_anything_older_than_tls_1_3(tmp_path):
    creds = tls.credentials(KEY)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():  # each connection as the step stream and the relay take one: `Credentials.wrap_server`
        for _ in range(2):
            conn, _ = listener.accept()
            try:
                conn.settimeout(5)
                creds.wrap_server(conn).close()
            except (ssl.SSLError, OSError):
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        assert _version(_client(creds, tmp_path, ssl.TLSVersion.TLSv1_3), port) == "TLSv1.3"
        with pytest.raises(ssl.SSLError):
            _version(_client(creds, tmp_path, ssl.TLSVersion.TLSv1_2), port)
    finally:
        thread.join(10)
        listener.close()


def test_a_grpc_connection_silent_in_its_handshake_is_closed_after_10_s():
    server, port = channels.server("127.0.0.1", 0, KEY)
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=40) as sock:
            t0 = time.monotonic()
            try:
                assert sock.recv(1) == b""  # the server closed it: nothing was ever sent
            except ConnectionResetError:
                pass
            waited = time.monotonic() - t0
        assert 8 <= waited <= 20, waited
    finally:
        server.stop(0)
