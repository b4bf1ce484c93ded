"""meshllm pull, tested after the download: a checkpoint laid out as the Hugging Face cache lays it out."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from meshllm.runtime.generate import LocalModel
from meshllm.runtime.sampling import SamplingParams
from tests.hf_models import write_hf_model


def hub_cache(root: Path, repo_id: str, src: Path) -> Path:
    """models--org--name/{refs/main, snapshots/<commit>/files, blobs/}, as huggingface_hub writes it."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in src.iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copyfile(f, blob)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo


def run_pull(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "meshllm", "pull", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_pull_exports_a_cached_checkpoint(tmp_path: Path) -> None:
    write_hf_model(tmp_path / "src", "qwen2", tied=True, layers=2)
    hub_cache(tmp_path / "hub", "test-org/tiny-qwen", tmp_path / "src")
    out = run_pull("test-org/tiny-qwen", "--out", str(tmp_path / "pulled"), "--dtype", "fp16", cache=tmp_path / "hub")
    assert out.returncode == 0, out.stderr
    manifest = json.loads((tmp_path / "pulled" / "manifest.json").read_text())
    assert manifest["name"] == "tiny-qwen" and manifest["dtype"] == "fp16" and manifest["config"]["arch"] == "qwen2"
    from meshllm.model.export import export

    export(tmp_path / "src", tmp_path / "direct", dtype="fp16")
    params = SamplingParams(max_tokens=8, temperature=0)
    pulled = LocalModel(tmp_path / "pulled").generate("The quick brown fox", params)
    assert pulled.token_ids == LocalModel(tmp_path / "direct").generate("The quick brown fox", params).token_ids


def test_pull_offline_without_cache_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "hub").mkdir()
    out = run_pull("test-org/absent", cache=tmp_path / "hub")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "offline and not in the Hugging Face cache" in out.stderr
