"""The model's own tokenizer and chat template, through llama.cpp (the vocabulary only, no weights).

A conversation becomes tokens the way llama-cpp-python's `Llama.create_chat_completion` makes them for a
model whose GGUF carries `tokenizer.chat_template`: the template rendered with Jinja2 (chat_template.py),
then tokenized with special tokens parsed and no BOS added, since the template writes `bos_token` itself
where its authors want one (as transformers' `apply_chat_template` does). Only a model without a template
falls back to llama.cpp's built-in format for its architecture; that text carries no BOS, so tokenization
adds the model's own (`tokenizer.ggml.add_bos_token`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path
from typing import Iterable, Sequence

from ..chat_template import ChatTemplate, as_dicts
from ..errors import BadInputError, EngineError, ModelFileError, UnsupportedModelError
from ..gguf_file import read_gguf
from .backend import _llama, _load_model

# When a GGUF carries no `tokenizer.chat_template` (some conversions drop it, Gemma 3 270M's among
# them), the architecture's own format, by the name llama.cpp knows it under.
_FALLBACK_TEMPLATES = {"gemma3": b"gemma", "gemma2": b"gemma", "gemma": b"gemma", "qwen2": b"chatml", "qwen3": b"chatml"}


class Tokenizer:
    """The model's own tokenizer, loaded without weights."""

    def __init__(self, model_path: str | os.PathLike):
        path = Path(model_path)
        read_gguf(path)  # a clear error for missing, truncated or non-GGUF files
        self._llama = _llama()
        self._model = _load_model(path, vocab_only=True)
        self._vocab = self._llama.llama_model_get_vocab(self._model)
        self.n_vocab = self._llama.llama_vocab_n_tokens(self._vocab)
        self.arch = read_gguf(path).arch
        if self.n_vocab <= 1:
            raise ModelFileError(f"{path} has no vocabulary (is it a middle shard?); tokenize with the full model")
        self._template: ChatTemplate | None = None
        self._template_error: UnsupportedModelError | None = None
        source = self.chat_template()
        if source:
            try:
                self._template = ChatTemplate(source, self._token_text(self._llama.llama_vocab_bos(self._vocab)),
                                              self._token_text(self._llama.llama_vocab_eos(self._vocab)))
            except UnsupportedModelError as e:  # raw completion still works; chat says why it cannot
                self._template_error = e

    def _token_text(self, token: int) -> str:
        """A special token's text as the vocabulary stores it ("" for none), as llama-cpp-python passes it."""
        if token < 0:
            return ""
        return self._llama.llama_vocab_get_text(self._vocab, token).decode("utf-8", errors="replace")

    @property
    def chat_format(self) -> str:
        """Which chat template a conversation is rendered with: `gguf (jinja)`, `llama.cpp built-in NAME`, `none`."""
        if self._template is not None:
            return "gguf (jinja)"
        if self._template_error is not None:
            return "gguf (jinja), does not compile"
        builtin = _FALLBACK_TEMPLATES.get(self.arch)
        return f"llama.cpp built-in {builtin.decode()}" if builtin else "none"

    def chat_tokens(self, messages) -> list[int]:
        """The prompt tokens for a conversation ((role, content) pairs or dicts), ending with the
        assistant's turn opened."""
        if self._template_error is not None:
            raise UnsupportedModelError(str(self._template_error))
        if self._template is not None:
            text = self._template.render(messages, add_generation_prompt=True)
            return self.tokenize(text, add_special=False, parse_special=True)
        pairs = [(m["role"], m["content"]) for m in as_dicts(messages)]
        return self.tokenize(self.apply_chat_template(pairs), add_special=True, parse_special=True)

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        raw = text.encode("utf-8")
        cap = len(raw) + 16
        buf = (ctypes.c_int32 * cap)()
        n = self._llama.llama_tokenize(self._vocab, raw, len(raw), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (ctypes.c_int32 * cap)()
            n = self._llama.llama_tokenize(self._vocab, raw, len(raw), buf, cap, add_special, parse_special)
        if n < 0:
            raise EngineError(f"llama.cpp failed to tokenize the text ({n})")
        return list(buf[:n])

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes a token stands for (may be part of a UTF-8 character)."""
        if not 0 <= token < self.n_vocab:
            raise BadInputError(f"token id {token} is outside the vocabulary (0..{self.n_vocab - 1})")
        buf = ctypes.create_string_buffer(64)
        n = self._llama.llama_token_to_piece(self._vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._llama.llama_token_to_piece(self._vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: Iterable[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(self._llama.llama_vocab_is_eog(self._vocab, token))

    def chat_template(self) -> str | None:
        raw = self._llama.llama_model_chat_template(self._model, None)
        return raw.decode("utf-8") if raw else None

    def apply_chat_template(self, messages: Sequence[tuple[str, str]]) -> str:
        """The prompt for (role, content) messages in llama.cpp's built-in format for this model.

        llama.cpp recognises well-known templates (Gemma, Llama 3, ChatML, Mistral and more) by their text
        and formats them natively, without Jinja: a template's default system prompt, for one, is lost.
        `chat_tokens` uses this only for models whose GGUF has no template. The text ends with the
        assistant's turn opened.
        """
        template = self._llama.llama_model_chat_template(self._model, None) or _FALLBACK_TEMPLATES.get(self.arch)
        if not template:
            raise UnsupportedModelError(
                f"this {self.arch} model has no chat template in its GGUF; use raw completion (swarm generate)"
            )
        for role, content in messages:
            if role not in ("system", "user", "assistant"):
                raise BadInputError(f"a chat message's role is system, user or assistant, not {role!r}")
            if "\x00" in content:
                raise BadInputError("a chat message cannot contain NUL characters")
        encoded = [(r.encode(), c.encode("utf-8")) for r, c in messages]
        chat = (self._llama.llama_chat_message * max(1, len(encoded)))()
        for i, (r, c) in enumerate(encoded):
            chat[i].role, chat[i].content = r, c
        need = 2 * sum(len(c) + 16 for _, c in encoded) + 256
        for _ in range(2):
            buf = ctypes.create_string_buffer(need)
            n = self._llama.llama_chat_apply_template(template, chat, len(encoded), True, buf, need)
            if n < 0:
                raise UnsupportedModelError(
                    "llama.cpp does not recognise this model's chat template; use raw completion (swarm generate)"
                )
            if n <= need:
                return buf.raw[:n].decode("utf-8", errors="replace")
            need = n + 1
        raise EngineError("llama.cpp kept asking for a larger chat buffer")

    def close(self) -> None:
        if getattr(self, "_model", None):
            self._llama.llama_model_free(self._model)
            self._model = None

    def __del__(self):  # pragma: no cover - best effort
        with contextlib.suppress(Exception):
            self.close()
