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

import grpc
from google.protobuf import json_format

from . import discovery, wire
from ._proto import swarm_pb2 as pb
from ._proto import swarm_pb2_grpc as pbg
from .errors import AuthError, BadInputError
from .cache import local_key
from .sampling import SamplingParams

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

    def __init__(self, call, peer: str):
        self._call = call
        self._peer = peer
        self.session_id: str | None = None
        self.result = Completion()

    def __iter__(self) -> Iterator[str]:
        try:
            for event in self._call:
                kind = event.WhichOneof("event")
                if kind == "started":
                    self.session_id = event.started.session_id
                    self.result.prompt_tokens = event.started.prompt_tokens
                elif kind == "piece":
                    self.result.tokens.extend(event.piece.tokens)
                    self.result.text += event.piece.text
                    if event.piece.text:
                        yield event.piece.text
                elif kind == "done":
                    d = event.done
                    self.result.finish_reason = d.finish_reason
                    self.result.first_token_ms = d.first_token_ms
                    self.result.tokens_per_s = d.decode_tokens_per_s
                    if d.decode_timings.steps:
                        self.result.timings = json_format.MessageToDict(
                            d.decode_timings, preserving_proto_field_name=True)
        except grpc.RpcError as e:
            raise wire.from_rpc(e, f"coordinator {self._peer}") from None
        finally:
            self._call.cancel()  # a caller that stops reading frees the session (no-op once finished)

    def cancel(self) -> None:
        """Stop generating; the coordinator frees the session."""
        self._call.cancel()


class SwarmClient:
    """A connection to a swarm's coordinator, given as HOST:PORT or found by mDNS."""

    def __init__(
        self, coordinator: str | None = None, *, key: str | None = None, swarm: str = "default",
        mdns_interface: str | None = None, discovery_timeout: float = 5.0,
    ):
        if coordinator is None:
            interfaces = discovery.interfaces_for("0.0.0.0", mdns_interface)
            coordinator = discovery.find_coordinator(swarm, interfaces, timeout=discovery_timeout).address
        self.address = wire.check_address(coordinator)
        key = key or os.environ.get("SWARM_KEY") or local_key(swarm)
        if not key:
            raise AuthError(
                "no swarm key: pass key=... (or --key), or set SWARM_KEY; the coordinator printed it when it started"
            )
        self._channel = wire.channel(self.address, key)
        self._stub = pbg.CoordinatorStub(self._channel)

    # ------------------------------------------------------------ generation

    def generate(self, prompt: str, **options) -> Generation:
        """Raw completion of `prompt`, streamed as text pieces (options: see `_request`)."""
        return self._start(self._request(options, prompt=prompt))

    def complete(self, prompt: str, **options) -> Completion:
        """Raw completion of `prompt`, returned when finished."""
        return _drain(self.generate(prompt, **options))

    def chat(self, messages: Iterable[Mapping[str, str] | tuple[str, str]], **options) -> Generation:
        """The assistant's reply to a conversation, streamed; formatted with the model's chat template."""
        chat = pb.ChatInput()
        for m in messages:
            role, content = (m["role"], m["content"]) if isinstance(m, Mapping) else m
            chat.messages.add(role=role, content=content)
        return self._start(self._request(options, chat=chat))

    def chat_complete(self, messages: Iterable[Mapping[str, str] | tuple[str, str]], **options) -> Completion:
        """The assistant's reply to a conversation, returned when finished."""
        return _drain(self.chat(messages, **options))

    def status(self) -> dict:
        """Nodes, their resources and layers, and the running sessions, as a plain dict."""
        try:
            reply = self._stub.Status(pb.StatusRequest(), timeout=10.0)
        except grpc.RpcError as e:
            raise wire.from_rpc(e, f"coordinator {self.address}") from None
        return json_format.MessageToDict(reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)

    def _start(self, request: pb.GenerateRequest) -> Generation:
        return Generation(self._stub.Generate(request), self.address)

    @staticmethod
    def _request(options: dict, **input_) -> pb.GenerateRequest:
        """Options: max_tokens, temperature (0 = greedy, the default), top_k, top_p, min_p, repeat_penalty,
        repeat_last_n, seed, stop (a string or a list), timings (bool)."""
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
        sampling = SamplingParams(**options)
        return pb.GenerateRequest(
            max_tokens=max_tokens, sampling=wire.sampling_to_pb(sampling), stop=stop, timings=timings, **input_,
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "SwarmClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _drain(gen: Generation) -> Completion:
    for _ in gen:
        pass
    return gen.result

