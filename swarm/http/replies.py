"""The coordinator's events -> OpenAI's JSON: chunks of a stream, or one whole answer, with usage."""

from __future__ import annotations

import time
import uuid

from .. import messages as m


def usage(done: m.Done) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def finish_reason(done: m.Done) -> str:
    return "length" if done.finish_reason == "length" else "stop"


class Reply:
    """The JSON objects of one answer, for `/v1/chat/completions` (chat) or `/v1/completions`."""

    def __init__(self, model: str, chat: bool):
        self.model, self.chat = model, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _envelope(self, choices: list, stream: bool) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if stream and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def _choice(self, text: str | None, finish: str | None, stream: bool, role: bool = False) -> dict:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        body = {"role": "assistant"} if role or not stream else {}
        if text is not None:
            body["content"] = text
        return {"index": 0, ("delta" if stream else "message"): body, "logprobs": None, "finish_reason": finish}

    def opening(self) -> dict | None:
        """A chat stream's first chunk names the role; a completion stream has none."""
        return self._envelope([self._choice("", None, True, role=True)], True) if self.chat else None

    def piece(self, text: str) -> dict:
        return self._envelope([self._choice(text, None, True)], True)

    def closing(self, done: m.Done, with_usage: bool) -> dict:
        """The last chunk with content: empty, with the finish reason."""
        out = self._envelope([self._choice(None if self.chat else "", finish_reason(done), True)], True)
        if with_usage:
            out["usage"] = None  # OpenAI's shape: usage only on the extra chunk that follows
        return out

    def usage_chunk(self, done: m.Done) -> dict:
        """With stream_options.include_usage: a last chunk with no choices and the usage."""
        return dict(self._envelope([], True), usage=usage(done))

    def whole(self, text: str, done: m.Done) -> dict:
        """A blocking answer."""
        return dict(self._envelope([self._choice(text, finish_reason(done), False)], False), usage=usage(done))
