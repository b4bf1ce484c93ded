"""What the HTTP gateway adds per token over meshllm.serve.client.Client used directly.

A stand-in mesh (a separate process speaking the v1 reply contract on a real
Mosquitto broker) answers every request with tokens whose text is the time it
published them. The same requests are then read two ways, with 1 and 16
concurrent streams, alternating:

- **direct**: ``Client.stream`` in this process;
- **gateway**: ``meshllm gateway`` in its own process (uvicorn), read here as
  server-sent events from ``POST /v1/completions`` with ``"stream": true``.

Two loads, each with 1 and 16 streams:

- **paced**: a token every 20 ms per stream (800 tokens/s in all with 16
  streams, in bursts of 16 as a mesh's batched decode makes them). Reported:
  the delivery latency per token (publish -> the reader has it; median, p95)
  and the CPU time per token of the reading side (this process for direct; the
  gateway process, which holds its own Client, for gateway).
- **flat out**: every stream as fast as the stand-in can publish. Reported:
  wall time per token (all tokens of all streams / the run's time), the cost
  per token of the slowest link, which is the figure the gateway's goal is
  about (at most 1 ms per token with 16 streams).

``added`` is gateway minus direct. The stand-in keeps the mesh's own speed out
of the figures. The bench runs its own Mosquitto with ``max_queued_messages 0``:
with the default (1000) the broker drops QoS 1 messages for a subscriber that
falls that far behind, which a flat-out stand-in provokes.

Usage: python tools/bench_gateway.py [--tokens 200] [--interval-ms 20] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiomqtt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meshllm.cli import run_async  # noqa: E402
from meshllm.mesh.broker import MOSQUITTO_OPTIONS, BrokerURL, free_port  # noqa: E402
from meshllm.mesh.topics import Topics  # noqa: E402
from meshllm.serve.client import Client  # noqa: E402
from tests.mesh_harness import wait_until  # noqa: E402

MODEL = "bench"
NODE = "standin"


# --- the stand-in mesh (run as a subprocess: --responder) -------------------------------------------------


async def responder(broker: str, mesh: str, interval_s: float) -> None:
    """Answers every request with ``max_tokens`` tokens (text: the publish time), honouring cancels."""
    t = Topics(mesh)
    cancelled: set[str] = set()
    async with aiomqtt.Client(**BrokerURL.parse(broker).client_kwargs(), identifier=f"standin-{secrets.token_hex(3)}",
                              max_queued_outgoing_messages=100000) as c:
        c.pending_calls_threshold = 100000
        retained = {
            t.member(NODE): {"node_id": NODE, "name": NODE, "model": MODEL, "host": "127.0.0.1", "port": 0,
                             "profile": {}},
            t.planner: {"node": NODE, "term": 1},
            t.plan: {"version": 1, "term": 1, "model": MODEL, "n_layers": 1, "replicas": [
                {"id": 0, "role": "mixed", "slots": 64, "context": 100000,
                 "stages": [{"node_id": NODE, "start": 0, "stop": 1}]}]},
            t.ready(NODE): {"pv": 1, "r": 0, "stage": 0, "role": "mixed"},
        }
        for topic, payload in retained.items():
            await c.publish(topic, json.dumps(payload), qos=1, retain=True)
        await c.subscribe(t.requests, qos=1)
        await c.subscribe(t.cancel, qos=1)
        print("ready", flush=True)

        async def answer(req: dict[str, Any]) -> None:
            rid, reply, n = req["id"], req.get("reply_to", t.reply(req["id"])), int(req.get("max_tokens", 16))
            start = time.monotonic()
            i = 0
            for i in range(n):
                if rid in cancelled:
                    break
                if interval_s:
                    await asyncio.sleep(max(0.0, start + (i + 1) * interval_s - time.monotonic()))
                await c.publish(reply, json.dumps({"id": rid, "index": i, "text": f" {time.time():.6f}",
                                                   "token_id": i}), qos=1)
            else:
                i = n
            await c.publish(reply, json.dumps({"id": rid, "index": i, "text": "", "done": True,
                                               "finish_reason": "cancelled" if rid in cancelled else "length",
                                               "usage": {"prompt_tokens": 1, "completion_tokens": i},
                                               "timings": {}}), qos=1)

        async with asyncio.TaskGroup() as tg:
            async for m in c.messages:
                d = json.loads(m.payload)  # type: ignore[arg-type]
                if str(m.topic) == t.cancel:
                    cancelled.add(d["id"])
                else:
                    tg.create_task(answer(d))


# --- readers ------------------------------------------------------------------------------------------------


def _stamps(text: str, now: float, out: list[float]) -> int:
    n = 0
    for s in text.split():
        out.append(now - float(s))
        n += 1
    return n


async def read_direct(client: Client, n: int, lat: list[float]) -> int:
    got = 0
    async for c in client.stream("go", max_tokens=n):
        got += _stamps(c.text, time.time(), lat)
    return got


async def read_gateway(url: str, n: int, lat: list[float]) -> int:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = json.dumps({"model": MODEL, "prompt": "go", "max_tokens": n, "stream": True}).encode()
    writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    if status != 200:
        raise RuntimeError(f"gateway answered {status}")
    while await reader.readline() not in (b"\r\n", b""):
        pass
    got, buf = 0, b""
    try:
        while True:
            size = int((await reader.readline()).strip(), 16)
            if size == 0:
                return got
            buf += await reader.readexactly(size)
            await reader.readexactly(2)
            *events, buf = buf.split(b"\n\n")
            now = time.time()
            for e in events:
                if e.startswith(b"data: {"):
                    obj = json.loads(e[6:])
                    if "error" in obj:
                        raise RuntimeError(f"the gateway's stream failed: {obj['error']}")
                    got += _stamps(obj["choices"][0]["text"], now, lat)
    finally:
        writer.close()


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(kind: str, streams: int, tokens: int, client: Client, url: str, gw_pid: int) -> dict[str, Any]:
    lat: list[float] = []
    cpu0 = _cpu_s(gw_pid) if kind == "gateway" else time.process_time()
    t0 = time.perf_counter()
    if kind == "direct":
        counts = await asyncio.gather(*(read_direct(client, tokens, lat) for _ in range(streams)))
    else:
        counts = await asyncio.gather(*(read_gateway(url, tokens, lat) for _ in range(streams)))
    wall = time.perf_counter() - t0
    cpu = (_cpu_s(gw_pid) if kind == "gateway" else time.process_time()) - cpu0
    n = sum(counts)
    assert n == streams * tokens, (n, streams * tokens)
    lat.sort()
    return {"tokens": n, "wall_ms_per_token": wall / n * 1e3, "cpu_ms_per_token": cpu / n * 1e3,
            "latency_ms_p50": statistics.median(lat) * 1e3, "latency_ms_p95": lat[int(len(lat) * 0.95)] * 1e3}


async def bench(broker: str, mesh: str, url: str, gw_pid: int, tokens: int, repeat: int) -> dict[str, Any]:
    """Each figure is the median over ``repeat`` runs; direct and gateway runs alternate."""
    runs: dict[str, list[dict[str, Any]]] = {}
    async with Client(mesh, broker) as client:
        await read_direct(client, 8, [])  # warm up both paths
        await read_gateway(url, 8, [])
        for _ in range(repeat):
            for streams in (1, 16):
                for kind in ("direct", "gateway"):
                    runs.setdefault(f"{kind}/{streams}", []).append(
                        await run(kind, streams, tokens, client, url, gw_pid))
    return {k: {m: statistics.median(r[m] for r in rs) for m in rs[0]} for k, rs in runs.items()}


def start_responder(broker: str, mesh: str, interval_ms: float) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, __file__, "--responder", broker, mesh, str(interval_ms)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return p


@contextlib.contextmanager
def broker_for_bench() -> Any:
    """Mosquitto on a free loopback port that queues without limit (see the module's docstring)."""
    import socket
    import tempfile

    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        conf = Path(d) / "mosquitto.conf"
        conf.write_text("\n".join([f"listener {port} 127.0.0.1", "allow_anonymous true", "persistence false",
                                    "user root", *MOSQUITTO_OPTIONS]) + "\n")
        exe = "mosquitto" if subprocess.run(["which", "mosquitto"], capture_output=True).returncode == 0 \
            else "/usr/sbin/mosquitto"
        proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def listening() -> bool:
            with socket.socket() as sk:
                return sk.connect_ex(("127.0.0.1", port)) == 0
        try:
            wait_until(listening, 10, "mosquitto to listen")
            yield f"mqtt://127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=200, help="tokens per stream")
    ap.add_argument("--interval-ms", type=float, default=20.0, help="paced: ms between a stream's tokens")
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure (the median is reported)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--responder", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.responder:
        b, m, ms = args.responder
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(responder(b, m, float(ms) / 1e3))
        return

    out: dict[str, Any] = {}
    with broker_for_bench() as broker:
        for load, interval in (("paced", args.interval_ms), ("flat out", 0.0)):
            mesh = f"bench-gw-{secrets.token_hex(3)}"
            resp = start_responder(broker, mesh, interval)
            gw = subprocess.Popen([sys.executable, "-m", "meshllm.gateway", "--mesh", mesh, "--broker", broker,
                                   "--port", "0"], stdout=subprocess.PIPE, text=True)
            try:
                assert gw.stdout is not None
                url = json.loads(gw.stdout.readline())["url"]
                time.sleep(1.0)  # the gateway reads the stand-in's retained records
                out[load] = run_async(bench(broker, mesh, url, gw.pid, args.tokens, args.repeat))  # uvloop
            finally:
                for p in (gw, resp):
                    p.terminate()
                    p.wait(10)
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"gateway vs Client: {args.tokens} tokens per stream, median of {args.repeat} runs; ms per token")
    print(f"paced, a token every {args.interval_ms:g} ms per stream:")
    print(f"{'streams':>8} | {'latency p50':^22} | {'latency p95':^22} | {'CPU of the reading side':^22}")
    print(f"{'':>8} | " + " | ".join(["direct gateway  added"] * 3))
    for streams in (1, 16):
        d, g = out["paced"][f"direct/{streams}"], out["paced"][f"gateway/{streams}"]
        print(f"{streams:>8} | " + " | ".join(f"{d[k]:6.3f} {g[k]:7.3f} {g[k] - d[k]:6.3f}"
                                             for k in ("latency_ms_p50", "latency_ms_p95", "cpu_ms_per_token")))
    print("flat out:")
    print(f"{'streams':>8} | {'wall time per token':^22} | {'CPU of the reading side':^22}")
    print(f"{'':>8} | " + " | ".join(["direct gateway  added"] * 2))
    for streams in (1, 16):
        d, g = out["flat out"][f"direct/{streams}"], out["flat out"][f"gateway/{streams}"]
        print(f"{streams:>8} | " + " | ".join(f"{d[k]:6.3f} {g[k]:7.3f} {g[k] - d[k]:6.3f}"
                                             for k in ("wall_ms_per_token", "cpu_ms_per_token")))


if __name__ == "__main__":
    main()
