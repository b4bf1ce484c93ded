"""Broken model directories and checkpoints fail with one clear line naming the problem."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from meshllm.errors import ManifestError, ModelError, UnsupportedModelError
from meshllm.model.export import export
from meshllm.model.llama2c import make_llama2c_config, random_llama2c_weights, write_llama2c
from meshllm.model.tokenizer import random_llama2c_vocab, write_tokenizer_bin
from meshllm.runtime.generate import LocalModel
from meshllm.runtime.segment import Segment
from tests.hf_models import write_hf_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    cfg = make_llama2c_config(64, 128, 2, 4, 2, 300, 64)
    write_llama2c(root / "m.bin", cfg, random_llama2c_weights(cfg, seed=1))
    write_tokenizer_bin(root / "tokenizer.bin", *random_llama2c_vocab(300, seed=1))
    export(root / "m.bin", root / "good")
    return root / "good"


@pytest.fixture
def broken(model_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "model"
    shutil.copytree(model_dir, out)
    return out


def cli_error(*args: str) -> str:
    """Runs the CLI, expects the one-line error exit, returns stderr."""
    p = subprocess.run([sys.executable, "-m", "meshllm", *args], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr
    assert p.stderr.startswith("meshllm: error: ")
    return p.stderr


def test_missing_file_is_named(broken: Path) -> None:
    (broken / "layer_001.onnx.data").unlink()
    with pytest.raises(ManifestError, match="layer_001.onnx.data.*missing"):
        LocalModel(broken)
    assert "layer_001.onnx.data" in cli_error("generate", "--model", str(broken), "hi")


def test_hash_mismatch_is_named(broken: Path) -> None:
    data = bytearray((broken / "layer_000.onnx.data").read_bytes())
    data[100] ^= 0xFF
    (broken / "layer_000.onnx.data").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="layer_000.onnx.data.*hash"):
        Segment(broken, 0, 1)
    Segment(broken, 1, 2)  # the other layer's files are intact and load
    assert "does not match its manifest hash" in cli_error("generate", "--model", str(broken), "hi")


def test_truncated_file_is_a_size_error(broken: Path) -> None:
    p = broken / "head.onnx.data"
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(ManifestError, match="head.onnx.data.*bytes"):
        LocalModel(broken)


def test_unknown_manifest_version(broken: Path) -> None:
    m = json.loads((broken / "manifest.json").read_text())
    m["format_version"] = 99
    (broken / "manifest.json").write_text(json.dumps(m))
    assert "format version 99 is not supported" in cli_error("generate", "--model", str(broken), "hi")


def test_not_a_model_dir(tmp_path: Path) -> None:
    assert "manifest.json is missing" in cli_error("generate", "--model", str(tmp_path), "hi")
    assert "does not exist" in cli_error("generate", "--model", str(tmp_path / "nope"), "hi")


def test_corrupt_graph_with_matching_hash_is_a_model_error(broken: Path) -> None:
    """A graph file that is not ONNX but whose manifest entry was rewritten to match."""
    from meshllm.model.manifest import file_entry, load_manifest

    (broken / "layer_000.onnx").write_bytes(b"\x00garbage" * 10)
    m = load_manifest(broken)
    m.files["layer_000.onnx"] = file_entry(broken / "layer_000.onnx")
    m.save(broken)
    with pytest.raises(ModelError, match="layer_000.onnx"):
        Segment(broken, 0, 1)


def test_unsupported_architecture(tmp_path: Path) -> None:
    write_hf_model(tmp_path / "hf", "llama", layers=1)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="model_type 'gpt2' is not supported"):
        export(tmp_path / "hf", tmp_path / "out")
    assert "gpt2" in cli_error("export", str(tmp_path / "hf"), str(tmp_path / "out2"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_truncated_llama2c_checkpoint(tmp_path: Path, model_dir: Path) -> None:
    src = model_dir.parent / "m.bin"
    (tmp_path / "m.bin").write_bytes(src.read_bytes()[:-100])
    shutil.copy(model_dir.parent / "tokenizer.bin", tmp_path)
    err = cli_error("export", str(tmp_path / "m.bin"), str(tmp_path / "out"))
    assert "m.bin" in err
    assert not (tmp_path / "out").exists()


def test_missing_checkpoint_and_tokenizer(tmp_path: Path, model_dir: Path) -> None:
    assert "does not exist" in cli_error("export", str(tmp_path / "none.bin"), str(tmp_path / "o"))
    shutil.copy(model_dir.parent / "m.bin", tmp_path)
    assert "tokenizer" in cli_error("export", str(tmp_path / "m.bin"), str(tmp_path / "o"))


def test_bad_split_and_overlong_prompt(model_dir: Path) -> None:
    assert "split points" in cli_error("generate", "--model", str(model_dir), "--split", "5", "hi")
    assert "does not fit the context" in cli_error("generate", "--model", str(model_dir), "word " * 100)
    assert "temperature" in cli_error("generate", "--model", str(model_dir), "--temperature", "-1", "hi")
