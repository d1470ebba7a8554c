"""The only module that talks to llama.cpp: load a shard, run sessions through it, move KV state.

A non-final shard's hidden states are taken from the graph node `l_out-<k-1>` through the
scheduler's eval callback; returning False from the data call stops that graph split, so the output
norm and the head are never computed. Every row of such a batch is marked as an output because
llama.cpp computes its last layer only for output rows.

Everything handed to llama.cpp is checked here first: shapes, dtypes, token ids, positions, context
capacity and KV blobs. Bad input raises a SwarmError and never reaches C.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib
import itertools
import json
import logging
import os
import queue
import secrets
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from . import kvstate, shardcache
from ._capture import HiddenCapture
from .errors import (
    BadInputError, ContextFullError, EngineError, KVStateError, ModelFileError, UnsupportedModelError,
)
from .gguf_file import read_gguf
from .layers import LayerRange, ShardRole
from .slicing import ShardFile, shard_info

log = logging.getLogger(__name__)
_llama_log = logging.getLogger("swarm.llama_cpp")

_init_lock = threading.Lock()
_lib_state: dict[str, object] = {}


def _llama():
    """Import llama_cpp, initialise the backend once and route its log into `logging`."""
    with _init_lock:
        if "llama" in _lib_state:
            return _lib_state["llama"]
        # llama.cpp's CPU backend runs each graph in an OpenMP team whose idle threads spin for a long
        # while (libgomp's default) before sleeping. Shards of a swarm that share a machine take turns,
        # and a finished shard's spinning threads slowed the next shard's step by 20-60%. A short spin
        # still lets the team meet at a graph's barriers without sleeping. 5,000 measured best of
        # 300-20,000 for three shards on two cores (docs/benchmarks.md). Read by libgomp when llama_cpp
        # loads it, so only effective if llama_cpp was not imported before; a user's own setting wins.
        os.environ.setdefault("GOMP_SPINCOUNT", "5000")
        cpus = _team_cpus()
        if cpus:
            # One CPU for each thread of a graph's team. Left free, the kernel at times woke two of them
            # onto one CPU, where every barrier of the graph waited for a time slice: three shards on two
            # cores ran at 82-85% of one process unbound and 91-93% bound (docs/benchmarks.md). libgomp
            # binds the thread that loads it to the first CPU and the team's other threads to the next,
            # so llama.cpp is loaded on the compute thread, the only one that runs graphs; every other
            # thread of the process keeps all CPUs.
            os.environ["GOMP_CPU_AFFINITY"] = " ".join(map(str, cpus))
            try:
                _compute.run(importlib.import_module, "llama_cpp")
            finally:
                del os.environ["GOMP_CPU_AFFINITY"]
        import llama_cpp

        @llama_cpp.llama_log_callback
        def _on_log(level, text, _user):  # called from llama.cpp threads
            msg = text.decode("utf-8", errors="replace").rstrip()
            if msg:  # ggml levels: 1 debug, 2 info, 3 warn, 4 error, 5 continuation
                _llama_log.log(logging.WARNING if level == 4 else logging.DEBUG, msg)

        llama_cpp.llama_log_set(_on_log, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        base = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
        base.ggml_get_name.argtypes = [ctypes.c_void_p]
        base.ggml_get_name.restype = ctypes.c_void_p
        base.ggml_nbytes.argtypes = [ctypes.c_void_p]
        base.ggml_nbytes.restype = ctypes.c_size_t
        base.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        base.ggml_backend_tensor_get.restype = None
        _lib_state.update(llama=llama_cpp, ggml=base, on_log=_on_log)
        return llama_cpp


class _ComputeThread:
    """The one thread of this process that runs llama.cpp graphs.

    Each thread that starts a graph becomes the master of an OpenMP team of its own, and libgomp keeps
    those teams. Once a process holds more OpenMP threads than the machine has CPUs, libgomp cuts its
    spin at every barrier to almost nothing: a coordinator whose sessions ran on whichever gRPC thread
    served them slept and woke its threads ~75 times per graph. Graphs are therefore run here, by one
    thread, whatever thread asks for them.
    """

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def run(self, fn: Callable, *args):
        """fn(*args) on the compute thread; its result, or its exception raised here."""
        thread = self._thread
        if thread is threading.current_thread():
            return fn(*args)
        if thread is None:
            with self._start_lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, name="llama-compute", daemon=True)
                    self._thread.start()
        done = threading.Lock()
        done.acquire()
        box: list = [None, None]
        self._jobs.put((fn, args, done, box))
        done.acquire()
        if box[1] is not None:
            raise box[1]
        return box[0]

    def _loop(self) -> None:
        while True:
            fn, args, done, box = self._jobs.get()
            try:
                box[0] = fn(*args)
            except BaseException as e:  # handed to the caller
                box[1] = e
            done.release()


_compute = _ComputeThread()


_plan: dict[str, int | None] = {}  # "threads", once a coordinator or node process said it


def plan_threads(n_threads: int | None) -> None:
    """The threads this process will give each graph (None: `default_threads()`). A process that runs a
    coordinator or a node (`join.start_coordinator`, `join.RunningNode`) says so before llama.cpp loads;
    all its graphs run through the engine, so it may bind them to CPUs (see `_team_cpus`)."""
    _plan["threads"] = n_threads


def _team_cpus() -> list[int] | None:
    """The CPUs to bind a graph's threads to, one each, or None to leave them to the kernel.

    Only in a process that planned its threads (`plan_threads`): libgomp would bind any other thread
    that runs a graph too, such as a library user's own llama_cpp.Llama. Only where the team uses every
    CPU the process may use (a team on fewer would put every process of a machine on the same few
    CPUs), and only if the user set no OpenMP placement of their own; SWARM_BIND_THREADS=0 turns it off.
    """
    if "threads" not in _plan or os.environ.get("SWARM_BIND_THREADS", "1") == "0":
        return None
    if any(os.environ.get(k) for k in ("GOMP_CPU_AFFINITY", "OMP_PROC_BIND", "OMP_PLACES")):
        return None
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return None
    team = _plan["threads"] or default_threads()
    return cpus if len(cpus) > 1 and team == len(cpus) else None


def _ggml():
    _llama()
    return _lib_state["ggml"]


def default_threads() -> int:
    """Physical cores: llama.cpp gains little from hyper-threads."""
    import psutil

    return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)


def _load_model(path: Path, vocab_only: bool):
    llama_cpp = _llama()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = vocab_only
    params.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise ModelFileError(
            f"llama.cpp could not load {path}; the file passed header checks, so its tensors or metadata "
            "do not match its architecture (run with --log-level debug to see llama.cpp's reason)"
        )
    return model


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


@dataclass
class _Session:
    seq: int
    n_past: int = 0
    floor: int = 0  # after an import that filled a window cache: the earliest length a rollback may keep
    # Changes whenever cells are rewritten or dropped (open, rollback, import): a KV delta is only taken
    # against a base of the same edit.
    edit: int = field(default_factory=lambda: next(_EDITS))


_KV_MAGIC = b"SWARMKV2"
_EDITS = itertools.count(1)


@dataclass(frozen=True)
class KVBase:
    """What a node remembers of the last checkpoint it sent of a session, to send only what changed next."""

    lineage: str  # names the chain of checkpoints: a full state and the deltas on top of it
    n_past: int
    edit: int
    positions: tuple  # per stream, the cell positions it held (numpy arrays)


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

    def import_kv(self, session: str, blob: bytes) -> None:
        """Load a blob from `export_kv` into `session` (opened if needed), replacing its KV cache."""
        head, payload = _parse_kv_blob(blob)
        if "base" in head:
            raise KVStateError("this KV state holds only what changed since an earlier one; put them together "
                               "with join_kv first")
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
        n_past = head["n_past"]
        if not 0 <= n_past <= self.n_ctx:
            raise KVStateError(f"KV state holds {n_past} positions but this shard's context holds {self.n_ctx}")
        window_start = 0
        if payload:
            try:
                payload, window_start = kvstate.fill_window(payload, kvstate.layout(payload))
            except KVStateError as e:  # a layout this version does not know: loaded as llama.cpp wrote it
                log.warning("KV state of shard %s not understood (%s); past a sliding window, the next steps may "
                            "round differently from the exporter's", self.layers, e)
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


def kv_header(blob: bytes, verify: bool = False) -> dict:
    """The header of a blob from `export_kv` or `checkpoint_kv` (shard_id, layers, n_past, the layout, and
    for a delta the length of the state it builds on), read without hashing the payload unless `verify`:
    `import_kv` and `join_kv` verify the whole blob before llama.cpp sees it."""
    if verify:
        return _parse_kv_blob(blob)[0]
    if len(blob) < len(_KV_MAGIC) + 4 or not bytes(blob[:len(_KV_MAGIC)]) == _KV_MAGIC:
        raise KVStateError("this is not a swarm KV state (bad magic); it must come from Shard.export_kv")
    (hlen,) = struct.unpack_from("<I", blob, len(_KV_MAGIC))
    return _parse_kv_blob(blob[:len(_KV_MAGIC) + 4 + hlen], verify=False)[0]  # the header alone: no copy


def _parse_kv_blob(blob: bytes, verify: bool = True) -> tuple[dict, bytes]:
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise KVStateError("a KV state must be bytes from Shard.export_kv")
    blob = bytes(blob)
    if len(blob) < len(_KV_MAGIC) + 4 or not blob.startswith(_KV_MAGIC):
        raise KVStateError("this is not a swarm KV state (bad magic); it must come from Shard.export_kv")
    (hlen,) = struct.unpack_from("<I", blob, len(_KV_MAGIC))
    start = len(_KV_MAGIC) + 4
    if start + hlen > len(blob):
        raise KVStateError("KV state is truncated (its header runs past the end)")
    try:
        head = json.loads(blob[start:start + hlen])
    except ValueError:
        raise KVStateError("KV state header is damaged") from None
    payload = blob[start + hlen:]
    if not isinstance(head, dict) or verify and _kv_digest(head, payload) != head.get("sha256"):
        raise KVStateError("KV state is damaged or truncated (checksum mismatch); export it again")
    types = {"shard_id": str, "layers": list, "n_past": int, "n_ctx": int, "max_sessions": int, "flash_attn": bool,
             "lineage": str}
    if any(type(head.get(k)) is not t for k, t in types.items()) or len(head["layers"]) != 2 or (
            "base" in head and type(head["base"]) is not int):
        raise KVStateError("KV state header is malformed; export it again with this version")
    return head, payload


def join_kv(blobs: Sequence[bytes]) -> bytes:
    """A full KV state (from `export_kv` or `checkpoint_kv`) and the deltas taken after it, in order, as
    one full state for `import_kv`; every piece's checksum is verified first."""
    if not blobs:
        raise KVStateError("no KV state to join")
    parsed = [_parse_kv_blob(b) for b in blobs]
    head = dict(parsed[0][0])
    if "base" in head:
        raise KVStateError("a chain of KV states must start with a full one")
    for h, _ in parsed[1:]:
        same = all(h.get(k) == head.get(k) for k in ("shard_id", "layers", "n_ctx", "max_sessions", "flash_attn",
                                                     "lineage"))
        if not same or h.get("base") != head["n_past"]:
            raise KVStateError(f"KV delta for {h.get('base')} positions does not follow the state of {head['n_past']} "
                               "before it (another session, shard or chain); take a full checkpoint again")
        head["n_past"] = h["n_past"]
    head.pop("sha256", None)
    if len(parsed) == 1:
        return bytes(blobs[0])
    try:
        payload = kvstate.apply(parsed[0][1], [p for _, p in parsed[1:]])
    except (ValueError, TypeError, IndexError, MemoryError) as e:  # KVStateError is a ValueError too
        if isinstance(e, KVStateError):
            raise
        raise KVStateError(f"these KV pieces do not fit together ({e}); take a full checkpoint again") from None
    return _pack_kv(head, payload)


def _pack_kv(head: dict, payload: bytes) -> bytes:
    head = dict(head, sha256=_kv_digest(head, payload))
    header = json.dumps(head, sort_keys=True).encode()
    return b"".join((_KV_MAGIC, struct.pack("<I", len(header)), header, payload))


def _kv_digest(head: dict, payload: bytes) -> str:
    """sha256 over the header (without its digest) and the payload."""
    meta = json.dumps({k: v for k, v in head.items() if k != "sha256"}, sort_keys=True).encode()
    h = hashlib.sha256(struct.pack("<Q", len(meta)) + meta)
    h.update(payload)
    return h.hexdigest()
