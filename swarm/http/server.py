"""The HTTP server's lifecycle: uvicorn on a thread of the coordinator's process, on a socket bound first.

Binding here, before the thread starts, makes a port in use a clear error at start-up rather than a
log line from a thread.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time

import uvicorn

from ..errors import BadInputError
from .app import Api

log = logging.getLogger(__name__)


class HttpServer:
    """The OpenAI-compatible API and the web page of one coordinator: bind first (before the model loads,
    so a port in use is refused at once), then `serve`; `stop()` ends it."""

    def __init__(self, host: str, port: int):
        if not 0 <= port < 65536:
            raise BadInputError(f"--http-port {port} is not a TCP port (0 to 65535; 0: any free port)")
        bare = host.strip("[]") or "0.0.0.0"
        try:
            self._sock = socket.create_server((bare, port), family=socket.AF_INET6 if ":" in bare else socket.AF_INET,
                                              backlog=128)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise BadInputError(f"HTTP port {port} on {bare} is in use; pick another with --http-port PORT, or "
                                    "start without the HTTP API (--no-http)") from None
            raise BadInputError(f"cannot listen for HTTP on {bare}:{port} ({e.strerror or e}); pick another "
                                "--http-port or --host, or use --no-http") from None
        self.host = host
        self.port = self._sock.getsockname()[1]
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def serve(self, coordinator, key: str) -> None:
        """Start answering on a thread of its own."""
        config = uvicorn.Config(Api(coordinator, key).app(), log_config=None, log_level="warning", access_log=False,
                                lifespan="off", timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, name="http",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self._server.started:
            self.stop()
            raise BadInputError(f"the HTTP server on port {self.port} did not start; see the log, or use --no-http")
        log.info("HTTP API and web page on %s:%d", self.host or "0.0.0.0", self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(5)
        self._sock.close()
