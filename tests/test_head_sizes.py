"""Any head size exports and runs: RoPE before GroupQueryAttention when its fused rotary cannot (head_dim % 16).

Hugging Face checkpoints (RoPE on halves) are checked against transformers, llama2.c's stories260K shape
(head size 8, RoPE on adjacent pairs) against the run.c transcription; prefill in chunks, decode, batched
decode of sequences at different positions and a split into segments all go through the unfused path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from meshllm.errors import UnsupportedModelError
from meshllm.model import graphs
from meshllm.model.config import ModelConfig
from meshllm.model.export import export
from meshllm.model.llama2c import make_llama2c_config, random_llama2c_weights, write_llama2c
from meshllm.model.tokenizer import random_llama2c_vocab, write_tokenizer_bin
from meshllm.runtime.generate import LocalModel
from meshllm.runtime.sampling import SamplingParams
from meshllm.runtime.segment import Segment
from tests.hf_models import write_hf_model
from tests.oracles.run_c import RunC

PROMPT = [1, 17, 33, 2, 99, 64, 7, 250, 3, 41, 5, 12]
CASES = [("llama", 8), ("qwen2", 24), ("mistral", 40)]  # none a multiple of 16


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-hd{c[1]}")
def exported(request, tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    arch, head_dim = request.param
    root = tmp_path_factory.mktemp(f"{arch}{head_dim}")
    model = write_hf_model(root / "hf", arch, head_dim=head_dim, tied=arch == "qwen2")
    export(root / "hf", root / "out")
    return model, root / "out"


def test_graph_rotates_before_attention_when_the_head_size_needs_it(exported) -> None:
    _, out = exported
    layer = onnx.load(str(out / "layer_000.onnx"), load_external_data=False)
    ops = [n.op_type for n in layer.graph.node]
    assert ops.count("RotaryEmbedding") == 2  # q and k
    gqa = next(n for n in layer.graph.node if n.op_type == "GroupQueryAttention")
    assert next(a.i for a in gqa.attribute if a.name == "do_rotary") == 0


def test_logits_match_transformers_through_chunks_decode_and_segments(exported) -> None:
    model, out = exported
    with torch.no_grad():
        ref = model(torch.tensor([PROMPT])).logits[0].numpy()
    segs = [Segment(out, 0, 2), Segment(out, 2, 4)]
    for s in segs:
        s.open("r")
    got = []
    for chunk in (PROMPT[:3], PROMPT[3:5]):  # a first prompt chunk, then a chunk on top of a cache
        x: np.ndarray = np.array(chunk)
        for s in segs:
            x = s.prefill("r", x)
        got.append(x[0])
    for t in range(5, len(PROMPT)):
        x = np.array([PROMPT[t]])
        for s in segs:
            x = s.decode(["r"], x)
        got.append(x[0])
    np.testing.assert_allclose(np.array(got), ref[[2, 4, *range(5, len(PROMPT))]], atol=1e-4, rtol=0)


def test_greedy_generation_equals_transformers_generate(exported) -> None:
    model, out = exported
    done = LocalModel(out).generate(PROMPT, SamplingParams(max_tokens=20, temperature=0))
    with torch.no_grad():
        ref = model.generate(torch.tensor([PROMPT]), max_new_tokens=20, do_sample=False,
                             eos_token_id=2, pad_token_id=0)[0, len(PROMPT):].tolist()
    if 2 in ref:
        ref = ref[: ref.index(2)]
    assert len(ref) >= 5 and done.token_ids == ref


def test_batched_decode_of_sequences_at_different_positions(exported) -> None:
    model, out = exported
    seg = Segment(out, 0, 4, max_batch=3)
    prompts = [PROMPT[:3], PROMPT[:7], PROMPT[2:11]]
    with torch.no_grad():
        refs = [model(torch.tensor([p + [5, 9]])).logits[0].numpy() for p in prompts]
    for i, p in enumerate(prompts):
        seg.open(i)
        seg.prefill(i, np.array(p))
    order = [2, 0, 1]  # not the order the slots were opened in
    for step, tok in enumerate([5, 9]):
        logits = seg.decode(order, np.array([tok] * 3))
        for row, i in enumerate(order):
            np.testing.assert_allclose(logits[row], refs[i][len(prompts[i]) + step], atol=1e-4, rtol=0)


# --- llama2.c's stories260K shape: head size 8, RoPE on adjacent pairs ----------------------------


@pytest.fixture(scope="module")
def stories260k(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stories260k")
    cfg = make_llama2c_config(64, 172, 5, 8, 4, 512, 512)  # dim, hidden, layers, heads, kv heads, vocab, seq
    assert cfg.head_dim == 8 and cfg.rope_interleaved
    write_llama2c(root / "model.bin", cfg, random_llama2c_weights(cfg, seed=5))
    write_tokenizer_bin(root / "tokenizer.bin", *random_llama2c_vocab(cfg.vocab_size, seed=5))
    export(root / "model.bin", root / "out")
    return root


def test_stories260k_shape_greedy_tokens_equal_run_c(stories260k: Path) -> None:
    oracle = RunC(stories260k / "model.bin", stories260k / "tokenizer.bin")
    model = LocalModel(stories260k / "out", split=(2,))
    steps = 40
    for prompt in ("Once upon a time", "the cat sat on the mat"):
        n_prompt = len(oracle.encode(prompt, True, False))
        expect = oracle.generate_greedy(prompt, steps)
        got = model.generate(prompt, SamplingParams(max_tokens=steps - n_prompt + 1, temperature=0))
        assert len(expect) > 10 and got.token_ids == expect, prompt


def test_stories260k_shape_batched_decode_equals_one_at_a_time(stories260k: Path) -> None:
    out = stories260k / "out"
    prompts = [[1, 40, 41, 42], [1, 7], [1, 300, 301, 302, 303, 304, 305]]
    alone = []
    for p in prompts:
        seg = Segment(out)
        seg.open(0)
        seg.prefill(0, np.array(p))
        alone.append([seg.decode([0], np.array([t]))[0] for t in (9, 10, 11)])
    seg = Segment(out, max_batch=3)
    for i, p in enumerate(prompts):
        seg.open(i)
        seg.prefill(i, np.array(p))
    for step, t in enumerate((9, 10, 11)):
        logits = seg.decode([1, 2, 0], np.array([t] * 3))
        for row, i in enumerate([1, 2, 0]):
            np.testing.assert_allclose(logits[row], alone[i][step], atol=1e-5, rtol=0)


def test_only_odd_head_sizes_are_refused() -> None:
    base = dict(arch="llama", dim=64, n_layers=1, n_heads=8, n_kv_heads=4, ffn_dim=128, vocab_size=32,
                max_seq_len=16)
    graphs.check_supported(ModelConfig(head_dim=8, **base))  # type: ignore[arg-type]
    with pytest.raises(UnsupportedModelError, match="odd"):
        graphs.check_supported(ModelConfig(head_dim=7, **base))  # type: ignore[arg-type]
    with pytest.raises(UnsupportedModelError, match="kv_dtype"):
        graphs.check_supported(ModelConfig(head_dim=8, kv_dtype="int8", **base))  # type: ignore[arg-type]
