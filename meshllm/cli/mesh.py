"""``meshllm status``, ``broker``, ``credentials`` and ``invite``: a mesh seen from any device."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
from typing import Any

from meshllm.cli.common import (
    add_login_option,
    add_mesh_options,
    broker_login,
    known_secret,
    run_async,
    secret_given,
)
from meshllm.errors import MeshError


def cmd_status(args: argparse.Namespace) -> int:
    from meshllm.mesh.access import with_login
    from meshllm.mesh.status import find_broker, read_state, render

    login = broker_login(args.login_file, args.mesh)

    async def go() -> dict[str, Any]:
        import aiomqtt

        broker = args.broker or await find_broker(args.mesh, args.interface, args.timeout)
        try:
            return await read_state(args.mesh, with_login(broker, login), ca_file=args.broker_ca)
        except aiomqtt.MqttError as e:
            hint = "; a closed mesh wants its app login (--login-file, see `meshllm credentials`)" \
                if "authorized" in str(e) else ""
            raise MeshError(f"cannot read mesh {args.mesh!r} from its broker: {e}{hint}") from None

    state = run_async(go())
    print(json.dumps(state, indent=1) if args.json else render(state))
    return 0


def cmd_broker(args: argparse.Namespace) -> int:
    from meshllm.errors import SecretError
    from meshllm.mesh.broker import EmbeddedBroker

    secret = secret_given(args)
    if secret is None and not args.open:
        raise SecretError("a broker is closed by default: pass --secret-file FILE (the mesh's secret, see "
                          "`meshllm invite`) or $MESHLLM_SECRET, or --open for a broker anyone may use")
    if secret is not None and args.open:
        raise SecretError("--open runs a broker without logins; drop --secret-file and $MESHLLM_SECRET")

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if secret is None:
            logging.getLogger("meshllm").warning(
                "this broker is OPEN (--open): anyone who can reach %s:%s can read and publish every topic of "
                "every mesh on it. To close it: meshllm broker --secret-file FILE", args.host, args.port)
        async with EmbeddedBroker(args.host, args.port, secret=secret) as broker:
            print(json.dumps({"event": "started", "url": broker.url, "logins": broker.secret is not None}),
                  flush=True)
            await stop.wait()

    run_async(go())
    return 0


def cmd_credentials(args: argparse.Namespace) -> int:
    from meshllm.mesh.access import app_login, node_login

    secret = known_secret(args)
    if secret is None:
        raise MeshError(f"no secret for mesh {args.mesh!r} on this device: pass --secret-file FILE, set "
                        "MESHLLM_SECRET, or run this where the mesh's first node runs")
    user, password = (node_login if args.node else app_login)(secret)
    print(f"{user}:{password}")
    return 0


def cmd_invite(args: argparse.Namespace) -> int:
    from meshllm.secret import invite_token

    secret = known_secret(args)
    if secret is None:
        raise MeshError(f"this device holds no secret for mesh {args.mesh!r}: start `meshllm node --mesh "
                        f"{args.mesh}` here first (it creates one), or pass --secret-file")
    print(f"meshllm node --join {invite_token(args.mesh, secret)}")
    return 0


def add_parsers(sub: Any) -> None:
    """Registers broker, credentials, invite and status."""
    br = sub.add_parser("broker", help="run a standalone embedded MQTT broker (amqtt); Mosquitto works as well")
    br.add_argument("--host", default="127.0.0.1")
    br.add_argument("--port", type=int, default=1883)
    br.add_argument("--secret-file", help="file holding the mesh secret (or set MESHLLM_SECRET): accept only the "
                    "node and app logins derived from it, with the topic rules of docs/security.md")
    br.add_argument("--open", action="store_true", help="accept anyone, without logins or topic rules")
    br.set_defaults(func=cmd_broker)
    cr = sub.add_parser("credentials", help="print the broker login (USER:PASSWORD) derived from the mesh secret",
                        description="Print the app login that a mesh with a secret wants from its apps (hand it "
                        "to them: `meshllm ask --login-file`, `mosquitto_pub -u USER -P PASSWORD`), or with "
                        "--node the nodes' login (for an external broker's password file).")
    cr.add_argument("--secret-file", help="file holding the mesh secret (or set MESHLLM_SECRET; default: the "
                    "secret stored for --mesh on this device)")
    cr.add_argument("--mesh", default="meshllm", help="mesh name")
    cr.add_argument("--node", action="store_true", help="print the nodes' login instead of the apps'")
    cr.set_defaults(func=cmd_credentials)
    inv = sub.add_parser("invite", help="print the token that lets a new device join this device's mesh",
                         description="Print `meshllm node --join TOKEN` for a closed mesh this device belongs to. "
                         "The token holds the mesh secret: hand it only to devices you trust.")
    inv.add_argument("--mesh", default="meshllm", help="mesh name")
    inv.add_argument("--secret-file", help="file holding the mesh secret (default: the one stored for --mesh)")
    inv.set_defaults(func=cmd_invite)
    st = sub.add_parser("status", help="show a mesh: members, broker, planner, plan")
    add_mesh_options(st)
    add_login_option(st)
    st.add_argument("--json", action="store_true")
    st.add_argument("--timeout", type=float, default=5.0, help="seconds to look for the broker")
    st.set_defaults(func=cmd_status)
