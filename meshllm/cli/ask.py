"""``meshllm ask``: send one prompt to a mesh and stream the answer to the terminal.

A thin shell over :class:`~meshllm.serve.client.Client`: it parses arguments
and prints; errors are :class:`~meshllm.errors.MeshError` subclasses, which
``meshllm``'s ``main()`` prints as one line with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from meshllm.cli.common import add_app_options, add_sampling_options


def add_ask_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Registers ``meshllm ask`` on the CLI's subparsers (``build_parser``'s ``sub``)."""
    a = subparsers.add_parser("ask", help="send a prompt to a mesh and stream the answer")
    a.add_argument("prompt", metavar="PROMPT")
    add_app_options(a)
    add_sampling_options(a)
    a.add_argument("--chat", action="store_true", help="send PROMPT as a user message of a chat, which the mesh "
                   "renders with the model's chat template (ChatML for a model without one)")
    a.add_argument("--chat-template", metavar="FILE", help="with --chat: render the chat here with this Jinja "
                   "template instead, and send the text as a prompt (docs/gateway.md)")
    a.add_argument("--json", action="store_true", help="print the result as one JSON object (text, token ids, "
                   "finish reason, usage, timings) instead of streaming text")
    a.add_argument("--timeout", type=float, default=120.0,
                   help="seconds to wait for the first token (default: 120)")
    a.set_defaults(func=cmd_ask)
    return a  # type: ignore[no-any-return]


def cmd_ask(args: argparse.Namespace) -> int:
    from meshllm.cli.common import run_async

    return int(run_async(_ask(args)))


async def _ask(args: argparse.Namespace) -> int:
    from meshllm.cli.common import broker_login
    from meshllm.serve.client import Client

    params: dict[str, Any] = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
                              "top_k": args.top_k, "seed": args.seed, "stop": args.stop}
    prompt: str | None = args.prompt
    if args.chat_template and not args.chat:
        from meshllm.errors import ConfigError

        raise ConfigError("--chat-template goes with --chat")
    if args.chat:
        messages = [{"role": "user", "content": args.prompt}]
        if args.chat_template:
            from meshllm.model.tokenizer import read_chat_template, render_chat_template

            prompt = render_chat_template(read_chat_template(args.chat_template), messages)
        else:
            prompt, params["messages"] = None, messages
    async with Client(args.mesh, args.broker, args.interface, args.broker_ca,
                      first_token_timeout=args.timeout, login=broker_login(args.login_file, args.mesh)) as client:
        if args.json:
            result = await client.complete(prompt, **params)
            print(json.dumps(result.to_json(), ensure_ascii=False))
            return 0
        ended, wrote = False, False
        try:
            async for chunk in client.stream(prompt, **params):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                wrote = wrote or bool(chunk.text)
            ended = True
        finally:
            if ended or wrote:  # an error after some text: end the line before main() prints it
                sys.stdout.write("\n")
                sys.stdout.flush()
    return 0
