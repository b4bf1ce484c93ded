#!/usr/bin/env python3
"""Where int8's top-1 disagreements with fp32 come from: its weights' rounding or its activations'.

A measurement for docs/inference.md ("int8's top-1 agreement"). Each variant is an int8
copy of the bundled model in which chosen ``MatMulNBits`` nodes are replaced by a float
``MatMul`` over their dequantized weights (the weights' rounding stays, the int8
activations of accuracy level 4 go), or a scheme variant (``QuantSpec`` fields). Every
variant is teacher-forced over the held-out Austen split the way tools/eval_quality.py
does, and counts the positions whose top-1 differs from fp32's.

    python tools/int8_flips.py [--variants plain,scheme,...] [--max-tokens N]
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meshllm.model import export as ex  # noqa: E402
from meshllm.model import quantize as q  # noqa: E402
from meshllm.model.manifest import load_manifest  # noqa: E402
from meshllm.runtime.generate import LocalModel  # noqa: E402
from tools import eval_quality as eq  # noqa: E402

Float = Callable[[str, str], bool]  # (part, node name) -> give this node float activations
PLAIN = q.QuantSpec(8, 64)
SCHEME = q.QuantSpec.for_dtype("int8", 64)
PROJ = ("qkv", "attn_out", "gate_up", "mlp_out")
VARIANTS: dict[str, tuple[q.QuantSpec, Float]] = {
    "plain": (PLAIN, lambda p, n: False),
    "float-activations": (PLAIN, lambda p, n: True),
    "float-head": (PLAIN, lambda p, n: p == "head"),
    "float-layers": (PLAIN, lambda p, n: p != "head"),
    **{f"float-layer{i}": (PLAIN, lambda p, n, i=i: p == f"layer.{i}") for i in range(6)},
    **{f"float-{k}": (PLAIN, lambda p, n, k=k: n.endswith("MatMul." + k)) for k in PROJ},
    "rotated": (dataclasses.replace(PLAIN, ffn_hadamard=True), lambda p, n: False),
    "rotated+refined": (dataclasses.replace(SCHEME, symmetric=True), lambda p, n: False),
    "scheme": (SCHEME, lambda p, n: False),
    "plain+zero-points": (dataclasses.replace(PLAIN, symmetric=False), lambda p, n: False),
}


def _float_activations(model: onnx.ModelProto, part: str, which: Float) -> onnx.ModelProto:
    """``MatMulNBits`` nodes chosen by ``which`` become float MatMuls over their dequantized weights."""
    inits = {t.name: t for t in model.graph.initializer}
    nodes, added = [], []
    for n in model.graph.node:
        base = n.name.removesuffix(".nbits")
        if n.op_type != "MatMulNBits" or not which(part, base):
            nodes.append(n)
            continue
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        arrays = [numpy_helper.to_array(inits[i]) if i else None for i in n.input[1:4]] + [None] * 3
        w = q.dequantize_blocks(q.Blocks(arrays[0], arrays[1], arrays[2], a["bits"], a["block_size"]))
        added.append(numpy_helper.from_array(np.ascontiguousarray(w.T), base + ".float"))
        nodes.append(helper.make_node("MatMul", [n.input[0], base + ".float"], list(n.output), name=base))
    used = {i for n in nodes for i in n.input}
    g = helper.make_graph(nodes, model.graph.name, list(model.graph.input), list(model.graph.output),
                          initializer=[t for t in model.graph.initializer if t.name in used] + added)
    out = helper.make_model(g, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    return out


def variant(src: Path, out: Path, spec: q.QuantSpec, which: Float) -> Path:
    m = load_manifest(src)
    out.mkdir(parents=True)
    for f in m.tokenizer_files():
        shutil.copyfile(src / f, out / f)
    original = q.quantize_part

    def quantize_part(model, spec_, part, table=None):  # type: ignore[no-untyped-def]
        model, made = original(model, spec_, part, table)
        changed = _float_activations(model, part, which)
        keeps_table = part != "head" or not any(n.op_type == "MatMul" and n.name.endswith("@logits")
                                                for n in changed.graph.node)
        return changed, made if keeps_table else None

    q.quantize_part = quantize_part  # write_parts quantizes part by part: the hook sees each part
    try:
        parts = ex.write_parts(m.config, ((p.name, onnx.load(str(src / p.files[0]))) for p in m.parts), out,
                               "int8", spec)
    finally:
        q.quantize_part = original
    ex._write_manifest(out, m.config, "int8", m.tokenizer, m.name, m.source, parts, spec)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "tiny-austen"))
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"from {', '.join(VARIANTS)}")
    ap.add_argument("--max-tokens", type=int, help="only the first N held-out tokens")
    args = ap.parse_args()
    names = [v for v in args.variants.split(",") if v]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant {bad[0]!r}")
    src = Path(args.model)
    fp32 = LocalModel(src, max_batch=1)
    assert fp32.tokenizer.bos_id is not None
    stream = eq.token_stream(fp32, eq.heldout_texts())
    if args.max_tokens:
        stream = stream[:args.max_tokens + 1]
    wins = eq.windows(stream, load_manifest(src).config.max_seq_len, fp32.tokenizer.bos_id)
    ref = eq.evaluate(src, "fp32", wins, 16, None)
    print(f"{ref.tokens} tokens in {len(wins)} windows; fp32 perplexity {ref.ppl:.3f}\n")
    print("| variant | flips | top-1 agreement | perplexity vs fp32 |\n|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory(prefix="meshllm-int8-") as tmp:
        for name in names:
            spec, which = VARIANTS[name]
            s = eq.evaluate(variant(src, Path(tmp) / name, spec, which), name, wins, 16, None)
            flips = int((s.top1 != ref.top1).sum())
            print(f"| {name} | {flips} | {100 - 100 * flips / ref.tokens:.2f} % | "
                  f"{100 * (s.ppl / ref.ppl - 1):+.3f} % |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
