"""``meshllm demo``: a whole mesh on this machine, offline, on the bundled model.

Starts an embedded broker and N ``meshllm node`` processes on loopback, each
announcing a pinned, emulated device (``--emulate-device``: figures scaled to
the 16 MB bundled model, so that host noise cannot change the plan's shape, and
``--emulate-timing model``, so that each stage runs as fast as the device it
plays). No device can hold the model alone, and half of them compute fast but
read memory slowly, the other half the reverse: the planner therefore makes
pipelines, and gives the prompts (compute-bound) to the first kind and the
generation (memory-bound) to the second. The demo shows progress while the
nodes start, meet, plan and load, prints the plan and why, streams a few
prompts with their timings and KV hand-off, and (``--serve``) keeps the mesh up
behind the OpenAI gateway until Ctrl-C. It stops every process it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from meshllm.errors import MeshError
from meshllm.mesh.access import app_login, with_login
from meshllm.mesh.broker import EmbeddedBroker
from meshllm.plan.plan import PublishedPlan, Role
from meshllm.secret import SECRET_ENV, generate_secret


@dataclass(frozen=True)
class DemoDevice:
    """An emulated device, pinned: what the node announces instead of measuring itself."""

    name: str
    about: str
    flops: float  # FLOP/s: how fast it runs a prompt (compute-bound)
    mem_bandwidth_Bps: float  # bytes/s: how fast it generates (each token reads every weight)
    mem_bytes: int  # memory it offers meshllm

    def spec(self) -> str:
        return json.dumps({"flops": self.flops, "mem_bandwidth_Bps": self.mem_bandwidth_Bps,
                           "mem_bytes": self.mem_bytes, "device_class": f"demo-{self.name.split('-')[0]}"})


# Scaled to the bundled model (16 MB of weights): 12 MB each, so no device holds it alone; two kinds, one fast
# at prompts and slow at generating, the other the reverse, so that PREFILL and DECODE roles pay off.
DEVICES = [
    DemoDevice("compute-a", "fast cores, narrow memory bus", 20e9, 0.3e9, 12_000_000),
    DemoDevice("compute-b", "fast cores, narrow memory bus", 20e9, 0.3e9, 12_000_000),
    DemoDevice("memory-a", "slow cores, wide memory bus", 2e9, 3e9, 12_000_000),
    DemoDevice("memory-b", "slow cores, wide memory bus", 2e9, 3e9, 12_000_000),
]
# The demand the planner sizes the mesh for: more than any plan without roles sustains (see `meshllm plan
# --compare` and docs/planner.md), so the roles are chosen because they win, not forced.
DEMO_WORKLOAD = "in=128,out=32,rate=8"
PROMPTS = ["It is a truth universally acknowledged, that", "Mr. Darcy looked at", "She was"]
STILL_WAITING_S = 1.5  # never silent longer than this while the mesh forms


def bundled_model() -> Path:
    """The model that ships with meshllm: package data (``meshllm.models``) in a wheel or an editable install,
    the repository's ``models/`` when run from a checkout."""
    places: list[Path] = []
    spec = importlib.util.find_spec("meshllm.models")
    if spec is not None and spec.submodule_search_locations:
        places += [Path(p) for p in spec.submodule_search_locations]
    places.append(Path(__file__).resolve().parent.parent / "models")
    for here in places:
        found = sorted(p.parent for p in here.glob("*/manifest.json"))
        if found:
            return found[0]
    raise MeshError(f"no bundled model under {' or '.join(map(str, places))}; pass --model DIR (see `meshllm export`)")


