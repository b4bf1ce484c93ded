"""Model files fetched from a peer: streamed, resumable, verified, confined to the manifest."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import shutil
from pathlib import Path

import pytest

from meshllm.dataplane.auth import connect
from meshllm.dataplane.codec import encode_buffers, read_frame
from meshllm.dataplane.server import DataPlane
from meshllm.errors import ManifestError
from meshllm.model.manifest import MANIFEST_NAME, FileEntry, Manifest, load_manifest, sha256_file
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


def _tampered_manifest(model: Path, names: list[str]) -> dict:
    """The model's manifest JSON with extra entries (as a hostile peer could hand out)."""
    d = json.loads((model / MANIFEST_NAME).read_text())
    for name in names:
        d["files"][name] = {"sha256": "0" * 64, "size": 1}
    return d


async def _ask_for(model: Path, manifest: Manifest, names: list[str]) -> list[str]:
    """What a plain fetch client gets for each name from a fetch server over a real socket: the bytes as
    text, or the server's error."""
    out = []
    async with DataPlane("127.0.0.1") as dp:
        dp.route("fetch", lambda msg, w: serve_fetch(model, manifest, msg, w))
        for name in names:  # spoken directly: fetch_file itself only asks for safe names
            reader, writer = await connect("127.0.0.1", dp.port, None, 5.0)
            writer.writelines(encode_buffers({"t": "fetch", "file": name, "offset": 0}))
            await writer.drain()
            data = b""
            while (msg := await asyncio.wait_for(read_frame(reader), 5.0))["t"] == "chunk":
                data += msg["data"].tobytes()
            writer.close()
            out.append(msg.get("error") or data.decode(errors="replace"))
    return out


def test_a_tampered_manifest_is_refused_at_load(model: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad-model"
    bad.mkdir()
    (bad / MANIFEST_NAME).write_text(json.dumps(_tampered_manifest(model, ["/etc/hostname", "../secret"])))
    with pytest.raises(ManifestError, match="'/etc/hostname'.*absolute"):
        load_manifest(bad)


def test_fetch_server_never_serves_outside_its_model_directory(model: Path, tmp_path: Path) -> None:
    """Even a manifest that got past the load check (built in memory here) cannot make the server read
    outside the model directory, through a name or through a symlink inside it."""
    root = tmp_path / "served"
    shutil.copytree(model, root / "model")
    (root / "secret").write_text("the mesh secret")
    (root / "model" / "link.bin").symlink_to(root / "secret")
    m = load_manifest(root / "model")
    names = ["/etc/hostname", "../secret", "link.bin"]
    tampered = dataclasses.replace(m, files={**m.files, **{n: FileEntry("0" * 64, 1) for n in names}})
    got = asyncio.run(_ask_for(root / "model", tampered, [*names, "tokenizer.bin"]))
    assert got[:3] == ["no such file"] * 3, got
    assert got[3] == (model / "tokenizer.bin").read_bytes().decode(errors="replace")  # a good name is served


def test_fetch_client_never_writes_outside_its_model_directory(model: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "out.bin").symlink_to(tmp_path / "victim")  # a symlink planted in the model directory
    for name in ["out.bin", "a//b", "./x", "x\\y", "/tmp/x"]:
        with pytest.raises(ManifestError, match="refus"):
            asyncio.run(fetch_file("127.0.0.1", 9, dest, name, sha256=None, size=None))
    assert not (tmp_path / "victim").exists()


def test_node_given_a_tampered_manifest_exits_with_one_line(model: Path, tmp_path: Path) -> None:
    from tests.mesh_harness import NodeProc

    bad = tmp_path / "bad-model"
    bad.mkdir()
    (bad / MANIFEST_NAME).write_text(json.dumps(_tampered_manifest(model, ["/etc/hostname", "../secret"])))
    p = NodeProc(f"t-tamper-{secrets.token_hex(3)}", "n1", extra=["--model", str(bad)], log_dir=tmp_path)
    try:
        assert p.proc.wait(20) == 2
    finally:
        p.kill()
    err = p.log_path.read_text().strip().splitlines()
    assert len(err) == 1 and "'/etc/hostname'" in err[0] and "absolute" in err[0], err


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
