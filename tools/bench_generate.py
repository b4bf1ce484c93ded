"""Benchmark the single-process inference core against the memory-bandwidth floor.

Writes (once, cached under build/bench/) a random-weight llama2.c checkpoint of
TinyStories-110M shape (dim 768, 12 layers, 12 heads, FFN 2048, vocab 32000),
exports it, and measures in one run:

- the floor: an onnxruntime matrix-vector product over a weight buffer of the
  same size as the weights one decode step reads (layers + head), i.e. the
  best a memory-bound decode can do on this machine;
- decode ms/token at position 16 and at position 480;
- prefill tokens/s for a 512-token prompt.

Usage: python tools/bench_generate.py [--dtype fp32|fp16] [--steps 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meshllm.model.export import export  # noqa: E402
from meshllm.model.llama2c import make_llama2c_config, random_llama2c_weights, write_llama2c  # noqa: E402
from meshllm.model.tokenizer import random_llama2c_vocab, write_tokenizer_bin  # noqa: E402
from meshllm.profile import matmul_session, median_seconds  # noqa: E402
from meshllm.runtime.segment import Segment  # noqa: E402


def ensure_model(dtype: str) -> Path:
    bench = ROOT / "build" / "bench"
    ckpt = bench / "stories110m-random.bin"
    out = bench / f"stories110m-random-{dtype}"
    if (out / "manifest.json").is_file():
        return out
    bench.mkdir(parents=True, exist_ok=True)
    cfg = make_llama2c_config(768, 2048, 12, 12, 12, 32000, 1024, shared_classifier=True)
    if not ckpt.is_file():
        write_llama2c(ckpt, cfg, random_llama2c_weights(cfg, seed=0))
        pieces, scores = random_llama2c_vocab(cfg.vocab_size, seed=0)
        write_tokenizer_bin(bench / "tokenizer.bin", pieces, scores)
    export(ckpt, out, dtype=dtype, overwrite=True)
    return out


def matvec_floor_ms(n_bytes: int, k: int, reps: int = 20) -> float:
    """Median time of x(1,k) @ W(k, n) in onnxruntime with W of ``n_bytes`` float32 bytes (the same
    measurement a node makes of its memory bandwidth, over the model's size)."""
    sess, x = matmul_session(1, k, n_bytes // 4 // k, None)
    return median_seconds(sess, x, reps) * 1e3


def decode_ms(seg: Segment, seq: int, steps: int) -> float:
    times = []
    for i in range(steps):
        t = time.perf_counter()
        seg.decode([seq], np.array([100 + i]))
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    model_dir = ensure_model(args.dtype)
    seg = Segment(model_dir, max_seq_len=1024)
    m = seg.manifest
    read_bytes = sum(c.runtime_weight_bytes for c in m.layer_costs) + m.part("head").cost.runtime_weight_bytes
    rng = np.random.default_rng(1)

    seg.open(0)
    seg.prefill(0, rng.integers(3, 32000, 16))
    for _ in range(3):  # warm up
        seg.decode([0], np.array([5]))
    seg.close(0)
    seg.open(0)
    seg.prefill(0, rng.integers(3, 32000, 16))
    d16 = decode_ms(seg, 0, args.steps)
    seg.close(0)

    seg.open(1)
    prompt = rng.integers(3, 32000, 480)
    seg.prefill(1, prompt)
    d480 = decode_ms(seg, 1, args.steps)
    seg.close(1)

    prefill_times = []
    for r in range(3):
        seg.open(10 + r)
        t = time.perf_counter()
        seg.prefill(10 + r, rng.integers(3, 32000, 512))
        prefill_times.append(time.perf_counter() - t)
        seg.close(10 + r)
    prefill_tps = 512 / statistics.median(prefill_times)

    floor = matvec_floor_ms(read_bytes, 768)
    res = {
        "model": "random llama2.c, TinyStories-110M shape", "dtype": args.dtype,
        "weight_bytes_read_per_token": read_bytes,
        "floor_ms": round(floor, 2), "bandwidth_GBps": round(read_bytes / floor / 1e6, 2),
        "decode_ms_pos16": round(d16, 2), "decode_ms_pos480": round(d480, 2),
        "decode_vs_floor": round(d16 / floor, 3), "pos480_vs_pos16": round(d480 / d16, 3),
        "prefill_tokens_per_s_512": round(prefill_tps, 1),
    }
    if args.json:
        print(json.dumps(res))
        return
    print(f"model: {res['model']} ({args.dtype}), {read_bytes / 1e6:.0f} MB of weights read per token")
    print(f"floor (onnxruntime matvec, same bytes): {floor:8.2f} ms   ({res['bandwidth_GBps']} GB/s)")
    print(f"decode at position 16:                  {d16:8.2f} ms/token   {d16 / floor:.2f}x floor  (goal <= 1.3x)")
    print(f"decode at position 480:                 {d480:8.2f} ms/token   {d480 / d16:.2f}x pos 16 (goal <= 1.3x)")
    print(f"prefill, 512-token prompt:              {prefill_tps:8.1f} tokens/s")


if __name__ == "__main__":
    main()
