"""Cut a GGUF model into exact layer-range shards that stock llama.cpp loads as models of their own.

A shard is a GGUF whose `<arch>.block_count` is the range's length and whose `blk.i.*` tensors are
renumbered from 0. Anything llama.cpp derives from a layer's index must be written per layer for the
slice (Gemma 3's sliding-window pattern), so each supported architecture names its per-layer keys.
Shards that produce no logits drop the vocabulary; the first shard keeps it to read token ids.

A first shard must also not make llama.cpp keep logits: it has the full vocabulary, and every row of a
batch has to be an output for its last layer to be computed for all rows, so llama.cpp would hold
n_vocab floats per prompt token (537 MB for a 512-token prompt on Gemma's 262k vocabulary). Instead
the slicer may append one look-ahead block (a copy of the next layer) that the engine never runs: the
row selection llama.cpp applies in the final block then happens there, so only one row is an output.
The slicer picks whichever costs less: that block's bytes, or the logits for a 512-token batch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from gguf.constants import GGUFValueType

from . import cache, shardcache
from .errors import ModelFileError, UnsupportedModelError
from .gguf_file import GGUFFile, KV, TensorSource, encode_kv, read_gguf, write_gguf
from .layers import LayerRange, ShardRole

log = logging.getLogger(__name__)

# Bump when the bytes a slice produces change, so cached shards are not reused across formats.
SLICER_VERSION = 3

# Keys llama.cpp reads with get_key_or_arr(..., n_layer): a scalar applies to every layer, an array
# holds one value per layer and must be sliced with the blocks.
_PER_LAYER_ARRAYS = (
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "expert_used_count",
)


@dataclass(frozen=True)
class ArchRules:
    """What the slicer must know about one architecture's loader to cut it exactly."""

    # Per-layer boolean pattern llama.cpp derives from the layer index when the GGUF has no array:
    # (key suffix, default period, gating key that must be > 0 for the pattern to apply).
    swa_pattern: tuple[str, int, str] | None = None


SUPPORTED: dict[str, ArchRules] = {
    # Plain decoder stacks: no layer-index-derived hyper-parameters (checked in llama.cpp's
    # src/models/{llama,qwen2,qwen3,mistral3}.cpp).
    "llama": ArchRules(),
    "qwen2": ArchRules(),
    "qwen3": ArchRules(),
    "mistral3": ArchRules(),
    # Gemma 3: layer i uses sliding-window attention when i % 6 < 5 unless the GGUF says otherwise
    # (llama_model_gemma3::load_arch_hparams -> load_swa_pattern(ml, 6)).
    "gemma3": ArchRules(swa_pattern=("attention.sliding_window_pattern", 6, "attention.sliding_window")),
}

META_PREFIX = "swarm.shard."
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")
_VOCAB_KEYS_KEPT = ("tokenizer.ggml.model",)


@dataclass(frozen=True)
class ShardFile:
    """A shard on disk and what it holds."""

    path: Path
    layers: LayerRange
    n_layer_total: int
    role: ShardRole
    shard_id: str  # content name: same source bytes and range give the same id
    lookahead: int = 0  # extra blocks stored after the range, never computed (see module docstring)


def _meta_int(model: GGUFFile, key: str, default: int | None = None) -> int:
    value = model.get(key, default)
    if type(value) is not int:
        raise ModelFileError(f"{model.path.name}: metadata {key} should be a whole number, found {value!r}")
    return value


def model_layer_count(model: GGUFFile) -> int:
    """Total transformer blocks of a model (or of the original model, for a shard)."""
    if META_PREFIX + "n_layer_total" in model.kvs:
        return _meta_int(model, META_PREFIX + "n_layer_total")
    key = f"{model.arch}.block_count"
    if key not in model.kvs:
        raise ModelFileError(f"{model.path} has no {key}; is it a language model GGUF?")
    return _meta_int(model, key)


