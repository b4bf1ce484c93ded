"""``meshllm demo``: a whole mesh on this machine, offline, on the bundled model.

Starts an embedded broker and N ``meshllm node`` processes on loopback, each
emulating a different device class (slower compute, less memory: see
``--emulate-*`` in docs/mesh.md), waits while they measure themselves, find
each other and load the plan's layers, prints the plan, streams answers to a
few prompts with their timings through :class:`~meshllm.serve.client.Client`,
and shuts everything down, leaving no process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

from meshllm.errors import MeshError
from meshllm.mesh.access import app_login, with_login
from meshllm.mesh.broker import EmbeddedBroker
from meshllm.mesh.status import read_state
from meshllm.plan.plan import PublishedPlan
from meshllm.secret import SECRET_ENV, generate_secret

# name, compute slow-down, memory cap: a mini-PC, an old laptop, a Raspberry Pi 5, a Raspberry Pi 4
DEVICES = [("minipc", 1.0, None), ("laptop", 1.6, None), ("rpi5", 3.0, "2G"), ("rpi4", 5.0, "1G")]
# High demand, so that the planner forms several replicas with PREFILL and DECODE roles rather than
# one pipeline that would idle most devices (see docs/planner.md).
DEMO_WORKLOAD = "in=64,out=64,rate=60"
PROMPTS = ["It is a truth universally acknowledged, that", "Mr. Darcy looked at", "She was"]


def bundled_model() -> Path:
    here = Path(__file__).resolve().parent.parent / "models"
    found = sorted(p.parent for p in here.glob("*/manifest.json"))
    if not found:
        raise MeshError(f"no bundled model under {here}; pass --model DIR (see `meshllm export`)")
    return found[0]


def render_plan(published: PublishedPlan) -> str:
    plan = published.plan
    lines = [f"plan v{plan.version} ({plan.method}), {len(plan.replicas)} replica(s)"
             + (f", idle: {', '.join(plan.idle)}" if plan.idle else "")]
    for r in plan.replicas:
        stages = "  ->  ".join(f"{s.node_id}[{s.start}-{s.stop - 1}]" for s in r.stages)
        lines.append(f"  replica {r.id} {r.role.value.upper():<8} {stages}")
    m = plan.metrics
    if published.predicted and math.isfinite(m.mean_wait_s):
        lines.append(f"  predicted mean wait {m.mean_wait_s:.2f} s at {m.rate:.2f} req/s")
    return "\n".join(lines)


class _Mesh:
    def __init__(self, n: int, model: Path, log_dir: Path, out: TextIO, workload: str) -> None:
        self.n, self.model, self.log_dir, self.out = n, model, log_dir, out
        self.workload = workload
        self.mesh = f"demo-{secrets.token_hex(3)}"
        self.procs: list[subprocess.Popen[str]] = []

    def start_nodes(self, broker: str, secret: str) -> None:
        for i in range(self.n):
            name, scale, mem = DEVICES[i % len(DEVICES)]
            node_id = f"{i + 1}-{name}"
            cmd = [sys.executable, "-m", "meshllm", "node", "--mesh", self.mesh, "--broker", broker,
                   "--interface", "127.0.0.1", "--node-id", node_id, "--name", name, "--model", str(self.model),
                   "--quick-profile", "--threads", "1", "--emulate-compute-scale", str(scale),
                   "--workload", self.workload]
            if mem:
                cmd += ["--emulate-memory", mem]
            log = open(self.log_dir / f"{node_id}.log", "w")
            # a closed mesh like any other: the secret travels in the environment, never to disk
            env = {**os.environ, SECRET_ENV: secret}
            self.procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True, env=env))
            print(f"  started {node_id:<10} (emulating {name}: {scale:g}x slower"
                  + (f", {mem} memory)" if mem else ")"), file=self.out, flush=True)

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
        for p in self.procs:
            if p.poll() is not None:
                raise MeshError(f"a node exited early (status {p.returncode}); logs in {self.log_dir}")


async def _wait_ready(m: _Mesh, broker: str, timeout: float) -> PublishedPlan:
    from meshllm.serve.client import Client  # noqa: F401  (import errors surface before waiting)

    deadline = time.monotonic() + timeout
    shown: set[str] = set()
    while time.monotonic() < deadline:
        m.check_alive()
        st = await read_state(m.mesh, broker, quiet_s=0.3)
        for node_id in sorted(set(st["members"]) - shown):
            print(f"  {node_id} joined the mesh", file=m.out, flush=True)
            shown.add(node_id)
        plan = PublishedPlan.decode(st["plan"]) if st["plan"] else None  # a malformed plan: PlanError, one line
        if plan is not None and len(st["members"]) == m.n:
            ready = await _ready_nodes(broker, m.mesh, plan.version)
            if plan.stage_nodes <= ready:
                return plan
        await asyncio.sleep(0.3)
    raise MeshError(f"the mesh was not ready within {timeout:.0f} s; logs in {m.log_dir}")


async def _ready_nodes(broker: str, mesh: str, version: int) -> set[str]:
    import aiomqtt

    from meshllm.mesh.broker import BrokerURL

    out = set()
    async with aiomqtt.Client(**BrokerURL.parse(broker).client_kwargs()) as c:
        await c.subscribe(f"meshllm/v1/{mesh}/ready/+", qos=1)
        with contextlib.suppress(asyncio.TimeoutError):
            while True:
                msg = await asyncio.wait_for(anext(aiter(c.messages)), 0.3)
                if isinstance(msg.payload, bytes) and msg.payload:
                    if json.loads(msg.payload).get("pv") == version:
                        out.add(str(msg.topic).rsplit("/", 1)[-1])
    return out


async def run_demo(n: int, model: Path | None, prompts: list[str], max_tokens: int, out: TextIO = sys.stdout,
                   timeout: float = 120.0, workload: str = DEMO_WORKLOAD) -> list[dict[str, Any]]:
    from meshllm.serve.client import Client

    model = model or bundled_model()
    results = []
    with tempfile.TemporaryDirectory(prefix="meshllm-demo-") as tmp:
        m = _Mesh(n, model, Path(tmp), out, workload)
        secret = generate_secret()
        async with EmbeddedBroker("127.0.0.1", secret=secret) as broker:
            observer = with_login(broker.url, app_login(secret))
            print(f"meshllm demo: {n} nodes on loopback, model {model.name}, broker {broker.url}", file=out)
            try:
                m.start_nodes(broker.url, secret)
                print("waiting for the nodes to measure themselves, meet, plan and load their layers...",
                      file=out, flush=True)
                t0 = time.monotonic()
                plan = await _wait_ready(m, observer, timeout)
                print(f"mesh ready in {time.monotonic() - t0:.1f} s\n{render_plan(plan)}\n", file=out, flush=True)
                async with Client(mesh=m.mesh, broker=broker.url, login=app_login(secret)) as client:
                    for prompt in prompts:
                        out.write(prompt)
                        final = None
                        async for chunk in client.stream(prompt, max_tokens=max_tokens, temperature=0.8,
                                                         top_p=0.95, seed=1):
                            out.write(chunk.text)
                            out.flush()
                            final = chunk
                        assert final is not None and final.timings is not None and final.usage is not None
                        t = final.timings
                        print(f"\n  [{final.usage.completion_tokens} tokens, first token {t['ttft_s'] * 1e3:.0f} ms, "
                              f"{t['tokens_per_s']:.1f} tokens/s, prefill replica {t['replicas']['prefill']}, "
                              f"decode replica {t['replicas']['decode']}]\n", file=out, flush=True)
                        results.append({"prompt": prompt, "timings": t, "tokens": final.usage.completion_tokens})
            finally:
                m.stop()
                print("all nodes stopped", file=out)
    return results
