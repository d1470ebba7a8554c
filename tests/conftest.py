"""Shared fixtures: the real Gemma 3 270M model, references from plain llama-cpp-python, a tiny llama model."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tiny_models import write_tiny_llama

PROMPTS = [
    "The history of the city of Paris begins",
    "def fibonacci(n):",
    "Here is a short list of fruits: apple, banana,",
]
N_TOKENS = 64
N_CTX = 512


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Shards and digests go to a fresh cache; the assembled Gemma model is reused if present."""
    root = tmp_path_factory.mktemp("swarm-cache")
    old = os.environ.get("SWARM_CACHE_DIR")
    os.environ["SWARM_CACHE_DIR"] = str(root)
    yield root
    if old is None:
        os.environ.pop("SWARM_CACHE_DIR", None)
    else:
        os.environ["SWARM_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def model_path(_private_cache) -> Path:
    """Gemma 3 270M: its sliding-window attention is the hard case for exact cuts (not the chat default)."""
    from swarm.models import gemma_path

    return gemma_path()


class Reference:
    """Plain llama_cpp.Llama on the unsplit file, a fresh instance per prompt: greedy (`run`), or seeded
    sampling of its logits (`sample`)."""

    def __init__(self, path: Path):
        self.path = path
        self._cache: dict[tuple, tuple[list[int], list[int], np.ndarray]] = {}

    def run(self, prompt: str, n: int = N_TOKENS, n_ctx: int = N_CTX):
        """(prompt tokens, generated tokens, logits after the prompt)."""
        key = (prompt, n, n_ctx)
        if key not in self._cache:
            import llama_cpp

            llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=n_ctx, verbose=False)
            vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
            tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
            out: list[int] = []
            logits = None
            for t in llm.generate(tokens, temp=0.0, top_k=1, repeat_penalty=1.0):
                if logits is None:  # llama.cpp still holds the prompt's last logits here
                    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
                    logits = np.ctypeslib.as_array(ptr, (llm.n_vocab(),)).copy()
                if llama_cpp.llama_vocab_is_eog(vocab, t):
                    break
                out.append(t)
                if len(out) >= n:
                    break
            del llm
            self._cache[key] = (tokens, out, logits)
        return self._cache[key]

    def sample(self, prompt: str, n: int, n_ctx: int = N_CTX, **options) -> list[int]:
        """Seeded sampling on plain llama-cpp-python's logits of the unsplit model: the prompt evaluated
        as `Llama.eval` batches it, then one token per step; each row's logits go through
        `swarm.sampling.Sampler` exactly as the final shard feeds it (node/stepping.py): every step's
        tokens observed at their start position, the row drawn with `position` = its own position."""
        key = (prompt, n, n_ctx, tuple(sorted(options.items())))
        if key not in self._cache:
            import llama_cpp

            from swarm.sampling import Sampler, SamplingParams

            sampler = Sampler(SamplingParams(**options))
            llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=n_ctx, verbose=False)
            vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
            step = llm.tokenize(prompt.encode(), add_bos=True, special=True)
            start, out = 0, []
            while len(out) < n:
                llm.eval(step)
                sampler.observe(step, start)
                start += len(step)
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), (llm.n_vocab(),))
                token = sampler.sample(logits.copy(), remember=False, position=start - 1)
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    break
                out.append(token)
                step = [token]
            del llm
            self._cache[key] = out
        return self._cache[key]


@pytest.fixture(scope="session")
def reference(model_path) -> Reference:
    return Reference(model_path)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf")


def pytest_sessionfinish(session, exitstatus):
    """A run that collected no tests is a failure, never a silent success (pytest's exit 5)."""
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