def _process_age() -> float:
    """Seconds since this process started (Linux; elsewhere since this call), so that the time to the first
    token counts the interpreter's start and the imports, as a newcomer waits for them."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            return float(f.read().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def render_plan(published: PublishedPlan) -> str:
    plan = published.plan
    lines = [f"plan v{plan.version} ({plan.method}), {len(plan.replicas)} replica(s)"
             + (f", idle: {', '.join(plan.idle)}" if plan.idle else "")]
    for r in plan.replicas:
        stages = "  ->  ".join(f"{s.node_id}[{s.start}-{s.stop - 1}]" for s in r.stages)
        lines.append(f"  replica {r.id} {r.role.value.upper():<8} {stages}")
    m = plan.metrics
    if published.predicted and math.isfinite(m.mean_wait_s):
        lines.append(f"  predicted mean wait {m.mean_wait_s:.2f} s at {m.rate:g} req/s")
    return "\n".join(lines)


def explain_plan(published: PublishedPlan, profiles: dict[str, dict[str, Any]], weight_bytes: float,
                 baseline: tuple[str, float] | None = None) -> str:
    """Why the planner chose this plan, in a few lines: memory, roles, idle devices, the predicted figures."""
    plan, lines = published.plan, ["why this plan:"]
    biggest = max((float(p.get("mem_bytes", 0)) for p in profiles.values()), default=0.0)
    if any(len(r.stages) > 1 for r in plan.replicas):
        lines.append(f"  no device holds the model ({_mb(weight_bytes)} of weights, {_mb(biggest)} at most each): "
                     "each replica is a pipeline")
    for r in plan.replicas:
        fig = [profiles.get(s.node_id, {}) for s in r.stages]
        flops = min(float(p.get("flops", 0)) for p in fig) / 1e9
        bw = min(float(p.get("mem_bandwidth_Bps", 0)) for p in fig) / 1e9
        holds = ", ".join(f"{s.node_id} layers {s.start}-{s.stop - 1}" for s in r.stages)
        why = {Role.PREFILL: f"prompts are compute-bound: {flops:g} GFLOP/s each",
               Role.DECODE: f"each token reads every weight: {bw:g} GB/s each",
               Role.MIXED: "prompts and answers"}[r.role]
        lines.append(f"  {r.role.value.upper():<8} replica {r.id}: {holds} ({why})")
    for node in plan.idle:
        mem = float(profiles.get(node, {}).get("mem_bytes", 0))
        reason = (f"it cannot hold the model alone ({_mb(mem)}), and the plan is predicted faster without it "
                  "in a pipeline" if mem < weight_bytes else "the plan is predicted faster without it")
        lines.append(f"  idle     {node}: {reason}")
    m, w = plan.metrics, plan.workload
    if published.predicted:
        lines.append(f"  demand {w.rate:g} req/s ({w.input.mean:.0f}-token prompts, {w.output.mean:.0f}-token "
                     f"answers): this plan sustains {m.sustainable_rate:.1f} req/s"
                     + (f", {baseline[0]} {baseline[1]:.1f} req/s" if baseline else ""))
    return "\n".join(lines)


def handoff_text(published: PublishedPlan, prefill: Any, decode: Any) -> str:
    """Where a request's KV cache went: each PREFILL stage sends its layers to the DECODE stages holding them."""
    replicas = {r.id: r for r in published.plan.replicas}
    p, d = replicas.get(prefill), replicas.get(decode)
    if p is None or d is None or p.id == d.id:
        return f"no KV hand-off (replica {prefill} ran prompt and answer)"
    moves = []
    for a in p.stages:
        for b in d.stages:
            lo, hi = max(a.start, b.start), min(a.stop, b.stop)
            if lo < hi:
                moves.append(f"{a.node_id} -> {b.node_id} (layers {lo}-{hi - 1})")
    return "KV hand-off " + ", ".join(moves)


def baseline_without_roles(members: dict[str, dict[str, Any]], model: Path, workload: str) -> tuple[str, float] | None:
    """The best plan without PREFILL/DECODE roles for the same devices (the dp-only baseline), for comparison."""
    from meshllm.model.manifest import load_manifest
    from meshllm.plan.cost import ModelCosts
    from meshllm.plan.planner import plan_with, system_model
    from meshllm.plan.system import PlanOptions
    from meshllm.plan.workload import Workload
    from meshllm.profile import DeviceProfile

    devices = [DeviceProfile.from_json(m["profile"]) for m in members.values() if isinstance(m.get("profile"), dict)]
    if not devices:
        return None
    manifest = load_manifest(model)
    sm = system_model(devices, ModelCosts.from_manifest(manifest), Workload.parse(workload), PlanOptions())
    other = plan_with(sm, "dp-only")
    shape = " + ".join(f"{len(r.stages)}-stage MIXED" for r in other.replicas)
    return f"the best plan without roles ({shape})", other.metrics.sustainable_rate


