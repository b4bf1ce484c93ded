"""The bundled model: its files match the manifest, and it writes English."""

from __future__ import annotations

import re
from pathlib import Path

from meshllm.model.manifest import load_manifest, verify_files
from meshllm.runtime.generate import LocalModel
from meshllm.runtime.sampling import SamplingParams

MODEL = Path(__file__).resolve().parent.parent / "models" / "tiny-austen"
FUNCTION_WORDS = {"the", "and", "of", "a", "to", "in", "was", "had", "her", "his", "be", "very", "with", "not"}


def test_bundled_model_files_match_the_manifest() -> None:
    m = load_manifest(MODEL)
    verify_files(MODEL, m)  # every file, by size and sha256
    assert m.name == "tiny-austen" and m.config.n_layers == 6
    assert sum(e.size for e in m.files.values()) < 20e6


def test_bundled_model_writes_words_and_splitting_changes_nothing() -> None:
    params = SamplingParams(max_tokens=48, temperature=0)
    whole = LocalModel(MODEL).generate("It is a truth universally acknowledged, that", params)
    assert len(whole.token_ids) == 48
    words = re.findall(r"[A-Za-z]+", whole.text)
    assert len(words) >= 25
    assert sum(w.lower() in FUNCTION_WORDS for w in words) >= 0.2 * len(words)  # English, not noise
    for cuts in ([3], [1, 2, 4], [1, 2, 3, 4, 5]):
        assert LocalModel(MODEL, split=cuts, verify=False).generate(
            "It is a truth universally acknowledged, that", params).token_ids == whole.token_ids
