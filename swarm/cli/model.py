"""Commands on a model file, in this one process: `swarm run`, `swarm shard`, `swarm info`."""

from __future__ import annotations

import argparse
import codecs
import sys
import time

from ..errors import BadInputError
from ..layers import LayerRange
from .options import sampling_options

DEFAULT_PROMPT = "The three most useful things to know about llamas are"


def _ranges(text: str) -> list[LayerRange]:
    return [LayerRange.parse(part) for part in text.split(",") if part.strip()]


def cmd_run(args: argparse.Namespace) -> int:
    from ..chain import LocalChain
    from ..models import resolve_model
    from ..sampling import SamplingParams

    model = resolve_model(args.model)
    ranges = _ranges(args.split) if args.split else args.shards
    sampling = SamplingParams(**sampling_options(args))
    with LocalChain(model, ranges, n_ctx=args.ctx, n_threads=args.threads) as chain:
        layout = ", ".join(f"{s.layers} ({s.role.value}, {s.path.stat().st_size / 1e6:.0f} MB)" for s in chain.shards)
        print(f"model {model.name} cut into {len(chain.shards)} shards: {layout}", file=sys.stderr)
        tokens = chain.tokenizer.tokenize(args.prompt)
        if len(tokens) + args.max_tokens > args.ctx:
            raise BadInputError(
                f"the prompt ({len(tokens)} tokens) plus --max-tokens {args.max_tokens} exceeds the context of "
                f"{args.ctx}; raise --ctx or lower --max-tokens"
            )
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
        t0 = time.perf_counter()
        first = None
        n = 0
        for token in chain.generate(tokens, max_tokens=args.max_tokens, sampling=sampling):
            if first is None:
                first = time.perf_counter()
            n += 1
            sys.stdout.write(decoder.decode(chain.tokenizer.piece(token)))
            sys.stdout.flush()
        sys.stdout.write(decoder.decode(b"", final=True) + "\n")
        if args.stats and first is not None:
            end = time.perf_counter()
            rate = (n - 1) / (end - first) if n > 1 else 0.0
            print(
                f"prompt {len(tokens)} tokens, first token after {1000 * (first - t0):.0f} ms, "
                f"{n} tokens, decode {rate:.1f} tokens/s",
                file=sys.stderr,
            )
    return 0


def cmd_shard(args: argparse.Namespace) -> int:
    from ..models import resolve_model
    from ..slicing import slice_model

    shard = slice_model(resolve_model(args.model), LayerRange.parse(args.layers), args.output_dir)
    print(shard.path)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from ..gguf_file import read_gguf
    from ..models import resolve_model
    from ..slicing import SUPPORTED, shard_info

    path = resolve_model(args.model)
    model = read_gguf(path)
    info = shard_info(path)
    arch = model.arch
    print(f"file          {path} ({path.stat().st_size / 1e6:.1f} MB)")
    print(f"architecture  {arch} ({'can be split' if arch in SUPPORTED else 'cannot be split'})")
    print(f"layers        {info.layers} of {info.n_layer_total} ({info.role.value})")
    print(f"n_embd        {model.get(f'{arch}.embedding_length')}")
    print(f"tensors       {len(model.tensors)}")
    return 0
