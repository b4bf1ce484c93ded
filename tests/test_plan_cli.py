"""`meshllm plan` offline: device files, model directories, workload specs, table and JSON output."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from meshllm.cli.plan import add_plan_parser
from meshllm.plan.errors import PlanError
from meshllm.plan.plan import Plan
from meshllm.profile import DeviceProfile

HF_CONFIG = {  # a TinyLlama-shaped model: only config.json is read to plan
    "model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
    "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-05, "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
}


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="meshllm")
    add_plan_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return int(args.func(args))


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    model = tmp_path / "tinyllama"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(HF_CONFIG))
    measured = DeviceProfile("bench", "bench", 1.2e11, 2.5e10, 16 * 10**9).to_json()
    devices = tmp_path / "devices.json"
    devices.write_text(json.dumps([{"class": "rpi5", "name": "pi", "count": 2}, {"class": "mini-pc", "name": "box"},
                                   measured]))
    return devices, model


def test_plan_prints_the_table_of_replicas_stages_and_predictions(files: tuple[Path, Path],
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    devices, model = files
    assert run("plan", "--devices", str(devices), "--model", str(model), "--workload", "in=300,out=60,rate=1") == 0
    out = capsys.readouterr().out
    assert "plan v1 (ga, seed 0) for tinyllama (fp32, 22 layers)" in out
    for word in ("PREFILL", "DECODE", "run ms", "sustainable", "mean waiting", "time to first token"):
        assert word in out


def test_plan_json_is_a_plan_and_compare_scores_every_baseline(files: tuple[Path, Path], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    devices, model = files
    out_file = tmp_path / "plan.json"
    assert run("plan", "--devices", str(devices), "--model", str(model), "--json", "--compare",
               "--out", str(out_file)) == 0
    data = json.loads(capsys.readouterr().out)
    plan = Plan.from_json(data["plan"])
    assert Plan.from_json(json.loads(out_file.read_text())) == plan
    assert set(data["compare"]) == {"exo", "dp-only", "splitwise", "random"}


def test_plan_reads_a_meshllm_model_directory_and_a_workload_file(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from meshllm.model.export import export
    from meshllm.model.llama2c import make_llama2c_config, random_llama2c_weights, write_llama2c
    from meshllm.model.tokenizer import random_llama2c_vocab, write_tokenizer_bin

    cfg = make_llama2c_config(64, 160, 4, 4, 2, 300, 128)
    write_llama2c(tmp_path / "m.bin", cfg, random_llama2c_weights(cfg, seed=4))
    write_tokenizer_bin(tmp_path / "tokenizer.bin", *random_llama2c_vocab(300, seed=4))
    export(tmp_path / "m.bin", tmp_path / "model")
    (tmp_path / "w.json").write_text(json.dumps({"rate": 2, "input": {"mean": 40, "std": 20}, "output": 20}))
    (tmp_path / "d.json").write_text(json.dumps([{"class": "rpi4", "name": "a"}, {"class": "rpi5", "name": "b"}]))
    assert run("plan", "--devices", str(tmp_path / "d.json"), "--model", str(tmp_path / "model"),
               "--workload", str(tmp_path / "w.json"), "--method", "splitwise") == 0
    assert "(splitwise) for m (fp32, 4 layers)" in capsys.readouterr().out


@pytest.mark.parametrize("entries, message", [
    ([{"class": "cray-1"}], "unknown device class 'cray-1'"),
    ({"class": "rpi5"}, "non-empty JSON list"),
    ([{"name": "x"}], "not a device profile nor a class entry"),
])
def test_bad_device_files_fail_with_the_reason(files: tuple[Path, Path], tmp_path: Path, entries: object,
                                               message: str) -> None:
    _, model = files
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(entries))
    with pytest.raises(PlanError, match=message):
        run("plan", "--devices", str(bad), "--model", str(model))


def test_missing_model_and_bad_workload_fail_with_the_reason(files: tuple[Path, Path], tmp_path: Path) -> None:
    devices, model = files
    with pytest.raises(PlanError, match="neither a meshllm model directory"):
        run("plan", "--devices", str(devices), "--model", str(tmp_path))
    with pytest.raises(PlanError, match="unknown key 'inn'"):
        run("plan", "--devices", str(devices), "--model", str(model), "--workload", "inn=5,out=2")
