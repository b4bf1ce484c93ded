"""`meshllm ... | head`: a reader that goes away early ends the command quietly, whatever the subcommand.
A real pipe whose read end is closed before the command writes, so that every write fails with EPIPE."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_plan_cli import HF_CONFIG


def run_into_closed_pipe(*argv: str) -> tuple[int, str]:
    proc = subprocess.Popen([sys.executable, "-m", "meshllm", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the first line is written (as `head` after its lines)
    err = proc.stderr.read()
    return proc.wait(60), err


def run_into_head(*argv: str) -> tuple[int, str, str]:
    """``meshllm ARGV | head -1`` with real processes."""
    proc = subprocess.Popen([sys.executable, "-m", "meshllm", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    head = subprocess.run(["head", "-1"], stdin=proc.stdout, capture_output=True, text=True, timeout=60)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read()
    proc.wait(60)
    return proc.returncode, err, head.stdout


@pytest.fixture
def plan_args(tmp_path: Path) -> list[str]:
    model = tmp_path / "tinyllama"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(HF_CONFIG))
    devices = tmp_path / "devices.json"
    devices.write_text(json.dumps([{"class": "rpi5", "name": "pi", "count": 4}, {"class": "mini-pc", "name": "box"}]))
    return ["plan", "--devices", str(devices), "--model", str(model), "--json", "--compare"]


def test_plan_into_a_closed_pipe_ends_quietly(plan_args: list[str]) -> None:
    rc, err = run_into_closed_pipe(*plan_args)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert rc == 1, err  # Python's recipe: status 1, as when a write fails


def test_plan_piped_into_head_prints_its_first_line_and_no_traceback(plan_args: list[str]) -> None:
    rc, err, out = run_into_head(*plan_args)
    assert out == "{\n"
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
