"""Loading llama.cpp (once, its log into `logging`), the one thread that runs its graphs, and their threads."""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import queue
import threading
from pathlib import Path
from typing import Callable

from ..errors import ModelFileError

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

