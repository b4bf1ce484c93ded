"""``meshllm node``: join (or start) a mesh on this device, serve layers, optionally the gateway."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import socket
import sys
from typing import Any

from meshllm.cli.common import add_mesh_options, known_secret, run_async


def _size(s: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    try:
        return int(float(s[:-1]) * units[s[-1].lower()]) if s and s[-1].lower() in units else int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 512M or 2G, got {s!r}") from None


async def _node_main(args: argparse.Namespace) -> int:
    import secrets

    from meshllm.mesh.node import Emulation, Node, NodeConfig
    from meshllm.profile import pinned_profile
    from meshllm.serve.server import ServingNode

    secret = node_secret(args)  # first: --join may name the mesh
    name = args.name or socket.gethostname()
    node_id = args.node_id or (f"{name}-{secrets.token_hex(3)}" if args.emulate_device else None)
    pinned = pinned_profile(args.emulate_device, node_id, name) if args.emulate_device else None
    cfg = NodeConfig(
        mesh=args.mesh, name=name, node_id=node_id, broker=args.broker,
        broker_ca=args.broker_ca, port=args.port, interface=args.interface, model=args.model,
        plan_file=args.plan_file, secret=secret, open_mesh=args.open, workload=args.workload,
        objective=args.objective,
        emulation=Emulation(args.emulate_compute_scale, args.emulate_memory, args.emulate_link_delay_ms / 1e3,
                            args.emulate_timing),
        quick_profile=args.quick_profile, profile=pinned,
        heartbeat_s=args.heartbeat, failure_timeout_s=args.failure_timeout,
    )
    if args.gateway:
        import os

        from meshllm.cli.gateway import check_exposure

        check_exposure(args.gateway[0], os.environ.get("MESHLLM_API_KEY"), args.open)
    # constructing the node validates the configuration, before anything starts
    member = ServingNode(cfg, threads=args.threads, kv_dtype=args.kv_dtype) if cfg.model else Node(cfg)
    if cfg.secret is None:
        logging.getLogger("meshllm").warning(OPEN_WARNING.format(mesh=cfg.mesh))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with member:
        node = member.node if isinstance(member, ServingNode) else member
        gateway = None
        if args.gateway:
            import os

            from meshllm.gateway import GatewayConfig, create_app, serve_gateway
            from meshllm.mesh.access import app_login

            # the gateway is an app: on a mesh with a secret it logs in as one, not as a node
            gw_cfg = GatewayConfig(mesh=args.mesh, broker=args.broker or (lambda: node.broker_url),
                                   login=app_login(cfg.secret) if cfg.secret else None,
                                   interface=args.interface, ca_file=args.broker_ca,
                                   api_key=os.environ.get("MESHLLM_API_KEY"), model_dir=args.model)
            gateway = asyncio.ensure_future(serve_gateway(create_app(gw_cfg), *args.gateway))
        print(json.dumps({"event": "started", "node_id": node.node_id, "port": node.dataplane.port}), flush=True)
        waiter = asyncio.ensure_future(stop.wait())
        stopped = asyncio.ensure_future(node.wait_stopped())
        await asyncio.wait({waiter, stopped}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if gateway is not None:
            gateway.cancel()
            await asyncio.gather(gateway, return_exceptions=True)
        if stopped.done():
            stopped.result()  # the mesh loop ended by itself: its error (e.g. NodeIdInUse, a MeshError) is ours
        stopped.cancel()
    return 0


OPEN_WARNING = ("mesh {mesh!r} is OPEN (--open): anyone who can reach this LAN can read every prompt and reply, "
                "submit requests, publish plans and fetch the model files. To close it, start it without --open "
                "(a secret is created) or with --join TOKEN / --secret-file FILE.")


def node_secret(args: argparse.Namespace) -> str | None:
    """The secret a node runs with (None only for a mesh its owner opened with ``--open``).

    In order: ``--join TOKEN`` (stored for next time), ``--secret-file``/``$MESHLLM_SECRET``, the secret
    stored for the mesh on this device; else this is a new mesh: a secret is created, stored, and the
    invite that lets other devices join is printed.
    """
    import os

    from meshllm.errors import SecretError
    from meshllm.secret import SECRET_ENV, generate_secret, invite_token, parse_invite, store_secret

    if args.open:
        if args.join or args.secret_file or SECRET_ENV in os.environ:
            raise SecretError("--open runs a mesh without a secret; drop --join, --secret-file and $MESHLLM_SECRET")
        return None
    if args.join:
        mesh, secret = parse_invite(args.join)
        if args.mesh not in (mesh, "meshllm"):
            raise SecretError(f"the invite is for mesh {mesh!r}, not --mesh {args.mesh!r}")
        args.mesh = mesh
        path = store_secret(mesh, secret)
        print(f"meshllm: joined mesh {mesh!r}; its secret is stored in {path} (next time `meshllm node --mesh "
              f"{mesh}` is enough)", file=sys.stderr, flush=True)
        return secret
    known = known_secret(args)
    if known is not None:
        return known
    secret = generate_secret()
    path = store_secret(args.mesh, secret)
    print(f"meshllm: created a new closed mesh {args.mesh!r}; its secret is in {path}\n"
          f"meshllm: to add a device, run there:  meshllm node --join {invite_token(args.mesh, secret)}\n"
          f"meshllm: apps on other devices need the login printed by:  meshllm credentials --mesh {args.mesh}",
          file=sys.stderr, flush=True)
    return secret


def cmd_node(args: argparse.Namespace) -> int:
    return int(run_async(_node_main(args)))


def add_parsers(sub: Any) -> None:
    """Registers node."""
    n = sub.add_parser("node", help="join (or start) a mesh on this device")
    add_mesh_options(n)
    n.add_argument("--name", help="human-readable node name (default: the hostname)")
    n.add_argument("--node-id", help="node id (default: NAME-<random>); the smallest id hosts the broker")
    n.add_argument("--port", type=int, default=0, help="data-plane TCP port (default: any free port)")
    n.add_argument("--model", help="meshllm model directory to serve layers from (without it the node only "
                   "takes part in membership)")
    n.add_argument("--plan-file", help="pin this plan (JSON) instead of planning; node ids must match")
    n.add_argument("--workload", help="workload the planner optimises for, e.g. in=128,out=64,rate=2 "
                   "(default: half the context in, half out, 1 request/s)")
    n.add_argument("--objective", default="wait", metavar="{wait,response}",
                   help="what the planner minimises, in its simulated pilots: the mean wait before a prompt starts "
                   "(wait, the default) or the mean time until the whole answer (response: shorter answers "
                   "where the two disagree, docs/evaluation.md); the elected planner's own option applies, so "
                   "give every node the same")
    n.add_argument("--threads", type=int, help="onnxruntime threads (default: all cores)")
    n.add_argument("--kv-dtype", choices=["fp32", "fp16"], help="dtype of this node's KV cache (default: the "
                   "model's, fp32 unless exported otherwise); every node of a mesh must use the same one")
    from meshllm.cli.gateway import parse_host_port

    n.add_argument("--gateway", type=parse_host_port, metavar="HOST:PORT",
                   help="also serve the OpenAI-compatible HTTP gateway and the mesh page here "
                   "(API key from MESHLLM_API_KEY)")
    n.add_argument("--join", metavar="TOKEN", help="join a closed mesh with the invite token that `meshllm invite` "
                   "prints on one of its devices (stored, so later starts need nothing)")
    n.add_argument("--secret-file", help="file holding the mesh secret (or set MESHLLM_SECRET): data-plane "
                   "peers must prove they hold it before any frame is accepted, the embedded broker requires "
                   "the node or app login derived from it, and mDNS records not signed with it are ignored. "
                   "Default: the secret stored for --mesh on this device, or a new one for a new mesh")
    n.add_argument("--open", action="store_true", help="run the mesh WITHOUT a secret: anyone on the LAN may "
                   "read prompts and replies, submit requests and publish plans (trusted, isolated networks only)")
    n.add_argument("--quick-profile", action="store_true", help="shorter, less accurate capability measurement")
    fd = n.add_argument_group("failure detection (give every node of a mesh the same values)")
    fd.add_argument("--heartbeat", type=float, default=0.5, metavar="S", help="seconds between heartbeats (0.5)")
    fd.add_argument("--failure-timeout", type=float, default=1.5, metavar="S",
                    help="a member silent this long is declared lost and its requests move to other replicas "
                    "(1.5; at least twice --heartbeat). Raise it where devices stall now and then (Wi-Fi, "
                    "SD-card writes, swapping): each false alarm costs a new plan and resumed requests")
    em = n.add_argument_group("emulation (pretend to be a slower device; for demos and tests)")
    em.add_argument("--emulate-compute-scale", type=float, default=1.0, metavar="X",
                    help="behave X times slower in compute and memory bandwidth")
    em.add_argument("--emulate-timing", choices=("scale", "model"), default="scale",
                    help="scale: each stage run is followed by a sleep of (X-1) times its measured time; model: "
                    "each run lasts what the planner's cost model predicts for the emulated profile, so that "
                    "host noise is not magnified (sim-to-real comparisons)")
    em.add_argument("--emulate-memory", type=_size, metavar="SIZE", help="cap usable memory, e.g. 512M")
    em.add_argument("--emulate-device", metavar="JSON", help="announce exactly these figures instead of measuring, "
                    "e.g. '{\"flops\": 2e10, \"mem_bandwidth_Bps\": 3e8, \"mem_bytes\": 12e6}' (the demo pins "
                    "its devices so that host noise cannot change its plan)")
    em.add_argument("--emulate-link-delay-ms", type=float, default=0.0, metavar="MS",
                    help="add one-way delay to this node's data-plane replies")
    n.set_defaults(func=cmd_node)
