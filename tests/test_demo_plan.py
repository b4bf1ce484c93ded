"""The demo's setting tells the story on any machine (issue 18, item 1), checked offline with the real planner.

The demo's nodes announce pinned figures (``--emulate-device``), so the planner sees exactly these profiles
wherever it runs: the plan must have >= 2 replicas, a PREFILL and a DECODE role and a pipeline of >= 2 stages
for every GA seed, and the roles must win (no plan without roles meets the demand the demo plans for).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from meshllm.demo import DEMO_WORKLOAD, DEVICES, bundled_model
from meshllm.errors import ConfigError
from meshllm.model.manifest import load_manifest
from meshllm.plan.cost import ModelCosts
from meshllm.plan.plan import Role
from meshllm.plan.planner import plan_with, system_model
from meshllm.plan.system import PlanOptions, SystemModel
from meshllm.plan.workload import Workload
from meshllm.profile import pinned_profile


def _system(seed: int) -> SystemModel:
    devices = [pinned_profile(d.spec(), f"{i + 1}-{d.name}", d.name) for i, d in enumerate(DEVICES)]
    costs = ModelCosts.from_manifest(load_manifest(bundled_model()))
    return system_model(devices, costs, Workload.parse(DEMO_WORKLOAD), PlanOptions(seed=seed))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_demo_devices_get_roles_and_pipelines_for_any_seed(seed: int) -> None:
    plan = plan_with(_system(seed), "ga")
    assert len(plan.replicas) >= 2
    assert {Role.PREFILL, Role.DECODE} <= {r.role for r in plan.replicas}
    assert max(len(r.stages) for r in plan.replicas) >= 2
    assert plan.metrics.stable and plan.metrics.sustainable_rate > plan.workload.rate


def test_without_roles_the_demand_is_not_met() -> None:
    sm = _system(0)
    for method in ("dp-only", "exo"):
        other = plan_with(sm, method)
        assert {r.role for r in other.replicas} == {Role.MIXED}
        assert other.metrics.sustainable_rate < other.workload.rate, (method, other.metrics)


def test_no_demo_device_holds_the_model_alone() -> None:
    weights = sum(p.cost.runtime_weight_bytes for p in load_manifest(bundled_model()).parts)
    assert all(d.mem_bytes < weights for d in DEVICES)


@pytest.mark.parametrize("spec", ["{bad", "[]", '{"flops": 1e9}', '{"flops": 1e9, "mem_bandwidth_Bps": 1e9, '
                                  '"mem_bytes": -1}', '{"flops": 1e9, "mem_bandwidth_Bps": 1e9, "mem_bytes": 1, '
                                  '"colour": 1}', '{"flops": true, "mem_bandwidth_Bps": 1e9, "mem_bytes": 1}'])
def test_bad_emulated_devices_are_one_line_errors(spec: str) -> None:
    with pytest.raises(ConfigError, match="--emulate-device") as e:
        pinned_profile(spec, "n1", "n")
    assert "\n" not in str(e.value)


def test_the_bundled_model_is_found_in_the_repository_layout() -> None:
    assert bundled_model() == Path(__file__).resolve().parent.parent / "models" / "tiny-austen"
