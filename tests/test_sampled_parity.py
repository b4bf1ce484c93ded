"""``meshllm generate`` is the reference the mesh must equal, for sampled requests too: the same
seed and sampling give the same tokens on a serving mesh (prefill and decode on other nodes) as in
one process, with the defaults left out on both sides (one set of defaults: SamplingParams) and
with a stop string (one stop rule: meshllm.runtime.stopping)."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from meshllm.runtime.generate import LocalModel
from meshllm.runtime.sampling import SamplingParams
from tests.mesh_harness import mosquitto
from tests.serving_harness import ask_raw, random_model, replica, serving_mesh, text_of, tokens_of


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_model(tmp_path_factory.mktemp("parity"))


def generate(model: Path, prompt: str, **opts: Any) -> dict[str, Any]:
    """``meshllm generate --json`` with ``opts`` as its options (only those given)."""
    args = [sys.executable, "-m", "meshllm", "generate", prompt, "--model", str(model), "--json"]
    for name, value in opts.items():
        for v in value if isinstance(value, list) else [value]:
            args += [f"--{name.replace('_', '-')}", str(v)]
    p = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_a_sampled_request_gives_the_same_tokens_on_the_mesh_and_in_meshllm_generate(model: Path,
                                                                                    tmp_path: Path) -> None:
    # a stop string that the sampled answer reaches (found with the same defaults in this process)
    full = LocalModel(model).generate("the cat sat", SamplingParams(max_tokens=40, seed=5)).text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert len(stop) == 2
    cases: list[tuple[str, dict[str, Any]]] = [
        ("Once upon a time", {"max_tokens": 32, "seed": 7}),  # temperature, top_p, top_k: the defaults
        ("Héllo 🙂 wörld", {"max_tokens": 32, "seed": 11, "temperature": 1.3, "top_k": 50, "top_p": 0.9}),
        ("the cat sat", {"max_tokens": 40, "seed": 5, "stop": [stop]}),
    ]
    mesh = f"t-parity-{secrets.token_hex(3)}"
    plan = {"version": 1, "n_layers": 4, "replicas": [replica(0, "prefill", [("n1", 0, 4)]),
                                                       replica(1, "decode", [("n2", 0, 2), ("n3", 2, 4)])]}
    with mosquitto() as broker, serving_mesh(mesh, broker, model, ["n1", "n2", "n3"], plan, tmp_path):
        reqs = [{"id": f"p{i}", "prompt": p, **opts} for i, (p, opts) in enumerate(cases)]
        streams = asyncio.run(ask_raw(broker, mesh, reqs))
    for (prompt, opts), stream in zip(cases, streams, strict=True):
        ref = generate(model, prompt, **opts)
        final = stream[-1]
        assert final.get("done"), stream
        assert tokens_of(stream) == ref["token_ids"], (prompt, opts)
        assert text_of(stream) == ref["text"]
        assert final["finish_reason"] == ref["finish_reason"]
    assert streams[2][-1]["finish_reason"] == "stop" and stop not in text_of(streams[2])
    assert len(set(tokens_of(streams[0]))) > 3  # really sampled, not a greedy loop
