"""The chaos tool: a short run with node kills and a degraded link loses no request and changes no token."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.netns import require_netns
from tools.chaos import plan_faults

ROOT = Path(__file__).resolve().parent.parent


def test_fault_schedule_is_seeded_sequential_and_ends_before_the_run() -> None:
    a = plan_faults(7, 120, ["kill", "cut", "netem", "broker"], ["n1", "n2", "n3", "n4"])
    assert a == plan_faults(7, 120, ["kill", "cut", "netem", "broker"], ["n1", "n2", "n3", "n4"])
    assert a and {f.kind for f in a} <= {"kill", "cut", "netem", "broker"}
    for f, g in zip(a, a[1:], strict=False):
        assert f.at + f.hold < g.at  # one fault at a time: at most one node is ever down
    assert a[-1].at + a[-1].hold <= 120
    assert all((f.target is None) == (f.kind == "broker") for f in a)


def test_chaos_run_with_kills_a_lossy_link_and_an_adversary_loses_nothing(tmp_path: Path) -> None:
    require_netns()
    out = tmp_path / "report.json"
    # seed 2 over 20 s: SIGKILL of a node (restarted), then loss and delay on another node's link; a closed
    # mesh (Mosquitto with logins and ACL) while a hostile app, a stranger and a careless user attack it
    cmd = [sys.executable, "tools/chaos.py", "--duration", "20", "--nodes", "4", "--seed", "2",
           "--faults", "kill,netem", "--secret", "--adversary", "--json", str(out), "--log-dir", str(tmp_path / "logs")]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert out.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    r = json.loads(out.read_text())
    assert sorted(f["kind"] for f in r["faults"]) == ["kill", "netem"], r["faults"]
    q, t = r["requests"], r["tokens"]
    assert q["completed"] >= 10, run.stdout[-3000:]
    assert q["lost"] == 0 and r["lost_ids"] == [], r["lost_ids"]
    assert t["mismatched_requests"] == 0, r["mismatched_ids"]
    assert t["app_duplicates"] == 0 and t["app_missing"] == 0 and t["wire_conflicting_duplicates"] == 0, t
    adv = r["adversary"]
    assert sum(adv["attacks"].values()) + sum(adv["refused"].values()) >= 8, adv
    assert adv["node_exits"] == [], run.stdout[-3000:]
    assert all(d.startswith("exit 2:") for d in adv["duplicate_node"]), adv["duplicate_node"]
    assert r["closed_mesh"]
    assert r["ok"] and run.returncode == 0, run.stdout[-3000:]