def _parent_death_signal() -> Callable[[], None] | None:
    """Linux: a function for the child to run before exec, so that the node gets SIGTERM if the demo dies and
    none is left behind. Resolved here, in the parent: after fork the child may only call it."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class _Nodes:
    """The demo's node processes: started in their own session (Ctrl-C reaches the demo, which stops them in
    order), tied to the demo's life, and always stopped."""

    def __init__(self, n: int, model: Path, log_dir: Path, workload: str) -> None:
        self.n, self.model, self.log_dir, self.workload = n, model, log_dir, workload
        self.mesh = f"demo-{secrets.token_hex(3)}"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ids: list[str] = []

    def start(self, broker: str, secret: str) -> None:
        on_fork = _parent_death_signal()
        for i in range(self.n):
            dev = DEVICES[i % len(DEVICES)]
            node_id = f"{i + 1}-{dev.name}"
            cmd = [sys.executable, "-m", "meshllm", "node", "--mesh", self.mesh, "--broker", broker,
                   "--interface", "127.0.0.1", "--node-id", node_id, "--name", dev.name, "--model", str(self.model),
                   "--threads", "1", "--emulate-device", dev.spec(), "--emulate-timing", "model",
                   "--workload", self.workload]
            env = {**os.environ, SECRET_ENV: secret}  # a closed mesh like any other; the secret never goes to disk
            with open(self.log_dir / f"{node_id}.log", "wb") as log:
                self.procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                   stderr=log, env=env, start_new_session=True,
                                                   preexec_fn=on_fork))
            self.ids.append(node_id)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def check_alive(self) -> None:
        for node_id, p in zip(self.ids, self.procs, strict=True):
            if p.poll() is not None:
                tail = (self.log_dir / f"{node_id}.log").read_text(errors="replace").strip().splitlines()[-1:]
                raise MeshError(f"node {node_id} exited early (status {p.returncode}): {tail[0] if tail else ''}")


class _Progress:
    """Timestamped progress lines; a 'still waiting' line whenever nothing was said for a while."""

    def __init__(self, out: TextIO, t0: float) -> None:
        self.out, self.t0, self.last = out, t0, time.monotonic()

    def say(self, text: str) -> None:
        print(f"  [{time.monotonic() - self.t0:4.1f} s] {text}", file=self.out, flush=True)
        self.last = time.monotonic()

    def quiet_for(self) -> float:
        return time.monotonic() - self.last


async def _wait_ready(nodes: _Nodes, broker: str, timeout: float, progress: _Progress) -> Any:
    """Follows the mesh's retained state until every replica of the plan reports its layers loaded."""
    import aiomqtt

    from meshllm.gateway.meshview import MeshView
    from meshllm.mesh.broker import BrokerURL
    from meshllm.mesh.topics import Topics

    view, topics = MeshView(nodes.mesh), Topics(nodes.mesh)
    said: set[str] = set()
    deadline = time.monotonic() + timeout
    async with aiomqtt.Client(**BrokerURL.parse(broker).client_kwargs(), identifier=f"demo-{secrets.token_hex(3)}") \
            as client:
        for t in (topics.members, topics.planner, topics.plan, f"{topics.root}/ready/+"):
            await client.subscribe(t, qos=1)
        messages = aiter(client.messages)
        while time.monotonic() < deadline:
            nodes.check_alive()
            with contextlib.suppress(asyncio.TimeoutError):
                msg = await asyncio.wait_for(anext(messages), 0.25)
                payload = msg.payload if isinstance(msg.payload, (bytes, bytearray)) else b""
                view.apply(str(msg.topic), bytes(payload), time.monotonic())
            _report(view, nodes, said, progress)
            plan = view.plan
            if plan is not None and len(view.members) == nodes.n and plan.plan.replicas \
                    and all(view.replica_ready(r) for r in plan.plan.replicas):
                return view
            if progress.quiet_for() > STILL_WAITING_S:
                progress.say(_pending(view, nodes))
    raise MeshError(f"the mesh was not ready within {timeout:.0f} s; node logs in {nodes.log_dir}")


