"""The ``meshllm`` command line: one module per group of subcommands, each registering its own parsers.

Modules import downwards only: this package's top registers the subcommands; they share
:mod:`meshllm.cli.common` and import nothing of each other but :mod:`meshllm.cli.gateway`'s option parsing.
Errors that meshllm raises on purpose (:class:`~meshllm.errors.MeshError`) are printed as one line and exit with
status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from meshllm.cli import ask, demo, gateway, mesh, model, node, plan
from meshllm.cli.common import LOGIN_ENV, add_login_option, broker_login, quiet_lost_mqtt_futures, run_async
from meshllm.errors import MeshError

__all__ = ["LOGIN_ENV", "add_login_option", "broker_login", "build_parser", "main", "quiet_lost_mqtt_futures",
           "run_async"]  # the shared helpers stay importable from here (tools use meshllm.cli.run_async)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshllm", description="Serve an LLM on a mesh of small devices.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = p.add_subparsers(dest="command", required=True)
    model.add_parsers(sub)
    node.add_parsers(sub)
    demo.add_parsers(sub)
    ask.add_ask_parser(sub)
    plan.add_plan_parser(sub)
    gateway.add_gateway_parser(sub)
    mesh.add_parsers(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        rc = func(args)
        sys.stdout.flush()  # here, not at exit, so that a reader gone early (`| head`) is handled below
        return rc
    except MeshError as e:
        print(f"meshllm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader of our output went away (`meshllm status | head`): stop quietly. Python's recipe: point
        # stdout at devnull, or the interpreter's last flush at exit fails again with a traceback
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
