"""The `swarm` command line: the only module that prints."""

from __future__ import annotations

import argparse
import codecs
import logging
import sys
import time

from . import __version__
from .errors import BadInputError, SwarmError
from .layers import LayerRange

DEFAULT_PROMPT = "The three most useful things to know about llamas are"


def _ranges(text: str) -> list[LayerRange]:
    return [LayerRange.parse(part) for part in text.split(",") if part.strip()]


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default="default", help="a GGUF path, or `default` for Gemma 3 270M (default)")


def cmd_run(args: argparse.Namespace) -> int:
    from .chain import LocalChain
    from .models import resolve_model
    from .sampling import SamplingParams

    model = resolve_model(args.model)
    ranges = _ranges(args.split) if args.split else args.shards
    sampling = SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repeat_penalty=args.repeat_penalty, seed=args.seed,
    )
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
    from .models import resolve_model
    from .slicing import slice_model

    shard = slice_model(resolve_model(args.model), LayerRange.parse(args.layers), args.output_dir)
    print(shard.path)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .gguf_file import read_gguf
    from .models import resolve_model
    from .slicing import SUPPORTED, shard_info

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarm", description="Run a GGUF model cut into layer-range shards.")
    parser.add_argument("--version", action="version", version=f"swarm {__version__}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="info (default) reports slow first-time steps; debug adds llama.cpp's own log")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="cut the model into shards and generate through the chain, streaming")
    _add_model(run)
    run.add_argument("-p", "--prompt", default=DEFAULT_PROMPT)
    group = run.add_mutually_exclusive_group()
    group.add_argument("--shards", type=int, default=3, help="cut into this many equal ranges (default 3)")
    group.add_argument("--split", help="explicit ranges, e.g. 0:6,6:12,12:18")
    run.add_argument("-n", "--max-tokens", type=int, default=64)
    run.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    run.add_argument("--top-k", type=int, default=40)
    run.add_argument("--top-p", type=float, default=0.95)
    run.add_argument("--min-p", type=float, default=0.05)
    run.add_argument("--repeat-penalty", type=float, default=1.0)
    run.add_argument("--seed", type=int, default=None)
    run.add_argument("--ctx", type=int, default=512, help="context length per session (default 512)")
    run.add_argument("--threads", type=int, default=None)
    run.add_argument("--stats", action="store_true", help="print time to first token and decode speed to stderr")
    run.set_defaults(func=cmd_run)

    shard = sub.add_parser("shard", help="write the shard GGUF for a layer range and print its path")
    _add_model(shard)
    shard.add_argument("--layers", required=True, help="START:END, half-open, e.g. 0:6")
    shard.add_argument("--output-dir", "-o", default=None, help="where to write it (default: the cache)")
    shard.set_defaults(func=cmd_shard)

    info = sub.add_parser("info", help="describe a model or shard file")
    _add_model(info)
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(message)s")
    for flag, value, low in (("--max-tokens", getattr(args, "max_tokens", 0), 0), ("--ctx", getattr(args, "ctx", 1), 1),
                             ("--threads", 1 if getattr(args, "threads", None) is None else args.threads, 1),
                             ("--shards", getattr(args, "shards", 1), 1)):
        if value < low:
            print(f"error: {flag} must be at least {low}", file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except SwarmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