def check_supported(model: GGUFFile) -> ArchRules:
    arch = model.arch
    if arch not in SUPPORTED:
        raise UnsupportedModelError(
            f"architecture {arch!r} of {model.path.name} is not supported for splitting: the slicer only cuts "
            f"architectures whose per-layer rules it knows ({', '.join(sorted(SUPPORTED))}). "
            "Run the model whole, or add its rules to swarm/slicing.py after reading its llama.cpp loader."
        )
    if int(model.get(f"{arch}.nextn_predict_layers", 0) or 0):
        raise UnsupportedModelError(f"{model.path.name} carries next-token-prediction layers, which cannot be sliced")
    if META_PREFIX + "layer_start" in model.kvs:
        raise UnsupportedModelError(f"{model.path.name} is already a shard; slice the original model instead")
    return SUPPORTED[arch]


# Batch size the look-ahead choice plans for: llama.cpp's default n_batch.
PLANNED_BATCH = 512


def shard_id(source_digest: str, layers: LayerRange, n_layer: int, lookahead: int = 0) -> str:
    text = f"swarm-shard v{SLICER_VERSION} {source_digest} {layers.start}:{layers.end}/{n_layer} +{lookahead}"
    return hashlib.sha256(text.encode()).hexdigest()


def _per_layer_values(model: GGUFFile, rules: ArchRules, n_layer: int) -> dict[str, KV]:
    """Every per-layer array the shard must carry, materialised for all n_layer blocks."""
    arch = model.arch
    out: dict[str, KV] = {}
    for suffix in _PER_LAYER_ARRAYS:
        kv = model.kvs.get(f"{arch}.{suffix}")
        if kv is not None and kv.vtype == GGUFValueType.ARRAY:
            out[kv.key] = kv
    if rules.swa_pattern:
        suffix, period, gate = rules.swa_pattern
        key = f"{arch}.{suffix}"
        kv = model.kvs.get(key)
        if kv is not None and kv.vtype == GGUFValueType.ARRAY:
            out[key] = kv
        elif int(model.get(f"{arch}.{gate}", 0) or 0) > 0:
            if kv is not None:  # a scalar period overrides the architecture's default
                period = int(kv.value)
            # Same rule as llama_hparams::set_swa_pattern(n_pattern, dense_first=false).
            pattern = [period == 0 or (i % period) < (period - 1) for i in range(n_layer)]
            out[key] = KV(key, GGUFValueType.ARRAY, pattern, item_type=GGUFValueType.BOOL)
    for key, kv in model.kvs.items():
        if (
            key.startswith(arch + ".")
            and key not in out
            and kv.vtype == GGUFValueType.ARRAY
            and len(kv.value) == n_layer
        ):
            raise UnsupportedModelError(
                f"{model.path.name} has a per-layer metadata array {key!r} the slicer does not know; "
                "slicing it could change the model, so it is refused"
            )
    for key, kv in out.items():
        if len(kv.value) != n_layer:
            raise ModelFileError(f"{model.path.name}: {key} has {len(kv.value)} entries for {n_layer} layers")
    return out