def _report(view: Any, nodes: _Nodes, said: set[str], progress: _Progress) -> None:
    for node_id in sorted(view.members):
        if f"m:{node_id}" not in said:
            said.add(f"m:{node_id}")
            p = view.members[node_id].get("profile", {})
            progress.say(f"{node_id} joined ({float(p.get('flops', 0)) / 1e9:g} GFLOP/s, "
                         f"{float(p.get('mem_bandwidth_Bps', 0)) / 1e9:g} GB/s, {_mb(float(p.get('mem_bytes', 0)))}"
                         " for layers, emulated)")
    if view.planner and f"p:{view.planner}:{view.term}" not in said:
        said.add(f"p:{view.planner}:{view.term}")
        progress.say(f"{view.planner} was elected planner (term {view.term})")
    if view.plan is not None and f"v:{view.plan.version}" not in said:
        said.add(f"v:{view.plan.version}")
        r = view.plan.plan.replicas
        progress.say(f"plan v{view.plan.version} published: {len(r)} replica(s); nodes are loading their layers")
    for node_id, rec in sorted(view.ready.items()):
        key = f"r:{node_id}:{rec.get('pv')}"
        if view.plan is not None and rec.get("pv") == view.plan.version and key not in said:
            said.add(key)
            stage = next((s for r in view.plan.plan.replicas for s in r.stages if s.node_id == node_id), None)
            if stage is not None:
                progress.say(f"{node_id} loaded layers {stage.start}-{stage.stop - 1} ({rec.get('role', '?')} "
                             f"replica {rec.get('r')})")


def _pending(view: Any, nodes: _Nodes) -> str:
    if len(view.members) < nodes.n:
        return (f"waiting for nodes to start and join: {len(view.members)} of {nodes.n} "
                "(Python and meshllm importing)")
    if view.plan is None:
        return "waiting for the planner to publish a plan"
    loading = sorted({s.node_id for r in view.plan.plan.replicas for s in r.stages
                      if view.ready.get(s.node_id, {}).get("pv") != view.plan.version})
    return f"waiting for {', '.join(loading) or 'the replicas'} to load their layers"


