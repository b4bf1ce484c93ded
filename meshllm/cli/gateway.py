"""``meshllm gateway``: parse options, serve until SIGINT/SIGTERM. Printing happens only here."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from meshllm.cli.common import add_app_options
from meshllm.errors import MeshError

API_KEY_ENV = "MESHLLM_API_KEY"


def parse_host_port(s: str, default_port: int = 8000) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT``, ``HOST`` or ``[v6]:PORT`` (for ``meshllm node --gateway``)."""
    host, port = s, default_port
    if s.startswith("["):
        end = s.find("]")
        host, rest = s[1:end], s[end + 1:]
        if rest.startswith(":"):
            port = _port(rest[1:], s)
    elif s.count(":") == 1:
        host, p = s.split(":")
        port = _port(p, s)
    return host or "127.0.0.1", port


def _port(p: str, whole: str) -> int:
    try:
        port = int(p)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {whole!r}")
    return port


def add_gateway_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Registers ``meshllm gateway`` on the CLI's subparsers (``build_parser``'s ``sub``)."""
    g = subparsers.add_parser("gateway", help="serve an OpenAI-compatible HTTP API and a live mesh page",
                              description="An OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, "
                              "/v1/models) and a live mesh page (/) in front of a mesh.")
    add_app_options(g)
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for the LAN)")
    g.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000; 0 picks a free one)")
    g.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                   help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV}, else no key)")
    g.add_argument("--open", action="store_true", help="allow listening beyond loopback without an API key "
                   "(anyone who reaches the port can use the mesh)")
    g.add_argument("--model", metavar="DIR", help="the mesh's model directory, to name the model and its context "
                   "(default: what the mesh's nodes publish)")
    g.add_argument("--timeout", type=float, default=120.0,
                   help="seconds to wait for a request's first token (default: 120)")
    g.add_argument("--chat-template", metavar="FILE", help="Jinja chat template for /v1/chat/completions, "
                   "instead of the model's own (or the ChatML fallback of a model without one); docs/gateway.md")
    g.set_defaults(func=cmd_gateway)
    return g  # type: ignore[no-any-return]


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, api_key: str | None, open_: bool) -> None:
    """A gateway that anyone on the LAN could use needs an API key, unless its owner says ``--open``."""
    if api_key or _loopback(host):
        return
    if not open_:
        from meshllm.errors import SecretError

        raise SecretError(f"the gateway would listen on {host} without an API key: set {API_KEY_ENV} (or "
                          "--api-key), listen on 127.0.0.1, or pass --open to let anyone who reaches it use the mesh")
    logging.getLogger("meshllm").warning(
        "the gateway on %s is OPEN (--open, no API key): anyone who reaches it can use the mesh", host)


def cmd_gateway(args: argparse.Namespace) -> int:
    from meshllm.cli.common import run_async

    return int(run_async(_gateway(args)))


async def _gateway(args: argparse.Namespace) -> int:
    from meshllm.cli.common import broker_login
    from meshllm.gateway.app import GatewayConfig, serve_gateway

    check_exposure(args.host, args.api_key, args.open)
    config = GatewayConfig(mesh=args.mesh, broker=args.broker, interface=args.interface, ca_file=args.broker_ca,
                           login=broker_login(args.login_file, args.mesh), api_key=args.api_key, model_dir=args.model,
                           first_token_timeout=args.timeout, chat_template=args.chat_template)
    loop = asyncio.get_running_loop()
    server = asyncio.ensure_future(serve_gateway(
        config, args.host, args.port,
        started=lambda url: print(json.dumps({"event": "started", "url": url, "mesh": args.mesh}), flush=True)))
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.cancel)
    try:
        await server
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # this coroutine is cancelled itself, not the server stopped by a signal: not ours to swallow
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m meshllm.gateway``: the gateway command on its own."""
    p = argparse.ArgumentParser(prog="meshllm")
    p.add_argument("-v", "--verbose", action="count", default=0)
    add_gateway_parser(p.add_subparsers(dest="command", required=True))
    given = list(sys.argv[1:] if argv is None else argv)
    lead = 0
    while lead < len(given) and given[lead].startswith("-v") and set(given[lead][1:]) == {"v"}:
        lead += 1
    args = p.parse_args([*given[:lead], "gateway", *given[lead:]])
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except MeshError as e:
        print(f"meshllm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