def _metadata(
    model: GGUFFile, rules: ArchRules, layers: LayerRange, n_layer: int, role: ShardRole, sid: str, lookahead: int
):
    arch = model.arch
    stored = LayerRange(layers.start, layers.end + lookahead)
    per_layer = _per_layer_values(model, rules, n_layer)
    keep_vocab = role != ShardRole.MIDDLE
    # A shard holding none of the window layers (Gemma 3's 17:18) must not ask for a window cache:
    # llama.cpp asserts that a model with a window has a window layer. With the window off, every layer
    # runs as the global layer it is (same attention, same RoPE base), so the numbers do not change.
    no_window = None
    if rules.swa_pattern:
        pattern = per_layer.get(f"{arch}.{rules.swa_pattern[0]}")
        if pattern is not None and not any(pattern.value[stored.start:stored.end]):
            no_window = f"{arch}.{rules.swa_pattern[2]}"
    blobs: list[bytes] = []
    emitted: set[str] = set()
    for key, kv in model.kvs.items():
        if key.startswith("GGUF."):
            continue
        if key == f"{arch}.block_count":
            blobs.append(encode_kv(key, kv.vtype, stored.count))
        elif key == no_window:
            blobs.append(encode_kv(key, kv.vtype, 0))
        elif key in per_layer:
            src = per_layer[key]
            blobs.append(encode_kv(key, src.vtype, src.value[stored.start:stored.end], src.item_type))
        elif not keep_vocab and key.startswith("tokenizer.") and key not in _VOCAB_KEYS_KEPT:
            continue  # a middle shard reads hidden states and writes hidden states: no vocabulary
        elif not keep_vocab and key == "tokenizer.ggml.model":
            blobs.append(encode_kv(key, GGUFValueType.STRING, "none"))
        elif not keep_vocab and key == f"{arch}.vocab_size":
            continue  # written below
        else:
            blobs.append(kv.raw)
        emitted.add(key)
    for key, kv in per_layer.items():  # patterns llama.cpp would derive from the index
        if key not in emitted:
            blobs.append(encode_kv(key, kv.vtype, kv.value[stored.start:stored.end], kv.item_type))
    if not keep_vocab:
        if "tokenizer.ggml.model" not in emitted:
            blobs.append(encode_kv("tokenizer.ggml.model", GGUFValueType.STRING, "none"))
        blobs.append(encode_kv(f"{arch}.vocab_size", GGUFValueType.UINT32, 1))
    u32 = GGUFValueType.UINT32
    blobs += [
        encode_kv(META_PREFIX + "id", GGUFValueType.STRING, sid),
        encode_kv(META_PREFIX + "role", GGUFValueType.STRING, role.value),
        encode_kv(META_PREFIX + "layer_start", u32, layers.start),
        encode_kv(META_PREFIX + "layer_end", u32, layers.end),
        encode_kv(META_PREFIX + "n_layer_total", u32, n_layer),
        encode_kv(META_PREFIX + "lookahead", u32, lookahead),
    ]
    return blobs


def _tensors(model: GGUFFile, layers: LayerRange, role: ShardRole, lookahead: int) -> list[TensorSource]:
    stored = LayerRange(layers.start, layers.end + lookahead)
    blocks: list[tuple[int, str, TensorSource]] = []
    others: list[TensorSource] = []
    for t in model.tensors:
        src = TensorSource(t.name, t.shape, t.ggml_type, model.data_start + t.offset, t.nbytes)
        m = _BLOCK.match(t.name)
        if m:
            i = int(m.group(1))
            if stored.start <= i < stored.end:
                src.name = f"blk.{i - stored.start}.{m.group(2)}"
                blocks.append((i, m.group(2), src))
            continue
        if t.name == "output.weight" and not role.gives_logits:
            continue  # optional in the supported loaders; they fall back to token_embd
        if t.name == "token_embd.weight" and role == ShardRole.MIDDLE:
            # Required by the loader with n_vocab rows; with vocab_size 1 one row satisfies it.
            src.shape = (t.shape[0], 1)
            src.nbytes = t.row_bytes
        others.append(src)
    blocks.sort(key=lambda b: (b[0], b[1]))
    return others + [b[2] for b in blocks]


