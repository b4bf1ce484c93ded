"""`meshllm demo`, the README's main job: a real mesh on loopback, readable text, nothing left behind."""

from __future__ import annotations

import re
import subprocess
import sys


def demo_nodes() -> set[str]:
    out = subprocess.run(["pgrep", "-f", "meshllm node --mesh demo-"], capture_output=True, text=True)
    return set(out.stdout.split())


def test_demo_streams_text_over_a_planned_mesh_and_cleans_up() -> None:
    before = demo_nodes()
    p = subprocess.run([sys.executable, "-m", "meshllm", "demo", "--nodes", "4", "--max-tokens", "24",
                        "--prompt", "She was", "--prompt", "Mr. Darcy"], capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    out = p.stdout
    assert re.search(r"plan v\d+ \(ga\), \d+ replica", out)
    assert re.search(r"replica \d+ (PREFILL|DECODE|MIXED)", out)
    answers = re.findall(r"^(She was|Mr\. Darcy)(.*)$", out, re.M)
    assert len(answers) == 2 and all(len(re.findall(r"[a-z]+", a[1])) >= 8 for a in answers), out
    assert out.count("tokens/s") == 2
    assert "all nodes stopped" in out
    assert "Traceback" not in p.stderr
    assert demo_nodes() <= before, "demo left node processes behind"
