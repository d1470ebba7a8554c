"""`Shard`: one loaded shard and its sessions: forward steps, rollback, replay, KV export and import.

A non-final shard's hidden states are taken from the graph node `l_out-<k-1>` through the
scheduler's eval callback; returning False from the data call stops that graph split, so the output
norm and the head are never computed. Every row of such a batch is marked as an output because
llama.cpp computes its last layer only for output rows.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import os
import secrets
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from .. import kvstate, shardcache
from ..errors import BadInputError, ContextFullError, EngineError, KVStateError
from ..layers import LayerRange, ShardRole
from ..slicing import ShardFile, shard_info
from .backend import _compute, _ggml, _llama, _load_model, default_threads
from .capture import HiddenCapture
from .kvblob import KVBase, _pack_kv, _parse_kv_blob

log = logging.getLogger(__name__)


@dataclass
class _Session:
    seq: int
    n_past: int = 0
    floor: int = 0  # after an import that filled a window cache: the earliest length a rollback may keep
    # Changes whenever cells are rewritten or dropped (open, rollback, import): a KV delta is only taken
    # against a base of the same edit.
    edit: int = field(default_factory=lambda: next(_EDITS))


_EDITS = itertools.count(1)
_MAX_CTX = 1 << 24  # llama.cpp's context fields are 32-bit; this is far beyond any model's context


class Shard:
    """One loaded shard: many sessions (llama.cpp sequences), each with its own KV cache.

    Methods are thread-safe; llama.cpp work is serialised per shard.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        n_ctx: int = 512,
        max_sessions: int = 1,
        n_batch: int = 512,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        flash_attn: bool = False,
    ):
        for name, value in (("n_ctx", n_ctx), ("max_sessions", max_sessions), ("n_batch", n_batch),
                            ("n_threads", 1 if n_threads is None else n_threads),
                            ("n_threads_batch", 1 if n_threads_batch is None else n_threads_batch)):
            if not isinstance(value, int) or value < 1:
                raise BadInputError(f"{name} must be a positive whole number, got {value!r}")
        if n_ctx * max_sessions > _MAX_CTX or (n_threads or 1) > 1024 or (n_threads_batch or 1) > 1024:
            raise BadInputError(
                f"n_ctx x max_sessions must be at most {_MAX_CTX} and threads at most 1024 "
                f"(got n_ctx={n_ctx}, max_sessions={max_sessions})"
            )
        self.info: ShardFile = shard_info(path)  # validates the file before llama.cpp sees it
        self.path = self.info.path
        self._held = shardcache.hold(self.path)  # no eviction from the shard cache while it is loaded
        self.layers: LayerRange = self.info.layers
        self.role: ShardRole = self.info.role
        self.n_ctx = n_ctx
        self.n_batch = min(n_batch, n_ctx)
        self.max_sessions = max_sessions
        self.flash_attn = bool(flash_attn)
        self._lock = threading.RLock()
        self._llama = llama_cpp = _llama()
        self._model = _load_model(self.path, vocab_only=False)
        self.n_embd = llama_cpp.llama_model_n_embd(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._model))
        n_threads = n_threads or default_threads()

        p = llama_cpp.llama_context_default_params()
        p.n_ctx = n_ctx * max_sessions
        p.n_batch = self.n_batch
        p.n_ubatch = self.n_batch
        p.n_seq_max = max_sessions
        p.kv_unified = False  # one KV stream per session, laid out as in a single-session context
        p.n_threads = n_threads
        p.n_threads_batch = n_threads_batch or n_threads
        # llama_cpp.Llama defaults to flash attention off; AUTO would turn it on and change the text.
        p.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        p.embeddings = False
        p.no_perf = True
        # llama.cpp computes a model's last block only for output rows. A non-final shard needs all
        # rows of its last layer, unless it carries a look-ahead block that takes that selection.
        self._only_last_output = self.role.gives_logits or self.info.lookahead > 0
        self._capture = None
        if not self.role.gives_logits:
            self._capture = HiddenCapture(
                f"l_out-{self.layers.count - 1}", self.n_batch, self.n_embd, _ggml(),
                llama_cpp.ggml_backend_sched_eval_callback,
            )
            p.cb_eval = self._capture.callback
            p.cb_eval_user_data = self._capture.user_data
        self._ctx = llama_cpp.llama_init_from_model(self._model, p)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            self._model = None
            raise EngineError(f"llama.cpp could not create a context for {self.path.name} (n_ctx={p.n_ctx}); out of memory?")
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0 if self.role.takes_tokens else self.n_embd, 1)
        b = self._batch
        self._b_pos = np.ctypeslib.as_array(b.pos, (self.n_batch,))
        self._b_nseq = np.ctypeslib.as_array(b.n_seq_id, (self.n_batch,))
        self._b_logits = np.ctypeslib.as_array(b.logits, (self.n_batch,))
        if self.role.takes_tokens:
            self._b_in = np.ctypeslib.as_array(b.token, (self.n_batch,))
        else:
            self._b_in = np.ctypeslib.as_array(b.embd, (self.n_batch, self.n_embd))
        self._sessions: dict[str, _Session] = {}
        self._free_seqs = list(range(max_sessions - 1, -1, -1))

    # ------------------------------------------------------------ sessions

    def open_session(self, session: str) -> None:
        """Reserve a sequence for `session`; its KV cache starts empty."""
        with self._lock:
            if not self._ctx:
                raise EngineError(f"shard {self.layers} is closed; load it again")
            if session in self._sessions:
                raise BadInputError(f"session {session!r} is already open on shard {self.layers}")
            if not self._free_seqs:
                raise ContextFullError(
                    f"shard {self.layers} already holds {self.max_sessions} sessions, its maximum; "
                    "drop one, or load the shard with a larger max_sessions"
                )
            seq = self._free_seqs.pop()
            self._llama.llama_memory_seq_rm(self._mem, seq, -1, -1)
            self._sessions[session] = _Session(seq)

    def drop_session(self, session: str) -> None:
        """Forget a session and free its KV cache (no error if it is not open)."""
        with self._lock:
            s = self._sessions.pop(session, None)
            if s is not None and self._ctx:
                self._llama.llama_memory_seq_rm(self._mem, s.seq, -1, -1)
                self._free_seqs.append(s.seq)

    def sessions(self) -> dict[str, int]:
        """Open sessions and how many positions each holds."""
        with self._lock:
            return {k: s.n_past for k, s in self._sessions.items()}

    def session_length(self, session: str) -> int:
        return self._get(session).n_past

    def kv_span(self, session: str) -> tuple[int, int]:
        """(first, end) of the positions the session's KV cache holds; on a sliding-window model the
        window layers' cache decides `first` (it keeps old cells until their room is needed)."""
        with self._lock:
            s = self._get(session)
            if not s.n_past:
                return 0, 0
            return (self._llama.llama_memory_seq_pos_min(self._mem, s.seq),
                    self._llama.llama_memory_seq_pos_max(self._mem, s.seq) + 1)

    def _get(self, session: str) -> _Session:
        if not self._ctx:
            raise EngineError(f"shard {self.layers} is closed; load it again")
        s = self._sessions.get(session)
        if s is None:
            raise BadInputError(f"unknown session {session!r} on shard {self.layers}; open it first")
        return s

    # ------------------------------------------------------------ compute

    def forward(self, session: str, inputs, start: int | None = None) -> np.ndarray:
        """Run one batch for `session` at positions start, start+1, ...

        First shards take token ids (1-D ints); others take hidden states, float32 of shape
        (n, n_embd). Non-final shards return hidden states (n, n_embd); final shards return the
        logits of the batch's last position (n_vocab,).
        """
        with self._lock:
            s = self._get(session)
            arr = self._check_inputs(inputs)
            n = arr.shape[0]
            if start is None:
                start = s.n_past
            if start != s.n_past:
                raise BadInputError(
                    f"positions must continue session {session!r}: it holds {s.n_past} positions, so the next "
                    f"batch starts at {s.n_past}, not {start} (positions may neither skip nor go back)"
                )
            if start + n > self.n_ctx:
                raise ContextFullError(
                    f"session {session!r} would reach {start + n} positions but the context holds {self.n_ctx}; "
                    "start a new session or load the shard with a larger n_ctx"
                )
            self._b_in[:n] = arr
            self._b_pos[:n] = np.arange(start, start + n, dtype=np.int32)
            self._b_nseq[:n] = 1
            seq_ids = self._batch.seq_id
            for i in range(n):
                seq_ids[i][0] = s.seq
            self._b_logits[:n] = 0 if self._only_last_output else 1
            self._b_logits[n - 1] = 1
            if self._capture is not None:
                self._capture.arm(n)
            self._batch.n_tokens = n
            rc = _compute.run(self._llama.llama_decode, self._ctx, self._batch)
            if rc != 0:
                # Roll back whatever the failed batch may have written.
                self._llama.llama_memory_seq_rm(self._mem, s.seq, start, -1)
                if rc == 1:
                    raise ContextFullError(f"no room in the KV cache for {n} more positions of session {session!r}")
                raise EngineError(f"llama_decode failed with code {rc} on shard {self.layers}")
            s.n_past = start + n
            if self.role.gives_logits:
                ptr = self._llama.llama_get_logits_ith(self._ctx, -1)
                if not ptr:
                    raise EngineError("llama.cpp returned no logits")
                return np.ctypeslib.as_array(ptr, (self.n_vocab,)).copy()
            return self._capture.take()

    def _check_inputs(self, inputs) -> np.ndarray:
        if self.role.takes_tokens:
            arr = np.asarray(inputs)
            if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
                raise BadInputError(
                    f"shard {self.layers} is a first shard and takes a 1-D list of token ids, got an array of "
                    f"shape {arr.shape} and dtype {arr.dtype}"
                )
            if arr.size and (arr.min() < 0 or arr.max() >= self.n_vocab):
                bad = int(arr[(arr < 0) | (arr >= self.n_vocab)][0])
                raise BadInputError(f"token id {bad} is outside the vocabulary (0..{self.n_vocab - 1})")
            arr = arr.astype(np.int32)
        else:
            if not isinstance(inputs, np.ndarray):
                raise BadInputError(
                    f"shard {self.layers} takes hidden states as a float32 numpy array of shape (n, {self.n_embd})"
                )
            arr = inputs
            if arr.dtype != np.float32:
                raise BadInputError(
                    f"hidden states must be float32, got {arr.dtype}; convert with .astype(numpy.float32) only if "
                    "they really are activations of this model"
                )
            if arr.ndim != 2 or arr.shape[1] != self.n_embd:
                raise BadInputError(
                    f"hidden states must have shape (n, {self.n_embd}) for this model, got {arr.shape}"
                )
            if not np.isfinite(arr).all():
                raise BadInputError("hidden states contain NaN or infinity; the shard before this one went wrong")
        n = arr.shape[0]
        if n == 0:
            raise BadInputError("a batch needs at least one position")
        if n > self.n_batch:
            raise BadInputError(
                f"a batch of {n} positions is larger than this shard's n_batch ({self.n_batch}); send it in pieces "
                "of at most n_batch, the way the reference model would run it"
            )
        return arr

    def rollback(self, session: str, length: int) -> None:
        """Forget a session's positions from `length` on (undo steps that a later shard failed)."""
        with self._lock:
            s = self._get(session)
            if not 0 <= length <= s.n_past:
                raise BadInputError(f"cannot roll session {session!r} back to {length}; it holds {s.n_past} positions")
            if 0 < length < s.floor:
                raise KVStateError(
                    f"cannot roll session {session!r} back to {length}: its KV state was imported at {s.floor} "
                    f"positions, and this model's sliding-window layers kept only the window before that; roll back "
                    f"to {s.floor} or later, or to 0 and replay"
                )
            self._llama.llama_memory_seq_rm(self._mem, s.seq, length, -1)
            if length < s.n_past:
                s.edit = next(_EDITS)
            s.n_past = length
            if length == 0:
                s.floor = 0

    def replay(self, session: str, steps: Iterable[tuple[int, object]]) -> None:
        """Rebuild a session's KV cache by running its recorded (start, inputs) steps again, in order.

        The result is exact only if the steps have the batch composition of the original run.
        """
        for start, inputs in steps:
            self.forward(session, inputs, start)

    # ------------------------------------------------------------ KV state

    def _snapshot(self, session: str) -> tuple[bytearray, int, int]:
        """The session's state as llama.cpp writes it, its length and edit, taken together."""
        with self._lock:
            s = self._get(session)
            size = self._llama.llama_state_seq_get_size(self._ctx, s.seq)
            buf = bytearray(size)
            view = (ctypes.c_uint8 * size).from_buffer(buf)
            got = self._llama.llama_state_seq_get_data(self._ctx, view, size, s.seq)
            del view
            if got == 0 and s.n_past:
                raise EngineError(f"llama.cpp could not export the KV state of session {session!r}")
            if got < size:
                del buf[got:]
            return buf, s.n_past, s.edit

    def _head(self, n_past: int, lineage: str) -> dict:
        return {"shard_id": self.info.shard_id, "layers": [self.layers.start, self.layers.end], "n_past": n_past,
                "n_ctx": self.n_ctx, "max_sessions": self.max_sessions, "flash_attn": self.flash_attn,
                "lineage": lineage}

    def export_kv(self, session: str) -> bytes:
        """The session's KV cache as a self-describing blob for `import_kv` on the same shard."""
        payload, n_past, _ = self._snapshot(session)
        return _pack_kv(self._head(n_past, secrets.token_hex(8)), payload)

    def checkpoint_kv(self, session: str, base: KVBase | None = None,
                      taken: Callable[[], None] | None = None) -> tuple[bytes, int, KVBase | None]:
        """Like `export_kv`, but against `base` (what the last checkpoint of this session held) only what
        changed since: the new cells and which cells are still held (`join_kv` puts them together).
        A full state when there is no usable base. `taken` is called once the state is copied out (the
        rest runs without the shard). Returns the blob, its positions and the base for the next one."""
        try:
            payload, n_past, edit = self._snapshot(session)
        finally:
            if taken is not None:
                taken()
        try:
            lay = kvstate.layout(payload)
            held = kvstate.positions(payload, lay) if lay.size else None
        except KVStateError as e:  # a layout this version does not know: whole states only
            log.warning("KV state of shard %s not understood (%s); checkpoints stay whole", self.layers, e)
            lay, held = None, None
        usable = (base is not None and held is not None and base.edit == edit and base.n_past <= n_past
                  and len(base.positions) == len(held))
        if usable:
            head = self._head(n_past, base.lineage)
            head["base"] = base.n_past
            blob = _pack_kv(head, kvstate.delta(payload, lay, list(base.positions)))
        else:
            head = self._head(n_past, secrets.token_hex(8))
            blob = _pack_kv(head, payload)
        return blob, n_past, (KVBase(head["lineage"], n_past, edit, tuple(held)) if held is not None else None)

    def check_kv_header(self, head: dict) -> None:
        """Refuse (KVStateError) a KV blob's header (`kv_header`) that another shard or layout wrote."""
        if head["shard_id"] != self.info.shard_id:
            a, b = head["layers"]
            raise KVStateError(
                f"this KV state belongs to another shard (layers {a}:{b}, id {head['shard_id'][:12]}); "
                f"this shard holds layers {self.layers} (id {self.info.shard_id[:12]}). Send it to the node "
                "that loaded the same shard file"
            )
        # llama.cpp's sequence state depends on the KV layout: one stream per session slot, and the
        # V cache is transposed unless flash attention is on.
        for key, mine in (("max_sessions", self.max_sessions), ("flash_attn", self.flash_attn)):
            if head.get(key) != mine:
                raise KVStateError(
                    f"this KV state comes from a shard loaded with {key}={head.get(key)}, this one has "
                    f"{key}={mine}; load the receiving shard with the same {key}"
                )
        if not 0 <= head["n_past"] <= self.n_ctx:
            raise KVStateError(f"KV state holds {head['n_past']} positions but this shard's context holds {self.n_ctx}")

    def import_kv(self, session: str, blob: bytes) -> None:
        """Load a blob from `export_kv` into `session` (opened if needed), replacing its KV cache."""
        head, payload = _parse_kv_blob(blob)
        if "base" in head:
            raise KVStateError("this KV state holds only what changed since an earlier one; put them together "
                               "with join_kv first")
        self.check_kv_header(head)
        n_past = head["n_past"]
        window_start = 0
        if payload:
            # Every layout the supported architectures export is understood: one that is not (damaged, forged,
            # cut short) is refused here, since llama.cpp reading part of it before refusing it can leave the
            # sequence's cache unusable (a position of 2^31 that no later removal clears).
            # (fill_window refuses cells beyond its length, held twice, or shared: `kvstate.check_positions`)
            payload, window_start = kvstate.fill_window(payload, kvstate.layout(payload), n_past)
        with self._lock:
            if session not in self._sessions:
                self.open_session(session)
            s = self._sessions[session]
            self._llama.llama_memory_seq_rm(self._mem, s.seq, -1, -1)
            s.n_past, s.edit, s.floor = 0, next(_EDITS), 0
            if payload:
                buf = (ctypes.c_uint8 * len(payload)).from_buffer_copy(payload)
                if self._llama.llama_state_seq_set_data(self._ctx, buf, len(payload), s.seq) == 0:
                    self._llama.llama_memory_seq_rm(self._mem, s.seq, -1, -1)
                    raise KVStateError(
                        f"llama.cpp refused the KV state (exported from a context of n_ctx={head.get('n_ctx')}, this "
                        f"shard has n_ctx={self.n_ctx}); load the shard with the settings of the one that exported it"
                    )
            held = self._llama.llama_memory_seq_pos_max(self._mem, s.seq) + 1
            if held != n_past:
                self._llama.llama_memory_seq_rm(self._mem, s.seq, -1, -1)
                raise KVStateError(f"KV state says {n_past} positions but holds {held}; it is inconsistent")
            s.n_past = n_past
            # Window layers hold nothing real before `window_start`: no rollback may reach back there.
            s.floor = n_past if window_start else 0

    # ------------------------------------------------------------ lifetime

    def close(self) -> None:
        with self._lock:
            if getattr(self, "_ctx", None):
                self._llama.llama_batch_free(self._batch)
                self._llama.llama_free(self._ctx)
                self._ctx = None
            if getattr(self, "_model", None):
                self._llama.llama_model_free(self._model)
                self._model = None
            if getattr(self, "_held", None):
                self._held.release()

    def __enter__(self) -> "Shard":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        with contextlib.suppress(Exception):
            self.close()
