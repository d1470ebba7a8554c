"""Chat templates as their authors wrote them: a GGUF's `tokenizer.chat_template` rendered with Jinja2.

The environment is the one Hugging Face transformers' `apply_chat_template` builds (and llama-cpp-python's
Jinja2ChatFormatter copies), so a template's default system prompt, special tokens and whitespace come
out as its authors meant: a sandboxed, immutable Jinja2 environment with `trim_blocks` and
`lstrip_blocks`, the `loopcontrols` extension, `{% generation %}` passed through, a `tojson` that keeps
non-ASCII text and takes `indent`, `separators` and `sort_keys`, and the globals `raise_exception` and
`strftime_now`. The template sees `messages` (dicts with `role` and `content`), `bos_token`, `eos_token`,
`add_generation_prompt` and `tools` (None: requests carry no tool definitions).

Errors: a template that does not compile is an UnsupportedModelError; one that refuses a conversation
(`raise_exception`, roles out of order) or fails on it is a BadInputError that quotes the template.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import BadInputError, UnsupportedModelError

Message = Mapping[str, str] | tuple[str, str]


class _Refused(jinja2.TemplateError):
    """What the template's own `raise_exception(...)` raises."""


class _GenerationTags(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks assistant tokens with it): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        parser.stream.skip(1)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str):
    raise _Refused(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # transformers replaces Jinja's own tojson, which escapes HTML characters and takes no options.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTags, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def as_dicts(messages: Sequence[Message]) -> list[dict[str, str]]:
    """Messages as the dicts templates index (`message['role']`, `message.content`), checked."""
    out = []
    for i, message in enumerate(messages):
        if isinstance(message, Mapping):
            role, content = message.get("role"), message.get("content")
        else:
            role, content = tuple(message) if len(message) == 2 else (None, None)
        if not isinstance(role, str) or not role or not isinstance(content, str):
            raise BadInputError(f"chat message {i} needs a role and a text content, e.g. "
                                "{'role': 'user', 'content': 'Hello'}")
        if len(role) > 64 or not role.isprintable():
            raise BadInputError(f"chat message {i} has a role of {len(role)} characters; a role is a short name "
                                "such as system, user, assistant or tool")
        if "\x00" in content:
            raise BadInputError("a chat message cannot contain NUL characters")
        out.append({"role": role, "content": content})
    return out


class ChatTemplate:
    """One model's Jinja chat template, compiled once; `render` is safe from any thread."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        self.source, self.bos_token, self.eos_token = source, bos_token, eos_token
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as e:
            raise UnsupportedModelError(
                f"the model's chat template (tokenizer.chat_template) is not valid Jinja: {e}; fix the template in "
                "the GGUF, or use raw completion (swarm generate)") from None

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The prompt text for a conversation; with `add_generation_prompt`, it opens the assistant's turn."""
        chat = as_dicts(messages)
        try:
            return self._template.render(messages=chat, bos_token=self.bos_token, eos_token=self.eos_token,
                                         add_generation_prompt=add_generation_prompt, tools=None)
        except _Refused as e:
            raise BadInputError(f"the model's chat template refused this conversation: {e}") from None
        except Exception as e:  # noqa: BLE001 - the template is the model's code: whatever it raises is reported
            raise BadInputError(
                f"the model's chat template failed on this conversation ({type(e).__name__}: {e}); check the "
                "messages' roles and their order (most templates want user and assistant turns alternating, "
                "after an optional system message)") from None
