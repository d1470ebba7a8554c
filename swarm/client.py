"""Use a swarm from Python: streaming and blocking generation, chat, and status.

    from swarm.client import SwarmClient

    with SwarmClient("192.168.1.20:7700", key="...") as swarm:   # or SwarmClient() to find it by mDNS
        for piece in swarm.generate("The capital of France is", max_tokens=32):
            print(piece, end="", flush=True)
        reply = swarm.chat_complete([{"role": "user", "content": "Name three llamas."}])
        print(reply.text, reply.tokens_per_s)

Errors are SwarmError subclasses: AuthError for a wrong key, BadInputError for a refused request,
NotReadyError while the swarm is still placing layers, PeerError when the coordinator is unreachable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping

from . import discovery, wire
from . import messages as m
from .cache import local_key
from .errors import AuthError, BadInputError
from .sampling import SamplingParams, chat_sampling
from .wire.convert_client import timings_dict

__all__ = ["SwarmClient", "Generation", "Completion"]


@dataclass
class Completion:
    """A finished generation: its text and how it went."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = ""
    prompt_tokens: int = 0
    first_token_ms: float = 0.0
    tokens_per_s: float = 0.0
    timings: dict = field(default_factory=dict)  # decode steps split into compute, serialization, network


class Generation:
    """An iterator of text pieces; `.result` holds the Completion once it is exhausted."""

    def __init__(self, events):
        self._events = events
        self.session_id: str | None = None
        self.result = Completion()

    def __iter__(self) -> Iterator[str]:
        try:
            for event in self._events:
                if isinstance(event, m.Piece):
                    self.result.tokens.extend(event.tokens)
                    self.result.text += event.text
                    if event.text:
                        yield event.text
                elif isinstance(event, m.Started):
                    self.session_id = event.session_id
                    self.result.prompt_tokens = event.prompt_tokens
                else:
                    self.result.finish_reason = event.finish_reason
                    self.result.first_token_ms = event.first_token_ms
                    self.result.tokens_per_s = event.decode_tokens_per_s
                    if event.timings.steps:
                        self.result.timings = timings_dict(event.timings)
        finally:
            self._events.cancel()  # a caller that stops reading frees the session (no-op once finished)

    def cancel(self) -> None:
        """Stop generating; the coordinator frees the session."""
        self._events.cancel()


class SwarmClient:
    """A connection to a swarm's coordinator, given as HOST:PORT or found by mDNS."""

    def __init__(
        self, coordinator: str | None = None, *, key: str | None = None, swarm: str = "default",
        mdns_interface: str | None = None, discovery_timeout: float = 5.0,
    ):
        key = key or os.environ.get("SWARM_KEY") or local_key(swarm)
        if not key:
            raise AuthError(
                "no swarm key: pass key=... (or --key), or set SWARM_KEY; the coordinator printed it when it started"
            )
        if coordinator is None:  # found by mDNS, and proven by its TLS handshake
            interfaces = discovery.interfaces_for("0.0.0.0", mdns_interface)
            coordinator = wire.tls.find_coordinator(swarm, interfaces, key, timeout=discovery_timeout)
        self.address = wire.check_address(coordinator)
        self._link = wire.CoordinatorLink(self.address, key)

    # ------------------------------------------------------------ generation

    def generate(self, prompt: str, **options) -> Generation:
        """Raw completion of `prompt`, streamed as text pieces (options: see `_request`)."""
        return self._start(self._request(options, prompt=prompt))

    def complete(self, prompt: str, **options) -> Completion:
        """Raw completion of `prompt`, returned when finished."""
        return _drain(self.generate(prompt, **options))

    def chat(self, messages: Iterable[Mapping[str, str] | tuple[str, str]], **options) -> Generation:
        """The assistant's reply to a conversation, streamed; formatted with the model's chat template."""
        pairs = tuple((x["role"], x["content"]) if isinstance(x, Mapping) else tuple(x) for x in messages)
        return self._start(self._request(options, chat=True, messages=pairs))

    def chat_complete(self, messages: Iterable[Mapping[str, str] | tuple[str, str]], **options) -> Completion:
        """The assistant's reply to a conversation, returned when finished."""
        return _drain(self.chat(messages, **options))

    def status(self) -> dict:
        """Nodes, their resources and layers, and the running sessions, as a plain dict."""
        return self._link.status()

    def _start(self, request: m.GenerateRequest) -> Generation:
        return Generation(self._link.generate(request))

    @staticmethod
    def _request(options: dict, chat: bool = False, **input_) -> m.GenerateRequest:
        """Options: max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed, stop (a
        string or a list), timings (bool). Raw completion is greedy unless told otherwise; a chat samples
        with `sampling.CHAT_DEFAULTS` (Ollama's) in place of the options not given, and temperature=0 is
        greedy there too."""
        allowed = {"max_tokens", "stop", "timings"} | set(SamplingParams.__dataclass_fields__)
        unknown = set(options) - allowed
        if unknown:
            raise BadInputError(f"unknown option(s) {sorted(unknown)}; use {sorted(allowed)}")
        stop = options.pop("stop", None) or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        max_tokens = int(options.pop("max_tokens", 0) or 0)
        if max_tokens < 0:
            raise BadInputError("max_tokens must be 0 (the coordinator's default) or positive")
        timings = bool(options.pop("timings", False))
        sampling = chat_sampling(**options) if chat else SamplingParams(**options)
        return m.GenerateRequest(max_tokens=max_tokens, sampling=sampling, stop=tuple(stop), timings=timings,
                                 **input_)

    def close(self) -> None:
        self._link.close()

    def __enter__(self) -> "SwarmClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _drain(gen: Generation) -> Completion:
    for _ in gen:
        pass
    return gen.result

