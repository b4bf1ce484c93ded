"""A node's configuration is checked before it joins the mesh: a bad planner option stops
``meshllm node`` at start with one line and exit status 2, instead of a node that joins and whose
mesh never gets a plan (the planner used to parse ``--workload`` only inside its ``except Exception``)."""

from __future__ import annotations

import json
import secrets
import subprocess
from pathlib import Path

import pytest

from meshllm.errors import ConfigError
from meshllm.serve.planning import PlannerOptions
from tests.mesh_harness import NodeProc
from tests.serving_harness import random_model, replica


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_model(tmp_path_factory.mktemp("cfg"), layers=2)


def _stops_with_one_line(node: NodeProc, *words: str) -> None:
    try:
        rc = node.proc.wait(30)
    except subprocess.TimeoutExpired:
        node.kill()
        raise AssertionError(f"the node started despite its bad option: {node.log_path.read_text()[-2000:]}") from None
    assert node.proc.stdout is not None
    out = node.proc.stdout.read()
    log = node.log_path.read_text()
    assert rc == 2, (rc, log)
    assert "started" not in out, out  # it never joined a mesh
    lines = [ln for ln in log.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("meshllm: error: "), log
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.mark.parametrize("spec, words", [
    ("in=128,out=64,rat=2", ["--workload", "unknown key 'rat'"]),
    ("in=12O,out=64", ["--workload", "not a number"]),
    ("conversaton", ["--workload", "'conversaton'"]),
    ("in=128,out=64,rate=-1", ["--workload", "rate"]),
])
def test_a_mistyped_workload_stops_the_node_at_start(model: Path, tmp_path: Path, spec: str, words: list[str]) -> None:
    node = NodeProc(f"t-cfg-{secrets.token_hex(3)}", "c1", log_dir=tmp_path,
                    extra=["--model", str(model), "--workload", spec])
    _stops_with_one_line(node, *words)


@pytest.mark.parametrize("content, words", [
    (None, ["--plan-file", "cannot read"]),
    ("{not json", ["--plan-file", "not a JSON plan"]),
    (json.dumps({"version": 1, "replicas": [{"id": 0, "stages": [{"start": 0}]}]}), ["--plan-file", "node_id"]),
])
def test_a_bad_plan_file_stops_the_node_at_start(model: Path, tmp_path: Path, content: str | None,
                                                 words: list[str]) -> None:
    path = tmp_path / "plan.json"
    if content is not None:
        path.write_text(content)
    node = NodeProc(f"t-cfg-{secrets.token_hex(3)}", "c1", log_dir=tmp_path,
                    extra=["--model", str(model), "--plan-file", str(path)])
    _stops_with_one_line(node, *words)


@pytest.mark.parametrize("extra", [["--failure-timeout", "0.6"], ["--heartbeat", "0", "--failure-timeout", "3"]])
def test_a_failure_timeout_shorter_than_two_heartbeats_stops_the_node_at_start(tmp_path: Path,
                                                                              extra: list[str]) -> None:
    node = NodeProc(f"t-cfg-{secrets.token_hex(3)}", "c1", log_dir=tmp_path, extra=extra)
    _stops_with_one_line(node, "--failure-timeout", "--heartbeat")


def test_an_unknown_objective_stops_the_node_at_start(model: Path, tmp_path: Path) -> None:
    node = NodeProc(f"t-cfg-{secrets.token_hex(3)}", "c1", log_dir=tmp_path,
                    extra=["--model", str(model), "--objective", "fastest"])
    _stops_with_one_line(node, "--objective", "'fastest'", "wait, response")


def test_good_planner_options_parse(tmp_path: Path) -> None:
    (tmp_path / "plan.json").write_text(json.dumps({"version": 1, "replicas": [replica(0, "mixed", [("a", 0, 2)])]}))
    opts = PlannerOptions.parse("in=128,out=64,rate=2", str(tmp_path / "plan.json"))
    assert opts.workload is not None and opts.workload.rate == 2.0
    assert opts.pinned is not None and opts.pinned["replicas"][0]["stages"][0]["node_id"] == "a"
    assert PlannerOptions.parse(None, None) == PlannerOptions()
    with pytest.raises(ConfigError, match="--workload"):
        PlannerOptions.parse("", None)


@pytest.mark.parametrize("extra, objective", [([], "wait"), (["--objective", "response"], "response")])
def test_the_elected_planner_plans_for_its_objective(model: Path, extra: list[str], objective: str) -> None:
    """``--objective`` reaches the live planner: the plan it publishes was made for it."""
    from tests.mesh_harness import mosquitto, state
    from tests.serving_harness import serving_mesh

    mesh = f"t-obj-{secrets.token_hex(3)}"
    with mosquitto() as broker, serving_mesh(mesh, broker, model, ["o1", "o2"], extra=extra):
        plan = state(mesh, broker)["plan"]
    assert plan["extra"]["objective"] == objective, plan["extra"]
