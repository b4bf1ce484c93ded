"""fp16 weight storage: half the bytes on disk, logits within 2e-2 of fp32 at every step."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from meshllm.model.export import export
from meshllm.runtime.generate import LocalModel
from meshllm.runtime.sampling import SamplingParams
from meshllm.runtime.segment import Segment
from tests.hf_models import write_hf_model


def test_fp16_export_halves_weights_and_keeps_logits(tmp_path: Path) -> None:
    write_hf_model(tmp_path / "hf", "llama", layers=2)
    m32 = export(tmp_path / "hf", tmp_path / "fp32")
    m16 = export(tmp_path / "hf", tmp_path / "fp16", dtype="fp16")
    size = lambda m: sum(e.size for k, e in m.files.items() if k.endswith(".data"))  # noqa: E731
    assert 0.45 < size(m16) / size(m32) < 0.55
    assert m16.layer_costs[0].weight_bytes * 2 == m32.layer_costs[0].weight_bytes
    ids = np.array([1, 5, 9, 33, 120, 7])
    out = []
    for d in ("fp32", "fp16"):
        s = Segment(tmp_path / d)
        s.open(0)
        out.append(s.prefill(0, ids)[0])
    np.testing.assert_allclose(out[0], out[1], atol=2e-2)
    # teacher-forced on fp32's greedy tokens, fp16 logits stay close at every step
    tokens = LocalModel(tmp_path / "fp32").generate([1, 5, 9], SamplingParams(max_tokens=12, temperature=0)).token_ids
    segs = [Segment(tmp_path / d) for d in ("fp32", "fp16")]
    for s in segs:
        s.open(0)
        s.prefill(0, np.array([1, 5, 9]))
    for t in tokens:
        a, b = (s.decode([0], np.array([t]))[0] for s in segs)
        np.testing.assert_allclose(a, b, atol=2e-2)