async def run_demo(n: int, model: Path | None, prompts: list[str], max_tokens: int, out: TextIO = sys.stdout,
                   timeout: float = 120.0, workload: str = DEMO_WORKLOAD, serve: tuple[str, int] | None = None,
                   ) -> list[dict[str, Any]]:
    """The demo; with ``serve=(host, port)`` it then serves the gateway until SIGINT/SIGTERM."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    stopping: list[str] = []

    def on_signal(name: str) -> None:
        if not stopping:  # once: the clean-up that follows is bounded and must not be cut short by a second Ctrl-C
            task.cancel()
        stopping.append(name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig.name)
    try:
        return await _run(n, model, prompts, max_tokens, out, timeout, workload, serve)
    except asyncio.CancelledError:
        if not stopping:
            raise
        return []
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _run(n: int, model: Path | None, prompts: list[str], max_tokens: int, out: TextIO, timeout: float,
               workload: str, serve: tuple[str, int] | None) -> list[dict[str, Any]]:
    from meshllm.model.manifest import load_manifest
    from meshllm.serve.client import Client

    t0 = time.monotonic()
    launched = t0 - _process_age()  # when `meshllm demo` started
    if serve is not None and serve[1]:
        _check_port_free(*serve)  # now, not after a minute of demo
    model = model or bundled_model()
    manifest = load_manifest(model)
    weights = sum(p.cost.runtime_weight_bytes for p in manifest.parts)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="meshllm-demo-") as tmp:
        nodes = _Nodes(n, model, Path(tmp), workload)
        secret = generate_secret()
        async with EmbeddedBroker("127.0.0.1", secret=secret) as broker:
            observer = with_login(broker.url, app_login(secret))
            print(f"meshllm demo: {n} emulated devices on loopback, model {manifest.name} ({_mb(weights)} of weights, "
                  f"{manifest.config.n_layers} layers), mesh {nodes.mesh}", file=out)
            for i in range(n):
                d = DEVICES[i % len(DEVICES)]
                print(f"  {i + 1}-{d.name:<10} {d.about}: {d.flops / 1e9:g} GFLOP/s, "
                      f"{d.mem_bandwidth_Bps / 1e9:g} GB/s, {_mb(d.mem_bytes)} for meshllm", file=out)
            print(f"  (figures pinned and scaled to this tiny model; the planner plans for {workload})", file=out,
                  flush=True)
            progress = _Progress(out, t0)
            try:
                nodes.start(broker.url, secret)
                progress.say(f"started {n} node processes")
                view = await _wait_ready(nodes, observer, timeout, progress)
                plan = view.plan
                profiles = {k: v.get("profile", {}) for k, v in view.members.items()}
                print(f"mesh ready in {time.monotonic() - t0:.1f} s\n\n{render_plan(plan)}", file=out)
                base = baseline_without_roles(view.members, model, workload) \
                    if any(r.role is not Role.MIXED for r in plan.plan.replicas) else None
                print(explain_plan(plan, profiles, weights, base) + "\n", file=out, flush=True)
                async with Client(mesh=nodes.mesh, broker=broker.url, login=app_login(secret)) as client:
                    for i, prompt in enumerate(prompts):
                        results.append(await _ask(client, prompt, max_tokens, plan, out,
                                                  launched if i == 0 else None))
                if serve is not None:
                    await _serve(nodes.mesh, broker.url, app_login(secret), model, manifest.name, serve, out,
                                 observer)
            finally:
                nodes.stop()
                print("all nodes stopped", file=out, flush=True)
    return results


async def _ask(client: Any, prompt: str, max_tokens: int, plan: PublishedPlan, out: TextIO,
               started: float | None) -> dict[str, Any]:
    out.write(prompt)
    final, first_at = None, None
    async for chunk in client.stream(prompt, max_tokens=max_tokens, temperature=0.8, top_p=0.95, seed=1):
        if first_at is None and chunk.text:
            first_at = time.monotonic()
        out.write(chunk.text)
        out.flush()
        final = chunk
    if final is None or final.timings is None or final.usage is None:
        raise MeshError("the mesh ended an answer without its timings")
    t = final.timings
    rep = t.get("replicas") or {}
    since = f"; first token {first_at - started:.1f} s after `meshllm demo` started" \
        if started is not None and first_at is not None else ""
    print(f"\n  [{final.usage.completion_tokens} tokens, first token {t['ttft_s'] * 1e3:.0f} ms, "
          f"{t['tokens_per_s']:.1f} tokens/s; prefill replica {rep.get('prefill')}, decode replica "
          f"{rep.get('decode')}{since}]\n  [{handoff_text(plan, rep.get('prefill'), rep.get('decode'))}]\n",
          file=out, flush=True)
    return {"prompt": prompt, "timings": t, "tokens": final.usage.completion_tokens}


async def _serve(mesh: str, broker: str, login: tuple[str, str], model: Path, name: str, where: tuple[str, int],
                 out: TextIO, app_url: str) -> None:
    """The gateway in front of the demo's mesh until cancelled (Ctrl-C)."""
    from meshllm.gateway.app import GatewayConfig, serve_gateway

    config = GatewayConfig(mesh=mesh, broker=broker, login=login, model_dir=str(model))
    await serve_gateway(config, *where, started=lambda url: print(_serve_text(url, name, mesh, app_url), file=out,
                                                                  flush=True))


def _serve_text(url: str, model: str, mesh: str, app_url: str) -> str:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Tell me about Mr. Darcy."}],
                       "max_tokens": 48})
    py = (f"from openai import OpenAI; c = OpenAI(base_url='{url}/v1', api_key='none'); "
          f"print(c.chat.completions.create(model='{model}', max_tokens=48, messages=[{{'role': 'user', "
          "'content': 'Tell me about Mr. Darcy.'}]).choices[0].message.content)")
    return "\n".join([
        f"serving the mesh: the page {url}/ , the OpenAI API {url}/v1 (Ctrl-C stops everything)",
        "",
        f"  curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' \\",
        f"    -d '{body}'",
        "",
        f"  python -c \"{py}\"",
        "",
        f"  meshllm ask --mesh {mesh} --broker {app_url} --chat 'Who is Emma?'",
        f"  meshllm status --mesh {mesh} --broker {app_url}",
        "",
    ])


def _check_port_free(host: str, port: int) -> None:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise MeshError(f"--serve: cannot listen on {host}:{port} ({e.strerror or e}); pass another port, "
                            "or 0 for any free one") from None


def serve_address(text: str) -> tuple[str, int]:
    """``--serve [PORT]``: the gateway always listens on loopback here; 0 picks a free port."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        import argparse

        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}")
    return "127.0.0.1", port

