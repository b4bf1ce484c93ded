"""The ``meshllm`` command line. Parses arguments, calls the library, prints.

Errors that meshllm raises on purpose (:class:`~meshllm.errors.MeshError`) are
printed as one line and exit with status 2; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from meshllm.cli_common import LOGIN_ENV, add_login_option, broker_login, quiet_lost_mqtt_futures, run_async
from meshllm.errors import MeshError

__all__ = ["LOGIN_ENV", "add_login_option", "broker_login", "build_parser", "main", "quiet_lost_mqtt_futures",
           "run_async"]  # the shared helpers stay importable from here (tools use meshllm.cli.run_async)


def _int_list(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {s!r}") from None


def cmd_export(args: argparse.Namespace) -> int:
    from meshllm.model.export import export

    m = export(args.checkpoint, args.out, tokenizer=args.tokenizer, dtype=args.dtype,
               max_seq_len=args.max_seq_len, overwrite=args.overwrite, name=args.name,
               block_size=args.block_size, accuracy_level=args.accuracy_level, kv_dtype=args.kv_dtype)
    size = sum(f.size for f in m.files.values())
    c = m.config
    print(f"exported {m.name}: {c.arch}, {c.n_layers} layers, dim {c.dim}, heads {c.n_heads}/{c.n_kv_heads}, "
          f"vocab {c.vocab_size}, context {c.max_seq_len}, {_dtype_text(m)}, {size / 1e6:.1f} MB -> {args.out}")
    return 0


def _dtype_text(m: Any) -> str:
    qz = m.quantization
    if not qz:
        return str(m.dtype)
    return f"{m.dtype} (block {qz['block_size']}, accuracy level {qz['accuracy_level']})"


def cmd_quantize(args: argparse.Namespace) -> int:
    from meshllm.model.export import quantize_model_dir

    m = quantize_model_dir(args.model_dir, args.out, dtype=args.dtype, block_size=args.block_size,
                           accuracy_level=args.accuracy_level, overwrite=args.overwrite, kv_dtype=args.kv_dtype)
    size = sum(f.size for f in m.files.values())
    held = sum(int(p.runtime_bytes or 0) for p in m.parts)
    print(f"quantized {m.name}: {_dtype_text(m)}, {size / 1e6:.1f} MB of files, {held / 1e6:.1f} MB of weights "
          f"at run time -> {args.out}")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from meshllm.model.pull import pull

    m, out = pull(args.model_id, args.out, dtype=args.dtype, revision=args.revision,
                  max_seq_len=args.max_seq_len, overwrite=args.overwrite, block_size=args.block_size,
                  accuracy_level=args.accuracy_level)
    size = sum(f.size for f in m.files.values())
    print(f"pulled {args.model_id}: {m.config.n_layers} layers, {_dtype_text(m)}, {size / 1e6:.0f} MB -> {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from meshllm.runtime.generate import LocalModel
    from meshllm.runtime.sampling import SamplingParams

    given = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_k": args.top_k,
             "top_p": args.top_p, "seed": args.seed, "stop": tuple(args.stop or ())}
    params = SamplingParams(**{k: v for k, v in given.items() if v is not None})  # else the mesh's defaults
    model = LocalModel(args.model, split=args.split or (), threads=args.threads, kv_dtype=args.kv_dtype)
    if args.json:
        print(json.dumps(model.generate(args.prompt, params).to_json()))
        return 0
    for text, _ in model.stream(args.prompt, params):
        sys.stdout.write(text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


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
        emulation=Emulation(args.emulate_compute_scale, args.emulate_memory, args.emulate_link_delay_ms / 1e3,
                            args.emulate_timing),
        quick_profile=args.quick_profile, profile=pinned,
    )
    if args.gateway:
        import os

        from meshllm.gateway.cli import check_exposure

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


def _secret_given(args: argparse.Namespace) -> str | None:
    """The secret from ``--secret-file`` or ``$MESHLLM_SECRET``, checked; None if neither is given."""
    import os

    from meshllm.secret import SECRET_ENV, check_secret, read_secret_file

    if getattr(args, "secret_file", None):
        return read_secret_file(args.secret_file)
    if SECRET_ENV in os.environ:
        return check_secret(os.environ[SECRET_ENV], f"${SECRET_ENV}")
    return None


def _known_secret(args: argparse.Namespace) -> str | None:
    """A given secret, else the one this device stored for ``--mesh`` (it created or joined it)."""
    from meshllm.secret import load_stored_secret

    given = _secret_given(args)
    return given if given is not None else load_stored_secret(getattr(args, "mesh", None) or "meshllm")


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
    known = _known_secret(args)
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

    secret = _secret_given(args)
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

    secret = _known_secret(args)
    if secret is None:
        raise MeshError(f"no secret for mesh {args.mesh!r} on this device: pass --secret-file FILE, set "
                        "MESHLLM_SECRET, or run this where the mesh's first node runs")
    user, password = (node_login if args.node else app_login)(secret)
    print(f"{user}:{password}")
    return 0


def cmd_invite(args: argparse.Namespace) -> int:
    from meshllm.secret import invite_token

    secret = _known_secret(args)
    if secret is None:
        raise MeshError(f"this device holds no secret for mesh {args.mesh!r}: start `meshllm node --mesh "
                        f"{args.mesh}` here first (it creates one), or pass --secret-file")
    print(f"meshllm node --join {invite_token(args.mesh, secret)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from meshllm.demo import PROMPTS, run_demo

    run_async(run_demo(args.nodes, Path(args.model) if args.model else None, args.prompt or PROMPTS,
                       args.max_tokens, timeout=args.timeout, workload=args.workload, serve=args.serve))
    return 0


def _mesh_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mesh", default="meshllm", help="mesh name (nodes with the same name form one mesh)")
    p.add_argument("--broker", help="MQTT broker URL, mqtt://[user:pass@]host:port or mqtts://... "
                   "(default: find one on the LAN over mDNS, or host one)")
    p.add_argument("--broker-ca", help="CA certificate file for mqtts:// brokers")
    p.add_argument("--interface", help="IPv4 address of the interface for mDNS and the data plane "
                   "(default: this machine's LAN address)")


def _dtype_options(p: argparse.ArgumentParser, quantized_only: bool = False) -> None:
    # no argparse choices: the library checks the value and fails with one line
    if quantized_only:
        p.add_argument("--dtype", required=True, metavar="{int4,int8}", help="weight type")
    else:
        p.add_argument("--dtype", default="fp32", metavar="{fp32,fp16,int4,int8}",
                       help="weight storage type (int4/int8: block-quantized, see docs/inference.md)")
    p.add_argument("--block-size", type=int, help="int4/int8: weights per quantization block, a power of two "
                   ">= 16 dividing every weight's rows (default 64 where it divides them, else 32)")
    p.add_argument("--accuracy-level", type=int, help="int4/int8: 4 = int8 activations, the fast CPU kernels "
                   "(default); 1 = float32 compute")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshllm", description="Serve an LLM on a mesh of small devices.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("export", help="turn a llama2.c or Hugging Face checkpoint into a meshllm model directory")
    e.add_argument("checkpoint", help="llama2.c .bin file or Hugging Face model directory")
    e.add_argument("out", help="output model directory")
    e.add_argument("--tokenizer", help="tokenizer file (llama2.c tokenizer.bin, or tokenizer.json)")
    _dtype_options(e)
    e.add_argument("--max-seq-len", type=int, help="cap the context length (default: the checkpoint's)")
    e.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    e.add_argument("--name", help="model name recorded in the manifest (default: the checkpoint's name)")
    e.add_argument("--kv-dtype", choices=["fp32", "fp16"], help="the model's default KV cache dtype (fp16: half "
                   "the memory per sequence and half the bytes per KV hand-off; a node may override it)")
    e.set_defaults(func=cmd_export)

    pu = sub.add_parser("pull", help="download a Hugging Face checkpoint (online devices) and export it")
    pu.add_argument("model_id", help="e.g. HuggingFaceTB/SmolLM2-135M-Instruct (see README for known models)")
    pu.add_argument("--out", help="model directory to write (default: models/<name>-<dtype>)")
    _dtype_options(pu)
    pu.add_argument("--revision", help="branch, tag or commit on the hub")
    pu.add_argument("--max-seq-len", type=int, help="cap the context length (KV memory grows with it)")
    pu.add_argument("--overwrite", action="store_true")
    pu.set_defaults(func=cmd_pull)

    qz = sub.add_parser("quantize", help="make an int4 or int8 copy of an exported fp32/fp16 model directory")
    qz.add_argument("model_dir", help="meshllm model directory (fp32 or fp16)")
    qz.add_argument("out", help="output model directory")
    _dtype_options(qz, quantized_only=True)
    qz.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    qz.add_argument("--kv-dtype", choices=["fp32", "fp16"], help="the model's default KV cache dtype (fp16: half "
                   "the memory per sequence and half the bytes per KV hand-off; a node may override it)")
    qz.set_defaults(func=cmd_quantize)

    g = sub.add_parser("generate", help="generate text from a prompt in this process")
    g.add_argument("prompt")
    g.add_argument("--model", required=True, help="meshllm model directory")
    from meshllm.runtime.sampling import DEFAULT_SAMPLING as ds

    # no defaults here: those of SamplingParams, which the mesh applies too
    g.add_argument("--max-tokens", type=int, help=f"most tokens to generate (default: {ds.max_tokens})")
    g.add_argument("--temperature", type=float, help=f"0 = greedy (default: {ds.temperature:g})")
    g.add_argument("--top-k", type=int, help=f"keep the k most likely tokens (default: {ds.top_k} = all)")
    g.add_argument("--top-p", type=float, help=f"nucleus sampling cut (default: {ds.top_p:g})")
    g.add_argument("--seed", type=int, help="random seed, for reproducible sampling")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--split", type=_int_list, help="run as segments cut before these layers, e.g. 2,4")
    g.add_argument("--threads", type=int, help="onnxruntime threads per segment (default: all cores)")
    g.add_argument("--kv-dtype", choices=["fp32", "fp16"], help="dtype of the KV cache (default: the model's)")
    g.add_argument("--json", action="store_true", help="print one JSON object: text, token ids, timings")
    g.set_defaults(func=cmd_generate)

    n = sub.add_parser("node", help="join (or start) a mesh on this device")
    _mesh_options(n)
    n.add_argument("--name", help="human-readable node name (default: the hostname)")
    n.add_argument("--node-id", help="node id (default: NAME-<random>); the smallest id hosts the broker")
    n.add_argument("--port", type=int, default=0, help="data-plane TCP port (default: any free port)")
    n.add_argument("--model", help="meshllm model directory to serve layers from (without it the node only "
                   "takes part in membership)")
    n.add_argument("--plan-file", help="pin this plan (JSON) instead of planning; node ids must match")
    n.add_argument("--workload", help="workload the planner optimises for, e.g. in=128,out=64,rate=2 "
                   "(default: half the context in, half out, 1 request/s)")
    n.add_argument("--threads", type=int, help="onnxruntime threads (default: all cores)")
    n.add_argument("--kv-dtype", choices=["fp32", "fp16"], help="dtype of this node's KV cache (default: the "
                   "model's, fp32 unless exported otherwise); every node of a mesh must use the same one")
    from meshllm.gateway import add_gateway_parser, parse_host_port

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

    from meshllm.plan.cli import add_plan_parser
    from meshllm.serve.ask import add_ask_parser

    add_ask_parser(sub)
    add_plan_parser(sub)
    add_gateway_parser(sub)

    st = sub.add_parser("status", help="show a mesh: members, broker, planner, plan")
    _mesh_options(st)
    add_login_option(st)
    st.add_argument("--json", action="store_true")
    st.add_argument("--timeout", type=float, default=5.0, help="seconds to look for the broker")
    st.set_defaults(func=cmd_status)
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
