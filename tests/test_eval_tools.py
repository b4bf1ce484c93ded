"""Smoke tests of the measuring tools: tools/eval_quality.py (quality per dtype) and tools/bench_generate.py
(speed per dtype), run as a user runs them, on the bundled model and a tiny random shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from meshllm.model.manifest import load_manifest, verify_files
from meshllm.runtime.generate import LocalModel
from tools import eval_quality

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "models" / "tiny-austen"

# int8 and int4 (meshllm quantize) must be measured by both tools: a tool that skips them fails these tests.


def tool(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_heldout_split_is_the_one_the_bundled_model_was_validated_on() -> None:
    """The model card's validation set has 59,848 tokens (6 novels, <s> text </s>); so must the stored split."""
    model = LocalModel(BUNDLED, max_batch=1)
    stream = eval_quality.token_stream(model, eval_quality.heldout_texts())
    assert len(stream) == 59848
    wins = eval_quality.windows(stream, 256, 1)
    assert all(len(x) == len(y) <= 256 and x[0] == 1 for x, y in wins)
    assert np.array_equal(np.concatenate([y[:-1] for x, y in wins[:-1]]), stream[:len(wins[:-1]) * 255])


def test_eval_quality_reports_perplexity_and_agreement_per_dtype() -> None:
    r = tool("tools/eval_quality.py", "--max-tokens", "510", "--batch", "2", "--json")
    res = json.loads(r.stdout)
    rows = {x["dtype"]: x for x in res["results"]}
    # the exit status says whether every dtype met its goal (512 tokens are too few to decide that here)
    assert r.returncode == (1 if any(x["meets_goal"] is False for x in rows.values()) else 0), r.stderr
    assert res["tokens"] >= 510 and res["windows"] == 2 and res["context"] == 256
    assert 20 < rows["fp32"]["perplexity"] < 200  # a trained model, on text it did not see (card: 63.8)
    assert rows["fp32"]["top1_agreement_pct"] == 100.0
    assert rows["fp16"]["top1_agreement_pct"] >= 99.0 and abs(rows["fp16"]["perplexity_change_pct"]) < 0.5
    assert not res["skipped"] and {"int8", "int4"} <= set(rows)


def test_eval_quality_refuses_an_unknown_dtype_in_one_line() -> None:
    r = tool("tools/eval_quality.py", "--dtype", "fp32,int3")
    assert r.returncode == 2 and "unknown dtype 'int3'" in r.stderr


def test_int8_flips_tells_the_roundings_apart() -> None:
    """tools/int8_flips.py: float activations over the dequantized weights really remove the int8 activations'
    rounding (the whole model's, here), and the scheme's copy is the one ``meshllm quantize`` makes."""
    r = tool("tools/int8_flips.py", "--variants", "plain,float-activations,scheme", "--max-tokens", "1000")
    assert r.returncode == 0, r.stderr
    rows = {c[0]: int(c[1]) for line in r.stdout.splitlines() if line.startswith("| ")
            and (c := [x.strip() for x in line.strip("|").split("|")])[1].isdigit()}
    assert set(rows) == {"plain", "float-activations", "scheme"}, r.stdout
    assert rows["float-activations"] < rows["plain"], rows
    bad = tool("tools/int8_flips.py", "--variants", "plain,int3")
    assert bad.returncode == 2 and "unknown variant 'int3'" in bad.stderr


def test_fp16_stand_in_is_a_verified_model_with_the_fp32_answers(tmp_path: Path) -> None:
    eval_quality.fp16_copy(BUNDLED, tmp_path / "fp16")
    m = load_manifest(tmp_path / "fp16")
    assert m.dtype == "fp16"
    verify_files(tmp_path / "fp16", m)
    assert m.files["layer_000.onnx.data"].size < 0.55 * load_manifest(BUNDLED).files["layer_000.onnx.data"].size
    ids = LocalModel(BUNDLED).encode_prompt("It is a truth universally acknowledged")
    a, b = LocalModel(BUNDLED), LocalModel(tmp_path / "fp16")
    la, lb = a.prefill(a.open(), ids), b.prefill(b.open(), ids)
    assert la.argmax() == lb.argmax() and np.abs(la - lb).max() < 0.05


def test_bench_generate_prints_every_figure_per_dtype_side_by_side(tmp_path: Path) -> None:
    r = tool("tools/bench_generate.py", "--shapes", "tiny", "--rounds", "1", "--steps", "3", "--bench-dir",
             str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    rows = res["results"]["tiny"]["dtypes"]
    assert {"fp32", "fp16"} <= set(rows)
    for row in rows.values():
        assert row["decode_ms_pos16"] > 0 and row["decode_ms_pos480"] > 0 and row["prefill_tps_512"] > 0
        assert row["peak_rss_mb"] > 10 and row["step_bytes_mb"] > 0 and row["decode_vs_floor"] > 0
        assert row["batch16_tps"] > row["batch1_tps"]  # batching amortises the weight reads
    assert rows["fp32"]["decode_speedup_vs_fp32"] == 1.0
    assert not res["skipped"] and {"int8", "int4"} <= set(rows)
    assert rows["int4"]["step_bytes_mb"] < 0.3 * rows["fp32"]["step_bytes_mb"]


def test_bench_generate_refuses_an_unknown_shape_in_one_line() -> None:
    r = tool("tools/bench_generate.py", "--shapes", "7b")
    assert r.returncode == 2 and "unknown shape '7b'" in r.stderr
