"""Logits of exported Hugging Face checkpoints equal those of transformers (torch) within 1e-4."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from meshllm.model.export import export
from meshllm.runtime.generate import LocalModel
from meshllm.runtime.sampling import SamplingParams
from meshllm.runtime.segment import Segment
from tests.hf_models import write_hf_model

CASES = [
    ("llama", False, True),  # untied, Llama-3 rope scaling
    ("llama", True, False),
    ("qwen2", True, False),  # q/k/v bias
    ("qwen2", False, False),
    ("mistral", False, False),
]
PROMPT = [1, 17, 33, 2, 99, 64, 7, 250, 3, 41, 5, 12]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{'tied' if c[1] else 'untied'}"
                + ("-rope_scaling" if c[2] else ""))
def exported(request, tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    arch, tied, scaling = request.param
    root = tmp_path_factory.mktemp(arch)
    model = write_hf_model(root / "hf", arch, tied=tied, rope_scaling=scaling)
    export(root / "hf", root / "out")
    return model, root / "out"


def _segments(model_dir: Path, cuts: tuple[int, ...]) -> list[Segment]:
    bounds = [0, *cuts, 4]
    return [Segment(model_dir, a, b) for a, b in zip(bounds[:-1], bounds[1:])]


@pytest.mark.parametrize("cuts", [(), (2,), (1, 3), (1, 2, 3)])
def test_logits_match_transformers_for_every_step(exported, cuts) -> None:
    model, out = exported
    with torch.no_grad():
        ref = model(torch.tensor([PROMPT])).logits[0].numpy()
    segs = _segments(out, cuts)
    for s in segs:
        s.open("r")
    # prefill the first 5 tokens in two chunks, then decode the rest one by one
    x: np.ndarray = np.array(PROMPT[:3])
    for s in segs:
        x = s.prefill("r", x)
    np.testing.assert_allclose(x[0], ref[2], atol=1e-4, rtol=0)
    x = np.array(PROMPT[3:5])
    for s in segs:
        x = s.prefill("r", x)
    np.testing.assert_allclose(x[0], ref[4], atol=1e-4, rtol=0)
    for t in range(5, len(PROMPT)):
        x = np.array([PROMPT[t]])
        for s in segs:
            x = s.decode(["r"], x)
        np.testing.assert_allclose(x[0], ref[t], atol=1e-4, rtol=0)


def test_greedy_generation_equals_transformers_generate(exported) -> None:
    model, out = exported
    local = LocalModel(out)
    done = local.generate(PROMPT, SamplingParams(max_tokens=20, temperature=0))
    with torch.no_grad():
        ref = model.generate(torch.tensor([PROMPT]), max_new_tokens=20, do_sample=False,
                             eos_token_id=2, pad_token_id=0)[0, len(PROMPT):].tolist()
    if 2 in ref:
        ref = ref[: ref.index(2)]
    assert done.token_ids == ref


def test_every_segmentation_gives_identical_greedy_tokens(exported) -> None:
    _, out = exported
    params = SamplingParams(max_tokens=16, temperature=0)
    baseline = LocalModel(out).generate(PROMPT, params).token_ids
    assert baseline
    for k in range(1, 4):
        for cuts in itertools.combinations([1, 2, 3], k):
            assert LocalModel(out, split=cuts, verify=False).generate(PROMPT, params).token_ids == baseline, cuts


def test_batched_decode_of_sequences_at_different_positions(exported) -> None:
    model, out = exported
    seg = Segment(out, 0, 4, max_batch=3)
    prompts = [PROMPT[:3], PROMPT[:7], PROMPT[2:11]]
    with torch.no_grad():
        refs = [model(torch.tensor([p + [5, 9]])).logits[0].numpy() for p in prompts]
    for i, p in enumerate(prompts):
        seg.open(i)
        seg.prefill(i, np.array(p))
    # open in a different order than the batch, to force slot rearrangement
    order = [2, 0, 1]
    for step, tok in enumerate([5, 9]):
        logits = seg.decode(order, np.array([tok] * 3))
        for row, i in enumerate(order):
            np.testing.assert_allclose(logits[row], refs[i][len(prompts[i]) + step], atol=1e-4, rtol=0)
