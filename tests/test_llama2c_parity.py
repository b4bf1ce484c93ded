"""meshllm generate on llama2.c checkpoints equals run.c semantics (the numpy oracle), token for token."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from meshllm.model.export import export
from meshllm.model.llama2c import make_llama2c_config, random_llama2c_weights, write_llama2c
from meshllm.model.tokenizer import random_llama2c_vocab, write_tokenizer_bin
from meshllm.runtime.generate import LocalModel
from meshllm.runtime.sampling import SamplingParams
from tests.oracles.run_c import RunC

PROMPTS = ["Once upon a time", "the cat sat on the mat", "Héllo, wörld 🙂", ""]
STEPS = 48

CASES = {
    # name: (n_heads, n_kv_heads, shared classifier, BOS boost)
    "mqa-shared": (8, 1, True, 0.0),
    "gqa-unshared": (8, 2, False, 0.0),
    "mha-shared": (8, 8, True, 0.0),
    "gqa-unshared-bos-likely": (8, 2, False, 4.0),
}


def write_case(root: Path, n_heads: int, n_kv: int, shared: bool, bos_boost: float, seed: int = 3) -> Path:
    cfg = make_llama2c_config(128, 256, 4, n_heads, n_kv, 512, 128, shared_classifier=shared)
    w = random_llama2c_weights(cfg, seed=seed)
    if bos_boost:
        # make the classifier prefer BOS (id 1) now and then, so run.c's stop on BOS is exercised
        w["output"][1] = w["output"][1] + bos_boost * w["output"].std() * np.sign(w["norm"])
    root.mkdir(parents=True, exist_ok=True)
    write_llama2c(root / "model.bin", cfg, w)
    pieces, scores = random_llama2c_vocab(cfg.vocab_size, seed=seed)
    write_tokenizer_bin(root / "tokenizer.bin", pieces, scores)
    export(root / "model.bin", root / "out")
    return root


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory) -> Path:
    return write_case(tmp_path_factory.mktemp(request.param), *CASES[request.param])


def test_greedy_tokens_and_text_equal_run_c(case: Path) -> None:
    oracle = RunC(case / "model.bin", case / "tokenizer.bin")
    model = LocalModel(case / "out")
    stopped_on_bos = 0
    for prompt in PROMPTS:
        prompt_ids = oracle.encode(prompt, True, False)
        assert model.encode_prompt(prompt) == prompt_ids
        expect = oracle.generate_greedy(prompt, STEPS)
        max_tokens = STEPS - len(prompt_ids) + 1
        got = model.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0))
        assert got.token_ids == expect, prompt
        text = b"".join(oracle.decode(p, t) for p, t in zip([prompt_ids[-1], *expect], expect))
        assert got.text == text.decode("utf-8", errors="replace")
        stopped_on_bos += len(expect) < max_tokens
        assert got.finish_reason == ("stop" if len(expect) < max_tokens else "length")
    if "bos-likely" in str(case):
        assert stopped_on_bos > 0, "the BOS-boosted model never stopped on BOS: the case tests nothing"


def test_every_segmentation_gives_identical_greedy_tokens(case: Path) -> None:
    params = SamplingParams(max_tokens=24, temperature=0)
    base = LocalModel(case / "out").generate(PROMPTS[0], params).token_ids
    for k in (1, 2, 3):
        for cuts in itertools.combinations([1, 2, 3], k):
            got = LocalModel(case / "out", split=cuts, verify=False).generate(PROMPTS[0], params).token_ids
            assert got == base, cuts


def test_cli_generate_json_with_split(tmp_path: Path) -> None:
    root = write_case(tmp_path / "m", 8, 2, False, 0.0)
    oracle = RunC(root / "model.bin", root / "tokenizer.bin")
    n_prompt = len(oracle.encode(PROMPTS[1], True, False))
    out = subprocess.run(
        [sys.executable, "-m", "meshllm", "generate", "--model", str(root / "out"), "--temperature", "0",
         "--max-tokens", str(STEPS - n_prompt + 1), "--split", "1,3", "--json", PROMPTS[1]],
        capture_output=True, text=True, timeout=120, check=True,
    )
    result = json.loads(out.stdout)
    assert result["token_ids"] == oracle.generate_greedy(PROMPTS[1], STEPS)
    assert result["timings"]["prompt_tokens"] == n_prompt
    assert result["timings"]["prefill_seconds"] > 0
