"""The options several `swarm` commands share."""

from __future__ import annotations

import argparse

from ..sampling import CHAT_DEFAULTS


def add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default="default",
                   help="a GGUF path, or a packaged model: `default` / `smollm2-135m` (SmolLM2-135M-Instruct, the "
                        "default) or `gemma3-270m` (Gemma 3 270M, a base model)")

def add_sampling(p: argparse.ArgumentParser, max_tokens: int, chat: bool = False) -> None:
    """Sampling options; a chat's are left unset (None) so that the chat defaults fill in the ones not given."""
    p.add_argument("-n", "--max-tokens", type=int, default=max_tokens)
    if chat:
        d = CHAT_DEFAULTS
        p.add_argument("--temperature", type=float, default=None,
                       help=f"default {d.temperature}; 0 is greedy (then without a repeat penalty unless given)")
        p.add_argument("--top-k", type=int, default=None, help=f"default {d.top_k}")
        p.add_argument("--top-p", type=float, default=None, help=f"default {d.top_p}")
        p.add_argument("--min-p", type=float, default=None, help=f"default {d.min_p}")
        p.add_argument("--repeat-penalty", type=float, default=None, help=f"default {d.repeat_penalty}")
    else:
        p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
        p.add_argument("--top-k", type=int, default=40)
        p.add_argument("--top-p", type=float, default=0.95)
        p.add_argument("--min-p", type=float, default=0.05)
        p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)

def add_client(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator", "-c", help="HOST:PORT of the coordinator (default: find it by mDNS)")
    p.add_argument("--key", help="the swarm key (default: $SWARM_KEY, or the key of a coordinator on this machine)")
    p.add_argument("--swarm", default="default", help="the swarm's name, to find it by mDNS (default: default)")
    p.add_argument("--mdns-interface", default=None,
                   help="address of the interface to use for mDNS, `all` (default for clients) or `off`")

def add_cache_limit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-limit", default=None, metavar="SIZE",
                   help="the most disk the shard cache may take, e.g. 20GB; `none` or 0: no cap (default: "
                        "$SWARM_CACHE_LIMIT, else 20GB, or half the space the cache could take on a smaller disk); "
                        "the least recently used shards go first, shards in use never")

def add_chat(p: argparse.ArgumentParser) -> None:
    p.add_argument("-p", "--prompt", default=None, help="answer this once and exit (default: interactive)")
    p.add_argument("--system", default=None, help="a system message to start the conversation with")
    add_sampling(p, 256, chat=True)
    p.add_argument("--stop", action="append", help="stop at this string (repeatable)")
    p.add_argument("--stats", action="store_true", help="print time to first token and decode speed to stderr")

def sampling_options(args: argparse.Namespace) -> dict:
    """The sampling options given (a chat's unset ones left out, for its defaults to fill in)."""
    given = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                 repeat_penalty=args.repeat_penalty, seed=args.seed)
    return {k: v for k, v in given.items() if v is not None}


def add_http(p: argparse.ArgumentParser, default_text: str) -> None:
    p.add_argument("--http-port", type=int, default=None,
                   help=f"port of the OpenAI-compatible HTTP API and the web page ({default_text})")
    p.add_argument("--http-host", default="127.0.0.1",
                   help="address the HTTP API and the web page listen on (default 127.0.0.1: this machine only; "
                        "0.0.0.0 serves other machines too, in plain HTTP: see docs/security.md)")
    p.add_argument("--no-http", action="store_true", help="serve no HTTP API and no web page")
