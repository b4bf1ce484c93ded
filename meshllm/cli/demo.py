"""``meshllm demo``: a whole mesh on this machine, offline, on the bundled model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from meshllm.cli.common import run_async


def cmd_demo(args: argparse.Namespace) -> int:
    from meshllm.demo import PROMPTS, run_demo

    run_async(run_demo(args.nodes, Path(args.model) if args.model else None, args.prompt or PROMPTS,
                       args.max_tokens, timeout=args.timeout, workload=args.workload, serve=args.serve))
    return 0


def add_parsers(sub: Any) -> None:
    """Registers demo."""
    d = sub.add_parser("demo", help="run a whole mesh on this machine, offline, on the bundled model")
    d.add_argument("--nodes", type=int, default=4)
    d.add_argument("--model", help="model directory (default: the bundled model under models/)")
    d.add_argument("--prompt", action="append", help="prompt to ask (repeatable; default: three examples)")
    d.add_argument("--max-tokens", type=int, default=48)
    d.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the mesh to be ready")
    from meshllm.demo import DEMO_WORKLOAD, serve_address

    d.add_argument("--workload", default=DEMO_WORKLOAD,
                   help=f"workload the planner optimises for (default: {DEMO_WORKLOAD}, a demand that only "
                   "PREFILL/DECODE replicas meet on the demo's devices)")
    d.add_argument("--serve", nargs="?", type=serve_address, const=("127.0.0.1", 8000), metavar="PORT",
                   help="after the prompts, keep the mesh up behind the OpenAI-compatible gateway and its page on "
                   "127.0.0.1:PORT (default 8000; 0 picks a free port) until Ctrl-C")
    d.set_defaults(func=cmd_demo)
