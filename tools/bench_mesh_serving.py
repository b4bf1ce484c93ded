"""Serving benchmarks on loopback, side by side in one run (TinyStories-110M-shaped random model).

1. decode tokens/s: one process (LocalModel) vs a 3-stage mesh (three node processes, one MIXED
   replica cut 0-4 / 4-8 / 8-12), one greedy request of 64 tokens each;
2. KV hand-off for a 512-token prompt vs its prefill time: the hand-off code path of the mesh
   (Segment.export_kv -> codec frames -> TCP over loopback -> DataPlane -> Segment.import_kv);
3. codec throughput on a 16 MiB KV block (encode + decode), and over a loopback TCP connection;
4. aggregate decode throughput of the 3-stage mesh with 1, 4 and 16 concurrent requests;
5. a plan roll-out under load: decode tokens/s of the requests in flight while every node loads its
   stage of the new plan, as a fraction of their steady tokens/s just before; how long loading took;
   and the decode tokens the roll-out cost them, (steady - rolling) x that time (medians of ``--rounds``).
   Three nodes share two cores here: each node's load takes CPU from the others' decoding too, which
   devices of their own would not.

Usage: python tools/bench_mesh_serving.py [--only mesh,handoff,codec,conc,rollout] [--rounds N] [--conc-rounds N]
       [node options]
(unknown options go to the three ``meshllm node`` processes, e.g. --threads 1)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meshllm.dataplane.codec import decode_body, encode_buffers  # noqa: E402
from meshllm.dataplane.links import PeerLinks  # noqa: E402
from meshllm.dataplane.server import DataPlane  # noqa: E402
from meshllm.mesh.broker import BrokerURL  # noqa: E402
from meshllm.runtime.generate import LocalModel  # noqa: E402
from meshllm.runtime.sampling import SamplingParams  # noqa: E402
from meshllm.runtime.segment import Segment  # noqa: E402
from tests.mesh_harness import mosquitto, state  # noqa: E402
from tests.serving_harness import ask_raw, replica, serving_mesh, tokens_of  # noqa: E402
from tools.bench_generate import ensure_model  # noqa: E402

PROMPT = "Once upon a time there was a little"
SECTIONS = ("mesh", "handoff", "codec", "conc", "rollout")
CUTS = ([("s1", 0, 4), ("s2", 4, 8), ("s3", 8, 12)], [("s1", 0, 5), ("s2", 5, 9), ("s3", 9, 12)])


def run_loop(coro):  # type: ignore[no-untyped-def]
    """The event loop nodes use (uvloop where available), so data-plane figures match the mesh."""
    from meshllm.cli import run_async

    return run_async(coro)


def one_process_tps(model: Path, n: int) -> float:
    lm = LocalModel(model, max_seq_len=1024, verify=False)
    lm.generate(PROMPT, SamplingParams(max_tokens=4, temperature=0))
    return lm.generate(PROMPT, SamplingParams(max_tokens=n, temperature=0)).decode_tokens_per_second


async def handoff(model: Path, n_tokens: int = 512) -> tuple[float, float, int]:
    src = Segment(model, 0, 12, max_batch=1, max_seq_len=1024, verify=False)
    dst = Segment(model, 0, 12, max_batch=1, max_seq_len=1024, verify=False)
    ids = np.random.default_rng(0).integers(3, 32000, n_tokens)
    src.open("r")
    t = time.perf_counter()
    src.prefill("r", ids)
    prefill_s = time.perf_counter() - t
    dst.open("r")
    got = asyncio.Event()
    count = 0

    async def on_kv(msg: dict, writer: object) -> None:
        nonlocal count
        dst.import_kv("r", msg["layer"], msg["k"], msg["vv"])
        count += 1
        if count == 12:
            got.set()

    nbytes = 0
    async with DataPlane("127.0.0.1") as dp, PeerLinks() as links:
        dp.route("kv", on_kv)
        t = time.perf_counter()
        for layer in range(12):
            k, v = src.export_kv("r", layer)
            nbytes += k.nbytes + v.nbytes
            await links.send(("127.0.0.1", dp.port), {"t": "kv", "layer": layer, "k": k, "vv": v})
        await got.wait()
        hand_s = time.perf_counter() - t
    assert np.array_equal(dst.export_kv("r", 11)[0], src.export_kv("r", 11)[0])
    return prefill_s, hand_s, nbytes


async def tcp_codec(block: np.ndarray, reps: int = 10) -> float:
    done = asyncio.Queue()

    async def on_blk(msg: dict, writer: object) -> None:
        done.put_nowait(msg["k"].nbytes)

    async with DataPlane("127.0.0.1") as dp, PeerLinks() as links:
        dp.route("blk", on_blk)
        await links.send(("127.0.0.1", dp.port), {"t": "blk", "k": block})
        await done.get()
        t = time.perf_counter()
        for _ in range(reps):
            await links.send(("127.0.0.1", dp.port), {"t": "blk", "k": block})
            await done.get()
        return block.nbytes * reps / (time.perf_counter() - t)


def codec_in_memory(block: np.ndarray, reps: int = 20) -> float:
    frame = {"t": "kv", "k": block}
    body = b"".join(encode_buffers(frame))[4:]
    t = time.perf_counter()
    for _ in range(reps):
        encode_buffers(frame)
        decode_body(body)
    return block.nbytes * reps / (time.perf_counter() - t)


async def rollout_round(broker: str, mesh: str, live: dict, version: int, *, streams: int = 4,
                        steady_s: float = 2.0) -> tuple[float, float, float]:
    """Starts ``streams`` long requests, measures their tokens/s for ``steady_s``, then publishes plan
    ``version`` (another cut: every node loads a new segment while the requests drain on the old one) and
    measures their tokens/s until every node reports the new plan ready. Returns (steady, roll-out, load s)."""
    import aiomqtt

    cut = CUTS[(version - 1) % 2]
    plan = {"version": version, "n_layers": 12, "term": live["term"], "planner": live["planner"], "pinned": True,
            "replicas": [replica(0, "mixed", cut, slots=16, context=1024)]}
    times: list[float] = []
    ready: dict[str, int] = {}
    ended: set[str] = set()
    ids = [f"roll{version}-{i}" for i in range(streams)]
    async with aiomqtt.Client(**BrokerURL.parse(broker).client_kwargs()) as c:
        await c.subscribe(f"meshllm/v1/{mesh}/replies/+", qos=1)
        await c.subscribe(f"meshllm/v1/{mesh}/ready/+", qos=1)

        async def collect() -> None:
            async for m in c.messages:
                topic = str(m.topic)
                d = json.loads(m.payload) if m.payload else {}  # type: ignore[arg-type]
                if "/ready/" in topic:
                    ready[topic.rsplit("/", 1)[-1]] = int(d.get("pv") or 0)
                elif d.get("done") or d.get("error"):
                    ended.add(topic.rsplit("/", 1)[-1])
                elif "token_id" in d:
                    times.append(time.perf_counter())
        task = asyncio.ensure_future(collect())
        for rid in ids:
            await c.publish(f"meshllm/v1/{mesh}/requests", json.dumps(
                {"id": rid, "prompt": f"{PROMPT} {rid}", "max_tokens": 700, "temperature": 0}), qos=1)
        while len(times) < streams * 16:  # every stream decoding
            await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        await asyncio.sleep(steady_s)
        t1 = time.perf_counter()
        await c.publish(f"meshllm/v1/{mesh}/plan", json.dumps(plan), qos=1, retain=True)
        while sum(pv == version for pv in ready.values()) < 3 and time.perf_counter() - t1 < 120:
            await asyncio.sleep(0.01)
        t2 = time.perf_counter()
        if ended & set(ids):
            raise RuntimeError("a request ended during the roll-out window: raise max_tokens")
        for rid in ids:  # done measuring: end the long requests
            await c.publish(f"meshllm/v1/{mesh}/cancel", json.dumps({"id": rid}), qos=1)
        while not set(ids) <= ended and time.perf_counter() - t2 < 60:
            await asyncio.sleep(0.05)
        task.cancel()
    steady = sum(t0 <= t < t1 for t in times) / (t1 - t0)
    rolling = sum(t1 <= t < t2 for t in times) / (t2 - t1)
    return steady, rolling, t2 - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    ap.add_argument("--rounds", type=int, default=3, help="plan roll-outs to measure (the median is reported)")
    ap.add_argument("--conc-rounds", type=int, default=5,
                    help="interleaved rounds of 1, 4 and 16 concurrent requests (medians are reported)")
    args, mesh_args = ap.parse_known_args()
    only = set(args.only.split(","))
    model = ensure_model("110m", "fp32")
    n = 64
    print(f"model: random TinyStories-110M shape, fp32 ({model})")
    single = one_process_tps(model, n) if "mesh" in only else 0.0
    if "handoff" in only:
        prefill_s, hand_s, nbytes = run_loop(handoff(model))
    if "codec" in only:
        block = np.random.default_rng(0).standard_normal((4, 1024, 1024), dtype=np.float32)
        mem_bps = codec_in_memory(block)
        tcp_bps = run_loop(tcp_codec(block))

    mesh = f"bench-serve-{secrets.token_hex(3)}"
    plan = {"version": 1, "n_layers": 12, "replicas": [replica(0, "mixed", CUTS[0], slots=16, context=1024)]}
    conc: dict[int, list[float]] = {}
    rolls: list[tuple[float, float, float]] = []
    mesh_tps = 0.0
    if only & {"mesh", "conc", "rollout"}:
        with mosquitto() as broker, tempfile.TemporaryDirectory() as tmp, \
                serving_mesh(mesh, broker, model, ["s1", "s2", "s3"], plan, Path(tmp), extra=mesh_args):
            req = {"id": "warm", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
            asyncio.run(ask_raw(broker, mesh, [req], timeout=120))
            if "mesh" in only:
                runs = []
                for i in range(3):
                    s = asyncio.run(ask_raw(broker, mesh, [{**req, "id": f"one{i}", "max_tokens": n}], timeout=300))[0]
                    runs.append(s[-1]["timings"]["tokens_per_s"])
                mesh_tps = statistics.median(runs)
            if "conc" in only:
                # warm: the first burst of 16 prompts pays onnxruntime's one-time growth for the larger shapes
                # (round 0 of a first run: 3.8x one, then 5.6-6.9x), which a serving mesh pays once
                asyncio.run(ask_raw(broker, mesh, [{**req, "id": f"warm16-{i}"} for i in range(16)], timeout=300))
                for r in range(args.conc_rounds):  # interleaved: each round runs 1, 4 and 16 back to back
                    for c in (1, 4, 16):
                        reqs = [{**req, "id": f"c{r}-{c}-{i}", "prompt": f"{PROMPT} {i}", "max_tokens": 32}
                                for i in range(c)]
                        t = time.perf_counter()
                        streams = asyncio.run(ask_raw(broker, mesh, reqs, timeout=600))
                        conc.setdefault(c, []).append(
                            sum(len(tokens_of(s)) for s in streams) / (time.perf_counter() - t))
            if "rollout" in only:
                live = state(mesh, broker)["plan"]
                for r in range(args.rounds):
                    rolls.append(asyncio.run(rollout_round(broker, mesh, live, 2 + r)))

    if "mesh" in only:
        print(f"decode, one process:              {single:7.1f} tokens/s")
        print(f"decode, 3-stage mesh on loopback: {mesh_tps:7.1f} tokens/s   {mesh_tps / single:.2f}x  (goal >= 0.85x)")
    if "handoff" in only:
        print(f"prefill of 512 tokens:            {prefill_s * 1e3:7.1f} ms")
        print(f"KV hand-off of 512 tokens:        {hand_s * 1e3:7.1f} ms   {hand_s / prefill_s:.1%} of prefill "
              f"(goal <= 10%), {nbytes / 1e6:.1f} MB")
    if "codec" in only:
        print(f"codec, 16 MiB block, encode+decode in memory: {mem_bps / 1e9:8.1f} GB/s  (goal >= 5 GB/s)")
        print(f"codec, 16 MiB block over loopback TCP:        {tcp_bps / 1e9:8.2f} GB/s")
    for c, tps in conc.items():
        ratios = [t / one for t, one in zip(tps, conc[1], strict=True)]  # per round: the same moment's load
        print(f"3-stage mesh, {c:2d} concurrent requests: {statistics.median(tps):7.1f} tokens/s aggregate"
              + (f"   {statistics.median(ratios):.1f}x one (median of {len(ratios)} rounds: "
                 + " ".join(f"{x:.2f}" for x in ratios) + ")" if c > 1 else ""))
    if rolls:
        for steady, rolling, load_s in rolls:
            print(f"plan roll-out: {rolling:6.1f} tokens/s in flight while loading ({load_s:.1f} s) vs {steady:6.1f} "
                  f"steady: {rolling / steady:.0%}, {(steady - rolling) * load_s:.0f} tokens lost")
        print(f"plan roll-out, median: {statistics.median(r / s for s, r, _ in rolls):.0%} of steady decode "
              f"tokens/s for the requests in flight, loading {statistics.median(t for _, _, t in rolls):.1f} s, "
              f"{statistics.median((s - r) * t for s, r, t in rolls):.0f} decode tokens lost")


if __name__ == "__main__":
    main()