def _check_count_derived_params(model: GGUFFile, n_layer: int, shard_blocks: int) -> None:
    """Refuse a cut that would change what llama.cpp derives from a model's layer count.

    Gemma 3: llama.cpp takes a 62-block model for the 27B, whose attention scale is
    1/sqrt(n_embd/n_head) instead of 1/sqrt(head size); no metadata key can override it.
    """
    if model.arch != "gemma3":
        return
    n_embd = _meta_int(model, "gemma3.embedding_length")
    n_head = _meta_int(model, "gemma3.attention.head_count")
    head = _meta_int(model, "gemma3.attention.key_length", n_embd // n_head)
    if (n_layer == 62) != (shard_blocks == 62) and n_embd // n_head != head:
        raise UnsupportedModelError(
            f"cannot cut {model.path.name} into a shard of {shard_blocks} blocks: llama.cpp picks Gemma 3's "
            "attention scale from the layer count (62 means 27B), so the shard would compute differently. "
            "Choose ranges so that no shard of this model changes that (for the 27B: run it whole)"
        )


def _choose_lookahead(model: GGUFFile, layers: LayerRange, role: ShardRole) -> int:
    """1 if a first shard is cheaper with a look-ahead block than with a full batch of logits."""
    if role != ShardRole.FIRST:
        return 0
    block_bytes = sum(t.nbytes for t in model.tensors if t.name.startswith(f"blk.{layers.end}."))
    tokens = model.get("tokenizer.ggml.tokens")
    n_vocab = len(tokens) if tokens is not None else int(model.get(f"{model.arch}.vocab_size", 0) or 0)
    return 1 if block_bytes < n_vocab * PLANNED_BATCH * 4 else 0


def _shard_names(model: GGUFFile, layers: LayerRange, lookahead: bool | None, digest: str) -> tuple[str, int, str]:
    """(shard id, look-ahead blocks, file name) of the shard of `layers` from a model whose sha256 is `digest`."""
    n_layer = model_layer_count(model)
    role = layers.role(n_layer)
    auto = _choose_lookahead(model, layers, role)
    extra = auto if lookahead is None else int(bool(lookahead) and role == ShardRole.FIRST)
    _check_count_derived_params(model, n_layer, layers.count + extra)
    sid = shard_id(digest, layers, n_layer, extra)
    return sid, extra, f"{model.arch}-{sid[:16]}-L{layers.start}-{layers.end}.gguf"


def shard_pieces(model: GGUFFile, layers: LayerRange, sid: str, lookahead: int) -> tuple[list[bytes], list[TensorSource]]:
    """The metadata blobs and tensors of a shard, for write_gguf or gguf_layout: the one recipe of a shard's bytes."""
    rules = check_supported(model)
    n_layer = model_layer_count(model)
    layers.check_within(n_layer)
    role = layers.role(n_layer)
    return _metadata(model, rules, layers, n_layer, role, sid, lookahead), _tensors(model, layers, role, lookahead)


def slice_model(
    model_path: str | os.PathLike,
    layers: LayerRange,
    out_dir: str | os.PathLike | None = None,
    lookahead: bool | None = None,
) -> ShardFile:
    """Write (or reuse) the shard of `model_path` holding `layers`; returns where it is.

    The whole range is the model file itself.

    `lookahead` forces the first shard's look-ahead block on or off; None lets the slicer choose.
    """
    model = read_gguf(model_path)
    check_supported(model)
    n_layer = model_layer_count(model)
    layers.check_within(n_layer)
    role = layers.role(n_layer)
    if role == ShardRole.WHOLE:
        return shard_info(model.path)  # the model itself is the one shard: no copy
    sid, extra, name = _shard_names(model, layers, lookahead, cache.file_digest(model.path))
    out_dir = Path(out_dir) if out_dir is not None else cache.subdir("shards")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / name
    if target.exists():
        shardcache.touch(target)  # a reuse counts as a use for the cache's eviction order
        return ShardFile(target, layers, n_layer, role, sid, extra)
    blobs, tensors = shard_pieces(model, layers, sid, extra)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    log.info("slicing layers %s of %s into %s", layers, model.path.name, target.name)
    try:
        with open(model.path, "rb") as src, open(tmp, "wb") as dst:
            shardcache.mark_writing(dst)  # a prune meanwhile must not take it for a dead slicer's
            write_gguf(dst, src, blobs, tensors, model.alignment)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    shardcache.after_write(target)  # keep the cache under its cap; never evicts `target`
    return ShardFile(target, layers, n_layer, role, sid, extra)


def shard_info(path: str | os.PathLike) -> ShardFile:
    """Describe a shard file, or an unsliced model as one whole shard."""
    model = read_gguf(path)
    n_layer = model_layer_count(model)
    if META_PREFIX + "layer_start" in model.kvs:
        layers = LayerRange(_meta_int(model, META_PREFIX + "layer_start"), _meta_int(model, META_PREFIX + "layer_end"))
        return ShardFile(
            model.path, layers, n_layer, layers.role(n_layer), str(model.get(META_PREFIX + "id")),
            _meta_int(model, META_PREFIX + "lookahead", 0),
        )
    layers = LayerRange(0, n_layer)
    return ShardFile(model.path, layers, n_layer, ShardRole.WHOLE, cache.file_digest(model.path))
