"""Mesh timings with real node processes on loopback: median of N runs each.

- visible: from launching `meshllm node` to its profile being visible in the mesh
  (process start, profile measurement, mDNS, broker connection included);
- detect: from a member freezing (SIGSTOP: socket open, no answers) to the mesh
  declaring it gone;
- re-elect: from SIGKILL of the planner to a new planner's claim;
- re-broker: zero-config mesh, from SIGKILL of the node hosting the embedded
  broker to the survivors being back in one mesh on a new broker.

Usage: python tools/bench_mesh.py [--runs 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import signal
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiomqtt  # noqa: E402

from meshllm.mesh.broker import BrokerURL  # noqa: E402
from meshllm.mesh.topics import Topics  # noqa: E402
from tests.mesh_harness import NodeProc, mosquitto, nodes, status_cli, wait_until  # noqa: E402


async def watch(broker: str, mesh: str, events: list[tuple[float, str, str, bytes]], ready: asyncio.Event) -> None:
    t = Topics(mesh)
    async with aiomqtt.Client(**BrokerURL.parse(broker).client_kwargs()) as c:
        await c.subscribe(t.members, qos=1)
        await c.subscribe(t.planner, qos=1)
        ready.set()
        async for m in c.messages:
            payload = m.payload if isinstance(m.payload, bytes) else b""
            events.append((time.monotonic(), "member" if m.topic.matches(t.members) else "planner",
                           t.leaf(str(m.topic)), payload))


async def wait_event(events: list, pred, after: float, timeout: float = 20.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ts, kind, leaf, payload in events:
            if ts >= after and pred(kind, leaf, payload):
                return ts - after
        await asyncio.sleep(0.01)
    raise TimeoutError("event not seen")


async def one_run(broker: str) -> dict[str, float]:
    mesh = f"bench-{secrets.token_hex(3)}"
    events: list = []
    ready = asyncio.Event()
    watcher = asyncio.create_task(watch(broker, mesh, events, ready))
    await ready.wait()
    procs = [NodeProc(mesh, f"b{i}", broker=broker) for i in range(3)]
    try:
        await asyncio.to_thread(lambda: [p.wait_started() for p in procs])
        await wait_event(events, lambda k, leaf, p: k == "planner", 0)
        t0 = time.monotonic()
        late = NodeProc(mesh, "b3", broker=broker)
        procs.append(late)
        visible = await wait_event(events, lambda k, leaf, p: k == "member" and leaf == "b3" and p, t0)
        planner = json.loads([e for e in events if e[1] == "planner"][-1][3])["node"]
        victim = next(p for p in procs if p.node_id not in (planner, "b3"))
        t1 = time.monotonic()
        victim.proc.send_signal(signal.SIGSTOP)
        detect = await wait_event(events, lambda k, leaf, p: k == "member" and leaf == victim.node_id and not p, t1)
        victim.proc.send_signal(signal.SIGCONT)
        victim.kill()
        t2 = time.monotonic()
        next(p for p in procs if p.node_id == planner).kill()
        reelect = await wait_event(
            events, lambda k, leaf, p: k == "planner" and p and json.loads(p)["node"] != planner, t2)
        return {"visible": visible, "detect": detect, "reelect": reelect}
    finally:
        for p in procs:
            p.kill()
        watcher.cancel()


def rebroker_run() -> float:
    mesh = f"bench-zc-{secrets.token_hex(3)}"
    with nodes(mesh, ["z1", "z2", "z3"]) as procs:
        st = wait_until(lambda: (s := status_cli(mesh)) and len(s["members"]) == 3 and s, 30, "formed")
        host = next(i for i, m in st["members"].items() if m["hosts_broker"])
        t0 = time.monotonic()
        next(p for p in procs if p.node_id == host).kill()
        survivors = sorted(i for i in st["members"] if i != host)
        wait_until(lambda: sorted(status_cli(mesh, interface="127.0.0.1")["members"]) == survivors, 30,
                   "re-formed", interval=0.05)
        return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    runs = []
    with mosquitto() as broker:
        for i in range(args.runs):
            runs.append(asyncio.run(one_run(broker)))
            print(f"run {i + 1}: " + ", ".join(f"{k} {v:.2f} s" for k, v in runs[-1].items()), flush=True)
    rebroker = []
    for i in range(args.runs):
        rebroker.append(rebroker_run())
        print(f"re-broker run {i + 1}: {rebroker[-1]:.2f} s (includes status polling)", flush=True)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"\nmedian of {args.runs} runs (Mosquitto broker, nodes on loopback):")
    print(f"  start to visible in the mesh:     {med['visible']:.2f} s")
    print(f"  failure detection (frozen node):  {med['detect']:.2f} s   (goal <= 3 s)")
    print(f"  planner re-election after SIGKILL:{med['reelect']:.2f} s   (goal <= 3 s)")
    print(f"  zero-config mesh re-formed after its broker host is killed: {statistics.median(rebroker):.2f} s")


if __name__ == "__main__":
    main()
