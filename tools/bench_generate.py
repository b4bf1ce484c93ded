"""Benchmark the single-process inference core per weight dtype, against the memory-bandwidth floor.

Makes (once, cached under build/bench/) random-weight llama2.c checkpoints of two
shapes and exports them per dtype:

- ``110m``: TinyStories-110M (dim 768, 12 layers, 12 heads, FFN 2048, vocab 32000);
- ``360m``: SmolLM2-360M-like (dim 960, 32 layers, 15 heads / 5 KV heads, FFN 2560,
  vocab 49152, tied embeddings).

fp32 and fp16 come from ``meshllm export``; int8 and int4 from ``meshllm quantize``
of the fp32 export (a dtype this meshllm cannot make is skipped with a message).
In one run it prints, side by side per dtype, medians of ``--rounds`` interleaved
rounds (every round measures every shape and dtype once, so a busy machine
slows all of them alike):

- decode ms/token at positions 16 and 480 (batch 1), and tokens/s;
- prefill tokens/s for a 512-token prompt;
- peak resident memory of a process that loads the model and runs the above
  (each dtype in its own subprocess, so peaks do not mix; the subprocess imports
  the runtime only, not the export side);
- the bytes one decode step reads (weights of the layers and head as loaded,
  from the manifest's per-part run-time bytes, plus the KV cache at position 16),
  the floor for those bytes (an onnxruntime matrix-vector product over a float32
  buffer of that size: the best a memory-bound step can do here, measured in the
  parent) and decode's ratio to it;
- decode with 16 sequences batched against 1 (tokens/s, at position 16; a
  separate subprocess, so its KV caches do not count in the peak above).

Usage: python tools/bench_generate.py [--dtype fp32,fp16,int8,int4] [--shapes 110m,360m]
                                      [--rounds 3] [--steps 16] [--threads N] [--clock wall|cpu] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Only what a measuring child needs is imported here: its peak memory is the runtime's, so the export side
# (which imports onnx, ~10 MB) is imported where models are made, in the parent.
from meshllm.model.manifest import Manifest, load_manifest  # noqa: E402

DTYPES = ("fp32", "fp16", "int8", "int4")
# name: (dim, ffn, layers, heads, kv heads, vocab, context, description)
SHAPES: dict[str, tuple[int, int, int, int, int, int, int, str]] = {
    "110m": (768, 2048, 12, 12, 12, 32000, 1024, "TinyStories-110M shape"),
    "360m": (960, 2560, 32, 15, 5, 49152, 1024, "SmolLM2-360M-like shape"),
    "tiny": (64, 128, 2, 4, 2, 512, 576, "tiny smoke-test shape"),  # for tests only
}
BATCH = 16
BENCH = ROOT / "build" / "bench"
#: What a step's time is measured with: wall time (default), or with ``--clock cpu`` the process's CPU
#: time, which on a machine shared with other jobs counts only the time this process ran (one thread
#: only: with more, spinning workers would count too).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


class Unavailable(Exception):
    """This meshllm cannot make the model in a dtype (yet)."""


# --- models ---------------------------------------------------------------------------------------


def ensure_model(shape: str, dtype: str, bench: Path = BENCH) -> Path:
    """The random-weight model of ``shape`` exported in ``dtype`` (cached)."""
    out = bench / f"{shape}-random-{dtype}"
    if (out / "manifest.json").is_file():
        return out
    from meshllm.model.export import export
    from meshllm.model.llama2c import make_llama2c_config, random_llama2c_weights, write_llama2c
    from meshllm.model.tokenizer import random_llama2c_vocab, write_tokenizer_bin

    dim, ffn, layers, heads, kv, vocab, ctx, _ = SHAPES[shape]
    ckpt = bench / f"{shape}-random.bin"
    if not ckpt.is_file():
        bench.mkdir(parents=True, exist_ok=True)
        cfg = make_llama2c_config(dim, ffn, layers, heads, kv, vocab, ctx, shared_classifier=True)
        write_llama2c(ckpt, cfg, random_llama2c_weights(cfg, seed=0))
        pieces, scores = random_llama2c_vocab(vocab, seed=0)
        write_tokenizer_bin(ckpt.with_name("tokenizer.bin"), pieces, scores)
    if dtype in ("fp32", "fp16"):
        export(ckpt, out, dtype=dtype, overwrite=True, tokenizer=ckpt.with_name("tokenizer.bin"))
        return out
    src = ensure_model(shape, "fp32", bench)
    r = subprocess.run([sys.executable, "-m", "meshllm", "quantize", str(src), str(out), "--dtype", dtype],
                       capture_output=True, text=True, timeout=3600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode != 0:
        if "invalid choice: 'quantize'" in r.stderr:
            raise Unavailable("this meshllm has no `meshllm quantize` yet (issue 15, quantized export)")
        raise Unavailable(f"`meshllm quantize --dtype {dtype}` failed: "
                          f"{(r.stderr.strip().splitlines() or ['no message'])[-1]}")
    return out


def step_bytes(m: Manifest, position: int) -> int:
    """Bytes one batch-1 decode step reads: layer and head weights as loaded, and the KV cache so far."""
    from meshllm.plan.cost import part_runtime_bytes

    weights = sum(part_runtime_bytes(m.part(f"layer.{i}")) for i in range(m.config.n_layers))
    weights += part_runtime_bytes(m.part("head"))
    kv = sum(c.kv_bytes_per_token for c in m.layer_costs) * position
    return int(weights + kv)


# --- measurements (in child processes) ----------------------------------------------------------


def _decode_ms(seg: Any, seqs: list[int], steps: int) -> float:
    times = []
    for i in range(steps):
        t = clock()
        seg.decode(seqs, np.full(len(seqs), 100 + i))
        times.append(clock() - t)
    return statistics.median(times) * 1e3


def measure_single(model_dir: Path, steps: int, threads: int | None) -> dict[str, float]:
    """Batch 1: decode at positions 16 and 480, prefill of 512 tokens, and this process's peak memory."""
    from meshllm.runtime.segment import Segment

    seg = Segment(model_dir, max_seq_len=512 + steps + 8, threads=threads)
    vocab = seg.config.vocab_size
    rng = np.random.default_rng(1)
    seg.open(0)
    seg.prefill(0, rng.integers(3, vocab, 16))
    for _ in range(3):  # warm up
        seg.decode([0], np.array([5]))
    seg.close(0)
    seg.open(0)
    seg.prefill(0, rng.integers(3, vocab, 16))
    d16 = _decode_ms(seg, [0], steps)
    seg.close(0)
    seg.open(1)
    seg.prefill(1, rng.integers(3, vocab, 480))
    d480 = _decode_ms(seg, [1], steps)
    seg.close(1)
    times = []
    for r in range(3):
        seg.open(10 + r)
        t = clock()
        seg.prefill(10 + r, rng.integers(3, vocab, 512))
        times.append(clock() - t)
        seg.close(10 + r)
    peak = peak_rss_bytes()
    return {"decode_ms_pos16": d16, "decode_ms_pos480": d480, "prefill_tps_512": 512 / statistics.median(times),
            "peak_rss_bytes": float(peak)}


