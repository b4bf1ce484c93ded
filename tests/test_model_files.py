"""A node's model directory: safe file names, a missing --model directory, corrupt files repaired from a
peer or, when no peer can, the node left out of plans with one clear error."""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshllm.dataplane.server import DataPlane
from meshllm.errors import ManifestError
from meshllm.model.manifest import MANIFEST_NAME, Manifest, check_file_name, load_manifest, sha256_file
from meshllm.serve.fetch import confined_path, serve_fetch
from meshllm.serve.model_files import ModelFiles, Source, sources
from meshllm.serve.planning import servable
from tests.mesh_harness import NodeProc, mosquitto, state, wait_until
from tests.serving_harness import all_ready, ask_raw, random_model, read_retained, replica, tokens_of


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_model(tmp_path_factory.mktemp("model-files"))


def _reference(model: Path, prompt: str, n: int) -> list[int]:
    from meshllm.runtime.generate import LocalModel
    from meshllm.runtime.sampling import SamplingParams

    return LocalModel(model).generate(prompt, SamplingParams(max_tokens=n, temperature=0)).token_ids


def _corrupt(path: Path) -> None:
    """Flips bytes in the middle of a file, keeping its size (so only the hash can tell)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    path.write_bytes(bytes(data))


# --- the file-name rule (pure) ----------------------------------------------

@pytest.mark.parametrize("name", ["layer_000.onnx", "tokenizer.json", "sub/dir/x.bin", "a..b", ".hidden", "\u00e9"])
def test_safe_file_names_are_accepted(name: str) -> None:
    assert check_file_name(name) == name


@pytest.mark.parametrize("name,why", [
    ("/etc/hostname", "absolute"), ("../secret", "'..'"), ("a/../../b", "'..'"), ("a//b", "empty"),
    ("a/", "empty"), ("./a", "'.'"), ("a\\b", "backslash"), ("a\x00b", "control"), ("a\nb", "control"),
    ("", "non-empty"), ("e\u0301", "normal form"),
])
def test_unsafe_file_names_are_refused_naming_the_entry(name: str, why: str) -> None:
    with pytest.raises(ManifestError, match=why) as e:
        check_file_name(name, "m.json")
    assert repr(name) in str(e.value) and "\n" not in str(e.value).replace(repr(name), "")


@given(st.text(alphabet=st.sampled_from(["a", "b", ".", "/", "\\", "\x00", "\n", " ", "\u00e9", "\u0301", ":", "~"]),
               max_size=12))
def test_every_accepted_name_resolves_inside_the_model_directory(name: str) -> None:
    root = Path("/tmp/h14-root").resolve()
    try:
        check_file_name(name)
    except ManifestError:
        return
    assert (root / name).resolve().is_relative_to(root) and (root / name).resolve() != root
    assert confined_path(root, name) == (root / name).resolve()


def test_manifest_with_unsafe_names_anywhere_is_refused(model: Path) -> None:
    d = json.loads((model / MANIFEST_NAME).read_text())
    for bad in ({**d, "tokenizer": {**d["tokenizer"], "file": "../tok.bin"}},
                {**d, "parts": [{**d["parts"][0], "files": ["/etc/hostname"]}, *d["parts"][1:]]},
                {**d, "files": {**d["files"], "x\\y": {"sha256": "0" * 64, "size": 1}}}):
        with pytest.raises(ManifestError, match="refusing file name"):
            Manifest.from_json(bad)
    with pytest.raises(ManifestError, match="not listed"):
        Manifest.from_json({**d, "parts": [{**d["parts"][0], "files": ["other.onnx"]}, *d["parts"][1:]]})


# --- who can serve (pure) ----------------------------------------------------

def test_members_that_cannot_serve_are_left_out_of_plans() -> None:
    ok = {"has_files": True, "model_sha": "m"}
    members = {"a": ok, "b": {**ok, "has_files": False, "model_error": "corrupt"},
               "c": {"has_files": False, "model_sha": "m"},  # can fetch from a
               "d": {"has_files": False, "model_sha": "other"},  # nobody holds its model
               "e": {"model": None}}  # no model information: as before
    assert set(servable(members)) == {"a", "c", "e"}
    assert set(servable({"c": members["c"]})) == set()


def test_fetch_sources_hold_the_same_complete_model() -> None:
    members = [("me", {"has_files": True, "model_sha": "m", "host": "h", "port": 1}),
               ("a", {"has_files": True, "model_sha": "m", "host": "h", "port": 2}),
               ("b", {"has_files": False, "model_sha": "m", "host": "h", "port": 3}),
               ("c", {"has_files": True, "model_sha": "x", "host": "h", "port": 4})]
    assert sources(members, "me", "m") == [Source("a", "h", 2)]
    assert [s.node_id for s in sources(members, "me", None)] == ["a", "c"]


# --- a manifest from a hostile peer (real socket) ----------------------------

def test_manifest_fetched_from_a_peer_with_unsafe_names_is_refused_and_discarded(model: Path,
                                                                                 tmp_path: Path) -> None:
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    d = json.loads((model / MANIFEST_NAME).read_text())
    d["files"]["../secret"] = {"sha256": "0" * 64, "size": 1}
    (hostile / MANIFEST_NAME).write_text(json.dumps(d))
    empty = tmp_path / "empty"
    empty.mkdir()

    async def go() -> None:
        async def nothing() -> None:
            pass
        async with DataPlane("127.0.0.1") as dp:  # a hostile peer: serves its manifest.json
            dp.route("fetch", lambda msg, w: serve_fetch(hostile, load_manifest(model), msg, w))
            files = ModelFiles(empty, "me", None, nothing)
            await files.fetch_meta(lambda sha: [Source("hostile", "127.0.0.1", dp.port)])

    with pytest.raises(ManifestError, match="'../secret'"):
        asyncio.run(go())
    assert list(empty.iterdir()) == []  # discarded: a restart asks again


# --- --model: a typo, an empty directory (real node processes) ---------------

def test_missing_model_directory_is_a_one_line_error_at_start(tmp_path: Path) -> None:
    path = tmp_path / "typo" / "dir"
    t0 = time.monotonic()
    p = NodeProc(f"t-typo-{secrets.token_hex(3)}", "n1", extra=["--model", str(path)], log_dir=tmp_path)
    try:
        status = p.proc.wait(15)
    finally:
        p.kill()
    took = time.monotonic() - t0
    err = p.log_path.read_text().strip().splitlines()
    assert status == 2 and len(err) == 1 and str(path) in err[0] and "does not exist" in err[0], err
    assert not path.exists() and not path.parent.exists()
    assert took < 8, took  # at start, not after waiting for peers


def test_empty_model_directory_says_it_waits_for_a_peer(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with mosquitto() as broker:
        p = NodeProc(f"t-wait-{secrets.token_hex(3)}", "n1", broker=broker, extra=["--model", str(empty)],
                     log_dir=tmp_path)
        try:
            wait_until(lambda: "waiting for a peer that holds the model" in p.log_path.read_text(), 30,
                       "the node to say it waits for a peer")
            wait_until(lambda: "still waiting for a peer" in p.log_path.read_text(), 30, "a reminder")
        finally:
            p.kill()


# --- corrupt files at deploy (real node processes) ---------------------------

def test_node_with_a_corrupt_weights_file_fetches_it_again_and_the_mesh_serves(model: Path,
                                                                               tmp_path: Path) -> None:
    mine = tmp_path / "b-model"
    shutil.copytree(model, mine)
    _corrupt(mine / "layer_003.onnx.data")  # in b's stage (layers 2-3)
    mesh = f"t-refetch-{secrets.token_hex(3)}"
    plan = {"version": 1, "n_layers": 4, "replicas": [replica(0, "mixed", [("a", 0, 2), ("b", 2, 4)])]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    pin = ["--plan-file", str(tmp_path / "plan.json")]
    with mosquitto() as broker:
        procs = [NodeProc(mesh, "a", broker=broker, extra=["--model", str(model), *pin], log_dir=tmp_path),
                 NodeProc(mesh, "b", broker=broker, extra=["--model", str(mine), *pin], log_dir=tmp_path)]
        try:
            for p in procs:
                p.wait_started()
            wait_until(lambda: all_ready(mesh, broker), 60, "both stages loaded")
            got = asyncio.run(ask_raw(broker, mesh, [{"id": "x", "prompt": "hello", "max_tokens": 8,
                                                        "temperature": 0}]))[0]
        finally:
            for p in procs:
                p.kill()
    assert tokens_of(got) == _reference(model, "hello", 8)
    assert sha256_file(mine / "layer_003.onnx.data") == sha256_file(model / "layer_003.onnx.data")
    log = procs[1].log_path.read_text()
    assert "fail verification" in log and "they verify now" in log and "Traceback" not in log


def test_node_whose_files_no_peer_can_repair_reports_it_and_is_left_out_of_plans(model: Path,
                                                                                tmp_path: Path) -> None:
    mine = tmp_path / "b-model"
    shutil.copytree(model, mine)
    _corrupt(mine / "layer_001.onnx.data")
    mesh = f"t-broken-{secrets.token_hex(3)}"
    with mosquitto() as broker:
        bad = NodeProc(mesh, "b", broker=broker, extra=["--model", str(mine)], log_dir=tmp_path)
        procs = [bad]
        try:
            bad.wait_started()

            def reported() -> bool:  # alone: nobody to fetch from, so it gives up and says why
                ready = json.loads(asyncio.run(read_retained(broker, f"meshllm/v1/{mesh}/ready/+")).get("b", b"{}"))
                rec = state(mesh, broker)["members"].get("b", {})
                return ("layer_001.onnx.data" in ready.get("error", "") and "layer_001.onnx.data" in
                        rec.get("model_error", "") and rec.get("has_files") is False)
            wait_until(reported, 60, "b to report that it cannot serve")
            good = NodeProc(mesh, "a", broker=broker, extra=["--model", str(model)], log_dir=tmp_path)
            procs.append(good)
            good.wait_started()

            def planned_without_b() -> bool:
                plan = state(mesh, broker)["plan"] or {}
                nodes = {s["node_id"] for r in plan.get("replicas", []) for s in r["stages"]}
                return nodes == {"a"} and all_ready(mesh, broker)
            wait_until(planned_without_b, 60, "a plan of a alone, loaded")
            got = asyncio.run(ask_raw(broker, mesh, [{"id": "y", "prompt": "hello", "max_tokens": 8,
                                                        "temperature": 0}]))[0]
            assert bad.proc.poll() is None  # it stays up (a member, a possible planner), out of plans
        finally:
            for p in procs:
                p.kill()
    assert tokens_of(got) == _reference(model, "hello", 8)
    log = bad.log_path.read_text()
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "cannot serve" in errors[0] and "layer_001.onnx.data" in errors[0], errors
    assert "Traceback" not in log and "background task failed" not in log
