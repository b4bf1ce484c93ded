"""What the subcommands share: running a coroutine, the broker login of an app, the mesh options and the
mesh secret a command was given. It imports no subcommand, so that every subcommand imports it downwards.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path
from typing import Any

from meshllm.errors import MeshError


def run_async(coro: Any) -> Any:
    """Runs a coroutine on uvloop where the platform has it."""
    async def main() -> Any:
        quiet_lost_mqtt_futures(asyncio.get_running_loop())
        return await coro

    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    return uvloop.run(main())


def quiet_lost_mqtt_futures(loop: asyncio.AbstractEventLoop) -> None:
    """aiomqtt leaves a future holding "Unexpected disconnection" when a broker drops a connection that was
    already being closed (a refused publish, a node that steps aside): the error was handled where it
    mattered, so its unretrieved copy goes to the debug log instead of a traceback on stderr."""
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if type(exc).__module__.startswith("aiomqtt") and "never retrieved" in str(context.get("message", "")):
            logging.getLogger("meshllm").debug("aiomqtt: %s", exc)
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)
    loop.set_exception_handler(handler)


LOGIN_ENV = "MESHLLM_BROKER_LOGIN"


def add_login_option(p: argparse.ArgumentParser) -> None:
    """``--login-file``: the broker login of an app (``meshllm ask``, ``status``, ``gateway``)."""
    p.add_argument("--login-file", help="file holding the broker login USER:PASSWORD, used when the broker URL "
                   f"names no user (or set {LOGIN_ENV}); a mesh with a secret needs its app login, "
                   "see `meshllm credentials`")


def broker_login(login_file: str | None, mesh: str | None = None) -> tuple[str, str] | None:
    """The app's broker login from ``--login-file`` or ``$MESHLLM_BROKER_LOGIN``; else, on a device that
    belongs to ``mesh`` (it stores the mesh's secret), the app login derived from that secret."""
    import os

    from meshllm.mesh.access import app_login, parse_login
    from meshllm.secret import load_stored_secret

    try:
        text = Path(login_file).read_text() if login_file else os.environ.get(LOGIN_ENV, "")
    except OSError as e:
        raise MeshError(f"cannot read the login file: {e}") from None
    if not text.strip():
        stored = load_stored_secret(mesh) if mesh else None
        return app_login(stored) if stored else None
    try:
        return parse_login(text)
    except ValueError as e:
        raise MeshError(f"{login_file or LOGIN_ENV}: {e}") from None


def add_mesh_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mesh", default="meshllm", help="mesh name (nodes with the same name form one mesh)")
    p.add_argument("--broker", help="MQTT broker URL, mqtt://[user:pass@]host:port or mqtts://... "
                   "(default: find one on the LAN over mDNS, or host one)")
    p.add_argument("--broker-ca", help="CA certificate file for mqtts:// brokers")
    p.add_argument("--interface", help="IPv4 address of the interface for mDNS and the data plane "
                   "(default: this machine's LAN address)")


def secret_given(args: argparse.Namespace) -> str | None:
    """The secret from ``--secret-file`` or ``$MESHLLM_SECRET``, checked; None if neither is given."""
    import os

    from meshllm.secret import SECRET_ENV, check_secret, read_secret_file

    if getattr(args, "secret_file", None):
        return read_secret_file(args.secret_file)
    if SECRET_ENV in os.environ:
        return check_secret(os.environ[SECRET_ENV], f"${SECRET_ENV}")
    return None


def known_secret(args: argparse.Namespace) -> str | None:
    """A given secret, else the one this device stored for ``--mesh`` (it created or joined it)."""
    from meshllm.secret import load_stored_secret

    given = secret_given(args)
    return given if given is not None else load_stored_secret(getattr(args, "mesh", None) or "meshllm")


def add_app_options(p: argparse.ArgumentParser) -> None:
    """How an app (``meshllm ask``, ``meshllm gateway``) finds a mesh and logs in to its broker."""
    p.add_argument("--mesh", default="meshllm", help="mesh name")
    p.add_argument("--broker", help="MQTT broker URL, mqtt://[user:pass@]host:port or mqtts://... "
                   "(default: find the mesh's broker on the LAN over mDNS)")
    p.add_argument("--broker-ca", help="CA certificate file for mqtts:// brokers")
    add_login_option(p)
    p.add_argument("--interface", help="IPv4 address of the interface for mDNS (default: this machine's LAN address)")


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    """The sampling options of ``meshllm ask`` and ``meshllm generate``. No defaults here: those of
    :class:`~meshllm.runtime.sampling.SamplingParams`, which the mesh and ``generate`` both apply."""
    from meshllm.runtime.sampling import DEFAULT_SAMPLING as ds

    p.add_argument("--max-tokens", type=int, help=f"most tokens to generate (default: {ds.max_tokens})")
    p.add_argument("--temperature", type=float, help=f"0 = greedy (default: {ds.temperature:g})")
    p.add_argument("--top-p", type=float, help=f"nucleus sampling cut (default: {ds.top_p:g})")
    p.add_argument("--top-k", type=int, help=f"keep the k most likely tokens (default: {ds.top_k} = all)")
    p.add_argument("--seed", type=int, help="random seed, for reproducible sampling")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
