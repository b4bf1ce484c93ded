"""A node whose model files have another dtype than the plan's stays out of it with one clear error."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from tests.mesh_harness import NodeProc, mosquitto, wait_until
from tests.serving_harness import random_model, read_retained, replica


def test_a_node_with_fp32_files_refuses_a_plan_for_int4_weights(tmp_path: Path) -> None:
    import asyncio

    model = random_model(tmp_path / "m")  # fp32
    plan = {"version": 1, "n_layers": 4, "dtype": "int4", "replicas": [replica(0, "mixed", [("n1", 0, 4)])]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    with mosquitto() as broker:
        mesh = f"t-dtype-{secrets.token_hex(3)}"
        node = NodeProc(mesh, "n1", broker=broker, log_dir=tmp_path,
                        extra=["--model", str(model), "--plan-file", str(tmp_path / "plan.json")])
        try:
            node.wait_started()

            def refused() -> dict | None:
                ready = asyncio.run(read_retained(broker, f"meshllm/v1/{mesh}/ready/+"))
                rec = json.loads(ready.get("n1", b"{}"))
                return rec if rec.get("error") else None
            rec = wait_until(refused, 30, "n1 to refuse the plan in its readiness record")
            assert rec["r"] is None and "int4" in rec["error"] and "fp32" in rec["error"]
            assert node.proc.poll() is None  # the node stays up, out of the plan
            errors = [ln for ln in node.log_path.read_text().splitlines() if " ERROR " in ln]
            assert len(errors) == 1 and "int4" in errors[0] and "Traceback" not in node.log_path.read_text()
        finally:
            node.kill()
