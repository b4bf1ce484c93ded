"""Quality per weight dtype: perplexity on held-out text and top-1 agreement with the fp32 logits.

For each dtype (fp32 first, the reference; then fp16, int8, int4 when this meshllm
can make them) the tool makes a copy of the model in that dtype, runs it with
meshllm's own runtime (:class:`meshllm.runtime.generate.LocalModel`, the decode
path nodes run: one token per step against the KV cache, 16 windows batched),
teacher-forced over windows of the model's context, and reports

- perplexity on the held-out text and its change against fp32;
- top-1 agreement: how often the dtype's most likely next token is fp32's.

Goals (issue 15): int8 within 0.5% of fp32 perplexity with >= 99% agreement; int4
within 5% perplexity.

Held-out text. The default model is the bundled ``models/tiny-austen``, trained by
``tools/train_tiny.py`` on Jane Austen's six novels minus the last 5% of each novel's
paragraphs. Those held-out paragraphs (59,848 tokens, 69 KB compressed) are in
``tools/data/austen-heldout.json.bz2``; ``--make-heldout CORPUS_DIR`` regenerates the
file bit for bit from the Debian package ``r-cran-janeaustenr`` (with train_tiny's
reader and split). The token stream and windows are train_tiny's, so the fp32
figure is the model card's validation perplexity (63.8). ``--text FILE`` evaluates
on any other UTF-8 text.

Dtype copies. ``python -m meshllm quantize SRC OUT --dtype D`` makes them (issue 15's
quantized export); a dtype it cannot make is skipped with a message. fp16 has a
stand-in until then: every weight initializer of the fp32 graphs stored as float16
and cast to float32, exactly what ``meshllm export --dtype fp16`` writes.

Usage::

    python tools/eval_quality.py [--model models/tiny-austen] [--dtype fp32,fp16,int8,int4]
                                 [--max-tokens N] [--batch 16] [--json]
"""

from __future__ import annotations

import argparse
import bz2
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meshllm.model.manifest import file_entry, load_manifest  # noqa: E402
from meshllm.runtime.generate import LocalModel  # noqa: E402

HELDOUT = ROOT / "tools" / "data" / "austen-heldout.json.bz2"
DTYPES = ("fp32", "fp16", "int8", "int4")
GOALS = {"int8": (0.5, 99.0), "int4": (5.0, None)}  # max perplexity change in %, min top-1 agreement in %
ROPE_TABLES = ("rope.cos", "rope.sin")  # exact constants, never down-cast (see graphs._Builder.const)


class Unavailable(Exception):
    """This meshllm cannot make the model in a dtype (yet)."""


# --- held-out text ------------------------------------------------------------------------------


