"""`loradock generate` and `loradock chat`: talk to a running `loradock serve`."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from loradock.commands.common import print_json
from loradock.commands.serve import read_token_file
from loradock.errors import UserError
from loradock.runtime.types import SamplingParams

ENV_SERVER = "LORADOCK_SERVER"


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument("--server", metavar="HOST:PORT", default=os.environ.get(ENV_SERVER, "127.0.0.1:50051"),
                       help=f"runtime address (default: ${ENV_SERVER} or %(default)s)")
    group.add_argument("--token-file", type=Path, metavar="FILE",
                       help="send the bearer token stored in FILE (for servers run with --auth-token-file)")
    group.add_argument("--tls-ca", type=Path, metavar="PEM",
                       help="connect with TLS, trusting this root certificate")
    group.add_argument("--timeout", type=float, metavar="SECONDS", help="give up on a call after this long")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    d = SamplingParams()  # the engine's defaults, so the CLI cannot drift from them
    group = parser.add_argument_group("sampling (defaults: greedy decoding)")
    group.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, metavar="N",
                       help="tokens to generate at most (default: %(default)s)")
    group.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy (default: %(default)s)")
    group.add_argument("--top-p", type=float, default=d.top_p,
                       help="nucleus sampling mass in (0, 1] (default: %(default)s)")
    group.add_argument("--top-k", type=int, default=d.top_k,
                       help="keep the k most likely tokens; 0 = all (default: %(default)s)")
    group.add_argument("--seed", type=int, default=d.seed, help="sampling seed, for reproducible sampled output")
    group.add_argument("--stop", action="append", default=list(d.stop), metavar="TEXT",
                       help="stop when TEXT is generated (repeatable; TEXT is not printed)")
    group.add_argument("--ignore-eos", action="store_true", default=d.ignore_eos,
                       help="keep generating past end-of-sequence")


def sampling_from(args: argparse.Namespace) -> dict:
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": tuple(args.stop),
        "ignore_eos": args.ignore_eos,
    }


def connect(args: argparse.Namespace):
    from loradock.client import Client

    return Client(args.server, token=read_token_file(args.token_file), tls=args.tls_ca, timeout=args.timeout)


def register(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser(
        "generate",
        help="generate text with a running server",
        description="Send one prompt to a running `loradock serve` and print the completion on "
        "stdout; which adapter version served it, the finish reason, token counts and timings go "
        "to stderr (or everything as JSON with --json).",
    )
    gen.add_argument("prompt", metavar="PROMPT", help="the prompt; '-' reads it from stdin")
    gen.add_argument("--adapter", metavar="REF",
                     help="adapter reference: name, name@3 or name@alias (default: the base model alone)")
    gen.add_argument("--chat", action="store_true",
                     help="send PROMPT as one user message, rendered with the base's chat template")
    gen.add_argument("--system", metavar="TEXT", help="with --chat: a system message first")
    gen.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    gen.add_argument("--json", action="store_true", help="print the whole result as JSON")
    add_sampling_arguments(gen)
    add_connection_arguments(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser(
        "chat",
        help="chat with a running server, switching adapters mid-conversation",
        description="Interactive chat with a running `loradock serve`. Each line you type is a user "
        "message; the whole conversation is sent each turn (rendered with the base's chat template) "
        "and the reply is streamed. Commands: '/adapter REF' switches adapter (keeping the "
        "history; '/adapter' alone switches to the base model), '/reset' forgets the history, "
        "'/quit' (or end of input) leaves. Reads stdin, so input can be piped.",
    )
    chat.add_argument("--adapter", metavar="REF", help="adapter to start with (default: the base model alone)")
    chat.add_argument("--system", metavar="TEXT", help="a system message at the start of the conversation")
    add_sampling_arguments(chat)
    add_connection_arguments(chat)
    chat.set_defaults(func=cmd_chat)


def _client_errors(action: Callable[[], int]) -> int:
    from loradock.client import LoradockError

    try:
        return action()
    except LoradockError as e:
        raise UserError(f"{e.code.name}: {e.details}") from None


def _served_by(result) -> str:
    return result.adapter.ref if result.adapter else "base"


def _summary(result) -> str:
    t = result.timings
    return (f"[{_served_by(result)} | {result.finish_reason.value} | {result.prompt_tokens} prompt + "
            f"{result.completion_tokens} generated tokens | ttft {t.ttft_ms:.0f} ms, total {t.total_ms:.0f} ms]")


def _stream_text(stream, out: TextIO) -> Iterator[str]:
    for text in stream.text():
        out.write(text)
        out.flush()
        yield text


def cmd_generate(args: argparse.Namespace) -> int:
    prompt_text = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.system and not args.chat:
        raise UserError("--system only applies with --chat")
    prompt: str | list[dict] = prompt_text
    if args.chat:
        prompt = [*([{"role": "system", "content": args.system}] if args.system else []),
                  {"role": "user", "content": prompt_text}]

    def run() -> int:
        with connect(args) as client:
            request = {"adapter": args.adapter, **sampling_from(args)}
            if args.stream and not args.json:
                stream = client.stream(prompt, **request)
                for _ in _stream_text(stream, sys.stdout):
                    pass
                print()
                result = stream.result
            else:
                result = client.generate(prompt, **request)
                if not args.json:
                    print(result.text)
            if args.json:
                print_json({**dataclasses.asdict(result), "finish_reason": result.finish_reason.value})
            else:
                print(_summary(result), file=sys.stderr)
        return 0

    return _client_errors(run)


def cmd_chat(args: argparse.Namespace) -> int:
    interactive = sys.stdin.isatty()
    system = [{"role": "system", "content": args.system}] if args.system else []

    def run() -> int:
        from loradock.client import FATAL_CODES, LoradockError

        adapter = args.adapter or None
        history: list[dict] = list(system)
        with connect(args) as client:
            if interactive:
                print("chatting; /adapter REF switches adapter, /reset forgets, /quit leaves", file=sys.stderr)
            while True:
                if interactive:
                    print(f"you ({adapter or 'base'})> ", end="", file=sys.stderr, flush=True)
                line = sys.stdin.readline()
                if not line:  # end of input
                    return 0
                line = line.strip()
                if not line:
                    continue
                if line == "/quit":
                    return 0
                if line == "/reset":
                    history = list(system)
                    print("(history cleared)", file=sys.stderr)
                    continue
                if line == "/adapter" or line.startswith("/adapter "):
                    adapter = line.removeprefix("/adapter").strip() or None
                    print(f"(now using {adapter or 'the base model'})", file=sys.stderr)
                    continue
                if line.startswith("/"):
                    print(f"unknown command {line.split()[0]!r}; use /adapter REF, /reset or /quit",
                          file=sys.stderr)
                    continue
                history.append({"role": "user", "content": line})
                stream = client.stream(history, adapter=adapter, **sampling_from(args))
                try:
                    reply = "".join(_stream_text(stream, sys.stdout))
                except LoradockError as e:
                    history.pop()  # the failed turn is not part of the conversation
                    if e.code in FATAL_CODES:
                        raise
                    print(f"error: {e.code.name}: {e.details}", file=sys.stderr)
                    continue
                print()
                print(_summary(stream.result), file=sys.stderr)
                history.append({"role": "assistant", "content": reply})

    return _client_errors(run)
