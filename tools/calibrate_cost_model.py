"""Calibrate the planner's cost model on this machine with the real runtime, and report its error.

1. Writes (once, under build/calib/) a random-weight llama2.c model — dim 1024,
   FFN 2816, 8 layers, 16 heads, vocab 4096, context 1024; 51 MB of float32
   weights per layer, larger than the caches, as an edge model's layers are —
   and exports it.
2. Measures this machine's profile with ``meshllm.profile.measure_profile``.
3. Times ``meshllm.runtime.segment.Segment`` runs: several layer ranges (with and
   without the embedding and the head), prefill chunks of several lengths,
   decode steps at several context lengths and batch sizes (median of a few
   repetitions each).
4. Fits the per-device factors (``meshllm.plan.calibrate.fit_factors``) on half
   of the samples and prints the prediction error of the raw profile and of
   the calibrated model on the other half (and on all samples).

Under a minute once the model is written (the first run writes about 0.85 GB under build/).
Usage: python tools/calibrate_cost_model.py [--threads N] [--out factors.json]
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
from meshllm.model.manifest import load_manifest  # noqa: E402
from meshllm.model.tokenizer import random_llama2c_vocab, write_tokenizer_bin  # noqa: E402
from meshllm.plan.calibrate import Sample, fit_factors, prediction_error  # noqa: E402
from meshllm.plan.cost import CostModel, ModelCosts  # noqa: E402
from meshllm.profile import measure_profile  # noqa: E402
from meshllm.runtime.segment import Segment  # noqa: E402

NODE = "this"
RANGES = [(0, 8), (0, 3), (3, 8), (2, 6), (4, 5)]
PREFILL = [8, 32, 128, 384]
DECODE = [(16, 1), (300, 1), (800, 1), (16, 4), (300, 4)]  # (context, batch)


def ensure_model() -> Path:
    d = ROOT / "build" / "calib-1024"
    out = d / "model"
    if (out / "manifest.json").is_file():
        return out
    d.mkdir(parents=True, exist_ok=True)
    cfg = make_llama2c_config(1024, 2816, 8, 16, 16, 4096, 1024, shared_classifier=True)
    write_llama2c(d / "m.bin", cfg, random_llama2c_weights(cfg, seed=0))
    write_tokenizer_bin(d / "tokenizer.bin", *random_llama2c_vocab(cfg.vocab_size, seed=0))
    export(d / "m.bin", out, overwrite=True)
    return out


def inputs(seg: Segment, batch: int, n: int, rng: np.random.Generator) -> np.ndarray:
    if seg.has_embed:
        return rng.integers(3, seg.config.vocab_size, size=batch * n)
    return rng.standard_normal((batch, n, seg.config.dim), dtype=np.float32)


def time_prefill(seg: Segment, n: int, reps: int, rng: np.random.Generator) -> float:
    times = []
    for r in range(reps + 1):
        seg.open(r)
        x = inputs(seg, 1, n, rng)
        t = time.perf_counter()
        seg.prefill(r, x if seg.has_embed else x)
        if r:  # the first run warms up
            times.append(time.perf_counter() - t)
        seg.close(r)
    return statistics.median(times)


def time_decode(seg: Segment, ctx: int, batch: int, steps: int, rng: np.random.Generator) -> float:
    seqs = list(range(batch))
    for s in seqs:
        seg.open(s)
        seg.prefill(s, inputs(seg, 1, ctx, rng))
    times = []
    for i in range(steps + 1):
        x = rng.integers(3, seg.config.vocab_size, size=batch) if seg.has_embed else \
            rng.standard_normal((batch, 1, seg.config.dim), dtype=np.float32)
        t = time.perf_counter()
        seg.decode(seqs, x)
        if i:
            times.append(time.perf_counter() - t)
    for s in seqs:
        seg.close(s)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, help="onnxruntime threads (default: all cores)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", help="write the fitted factors as JSON {node_id: factors}")
    args = ap.parse_args()
    t0 = time.perf_counter()
    model_dir = ensure_model()
    manifest = load_manifest(model_dir)
    costs = ModelCosts.from_manifest(manifest)
    profile = measure_profile(NODE, "this machine", threads=args.threads)
    print(f"profile: {profile.flops / 1e9:.1f} GFLOP/s (float32 matmul), {profile.mem_bandwidth_Bps / 1e9:.1f} GB/s "
          f"(matrix-vector), {profile.mem_bytes / 1e9:.1f} GB available")
    rng = np.random.default_rng(0)
    samples: list[Sample] = []
    for start, stop in RANGES:
        seg = Segment(model_dir, start, stop, max_batch=4, max_seq_len=1024, threads=args.threads, verify=False,
                      manifest=manifest)
        for n in PREFILL:
            sec = time_prefill(seg, n, args.reps, rng)
            samples.append(Sample.prefill(NODE, start, stop, n, sec))
        for ctx, batch in DECODE:
            sec = time_decode(seg, ctx, batch, 2 + args.reps, rng)
            # the timed steps run at ctx .. ctx+steps cached positions: use the middle
            samples.append(Sample.decode(NODE, start, stop, ctx + (2 + args.reps) // 2, sec, batch))
        print(f"layers [{start}, {stop}): {len(PREFILL)} prefill and {len(DECODE)} decode timings")
    fit_on, held_out = samples[::2], samples[1::2]
    factors = fit_factors(costs, [profile], fit_on)
    raw, cal = CostModel(costs, [profile]), CostModel(costs, [profile], factors)
    f = factors[NODE]
    print(f"\nfitted on {len(fit_on)} samples: flops efficiency {f.flops_eff:.2f}, bandwidth efficiency "
          f"{f.bw_eff:.2f}, {f.run_overhead_s * 1e3:.2f} ms per run, {f.layer_overhead_s * 1e3:.3f} ms per layer")
    print("\nprediction error (|predicted - measured| / measured):")
    print(f"  raw profile, held-out half : {prediction_error(raw, held_out).line()}")
    print(f"  calibrated,  held-out half : {prediction_error(cal, held_out).line()}")
    print(f"  raw profile, all samples   : {prediction_error(raw, samples).line()}")
    print(f"  calibrated,  all samples   : {prediction_error(cal, samples).line()}")
    if args.out:
        Path(args.out).write_text(json.dumps({k: v.to_json() for k, v in factors.items()}, indent=1) + "\n")
        print(f"\nfactors written to {args.out}")
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
