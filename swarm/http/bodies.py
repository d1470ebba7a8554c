"""OpenAI request bodies -> the project's `GenerateRequest`, refusing what the swarm cannot honour.

Every refusal is an `ApiError` whose message says what to change; the app turns it into OpenAI's
error body. Options OpenAI has and the swarm does not (n > 1, logprobs, tools, penalties) are refused
rather than ignored, so a client never gets an answer to a question it did not ask.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .. import messages as m
from ..errors import BadInputError
from ..sampling import CHAT_DEFAULTS, SamplingParams


class ApiError(Exception):
    """An HTTP error with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = "invalid_request_error" if status < 500 else "server_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


@dataclass(frozen=True)
class Ask:
    """A parsed request: what to generate, and how to answer (streamed or not, with usage or not)."""

    request: m.GenerateRequest
    model: str  # the served model's name, as replies give it
    stream: bool
    include_usage: bool


# Sampling options beyond OpenAI's that llama.cpp's server also takes; passed through as they are.
_EXTRA_SAMPLING = {"top_k": int, "min_p": float, "repeat_penalty": float}
# OpenAI options the swarm does not implement, with the value that means "off" (accepted as such).
_UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "tools": (None, []), "functions": (None, []),
                "tool_choice": (None, "none"), "function_call": (None, "none"), "echo": (None, False),
                "best_of": (None, 1), "suffix": (None, ""), "logit_bias": (None, {}),
                "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0)}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def parse_chat(body: Any, model_names: tuple[str, ...]) -> Ask:
    """A /v1/chat/completions body."""
    body = _object(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("`messages` must be a non-empty list of {\"role\": ..., \"content\": ...} objects", "messages")
    pairs = tuple(_message(x, i) for i, x in enumerate(messages))
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise bad("only plain text answers are supported: drop `response_format` or set it to {\"type\": \"text\"}",
                  "response_format")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    return _ask(body, model_names, CHAT_DEFAULTS, max_tokens, messages=pairs)


def parse_completion(body: Any, model_names: tuple[str, ...]) -> Ask:
    """A /v1/completions body."""
    body = _object(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise bad("`prompt` must be a non-empty string (one prompt per request; token-id prompts are not supported)",
                  "prompt")
    return _ask(body, model_names, SamplingParams(), body.get("max_tokens"), prompt=prompt)


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    return body


def _message(x: Any, i: int) -> tuple[str, str]:
    param = f"messages[{i}]"
    if not isinstance(x, dict):
        raise bad(f"{param} must be an object with `role` and `content`", param)
    role = x.get("role")
    if role not in _ROLES:
        raise bad(f"{param}.role is {role!r}; use one of system, user, assistant (tool messages are not supported)",
                  f"{param}.role")
    content = x.get("content")
    if isinstance(content, list):  # content parts: text only
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"{param}.content may hold only text parts ({{\"type\": \"text\", \"text\": ...}})",
                          f"{param}.content")
            texts.append(part["text"])
        content = "".join(texts)
    if content is None and role == "assistant":
        content = ""
    if not isinstance(content, str):
        raise bad(f"{param}.content must be a string", f"{param}.content")
    return _ROLES[role], content


def _ask(body: dict, model_names: tuple[str, ...], defaults: SamplingParams, max_tokens: Any, **input_) -> Ask:
    model = body.get("model")
    if model is not None and model not in model_names:
        raise ApiError(400, f"this swarm serves {model_names[0]!r}, not {model!r}; use that name (GET /v1/models "
                            "lists it)", "model", "model_not_found")
    n = body.get("n")
    if n not in (None, 1):
        raise bad(f"n={n!r}: the swarm returns one choice per request; send n=1 (or leave it out) and ask again "
                  "for more", "n")
    for name, off in _UNSUPPORTED.items():
        if name in body and body[name] not in off:
            raise bad(f"`{name}` is not supported by the swarm; leave it out", name)
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("`stream_options` must be an object like {\"include_usage\": true}", "stream_options")
    include_usage = _bool(options or {}, "include_usage", "stream_options.include_usage")
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise bad(f"max_tokens must be a positive whole number, not {max_tokens!r}", "max_tokens")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)):
        raise bad("`stop` must be a string or a list of strings", "stop")
    try:
        sampling = _sampling(body, defaults)
        return Ask(m.GenerateRequest(max_tokens=max_tokens or 0, sampling=sampling, stop=tuple(stop or ()), **input_),
                   model_names[0], stream, include_usage)
    except BadInputError as e:
        raise bad(str(e)) from None


def _sampling(body: dict, defaults: SamplingParams) -> SamplingParams:
    given: dict[str, Any] = {}
    temperature = body.get("temperature")
    if temperature is not None:
        if not _is_number(temperature) or not 0.0 <= temperature <= 2.0:
            raise bad(f"temperature must be a number from 0 (greedy) to 2, not {temperature!r}", "temperature")
        if temperature == 0:
            defaults = SamplingParams()  # greedy, repeat penalty off: what the exactness tests compare
        given["temperature"] = float(temperature)
    top_p = body.get("top_p")
    if top_p is not None:
        if not _is_number(top_p) or not 0.0 < top_p <= 1.0:
            raise bad(f"top_p must be a number above 0 and at most 1, not {top_p!r}", "top_p")
        given["top_p"] = float(top_p)
    seed = body.get("seed")
    if seed is not None:
        if not _is_int(seed) or not 0 <= seed < 1 << 63:
            raise bad(f"seed must be a whole number from 0 to 2**63 - 1, not {seed!r}", "seed")
        given["seed"] = seed
    for name, kind in _EXTRA_SAMPLING.items():
        value = body.get(name)
        if value is not None:
            if not (_is_int(value) if kind is int else _is_number(value)):
                raise bad(f"{name} must be a {'whole ' if kind is int else ''}number, not {value!r}", name)
            given[name] = kind(value)
    return dataclasses.replace(defaults, **given)


def _bool(body: dict, name: str, param: str | None = None) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"`{param or name}` must be true or false, not {value!r}", param or name)
    return value


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
