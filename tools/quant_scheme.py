#!/usr/bin/env python3
"""Compares quantization schemes on the bundled model: perplexity and top-1 agreement with fp32.

A one-off measurement that chose meshllm's int4/int8 scheme (docs/inference.md,
"Quantized weights"); tools/eval_quality.py is the general tool. Reads the
held-out split of the Austen novels (the last 5 % of each novel's paragraphs,
as tools/train_tiny.py splits them) from an installed janeaustenr R package,
teacher-forces windows of it through each variant one token at a time (the head
returns the last position's logits only) and compares every position's logits.

    python tools/quant_scheme.py --corpus-dir /usr/lib/R/site-library/janeaustenr
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshllm.model import quantize as q  # noqa: E402
from meshllm.model.export import _write_manifest, write_parts  # noqa: E402
from meshllm.model.manifest import load_manifest  # noqa: E402
from meshllm.model.tokenizer import load_tokenizer  # noqa: E402
from meshllm.runtime.segment import Segment  # noqa: E402
from tools.train_tiny import load_austen, split_corpus  # noqa: E402


def variant(src: Path, out: Path, dtype: str, spec: q.QuantSpec) -> Path:
    import onnx

    m = load_manifest(src)

    def models():
        for p in m.parts:
            model = onnx.load(str(src / p.files[0]))
            yield p.name, model

    out.mkdir(parents=True)
    import shutil
    for f in m.tokenizer_files():
        shutil.copyfile(src / f, out / f)
    parts = write_parts(m.config, models(), out, dtype, spec)
    _write_manifest(out, m.config, dtype, m.tokenizer, m.name, m.source, parts, spec)
    return out


def logits_of(model_dir: Path, windows: list[list[int]]) -> np.ndarray:
    seg = Segment(model_dir, threads=2)
    rows = []
    for w in windows:
        seg.open(0)
        for t in w[:-1]:
            rows.append(seg.decode([0], np.array([t]))[0])
        seg.close(0)
    return np.stack(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/tiny-austen")
    ap.add_argument("--corpus-dir", default="/usr/lib/R/site-library/janeaustenr")
    ap.add_argument("--windows-per-novel", type=int, default=5)
    ap.add_argument("--window", type=int, default=200)
    args = ap.parse_args()
    src = Path(args.model)
    m0 = load_manifest(src)
    tok = load_tokenizer(src, m0.tokenizer)
    _, val = split_corpus(load_austen(args.corpus_dir), 0.05)
    windows = []
    for text in val:
        ids = tok.encode(text)
        for j in range(args.windows_per_novel):
            windows.append(ids[j * args.window:(j + 1) * args.window + 1])
    targets = np.concatenate([np.array(w[1:]) for w in windows])
    base = q.QuantSpec(4)
    specs = {
        "int8 sym": ("int8", q.QuantSpec(8)),
        "int8 asym": ("int8", replace(q.QuantSpec(8), symmetric=False)),
        "int8 sym, accuracy 1": ("int8", q.QuantSpec(8, accuracy_level=1)),
        "int8 asym, accuracy 1": ("int8", q.QuantSpec(8, accuracy_level=1, symmetric=False)),
        "int4 sym": ("int4", base),
        "int4 asym (zero points)": ("int4", replace(base, symmetric=False)),
        "int4 sym, table/head int8": ("int4", replace(base, table_bits=8)),
        "int4 asym, table/head int8": ("int4", replace(base, symmetric=False, table_bits=8)),
        "int4 sym, accuracy 1": ("int4", q.QuantSpec(4, accuracy_level=1)),
        "int4 sym, table/head int8, accuracy 1": ("int4", q.QuantSpec(4, accuracy_level=1, table_bits=8)),
        "int4 sym, block 16": ("int4", q.QuantSpec(4, block_size=16)),
        "int4 sym, block 64": ("int4", q.QuantSpec(4, block_size=64)),
    }
    ref = logits_of(src, windows)

    def report(name: str, lg: np.ndarray, nbytes: int) -> None:
        lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
        ppl = float(np.exp(np.mean(lse - lg[np.arange(len(targets)), targets])))
        agree = float(np.mean(lg.argmax(-1) == ref.argmax(-1)))
        print(f"| {name} | {ppl:.3f} | {100 * (ppl / ppl_ref - 1):+.2f}% | {100 * agree:.1f}% "
              f"| {nbytes / 1e6:.2f} MB |", flush=True)

    lse = np.log(np.exp(ref - ref.max(-1, keepdims=True)).sum(-1)) + ref.max(-1)
    ppl_ref = float(np.exp(np.mean(lse - ref[np.arange(len(targets)), targets])))
    weights = lambda d: sum(e.size for k, e in load_manifest(d).files.items() if k.endswith((".onnx", ".data")))  # noqa
    print(f"{len(targets)} held-out tokens in {len(windows)} windows")
    print("| variant | perplexity | vs fp32 | top-1 agreement | model files |\n|---|---|---|---|---|")
    report("fp32", ref, weights(src))
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (dtype, spec)) in enumerate(specs.items()):
            d = variant(src, Path(tmp) / str(i), dtype, spec)
            report(name, logits_of(d, windows), weights(d))


if __name__ == "__main__":
    main()
