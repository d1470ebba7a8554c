"""Shard chains on real llama.cpp and the real Gemma model give exactly what the unsplit model gives."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import N_CTX, N_TOKENS, PROMPTS
from swarm.chain import LocalChain


@pytest.fixture(scope="module", params=[1, 2, 3, 6], ids=lambda n: f"{n}-shards")
def chain(request, model_path):
    with LocalChain(model_path, request.param, n_ctx=N_CTX) as c:
        yield c


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_and_final_logits_identical(chain, reference, prompt, record_property):
    tokens, expected, ref_logits = reference.run(prompt)
    assert len(expected) == N_TOKENS  # the reference really generated 64 tokens
    sid = chain.open_session()
    try:
        logits = chain.prefill(sid, tokens)
    finally:
        chain.drop_session(sid)
    diff = float(np.abs(logits - ref_logits).max())
    record_property("max_abs_logit_difference", diff)
    print(f"{len(chain.shards)} shards, {prompt!r}: largest logit difference {diff}")
    assert diff == 0.0, f"largest logit difference {diff}"
    got = list(chain.generate(tokens, max_tokens=N_TOKENS))
    assert got == expected, f"diverged at token {next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)}"


def test_interleaved_sessions_match_their_solo_runs(model_path, reference):
    """Three sessions stepped in turn through one set of shards, each equal to its solo reference."""
    with LocalChain(model_path, 3, n_ctx=N_CTX, max_sessions=3) as chain:
        runs = {}
        for prompt in PROMPTS:
            tokens, expected, _ = reference.run(prompt)
            sid = chain.open_session()
            runs[sid] = (chain.prefill(sid, tokens), [], expected)
        for _ in range(N_TOKENS):
            for sid, (logits, out, _) in runs.items():
                token = int(np.argmax(logits))
                out.append(token)
                runs[sid] = (chain.step(sid, [token]), out, runs[sid][2])
        for _sid, (_, out, expected) in runs.items():
            assert out == expected


def test_long_prompt_goes_in_n_batch_pieces(model_path, reference):
    """A prompt longer than n_batch is run in the same pieces llama-cpp-python uses."""
    import llama_cpp

    prompt = " ".join(["Once upon a time there was a llama who lived on a farm."] * 12)
    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=N_CTX, n_batch=64, verbose=False)
    tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
    assert len(tokens) > 128
    expected = []
    for t in llm.generate(tokens, temp=0.0, top_k=1, repeat_penalty=1.0):
        expected.append(t)
        if len(expected) == 16:
            break
    del llm
    with LocalChain(model_path, 2, n_ctx=N_CTX, n_batch=64) as chain:
        assert list(chain.generate(tokens, max_tokens=16, stop_at_eog=False)) == expected


def test_python_and_c_layer_capture_agree(model_path, reference, monkeypatch):
    """The compiled callback is used where a compiler exists; the Python fallback gives the same text."""
    import shutil

    from swarm.engine import capture

    tokens, expected, _ = reference.run(PROMPTS[2])
    with LocalChain(model_path, 3, n_ctx=N_CTX) as chain:
        kinds = {s._capture.kind for s in chain.shards[:-1]}
        if shutil.which("cc"):  # CI and development machines have one: the fast path must be in use
            assert kinds == {"c"}
        assert list(chain.generate(tokens, max_tokens=N_TOKENS)) == expected
    monkeypatch.setattr(capture, "_native", False)
    with LocalChain(model_path, 3, n_ctx=N_CTX) as chain:
        assert {s._capture.kind for s in chain.shards[:-1]} == {"python"}
        assert list(chain.generate(tokens, max_tokens=N_TOKENS)) == expected


def test_first_shard_without_lookahead_block_is_exact_too(model_path, reference):
    """The other first-shard mode (every row an output, logits kept) gives the same text."""
    tokens, expected, ref_logits = reference.run(PROMPTS[0])
    with LocalChain(model_path, 3, n_ctx=N_CTX, lookahead=False) as chain:
        assert chain.shards[0].info.lookahead == 0
        sid = chain.open_session()
        assert float(np.abs(chain.prefill(sid, tokens) - ref_logits).max()) == 0.0
        chain.drop_session(sid)
        assert list(chain.generate(tokens, max_tokens=N_TOKENS)) == expected
