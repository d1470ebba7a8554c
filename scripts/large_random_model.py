"""Write a large random-weight llama-family GGUF (18 layers, F16, about 2.2 GB) for benchmarks that need
shards far larger than the default model's: each third of it is a 730 MB shard file, 3.5 times the
default model's largest (about 210 MB, the ones with the vocabulary) and 33 times its middle one (22 MB).

The weights are random (seeded), so the text is nonsense, but llama.cpp computes it like any model's
and the swarm must still reproduce it exactly; the end-of-text token's output row is zero, so greedy
generation never stops early. The vocabulary is 300 tokens (the 256 bytes and a few words).

    python scripts/large_random_model.py /tmp/large-random.gguf
    python scripts/bench_recovery.py --model /tmp/large-random.gguf --parts standby --contexts 128 --rounds 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gguf
import numpy as np

N_LAYER, N_EMBD, N_HEAD, N_HEAD_KV, N_FF, N_CTX = 18, 2048, 16, 4, 8192, 4096


def _vocab() -> tuple[list[bytes], list[float], list[int]]:
    head = [b"<unk>", b"<s>", b"</s>"]
    tokens = head + [f"<0x{i:02X}>".encode() for i in range(256)] + [f"\u2581w{i}".encode() for i in range(41)]
    types = [2, 3, 3] + [6] * 256 + [1] * 41  # unknown, control, control, bytes, words
    scores = [0.0] * 3 + [-1000.0] * 256 + [-float(i) for i in range(41)]
    return tokens, scores, types


def write(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    tokens, scores, types = _vocab()
    head_dim = N_EMBD // N_HEAD
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("large-random-llama")
    w.add_context_length(N_CTX)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(head_dim)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def t(*shape: int, scale: float, dtype=np.float16) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(dtype)

    out = t(len(tokens), N_EMBD, scale=0.02, dtype=np.float32)
    out[2] = 0.0  # end of text: never the greedy choice
    w.add_tensor("token_embd.weight", t(len(tokens), N_EMBD, scale=0.5, dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, np.float32))
    w.add_tensor("output.weight", out)
    s_in, s_ff = 1 / np.sqrt(N_EMBD), 1 / np.sqrt(N_FF)
    for i in range(N_LAYER):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(N_EMBD, np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", t(N_HEAD * head_dim, N_EMBD, scale=s_in))
        w.add_tensor(f"blk.{i}.attn_k.weight", t(N_HEAD_KV * head_dim, N_EMBD, scale=s_in))
        w.add_tensor(f"blk.{i}.attn_v.weight", t(N_HEAD_KV * head_dim, N_EMBD, scale=s_in))
        w.add_tensor(f"blk.{i}.attn_output.weight", t(N_EMBD, N_HEAD * head_dim, scale=s_in))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(N_EMBD, np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", t(N_FF, N_EMBD, scale=s_in))
        w.add_tensor(f"blk.{i}.ffn_up.weight", t(N_FF, N_EMBD, scale=s_in))
        w.add_tensor(f"blk.{i}.ffn_down.weight", t(N_EMBD, N_FF, scale=s_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="where to write the GGUF")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    write(args.out, args.seed)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e9:.2f} GB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
