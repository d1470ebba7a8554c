"""The model's own tokenizer and chat template, through llama.cpp (the vocabulary only, no weights)."""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import BadInputError, EngineError, ModelFileError, UnsupportedModelError
from ..gguf_file import read_gguf
from .backend import _llama, _load_model

# When a GGUF carries no `tokenizer.chat_template` (some conversions drop it, the default model's among
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
        """The prompt for (role, content) messages, formatted by the model's own chat template.

        llama.cpp recognises the template stored in the GGUF (Gemma, Llama 3, ChatML, Mistral and more)
        and formats it natively; the text ends with the assistant's turn opened.
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
