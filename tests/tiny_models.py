"""Small random-weight GGUF models written with gguf-py, for testing the slicer beyond Gemma."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

N_LAYER, N_EMBD, N_HEAD, N_HEAD_KV, N_FF = 4, 64, 4, 2, 128


def _vocab(bos: str = "<s>", eos: str = "</s>", specials: tuple[str, ...] = ()
           ) -> tuple[list[bytes], list[float], list[int]]:
    """<unk>, BOS (id 1), EOS (id 2), the chat template's special tokens, the 256 bytes, then 41 words."""
    head = [b"<unk>", bos.encode(), eos.encode()] + [t.encode() for t in specials]
    tokens = head + [f"<0x{i:02X}>".encode() for i in range(256)]
    types = [2] + [3] * (len(head) - 1) + [6] * 256  # unknown, control..., byte
    words = [f"\u2581w{i}".encode() for i in range(41)]
    tokens += words
    types += [1] * len(words)
    scores = [0.0] * len(head) + [-1000.0] * 256 + [-float(i) for i in range(len(words))]
    return tokens, scores, types


def write_tiny_llama(path: Path, arch: str = "llama", extra_kv: dict | None = None, seed: int = 0,
                     chat_template: str | None = None, bos: str = "<s>", eos: str = "</s>",
                     specials: tuple[str, ...] = ()) -> Path:
    """A 4-layer llama-family model with a 300-token SPM vocabulary and random F32 weights.

    arch may be llama, mistral3, qwen2 (adds q/k/v biases) or qwen3 (adds q/k norms); any other name
    writes llama-shaped tensors under that architecture (for refusal tests). A chat model's
    `tokenizer.chat_template` goes in with the texts of its BOS and EOS and the other special tokens its
    template writes (each one token, parsed as in the real model).
    """
    rng = np.random.default_rng(seed)
    tokens, scores, types = _vocab(bos, eos, specials)
    n_vocab = len(tokens)
    head_dim = N_EMBD // N_HEAD
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-random-llama")
    w.add_context_length(512)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    # An array, one entry per layer: the slicer must cut it with the blocks.
    w.add_feed_forward_length([N_FF] * N_LAYER)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(head_dim)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    if chat_template is not None:
        w.add_chat_template(chat_template)
        w.add_add_space_prefix(False)  # as chat models' tokenizers do: no space put after each special token
    for key, value in (extra_kv or {}).items():
        w.add_key_value(key, value[0], value[1], sub_type=value[2] if len(value) > 2 else None)

    def t(*shape: int, scale: float = 0.08) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w.add_tensor("token_embd.weight", t(n_vocab, N_EMBD, scale=0.5))
    w.add_tensor("output_norm.weight", 1.0 + t(N_EMBD, scale=0.05))
    w.add_tensor("output.weight", t(n_vocab, N_EMBD))
    for i in range(N_LAYER):
        w.add_tensor(f"blk.{i}.attn_norm.weight", 1.0 + t(N_EMBD, scale=0.05))
        w.add_tensor(f"blk.{i}.attn_q.weight", t(N_HEAD * head_dim, N_EMBD))
        w.add_tensor(f"blk.{i}.attn_k.weight", t(N_HEAD_KV * head_dim, N_EMBD))
        w.add_tensor(f"blk.{i}.attn_v.weight", t(N_HEAD_KV * head_dim, N_EMBD))
        w.add_tensor(f"blk.{i}.attn_output.weight", t(N_EMBD, N_HEAD * head_dim))
        if arch == "qwen2":
            w.add_tensor(f"blk.{i}.attn_q.bias", t(N_HEAD * head_dim))
            w.add_tensor(f"blk.{i}.attn_k.bias", t(N_HEAD_KV * head_dim))
            w.add_tensor(f"blk.{i}.attn_v.bias", t(N_HEAD_KV * head_dim))
        if arch == "qwen3":
            w.add_tensor(f"blk.{i}.attn_q_norm.weight", 1.0 + t(head_dim, scale=0.05))
            w.add_tensor(f"blk.{i}.attn_k_norm.weight", 1.0 + t(head_dim, scale=0.05))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", 1.0 + t(N_EMBD, scale=0.05))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", t(N_FF, N_EMBD))
        w.add_tensor(f"blk.{i}.ffn_up.weight", t(N_FF, N_EMBD))
        w.add_tensor(f"blk.{i}.ffn_down.weight", t(N_EMBD, N_FF))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
