"""``meshllm status``: a read-only look at a mesh from outside.

Finds the broker (``--broker``, or mDNS like a node would, without
advertising anything), reads the retained state (members, planner claim,
plan) and renders it as a table or JSON. It never publishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from typing import Any

import aiomqtt

from meshllm.mesh.broker import BrokerError, BrokerURL, existing_broker, port_open
from meshllm.mesh.discovery import Discovery
from meshllm.mesh.payloads import loads_object
from meshllm.mesh.topics import Topics
from meshllm.plan.errors import PlanError
from meshllm.plan.plan import PublishedPlan


async def find_broker(mesh: str, interface: str | None, timeout: float = 5.0) -> str:
    """The mesh's broker as its nodes would choose it, found over mDNS."""
    async with Discovery(f"client-{secrets.token_hex(3)}", mesh, 0, interface=interface, advertise=False) as d:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            url = existing_broker(d.broker_ads())
            if url:
                b = BrokerURL.parse(url)
                if await port_open(b.host, b.port):
                    return url
                d.forget_broker(url)
            with contextlib.suppress(asyncio.TimeoutError):
                d.changed.clear()
                await asyncio.wait_for(d.changed.wait(), 0.25)
    raise BrokerError(f"no broker found for mesh {mesh!r} within {timeout:.0f} s "
                      f"(is a node running? pass --broker to name one)")


async def read_state(mesh: str, broker: str, *, quiet_s: float = 0.4, ca_file: str | None = None) -> dict[str, Any]:
    """Collects the retained state of the mesh from its broker."""
    topics = Topics(mesh)
    b = BrokerURL.parse(broker)
    state: dict[str, Any] = {"mesh": mesh, "broker": str(b), "members": {}, "planner": None, "term": 0, "plan": None}
    async with aiomqtt.Client(**b.client_kwargs(ca_file), identifier=f"status-{secrets.token_hex(3)}") as client:
        for t in (topics.members, topics.planner, topics.plan):
            await client.subscribe(t, qos=1)
        with contextlib.suppress(asyncio.TimeoutError):
            while True:
                msg = await asyncio.wait_for(anext(aiter(client.messages)), quiet_s)
                payload = msg.payload if isinstance(msg.payload, (bytes, bytearray)) else b""
                if not payload:
                    continue
                with contextlib.suppress(ValueError):  # a malformed record is skipped (PayloadError too)
                    data = loads_object(payload)
                    if msg.topic.matches(topics.members):
                        state["members"][topics.leaf(str(msg.topic))] = data
                    elif str(msg.topic) == topics.planner:
                        state["planner"], state["term"] = data.get("node"), data.get("term", 0)
                    elif str(msg.topic) == topics.plan:
                        state["plan"] = data
    return state


def _ms(seconds: Any) -> str:
    return f"{seconds * 1e3:.2f}" if isinstance(seconds, (int, float)) and seconds > 0 else "-"


def render(state: dict[str, Any]) -> str:
    lines = [f"mesh {state['mesh']!r} via {state['broker']}",
             f"planner: {state['planner'] or '(none)'} (term {state['term']})", ""]
    # serve ms: the serving overhead per stage run the node measured and advertises ("-" until it has served)
    head = f"{'node':<24} {'GFLOP/s':>8} {'GB/s':>6} {'mem GB':>7} {'serve ms':>8} {'data plane':<22} broker"
    lines.append(head)
    lines.append("-" * len(head))
    for node_id, m in sorted(state["members"].items()):
        p = m.get("profile", {})
        lines.append(
            f"{node_id:<24} {p.get('flops', 0) / 1e9:>8.1f} {p.get('mem_bandwidth_Bps', 0) / 1e9:>6.1f} "
            f"{p.get('mem_bytes', 0) / 1e9:>7.1f} {_ms(p.get('serving_overhead_s')):>8} "
            f"{m.get('host', '?') + ':' + str(m.get('port', '?')):<22} "
            f"{'hosts' if m.get('hosts_broker') else ''}{' (emulated)' if p.get('emulated') else ''}")
    lines.append("")
    models = sorted({(str(m.get("model_name")), str(m.get("chat_template") or "?")) for m in state["members"].values()
                     if m.get("model_name")})
    for name, template in models:
        lines.append(f"model {name}, chat template: {template}")
    if state.get("plan"):
        try:
            published = PublishedPlan.decode(state["plan"])
        except PlanError as e:
            lines.append(f"a malformed plan is published: {e}")
        else:
            lines.append(f"plan v{published.version} (term {published.term}), {len(published.plan.replicas)} "
                         "replicas")
    else:
        lines.append("no plan yet")
    return "\n".join(lines)
