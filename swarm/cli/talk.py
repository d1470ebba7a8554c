"""Commands that use a swarm: `swarm generate` and `swarm chat` (and the chat of `swarm local`)."""

from __future__ import annotations

import argparse
import sys

from .options import sampling_options


def client_of(args: argparse.Namespace):
    from ..client import SwarmClient

    return SwarmClient(args.coordinator, key=args.key, swarm=args.swarm, mdns_interface=args.mdns_interface)


def _stream(gen, args: argparse.Namespace) -> None:
    for piece in gen:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    r = gen.result
    if getattr(args, "stats", False):
        print(f"prompt {r.prompt_tokens} tokens, first token after {r.first_token_ms:.0f} ms, {len(r.tokens)} tokens, "
              f"decode {r.tokens_per_s:.1f} tokens/s ({r.finish_reason})", file=sys.stderr)


def _client_options(args: argparse.Namespace) -> dict:
    return dict(max_tokens=args.max_tokens, stop=args.stop or [], **sampling_options(args))


def cmd_generate(args: argparse.Namespace) -> int:
    with client_of(args) as client:
        _stream(client.generate(args.text, **_client_options(args)), args)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    with client_of(args) as client:
        return chat_session(client, args)


def chat_session(client, args: argparse.Namespace) -> int:
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt:
        _stream(client.chat(history + [{"role": "user", "content": args.prompt}], **_client_options(args)), args)
        return 0
    print("chat with the swarm; /reset forgets the conversation, /quit (or Ctrl-D) leaves", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print("", file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return 0
        if text == "/reset":
            history = history[:1] if args.system else []
            print("(conversation forgotten)", file=sys.stderr)
            continue
        if text.startswith("/"):
            print("commands: /reset, /quit", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        gen = client.chat(history, **_client_options(args))
        try:
            _stream(gen, args)
        except KeyboardInterrupt:
            gen.cancel()
            print("\n(interrupted)", file=sys.stderr)
        history.append({"role": "assistant", "content": gen.result.text})
