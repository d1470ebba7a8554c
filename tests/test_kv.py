"""Moving a session between shard instances: KV export/import and replay continue exactly."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import N_CTX, N_TOKENS, PROMPTS
from swarm.chain import LocalChain, StepTrace
from swarm.engine import Shard

CUT = 20  # tokens generated before the handoff


def _run_until_cut(chain, tokens, trace=None):
    """Prefill and CUT greedy steps; returns (session, tokens so far, logits for the next one)."""
    sid = chain.open_session()
    logits = None
    for i in range(0, len(tokens), chain.n_batch):
        logits = chain.step(sid, tokens[i:i + chain.n_batch], trace)
    out = []
    for _ in range(CUT):
        out.append(int(np.argmax(logits)))
        logits = chain.step(sid, [out[-1]], trace)
    return sid, out, logits


def _continue(shards, sid, out, logits):
    """Greedy steps through a list of shards until N_TOKENS are generated."""
    out = list(out)
    while len(out) < N_TOKENS:
        out.append(int(np.argmax(logits)))
        x = np.asarray([out[-1]], dtype=np.int32)
        for shard in shards:
            x = shard.forward(sid, x)
        logits = x
    return out


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_kv_export_import_into_fresh_shards_continues_identically(model_path, reference, prompt):
    tokens, expected, _ = reference.run(prompt)
    with LocalChain(model_path, 3, n_ctx=N_CTX) as chain:
        sid, out, logits = _run_until_cut(chain, tokens)
        fresh = [Shard(s.path, n_ctx=N_CTX) for s in chain.shards]
        try:
            for old, new in zip(chain.shards, fresh):
                blob = old.export_kv(sid)
                new.import_kv(sid, blob)
                assert new.session_length(sid) == len(tokens) + CUT
            assert _continue(fresh, sid, out, logits) == expected
        finally:
            for s in fresh:
                s.close()


def test_kv_of_a_shard_without_a_global_attention_layer_moves_exactly(model_path, reference):
    """Gemma 3 attends globally only in layers 5, 11 and 17: the middle shard 6:11 has none, so its global
    KV cache has no layers, yet llama.cpp's export lists that cache's cells. Moving such a shard's state
    (what every recovery and handover does) must continue the text as well as any other shard's."""
    from swarm.layers import LayerRange

    tokens, expected, _ = reference.run(PROMPTS[1])
    with LocalChain(model_path, [LayerRange(0, 6), LayerRange(6, 11), LayerRange(11, 18)], n_ctx=N_CTX) as chain:
        sid, out, logits = _run_until_cut(chain, tokens)
        with Shard(chain.shards[1].path, n_ctx=N_CTX) as fresh:
            fresh.import_kv(sid, chain.shards[1].export_kv(sid))
            assert fresh.session_length(sid) == len(tokens) + CUT
            assert _continue([chain.shards[0], fresh, chain.shards[2]], sid, out, logits) == expected


def test_kv_moves_between_sessions_of_one_shard(model_path, reference):
    tokens, expected, _ = reference.run(PROMPTS[0])
    with LocalChain(model_path, 2, n_ctx=N_CTX, max_sessions=2) as chain:
        sid, out, logits = _run_until_cut(chain, tokens)
        for shard in chain.shards:
            shard.import_kv("moved", shard.export_kv(sid))
            shard.drop_session(sid)
        assert _continue(chain.shards, "moved", out, logits) == expected


@pytest.mark.parametrize("which", [1, 2], ids=["middle", "last"])
def test_replay_of_boundary_states_rebuilds_a_shard_exactly(model_path, reference, which):
    """A replacement shard rebuilt from the hidden states its predecessor sent gives the same text."""
    tokens, expected, _ = reference.run(PROMPTS[1])
    with LocalChain(model_path, 3, n_ctx=N_CTX) as chain:
        trace: list[StepTrace] = []
        sid, out, logits = _run_until_cut(chain, tokens, trace)
        assert all(isinstance(t.inputs[which], np.ndarray) and t.inputs[which].dtype == np.float32 for t in trace)
        with Shard(chain.shards[which].path, n_ctx=N_CTX) as replacement:
            replacement.open_session(sid)
            replacement.replay(sid, [(t.start, t.inputs[which]) for t in trace])
            shards = list(chain.shards)
            shards[which] = replacement
            assert _continue(shards, sid, out, logits) == expected


def test_replay_of_first_shard_from_tokens(model_path, reference):
    tokens, expected, _ = reference.run(PROMPTS[2])
    with LocalChain(model_path, 2, n_ctx=N_CTX) as chain:
        trace: list[StepTrace] = []
        sid, out, logits = _run_until_cut(chain, tokens, trace)
        with Shard(chain.shards[0].path, n_ctx=N_CTX) as replacement:
            replacement.open_session(sid)
            replacement.replay(sid, [(t.start, t.inputs[0]) for t in trace])
            assert _continue([replacement, chain.shards[1]], sid, out, logits) == expected
