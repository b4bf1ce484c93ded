"""A node loading a new plan's segment while every core is busy keeps its heartbeats, and loads it.

Real node processes, real onnxruntime, real busy processes. Segments used to load at ``SCHED_IDLE``: a thread
there that holds the GIL (building a segment is partly Python), or waits for it (CPython makes the thread that
drops the GIL wait until the waiter takes it), keeps the node's event loop from running for as long as busier
processes keep that thread off the cores. The node then went seconds without a heartbeat and was declared lost
(measured: loop stalls of 4-5 s with 4 busy processes on 2 cores; building only the onnxruntime session at
``SCHED_IDLE``, which releases the GIL, still lost a node in 3 of 7 runs of this test).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import aiomqtt
import pytest

from meshllm.mesh.broker import BrokerURL
from tests.mesh_harness import members_declared_lost, mosquitto, state
from tests.serving_harness import all_ready, random_model, replica, serving_mesh

BUSY_S = 8.0  # the busy processes end by themselves after this, whatever happens to the test


@pytest.fixture(scope="module")
def broker():
    with mosquitto() as url:
        yield url


def test_a_plan_rolls_out_with_every_core_busy_and_no_node_is_declared_lost(tmp_path: Path, broker: str) -> None:
    model = random_model(tmp_path / "m", layers=8)
    mesh = f"t-busy-{secrets.token_hex(3)}"
    v1 = {"version": 1, "n_layers": 8, "replicas": [replica(0, "mixed", [("n1", 0, 4), ("n2", 4, 8)])]}
    with serving_mesh(mesh, broker, model, ["n1", "n2"], v1, tmp_path):
        live = state(mesh, broker)["plan"]
        v2 = {"version": 2, "n_layers": 8, "term": live["term"], "planner": live["planner"], "pinned": True,
              "replicas": [replica(0, "mixed", [("n2", 0, 5), ("n1", 5, 8)])]}
        spin = f"import time\nt = time.monotonic()\nwhile time.monotonic() - t < {BUSY_S}: pass"
        busy = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(2 * (os.cpu_count() or 1))]
        try:
            cleared, took = asyncio.run(_roll_out(broker, mesh, v2))
        finally:
            for p in busy:
                p.kill()
                p.wait()
    assert not cleared, f"members declared lost while the plan loaded: {cleared}"
    assert took is not None, f"plan v2 was not loaded within 40 s ({BUSY_S:g} s of them with the cores busy)"


async def _roll_out(broker: str, mesh: str, plan: dict) -> tuple[list[str], float | None]:
    """Publishes ``plan`` and watches the member records until every stage reports it loaded (40 s at most):
    the members whose record was cleared (declared lost) meanwhile, and how long loading took."""
    async with members_declared_lost(broker, mesh) as cleared, \
            aiomqtt.Client(**BrokerURL.parse(broker).client_kwargs()) as c:
        t0 = time.monotonic()
        await c.publish(f"meshllm/v1/{mesh}/plan", json.dumps(plan), qos=1, retain=True)
        took = None
        while time.monotonic() - t0 < 40:
            if await asyncio.to_thread(all_ready, mesh, broker):
                took = time.monotonic() - t0
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(2.0)  # a stall ending now is still seen (failure timeout 1.5 s)
    return cleared, took
