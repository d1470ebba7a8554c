"""The HTTP surface over the coordinator, kept thin like the gRPC servicers: parse, call the room, answer.

    GET  /                      the web page (static files; it asks for the key itself)
    GET  /health                no key: 200 when the swarm has a route to serve on, 503 while not
    GET  /v1/models             the one model this swarm serves
    POST /v1/chat/completions   OpenAI's chat completions, blocking or as server-sent events
    POST /v1/completions        OpenAI's (legacy) completions, likewise
    GET  /v1/swarm/status       what `swarm status --json` prints: nodes, layers, route, sessions, recoveries

Everything under /v1 needs `Authorization: Bearer <swarm key>`. Errors use OpenAI's body shape:
401 for the key, 400 for a request to change, 503 while the swarm cannot serve, 500 for a bug.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from pathlib import Path
from typing import Any

from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .. import messages as m
from ..errors import (
    BadInputError, KVStateError, ModelFileError, NotReadyError, PeerError, ShardRangeError, UnsupportedModelError,
)
from ..wire.convert_client import report_dict
from .bodies import ApiError, Ask, parse_chat, parse_completion
from .pump import EventPump
from .replies import Reply

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
MAX_BODY = 4 << 20  # bytes; a prompt is at most 1 MiB of text (coordinator/generation.py)


def error_for(e: Exception) -> ApiError:
    """A swarm error from the coordinator as the HTTP error it answers with; logs the unexpected ones."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, (BadInputError, ShardRangeError, KVStateError, ModelFileError, UnsupportedModelError)):
        return ApiError(400, str(e))
    if isinstance(e, (NotReadyError, PeerError)):
        return ApiError(503, str(e), code="swarm_unavailable")
    log.exception("an HTTP request failed", exc_info=e)
    return ApiError(500, f"{type(e).__name__}: {e}")


def _answer(e: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


class Api:
    """The routes, over a coordinator (anything with `generate`, `status` and `model_path`)."""

    def __init__(self, coordinator, key: str):
        self.c = coordinator
        self._key = key.encode()
        path = Path(coordinator.model_path)
        self.models = (path.name, path.stem)

    def app(self) -> Starlette:
        routes = [
            Route("/", self.page),
            Route("/health", self.health),
            Route("/v1/models", self.list_models),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/swarm/status", self.status),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ]
        handlers = {ApiError: lambda _r, e: _answer(e),
                    HTTPException: lambda _r, e: _answer(ApiError(e.status_code, f"{e.detail}: see /v1/models, "
                                                                  "/v1/chat/completions, /v1/completions")),
                    Exception: lambda _r, e: _answer(error_for(e))}  # a bug: OpenAI's body, and it is logged
        return Starlette(routes=routes, exception_handlers=handlers)

    # ------------------------------------------------------------ plain pages

    async def page(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def health(self, request: Request) -> Response:
        report = await asyncio.to_thread(self.c.status)
        # "planning" also follows every session's end, while the route it ran on still serves.
        ok = report.state == "ready" or self.c.placement.route() is not None
        return JSONResponse({"status": "ok" if ok else "unavailable", "state": report.state},
                            status_code=200 if ok else 503)

    async def list_models(self, request: Request) -> Response:
        self._check_key(request)
        return JSONResponse({"object": "list", "data": [
            {"id": self.models[0], "object": "model", "created": int(Path(self.c.model_path).stat().st_mtime),
             "owned_by": "swarm"}]})

    async def status(self, request: Request) -> Response:
        self._check_key(request)
        return JSONResponse(report_dict(await asyncio.to_thread(self.c.status)))

    # ------------------------------------------------------------ generation

    async def chat(self, request: Request) -> Response:
        self._check_key(request)
        return await self._generate(request, parse_chat(await self._json(request), self.models), chat=True)

    async def completions(self, request: Request) -> Response:
        self._check_key(request)
        return await self._generate(request, parse_completion(await self._json(request), self.models), chat=False)

    async def _generate(self, request: Request, ask: Ask, chat: bool) -> Response:
        pump = EventPump(lambda is_active: self.c.generate(ask.request, is_active))
        try:
            # The first event (the session started) or the error that refused it: a refused request
            # gets an HTTP error, never a stream that fails at once.
            first = await _next(request, pump)
        except BaseException:
            pump.stop()
            raise
        if not isinstance(first, m.Started):
            pump.stop()
            raise ApiError(500, "the coordinator ended the stream before it started")
        reply = Reply(ask.model, chat)
        if ask.stream:
            return EventSourceResponse(self._events(pump, reply, ask.include_usage), ping=15)
        return await self._whole(request, pump, reply)

    async def _events(self, pump: EventPump, reply: Reply, include_usage: bool):
        """The stream's server-sent events; a client that goes away cancels this and frees the session."""
        try:
            opening = reply.opening()
            if opening:
                yield _data(opening)
            while True:
                try:
                    event = await pump.next()
                except Exception as e:  # a failure mid-answer: OpenAI's clients raise on an `error` event
                    yield _data(error_for(e).body())
                    return
                if event is None:
                    break
                if isinstance(event, m.Piece) and event.text:
                    yield _data(reply.piece(event.text))
                elif isinstance(event, m.Done):
                    yield _data(reply.closing(event, include_usage))
                    if include_usage:
                        yield _data(reply.usage_chunk(event))
            yield {"data": "[DONE]"}
        finally:
            pump.stop()

    async def _whole(self, request: Request, pump: EventPump, reply: Reply) -> Response:
        text, done = [], None
        try:
            while True:
                event = await _next(request, pump)
                if event is None:
                    break
                if isinstance(event, m.Piece):
                    text.append(event.text)
                elif isinstance(event, m.Done):
                    done = event
        finally:
            pump.stop()
        if done is None:
            raise ApiError(500, "the generation ended without its summary")
        return JSONResponse(reply.whole("".join(text), done))

    # ------------------------------------------------------------ helpers

    def _check_key(self, request: Request) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(401, "no swarm key: send the header `Authorization: Bearer <swarm key>` (the coordinator "
                                "printed the key when it started)", code="invalid_api_key")
        if not hmac.compare_digest(given.strip().encode(), self._key):
            raise ApiError(401, "wrong swarm key: use the key the coordinator printed when it started",
                           code="invalid_api_key")

    @staticmethod
    async def _json(request: Request) -> Any:
        too_big = f"the body is larger than {MAX_BODY} bytes, the most the swarm takes; send a shorter prompt"
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY:  # refused before a byte of it is read
            raise ApiError(413, too_big)
        raw = bytearray()
        async for chunk in request.stream():  # (a body without a length is counted as it comes)
            raw += chunk
            if len(raw) > MAX_BODY:
                raise ApiError(413, too_big)
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON ({e}); send a JSON object with "
                                "Content-Type: application/json") from None


async def _next(request: Request, pump: EventPump) -> m.GenerateEvent | None:
    """The pump's next event, watching for a client that goes away meanwhile (a session waiting for a slot,
    or a blocking answer): that one's session is ended."""
    while True:
        try:
            return await asyncio.wait_for(pump.next(), 1.0)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise ApiError(499, "the client closed the request") from None
        except Exception as e:
            raise error_for(e) from None


def _data(obj: dict) -> dict:
    return {"data": json.dumps(obj, ensure_ascii=False, separators=(",", ":"))}
