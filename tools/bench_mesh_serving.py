"""Serving benchmarks on loopback, side by side in one run (TinyStories-110M-shaped random model).

1. decode tokens/s: one process (LocalModel) vs a 3-stage mesh (three node processes, one MIXED
   replica cut 0-4 / 4-8 / 8-12), one greedy request of 64 tokens each;
2. KV hand-off for a 512-token prompt vs its prefill time: the hand-off code path of the mesh
   (Segment.export_kv -> codec frames -> TCP over loopback -> DataPlane -> Segment.import_kv);
3. codec throughput on a 16 MiB KV block (encode + decode), and over a loopback TCP connection;
4. aggregate decode throughput of the 3-stage mesh with 1, 4 and 16 concurrent requests.

Usage: python tools/bench_mesh_serving.py
"""

from __future__ import annotations

import asyncio
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
from meshllm.runtime.generate import LocalModel  # noqa: E402
from meshllm.runtime.sampling import SamplingParams  # noqa: E402
from meshllm.runtime.segment import Segment  # noqa: E402
from tests.mesh_harness import mosquitto  # noqa: E402
from tests.serving_harness import ask_raw, replica, serving_mesh, tokens_of  # noqa: E402
from tools.bench_generate import ensure_model  # noqa: E402

PROMPT = "Once upon a time there was a little"
MESH_ARGS = sys.argv[1:]  # extra `meshllm node` options for the three stage processes, e.g. --threads 1


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


def main() -> None:
    model = ensure_model("fp32")
    n = 64
    print(f"model: random TinyStories-110M shape, fp32 ({model})")
    single = one_process_tps(model, n)

    prefill_s, hand_s, nbytes = run_loop(handoff(model))
    block = np.random.default_rng(0).standard_normal((4, 1024, 1024), dtype=np.float32)
    mem_bps = codec_in_memory(block)
    tcp_bps = run_loop(tcp_codec(block))

    mesh = f"bench-serve-{secrets.token_hex(3)}"
    plan = {"version": 1, "n_layers": 12, "replicas": [
        replica(0, "mixed", [("s1", 0, 4), ("s2", 4, 8), ("s3", 8, 12)], slots=16, context=1024)]}
    conc: dict[int, float] = {}
    with mosquitto() as broker, tempfile.TemporaryDirectory() as tmp, \
            serving_mesh(mesh, broker, model, ["s1", "s2", "s3"], plan, Path(tmp), extra=MESH_ARGS):
        req = {"id": "warm", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
        asyncio.run(ask_raw(broker, mesh, [req], timeout=120))
        runs = []
        for i in range(3):
            s = asyncio.run(ask_raw(broker, mesh, [{**req, "id": f"one{i}", "max_tokens": n}], timeout=300))[0]
            runs.append(s[-1]["timings"]["tokens_per_s"])
        mesh_tps = statistics.median(runs)
        for c in (1, 4, 16):
            reqs = [{**req, "id": f"c{c}-{i}", "prompt": f"{PROMPT} {i}", "max_tokens": 32} for i in range(c)]
            t = time.perf_counter()
            streams = asyncio.run(ask_raw(broker, mesh, reqs, timeout=600))
            conc[c] = sum(len(tokens_of(s)) for s in streams) / (time.perf_counter() - t)

    print(f"decode, one process:              {single:7.1f} tokens/s")
    print(f"decode, 3-stage mesh on loopback: {mesh_tps:7.1f} tokens/s   {mesh_tps / single:.2f}x  (goal >= 0.85x)")
    print(f"prefill of 512 tokens:            {prefill_s * 1e3:7.1f} ms")
    print(f"KV hand-off of 512 tokens:        {hand_s * 1e3:7.1f} ms   {hand_s / prefill_s:.1%} of prefill "
          f"(goal <= 10%), {nbytes / 1e6:.1f} MB")
    print(f"codec, 16 MiB block, encode+decode in memory: {mem_bps / 1e9:8.1f} GB/s  (goal >= 5 GB/s)")
    print(f"codec, 16 MiB block over loopback TCP:        {tcp_bps / 1e9:8.2f} GB/s")
    for c, tps in conc.items():
        print(f"3-stage mesh, {c:2d} concurrent requests: {tps:7.1f} tokens/s aggregate")


if __name__ == "__main__":
    main()
