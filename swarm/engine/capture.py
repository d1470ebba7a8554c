"""Part of the engine: take a shard's layer output out of the llama.cpp graph.

The C callback in `capture.c` is compiled on first use into the cache (a C compiler is already
needed to build llama-cpp-python); where that fails, or SWARM_CAPTURE=python, a Python callback
does the same job at a few microseconds per graph node.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
from importlib import resources

import numpy as np

from .. import cache
from ..errors import EngineError

log = logging.getLogger(__name__)

_NAME_LEN = 64
_native: ctypes.CDLL | None | bool = None  # None: not tried yet; False: unavailable


class _State(ctypes.Structure):
    _fields_ = [
        ("get_name", ctypes.c_void_p),
        ("nbytes", ctypes.c_void_p),
        ("tensor_get", ctypes.c_void_p),
        ("target", ctypes.c_char * _NAME_LEN),
        ("out", ctypes.c_void_p),
        ("want", ctypes.c_size_t),
        ("got", ctypes.c_size_t),
        ("status", ctypes.c_int),
    ]


def _load_native() -> ctypes.CDLL | None:
    """Compile (once per source version) and load the C callback; None if not possible."""
    global _native
    if _native is not None:
        return _native or None
    _native = False
    if os.environ.get("SWARM_CAPTURE", "").lower() == "python":
        return None
    source = resources.files("swarm.engine").joinpath("capture.c").read_bytes()
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        log.info("no C compiler found; using the Python layer-output callback")
        return None
    target = cache.subdir("native") / f"capture-{hashlib.sha256(source).hexdigest()[:16]}.so"
    if not target.exists():
        # Per-process names: several processes may build at once; only a checked library is installed.
        src = target.with_name(f".{target.stem}.{os.getpid()}.c")
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            src.write_bytes(source)
            subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(tmp), str(src)], check=True,
                           capture_output=True, timeout=120)
            ctypes.CDLL(str(tmp)).swarm_capture_cb  # noqa: B018 - raises if the symbol is missing
            os.replace(tmp, target)
        except (OSError, AttributeError, subprocess.SubprocessError) as e:
            log.info("could not build the C layer-output callback (%s); using the Python one", e)
            return None
        finally:
            src.unlink(missing_ok=True)
            tmp.unlink(missing_ok=True)
    try:
        lib = ctypes.CDLL(str(target))
        lib.swarm_capture_cb  # noqa: B018
    except (OSError, AttributeError) as e:
        log.info("could not load %s (%s); using the Python layer-output callback", target, e)
        return None
    _native = lib
    return lib


class HiddenCapture:
    """Copies node `l_out-<k-1>` into a buffer and stops the graph split there."""

    def __init__(self, node_name: str, n_batch: int, n_embd: int, ggml: ctypes.CDLL, callback_type):
        if len(node_name) >= _NAME_LEN:
            raise EngineError(f"graph node name {node_name!r} is too long")
        self._out = np.empty((n_batch, n_embd), dtype=np.float32)
        self._row_bytes = n_embd * 4
        self._n = 0
        self._state = _State(
            ctypes.cast(ggml.ggml_get_name, ctypes.c_void_p),
            ctypes.cast(ggml.ggml_nbytes, ctypes.c_void_p),
            ctypes.cast(ggml.ggml_backend_tensor_get, ctypes.c_void_p),
            node_name.encode(),
            self._out.ctypes.data,
        )
        self.user_data = ctypes.cast(ctypes.pointer(self._state), ctypes.c_void_p)
        native = _load_native()
        if native is not None:
            self.callback = callback_type(ctypes.cast(native.swarm_capture_cb, ctypes.c_void_p).value)
            self.kind = "c"
        else:
            self._ggml = ggml
            self._target = node_name.encode() + b"\0"
            self._name_off: int | None = None
            self.callback = callback_type(self._on_node)
            self.kind = "python"

    def arm(self, n_tokens: int) -> None:
        s = self._state
        self._n = n_tokens
        s.want, s.got, s.status = n_tokens * self._row_bytes, 0, 0

    def _on_node(self, tensor, ask, _user) -> bool:
        # Same logic as swarm_capture_cb in capture.c.
        if ask:
            if self._name_off is None:
                self._name_off = self._ggml.ggml_get_name(tensor) - tensor
            return ctypes.string_at(tensor + self._name_off, len(self._target)) == self._target
        s = self._state
        try:
            s.got = self._ggml.ggml_nbytes(tensor)
            if s.got != s.want:
                s.status = 1
                return False
            self._ggml.ggml_backend_tensor_get(tensor, s.out, 0, s.got)
        except Exception:  # an exception must not unwind through C
            log.exception("layer-output callback failed")
            s.status, s.got = 2, max(s.got, 1)
        return False

    def take(self) -> np.ndarray:
        s = self._state
        if s.got == 0:
            raise EngineError("the shard's graph had no layer-output node to capture; is the architecture supported?")
        if s.status == 1:
            raise EngineError(f"capturing the shard's output failed: the node has {s.got} bytes, expected {s.want}")
        if s.status:
            raise EngineError("capturing the shard's output failed inside the callback (see the log)")
        return self._out[: self._n].copy()