def peak_rss_bytes() -> int:
    """This process's peak resident memory. Not ``getrusage``: on Linux its ``ru_maxrss`` carries the parent's
    peak over fork and exec, so every child reported the parent's (the benchmark's own) peak. ``VmHWM`` belongs
    to the address space that exec made."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure_batch(model_dir: Path, steps: int, threads: int | None) -> dict[str, float]:
    """Decode tokens/s with 16 sequences batched and with 1, each at position 16."""
    from meshllm.runtime.segment import Segment

    seg = Segment(model_dir, max_batch=BATCH, max_seq_len=16 + 2 * steps + 8, threads=threads)
    rng = np.random.default_rng(2)
    seqs = list(range(BATCH))
    for s in seqs:
        seg.open(s)
        seg.prefill(s, rng.integers(3, seg.config.vocab_size, 16))
    for _ in range(3):  # warm up both shapes of the step
        seg.decode(seqs, np.full(BATCH, 5))
        seg.decode([0], np.array([5]))
    one = _decode_ms(seg, [0], steps)
    many = _decode_ms(seg, seqs, steps)
    return {"batch1_tps": 1e3 / one, "batch16_tps": BATCH * 1e3 / many}


def matvec_floor_ms(n_bytes: int, k: int, threads: int | None = None, reps: int = 20) -> float:
    """Median time of x(1,k) @ W(k, n) in onnxruntime with W of ``n_bytes`` float32 bytes (the same
    measurement a node makes of its memory bandwidth, over the bytes a decode step reads), with the
    decode's threads and clock."""
    from meshllm.profile import matmul_session, median_seconds

    sess, x = matmul_session(1, k, max(1, n_bytes // 4 // k), threads)
    if clock is time.perf_counter:
        return median_seconds(sess, x, reps) * 1e3
    for _ in range(3):
        sess.run(None, {"x": x})
    times = []
    for _ in range(reps):
        t = clock()
        sess.run(None, {"x": x})
        times.append(clock() - t)
    return statistics.median(times) * 1e3


def run_child(kind: str, model_dir: Path, steps: int, threads: int | None) -> dict[str, float]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, str(model_dir), "--steps", str(steps),
           "--clock", next(k for k, v in CLOCKS.items() if v is clock)]
    if threads:
        cmd += ["--threads", str(threads)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode != 0:
        raise RuntimeError(f"{kind} measurement of {model_dir} failed: {r.stderr.strip()[-2000:]}")
    out: dict[str, float] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


# --- the run --------------------------------------------------------------------------------------


def bench(shapes: list[str], dtypes: list[str], rounds: int, steps: int, threads: int | None,
          bench_dir: Path = BENCH, log: Any = None) -> dict[str, Any]:
    log = log or (lambda s: print(s, file=sys.stderr))
    models: dict[tuple[str, str], Path] = {}
    skipped: dict[str, str] = {}
    for shape in shapes:
        for d in dtypes:
            try:
                models[shape, d] = ensure_model(shape, d, bench_dir)
            except Unavailable as e:
                skipped[d] = str(e)
    if skipped:
        for d, why in skipped.items():
            log(f"skipping {d}: {why}")
    dtypes = [d for d in dtypes if d not in skipped]
    samples: dict[tuple[str, str], list[dict[str, float]]] = {k: [] for k in models}
    for r in range(rounds):
        for shape in shapes:
            for d in dtypes:
                m = load_manifest(models[shape, d])
                s = run_child("single", models[shape, d], steps, threads)
                s.update(run_child("batch", models[shape, d], steps, threads))
                s["floor_ms"] = matvec_floor_ms(step_bytes(m, 16), m.config.dim, threads)
                samples[shape, d].append(s)
                log(f"round {r + 1}/{rounds} {shape} {d}: decode {s['decode_ms_pos16']:.2f} ms/token, "
                    f"floor {s['floor_ms']:.2f} ms, prefill {s['prefill_tps_512']:.0f} tokens/s")
    results: dict[str, Any] = {}
    for shape in shapes:
        rows = {}
        for d in dtypes:
            m = load_manifest(models[shape, d])
            med = {k: statistics.median(x[k] for x in samples[shape, d]) for k in samples[shape, d][0]}
            nbytes = step_bytes(m, 16)
            rows[d] = {
                "decode_ms_pos16": round(med["decode_ms_pos16"], 3),
                "decode_ms_pos480": round(med["decode_ms_pos480"], 3),
                "decode_tps_pos16": round(1e3 / med["decode_ms_pos16"], 1),
                "prefill_tps_512": round(med["prefill_tps_512"], 1),
                "peak_rss_mb": round(med["peak_rss_bytes"] / 1e6, 1),
                "step_bytes_mb": round(nbytes / 1e6, 2),
                "floor_ms": round(med["floor_ms"], 3),
                "bandwidth_GBps": round(nbytes / med["floor_ms"] / 1e6, 2),
                "decode_vs_floor": round(med["decode_ms_pos16"] / med["floor_ms"], 3),
                "batch1_tps": round(med["batch1_tps"], 1),
                "batch16_tps": round(med["batch16_tps"], 1),
                "batch16_vs_1": round(med["batch16_tps"] / med["batch1_tps"], 2),
            }
        if "fp32" in rows:
            for row in rows.values():
                row["decode_speedup_vs_fp32"] = round(rows["fp32"]["decode_ms_pos16"] / row["decode_ms_pos16"], 2)
                row["peak_vs_fp32"] = round(row["peak_rss_mb"] / rows["fp32"]["peak_rss_mb"], 2)
        results[shape] = {"shape": SHAPES[shape][7], "dtypes": rows}
    return {"rounds": rounds, "steps": steps, "threads": threads or os.cpu_count(),
            "clock": next(k for k, v in CLOCKS.items() if v is clock), "results": results, "skipped": skipped}


ROWS = [  # label, key, format
    ("decode ms/token, position 16", "decode_ms_pos16", "{:.2f}"),
    ("decode ms/token, position 480", "decode_ms_pos480", "{:.2f}"),
    ("decode tokens/s, position 16", "decode_tps_pos16", "{:.1f}"),
    ("decode speed-up vs fp32", "decode_speedup_vs_fp32", "{:.2f}x"),
    ("prefill tokens/s, 512-token prompt", "prefill_tps_512", "{:.0f}"),
    ("peak resident memory, MB", "peak_rss_mb", "{:.0f}"),
    ("peak memory vs fp32", "peak_vs_fp32", "{:.2f}x"),
    ("bytes read per decode step, MB", "step_bytes_mb", "{:.1f}"),
    ("floor for those bytes, ms", "floor_ms", "{:.2f}"),
    ("decode / floor", "decode_vs_floor", "{:.2f}x"),
    ("decode tokens/s, 1 sequence", "batch1_tps", "{:.1f}"),
    ("decode tokens/s, 16 sequences batched", "batch16_tps", "{:.1f}"),
    ("16 batched vs 1", "batch16_vs_1", "{:.2f}x"),
]


def format_tables(res: dict[str, Any]) -> str:
    out = [f"medians of {res['rounds']} interleaved rounds, {res['steps']} decode steps each, "
           f"{res['threads']} threads, {res.get('clock', 'wall')} time"]
    for shape, r in res["results"].items():
        dts = list(r["dtypes"])
        out += ["", f"{shape} ({r['shape']}, random weights)", "",
                "| | " + " | ".join(dts) + " |", "|---|" + "---|" * len(dts)]
        for label, key, fmt in ROWS:
            cells = [fmt.format(r["dtypes"][d][key]) if key in r["dtypes"][d] else "-" for d in dts]
            out.append(f"| {label} | " + " | ".join(cells) + " |")
    out += [f"skipped {d}: {why}" for d, why in res["skipped"].items()]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default=",".join(DTYPES), help="comma-separated dtypes (default: every one available)")
    ap.add_argument("--shapes", default="110m,360m", help=f"comma-separated shapes from {', '.join(SHAPES)}")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--steps", type=int, default=16, help="decode steps per measurement (default 16)")
    ap.add_argument("--threads", type=int, help="onnxruntime threads (default: all cores)")
    ap.add_argument("--bench-dir", default=str(BENCH), help="where the random models are cached")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall time (default) or process CPU time (needs --threads 1; for a shared machine)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "MODEL_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        ap.error("--clock cpu needs --threads 1 (with more threads, spinning workers count as CPU time)")
    global clock
    clock = CLOCKS[args.clock]
    if args.child:
        kind, model_dir = args.child
        fn = measure_single if kind == "single" else measure_batch
        print(json.dumps(fn(Path(model_dir), args.steps, args.threads)))
        return 0
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    for d in dtypes:
        if d not in DTYPES:
            ap.error(f"unknown dtype {d!r} (choose from {', '.join(DTYPES)})")
    for s in shapes:
        if s not in SHAPES:
            ap.error(f"unknown shape {s!r} (choose from {', '.join(SHAPES)})")
    if args.rounds < 1 or args.steps < 1:
        ap.error("--rounds and --steps must be at least 1")
    res = bench(shapes, dtypes, args.rounds, args.steps, args.threads, Path(args.bench_dir))
    print(json.dumps(res, indent=1) if args.json else format_tables(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
