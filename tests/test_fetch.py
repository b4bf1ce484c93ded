"""Model files fetched from a peer: streamed, resumable, verified, confined to the manifest."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import pytest

from meshllm.dataplane.server import DataPlane
from meshllm.errors import ManifestError
from meshllm.model.manifest import load_manifest, sha256_file
from meshllm.serve.fetch import fetch_file, serve_fetch
from tests.mesh_harness import mosquitto
from tests.serving_harness import ask_raw, random_model, replica, serving_mesh, tokens_of


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return random_model(tmp_path_factory.mktemp("fetch"))


async def _fetch(model: Path, dest: Path, name: str, **kw) -> None:
    m = load_manifest(model)
    async with DataPlane("127.0.0.1") as dp:
        dp.route("fetch", lambda msg, w: serve_fetch(model, m, msg, w))
        e = m.files.get(name)
        await fetch_file("127.0.0.1", dp.port, dest, name, sha256=kw.get("sha", e.sha256 if e else None),
                         size=e.size if e else None)


def test_fetch_whole_file_and_resume_a_partial_one(model: Path, tmp_path: Path) -> None:
    asyncio.run(_fetch(model, tmp_path, "layer_001.onnx.data"))
    assert sha256_file(tmp_path / "layer_001.onnx.data") == sha256_file(model / "layer_001.onnx.data")
    data = (model / "layer_002.onnx.data").read_bytes()
    (tmp_path / "layer_002.onnx.data.part").write_bytes(data[: len(data) // 3])  # an interrupted transfer
    asyncio.run(_fetch(model, tmp_path, "layer_002.onnx.data"))
    assert (tmp_path / "layer_002.onnx.data").read_bytes() == data
    assert not (tmp_path / "layer_002.onnx.data.part").exists()


def test_corrupt_partial_file_is_discarded_not_used(model: Path, tmp_path: Path) -> None:
    data = (model / "head.onnx.data").read_bytes()
    (tmp_path / "head.onnx.data.part").write_bytes(b"\x00" * 100)  # wrong bytes: the hash will not match
    with pytest.raises(ManifestError, match="hash"):
        asyncio.run(_fetch(model, tmp_path, "head.onnx.data"))
    assert not (tmp_path / "head.onnx.data").exists() and not (tmp_path / "head.onnx.data.part").exists()
    asyncio.run(_fetch(model, tmp_path, "head.onnx.data"))  # the retry starts afresh
    assert (tmp_path / "head.onnx.data").read_bytes() == data


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "not-in-manifest.bin"])
def test_files_outside_the_manifest_are_refused(model: Path, tmp_path: Path, name: str) -> None:
    with pytest.raises(ManifestError):
        asyncio.run(_fetch(model, tmp_path, name))
    assert all(p.stat().st_size == 0 for p in tmp_path.rglob("*") if p.is_file())  # nothing was written


def test_node_without_model_files_fetches_its_stage_and_serves(model: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty-model"
    empty.mkdir()
    mesh = f"t-fetch-{secrets.token_hex(3)}"
    plan = {"version": 1, "n_layers": 4, "replicas": [replica(0, "mixed", [("f1", 0, 2), ("f2", 2, 4)])]}
    (tmp_path / "plan.json").write_text(__import__("json").dumps(plan))
    from tests.mesh_harness import NodeProc, wait_until
    from tests.serving_harness import all_ready

    with mosquitto() as broker:
        procs = [NodeProc(mesh, "f1", broker=broker, extra=["--model", str(model), "--plan-file",
                                                             str(tmp_path / "plan.json")]),
                 NodeProc(mesh, "f2", broker=broker, extra=["--model", str(empty), "--plan-file",
                                                             str(tmp_path / "plan.json")])]
        try:
            for p in procs:
                p.wait_started()
            wait_until(lambda: all_ready(mesh, broker), 60, "both stages loaded")
            got = asyncio.run(ask_raw(broker, mesh, [{"id": "x", "prompt": "hello", "max_tokens": 8,
                                                        "temperature": 0}]))[0]
        finally:
            for p in procs:
                p.kill()
    from meshllm.runtime.generate import LocalModel
    from meshllm.runtime.sampling import SamplingParams

    assert tokens_of(got) == LocalModel(model).generate("hello", SamplingParams(max_tokens=8, temperature=0)).token_ids
    fetched = {p.name for p in empty.iterdir()}
    # exactly the files of layers 2-3, the head, the tokenizer and the manifest; not layers 0-1
    assert "layer_002.onnx.data" in fetched and "head.onnx" in fetched and "manifest.json" in fetched
    assert "layer_000.onnx.data" not in fetched and "embed.onnx.data" not in fetched