def make_heldout(corpus_dir: str, out: Path = HELDOUT) -> None:
    """Writes the held-out split of train_tiny (last 5% of each novel's paragraphs), deterministically."""
    sys.path.insert(0, str(ROOT / "tools"))
    import train_tiny  # needs torch, as training does

    novels = train_tiny.load_austen(corpus_dir)
    _, val = train_tiny.split_corpus(novels, 0.05)
    doc = {"what": "held-out split of models/tiny-austen: the last 5% of the paragraphs of each novel "
                   "(never trained on)",
           "made_by": "python tools/eval_quality.py --make-heldout /usr/lib/R/site-library/janeaustenr",
           "source": "Debian r-cran-janeaustenr 1.0.0-1; texts public domain; package MIT "
                     "(see models/tiny-austen/README.md)",
           "novels": [{"title": title, "text": text} for (title, _), text in zip(novels, val, strict=True)]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(bz2.compress((json.dumps(doc, indent=0, ensure_ascii=False) + "\n").encode(), 9))


def heldout_texts(path: Path = HELDOUT) -> list[str]:
    return [n["text"] for n in json.loads(bz2.decompress(path.read_bytes()))["novels"]]


def token_stream(model: LocalModel, texts: list[str]) -> np.ndarray:
    """Each document as <s> text </s> (train_tiny's ``encode_docs``)."""
    tok = model.tokenizer
    if tok.bos_id is None or not tok.eos_ids:
        raise SystemExit("error: the model's tokenizer has no <s>/</s> tokens to frame the documents")
    out: list[int] = []
    for t in texts:
        out += [tok.bos_id, *tok.encode(t, bos=False), tok.eos_ids[0]]
    return np.asarray(out, np.int64)


def windows(stream: np.ndarray, ctx: int, bos: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(inputs, targets) of train_tiny's ``eval_windows``: <s> + up to ctx-1 tokens, targets shifted."""
    out = []
    for i in range(0, len(stream) - 1, ctx - 1):
        seg = stream[i:i + ctx]
        if len(seg) < 2:
            break
        out.append((np.concatenate([[bos], seg[:-1]]).astype(np.int64), seg.astype(np.int64)))
    return out


# --- dtype copies -------------------------------------------------------------------------------


def fp16_copy(src: Path, out: Path) -> None:
    """The fp32 model with its weights stored as float16 and cast to float32 at load (the fp16 export format)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = load_manifest(src)
    if m.dtype != "fp32":
        raise Unavailable(f"the fp16 stand-in converts fp32 models, {src} is {m.dtype}")
    out.mkdir(parents=True)
    for f in m.tokenizer_files():
        shutil.copyfile(src / f, out / f)
    for part in m.parts:
        graph_file = part.files[0]
        model = onnx.load(str(src / graph_file))
        g = model.graph
        casts, inits = [], []
        for t in g.initializer:
            if t.data_type == TensorProto.FLOAT and t.name not in ROPE_TABLES:
                arr = numpy_helper.to_array(t).astype(np.float16)
                inits.append(numpy_helper.from_array(arr, t.name))
                casts.append(helper.make_node("Cast", [t.name], [t.name + ".f32"], name=f"Cast.{t.name}.f32",
                                              to=TensorProto.FLOAT))
            else:
                inits.append(t)
        cast_of = {c.input[0]: c.output[0] for c in casts}
        for node in g.node:
            for k, name in enumerate(node.input):
                if name in cast_of:
                    node.input[k] = cast_of[name]
        del g.initializer[:]
        g.initializer.extend(inits)
        nodes = [*casts, *g.node]
        del g.node[:]
        g.node.extend(nodes)
        data = graph_file + ".data"
        onnx.save_model(model, out / graph_file, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data, size_threshold=1024)
    files = {f: file_entry(out / f) for f in m.files if (out / f).is_file()}
    parts = tuple(dataclasses.replace(p, files=tuple(f for f in p.files if f in files),
                                      cost=dataclasses.replace(p.cost, weight_bytes=p.cost.weight_bytes // 2))
                  for p in m.parts)
    dataclasses.replace(m, dtype="fp16", parts=parts, files=files).save(out)


def make_copy(src: Path, out: Path, dtype: str, quantize_args: list[str] | None = None) -> None:
    """``src`` in ``dtype`` at ``out``, by ``meshllm quantize`` (or the fp16 stand-in); :class:`Unavailable` if not.

    ``quantize_args`` (``--block-size``, ``--accuracy-level``) apply to int4/int8 only."""
    extra = (quantize_args or []) if dtype in ("int4", "int8") else []
    r = subprocess.run([sys.executable, "-m", "meshllm", "quantize", str(src), str(out), "--dtype", dtype, *extra],
                       capture_output=True, text=True, timeout=1800, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode == 0:
        return
    shutil.rmtree(out, ignore_errors=True)
    if dtype == "fp16":
        fp16_copy(src, out)
        return
    if "invalid choice: 'quantize'" in r.stderr:
        raise Unavailable("this meshllm has no `meshllm quantize` yet (issue 15, quantized export)")
    why = (r.stderr.strip().splitlines() or ["no message"])[-1]
    raise Unavailable(f"`meshllm quantize --dtype {dtype}` failed: {why}")


# --- evaluation ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Scores:
    dtype: str
    tokens: int
    nll: float  # mean negative log-likelihood, nats/token
    top1: np.ndarray  # argmax at every scored position
    seconds: float

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


def evaluate(model_dir: Path, dtype: str, wins: list[tuple[np.ndarray, np.ndarray]], batch: int,
             threads: int | None) -> Scores:
    """Teacher-forced decode of every window, ``batch`` windows per step."""
    ctx = max(len(x) for x, _ in wins)
    model = LocalModel(model_dir, max_batch=batch, max_seq_len=ctx, threads=threads)
    t0 = time.perf_counter()
    nll, n = 0.0, 0
    order = sorted(range(len(wins)), key=lambda i: -len(wins[i][0]))  # same-length windows batch together
    i = 0
    picks = np.empty(len(order), dtype=object)
    while i < len(order):
        length = len(wins[order[i]][0])
        group = [j for j in order[i:i + batch] if len(wins[j][0]) == length]
        x = np.stack([wins[j][0] for j in group])
        y = np.stack([wins[j][1] for j in group])
        seqs = [model.open() for _ in group]
        best = np.empty(y.shape, np.int64)
        for pos in range(length):
            logits = model.decode(seqs, x[:, pos]).astype(np.float64)
            mx = logits.max(axis=1, keepdims=True)
            lse = mx[:, 0] + np.log(np.exp(logits - mx).sum(axis=1))
            nll += float((lse - logits[np.arange(len(group)), y[:, pos]]).sum())
            best[:, pos] = logits.argmax(axis=1)
        for s in seqs:
            model.close(s)
        for k, j in enumerate(group):
            picks[j] = best[k]
        n += y.size
        i += len(group)
    top1 = [picks[j] for j in range(len(wins))]
    return Scores(dtype, n, nll / n, np.concatenate(top1), time.perf_counter() - t0)


def report(scores: list[Scores]) -> list[dict[str, Any]]:
    ref = scores[0]
    rows = []
    for s in scores:
        change = (s.ppl / ref.ppl - 1) * 100
        agree = float((s.top1 == ref.top1).mean() * 100)
        goal = GOALS.get(s.dtype)
        ok = None if goal is None else (abs(change) <= goal[0] and (goal[1] is None or agree >= goal[1]))
        rows.append({"dtype": s.dtype, "tokens": s.tokens, "nll": round(s.nll, 5), "perplexity": round(s.ppl, 3),
                     "perplexity_change_pct": round(change, 3), "top1_agreement_pct": round(agree, 3),
                     "goal": None if goal is None else {"max_ppl_change_pct": goal[0], "min_top1_pct": goal[1]},
                     "meets_goal": ok, "seconds": round(s.seconds, 1)})
    return rows


def format_table(rows: list[dict[str, Any]], skipped: dict[str, str], what: str) -> str:
    lines = [what, "",
             "| dtype | perplexity | vs fp32 | top-1 agreement with fp32 | goal | met |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        g = r["goal"]
        goal = "reference" if r["dtype"] == "fp32" else "-" if g is None else (
            f"<= {g['max_ppl_change_pct']}%" + (f", >= {g['min_top1_pct']}%" if g["min_top1_pct"] else ""))
        met = "" if r["meets_goal"] is None else ("yes" if r["meets_goal"] else "NO")
        lines.append(f"| {r['dtype']} | {r['perplexity']:.2f} | {r['perplexity_change_pct']:+.2f}% | "
                     f"{r['top1_agreement_pct']:.2f}% | {goal} | {met} |")
    lines += [f"skipped {d}: {why}" for d, why in skipped.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", default=str(ROOT / "models" / "tiny-austen"), help="an fp32 meshllm model directory")
    ap.add_argument("--dtype", default=",".join(DTYPES),
                    help="comma-separated dtypes to compare with fp32 (default: all; fp32 always runs first)")
    ap.add_argument("--text", help="UTF-8 text file to evaluate on (default: the held-out Austen split)")
    ap.add_argument("--max-tokens", type=int, help="evaluate only the first N tokens of the text")
    ap.add_argument("--batch", type=int, default=16, help="windows decoded together (default 16)")
    ap.add_argument("--threads", type=int, help="onnxruntime threads (default: all cores)")
    ap.add_argument("--block-size", type=int, help="int4/int8 block size (default: meshllm quantize's)")
    ap.add_argument("--accuracy-level", type=int, help="int4/int8 accuracy level (default: meshllm quantize's)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--make-heldout", metavar="CORPUS_DIR",
                    help=f"regenerate {HELDOUT.relative_to(ROOT)} from janeaustenr (needs torch) and exit")
    args = ap.parse_args(argv)
    if args.make_heldout:
        make_heldout(args.make_heldout)
        print(f"wrote {HELDOUT}")
        return 0
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        ap.error(f"unknown dtype {bad[0]!r} (choose from {', '.join(DTYPES)})")
    src = Path(args.model)
    m = load_manifest(src)
    if m.dtype != "fp32":
        ap.error(f"{src} is {m.dtype}; the reference must be an fp32 model")

    ref = LocalModel(src, max_batch=1)
    texts = [Path(args.text).read_text()] if args.text else heldout_texts()
    stream = token_stream(ref, texts)
    if args.max_tokens:
        stream = stream[:args.max_tokens + 1]
    assert ref.tokenizer.bos_id is not None
    wins = windows(stream, m.config.max_seq_len, ref.tokenizer.bos_id)
    del ref
    what = (f"{m.name}: {sum(len(y) for _, y in wins)} tokens of "
            f"{args.text or HELDOUT.relative_to(ROOT)} in {len(wins)} windows of {m.config.max_seq_len}")
    print(what, file=sys.stderr)

    scores, skipped = [evaluate(src, "fp32", wins, args.batch, args.threads)], {}
    with tempfile.TemporaryDirectory(prefix="meshllm-eval-") as tmp:
        for d in [d for d in dtypes if d != "fp32"]:
            out = Path(tmp) / d
            try:
                qargs = [*(["--block-size", str(args.block_size)] if args.block_size else []),
                         *(["--accuracy-level", str(args.accuracy_level)] if args.accuracy_level else [])]
                make_copy(src, out, d, qargs)
            except Unavailable as e:
                skipped[d] = str(e)
                print(f"skipping {d}: {e}", file=sys.stderr)
                continue
            scores.append(evaluate(out, d, wins, args.batch, args.threads))
            print(f"{d}: perplexity {scores[-1].ppl:.3f} ({scores[-1].seconds:.0f} s)", file=sys.stderr)
    rows = report(scores)
    if args.json:
        print(json.dumps({"model": m.name, "text": args.text or str(HELDOUT.relative_to(ROOT)),
                          "tokens": rows[0]["tokens"], "windows": len(wins), "context": m.config.max_seq_len,
                          "results": rows, "skipped": skipped}, indent=1))
    else:
        print(format_table(rows, skipped, what))
    return 1 if any(r["meets_goal"] is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
