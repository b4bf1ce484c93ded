"""The mesh plans with the quantized sizes: a quantized model needs fewer devices and fewer stages.

The cost model takes a part's memory from the manifest's per-part ``runtime_bytes`` when
there is one (quantized exports), else from the float32 size; the plan carries the model's
dtype. Two manifests of the same architecture that differ only in their run-time bytes are
planned on the same emulated devices: the fp32 one does not fit one device (it needs more
stages, or is refused), the int4 one does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshllm.model.config import ModelConfig
from meshllm.model.export import part_costs
from meshllm.model.manifest import Manifest, Part, load_manifest
from meshllm.plan.cost import CostModel, ModelCosts, part_runtime_bytes
from meshllm.plan.plan import Plan
from meshllm.plan.planner import plan_mesh, replan, rescore, system_model
from meshllm.plan.workload import Workload
from meshllm.profile import DeviceProfile

ROOT = Path(__file__).resolve().parent.parent

MB = 1e6
CFG = ModelConfig(arch="llama", dim=768, n_layers=12, n_heads=12, n_kv_heads=12, head_dim=64, ffn_dim=2048,
                  vocab_size=32000, max_seq_len=1024)
WORKLOAD = Workload.parse("in=128,out=64,rate=0.5")
INT4_BYTES_PER_PARAM = 0.5 + 4 / 32  # 4-bit weights + one float32 scale per block of 32


@dataclass(frozen=True)
class _SizedPart(Part):
    """A part whose manifest entry records ``runtime_bytes`` (what a quantized export writes)."""

    runtime_bytes: int | None = None


def manifest(dtype: str, bytes_per_param: float | None) -> Manifest:
    """A manifest of :data:`CFG` (no files: the planner reads only figures); ``bytes_per_param`` sets each part's
    ``runtime_bytes``, None leaves it out as in manifests from before quantized exports."""
    costs = part_costs(CFG, "fp32")

    def part(name: str, kind: str) -> Part:
        c = costs[kind]
        if bytes_per_param is None:
            return Part(name, (), c)
        return _SizedPart(name, (), c, int(c.runtime_weight_bytes / 4 * bytes_per_param))

    parts = (part("embed", "embed"), *(part(f"layer.{i}", "layer") for i in range(CFG.n_layers)), part("head", "head"))
    return Manifest(name="m110", config=CFG, dtype=dtype, tokenizer={}, parts=parts, files={})


def devices(n: int, mem_bytes: float) -> list[DeviceProfile]:
    """``n`` alike Raspberry-Pi-class devices with ``mem_bytes`` each for meshllm."""
    return [DeviceProfile(f"pi{i}", f"pi{i}", 2e10, 4e9, int(mem_bytes), device_class="rpi5", emulated=True)
            for i in range(n)]


def max_stages(plan: Plan) -> int:
    return max(len(r.stages) for r in plan.replicas)


def test_cost_model_takes_runtime_bytes_from_the_manifest_else_the_float32_size() -> None:
    fp32, int4 = ModelCosts.from_manifest(manifest("fp32", None)), ModelCosts.from_manifest(manifest("int4", 0.625))
    assert fp32.dtype == "fp32" and int4.dtype == "int4"
    assert fp32.layer_weight_bytes == (part_costs(CFG, "fp32")["layer"].runtime_weight_bytes,) * CFG.n_layers
    assert int4.total_weight_bytes == pytest.approx(fp32.total_weight_bytes * 0.625 / 4, rel=1e-6)
    # the bytes a decode step reads shrink too, so the quantized model is predicted faster, not only smaller
    c32, c4 = CostModel(fp32, devices(1, 4e9)), CostModel(int4, devices(1, 4e9))
    assert c4.decode_time(0, 0, CFG.n_layers, 16) < 0.25 * c32.decode_time(0, 0, CFG.n_layers, 16)
    assert c4.memory(0, CFG.n_layers, 0) < 0.2 * c32.memory(0, CFG.n_layers, 0)
    assert ModelCosts.from_json(json.loads(json.dumps(int4.to_json()))) == int4


def test_part_runtime_bytes_reads_the_part_or_its_cost_figures() -> None:
    m = manifest("fp32", None)
    p = m.part("layer.0")
    assert part_runtime_bytes(p) == p.cost.runtime_weight_bytes
    assert part_runtime_bytes(_SizedPart(p.name, p.files, p.cost, 123)) == 123.0


def test_a_model_that_fits_only_when_quantized_gets_a_plan_with_fewer_stages() -> None:
    fp32 = ModelCosts.from_manifest(manifest("fp32", None))
    int4 = ModelCosts.from_manifest(manifest("int4", INT4_BYTES_PER_PARAM))
    mem = 200 * MB  # fp32 weights are ~530 MB, int4 ~83 MB: four devices hold fp32 only split in 3+ stages
    assert int4.total_weight_bytes < mem < fp32.total_weight_bytes / 2
    devs = devices(4, mem)

    p32, p4 = plan_mesh(devs, fp32, WORKLOAD), plan_mesh(devs, int4, WORKLOAD)
    assert p32.replicas and p4.replicas
    assert min(len(r.stages) for r in p32.replicas) >= 3
    assert max_stages(p4) < min(len(r.stages) for r in p32.replicas)
    assert max_stages(p4) == 1  # the whole quantized model fits one device
    for p in (p32, p4):
        assert all(s.memory_bytes <= s.memory_capacity for r in p.replicas for s in r.stages)
    assert (p32.dtype, p4.dtype) == ("fp32", "int4")
    assert Plan.from_json(json.loads(json.dumps(p4.to_json()))).dtype == "int4"

    # one device: the fp32 model is refused as not fitting, the int4 one is served whole
    one32, one4 = plan_mesh(devs[:1], fp32, WORKLOAD), plan_mesh(devs[:1], int4, WORKLOAD)
    assert not one32.replicas and one32.notes
    assert [len(r.stages) for r in one4.replicas] == [1]


def test_a_plan_made_for_another_dtype_is_not_kept_by_replanning() -> None:
    fp32 = ModelCosts.from_manifest(manifest("fp32", None))
    int4 = ModelCosts.from_manifest(manifest("int4", INT4_BYTES_PER_PARAM))
    devs = devices(4, 2000 * MB)  # both fit
    p32 = plan_mesh(devs, fp32, WORKLOAD)
    assert rescore(p32, system_model(devs, fp32, WORKLOAD)) is not None
    assert rescore(p32, system_model(devs, int4, WORKLOAD)) is None  # nodes would load other files
    new, is_new = replan(p32, devs, int4, WORKLOAD)
    assert is_new and new.dtype == "int4" and new.version == p32.version + 1


def test_plans_from_before_dtypes_read_as_fp32() -> None:
    p = plan_mesh(devices(2, 2000 * MB), ModelCosts.from_manifest(manifest("fp32", None)), WORKLOAD)
    d = p.to_json()
    del d["dtype"]
    assert Plan.from_json(d).dtype == "fp32"


def _plan_cli(model: Path, devices_file: Path, *extra: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "meshllm", "plan", "--devices", str(devices_file), "--model",
                        str(model), "--workload", "in=64,out=32,rate=0.5", *extra],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_meshllm_plan_shows_the_models_dtype(tmp_path: Path) -> None:
    devs = tmp_path / "devices.json"
    devs.write_text(json.dumps([d.to_json() for d in devices(2, 2000 * MB)]))
    out = _plan_cli(ROOT / "models" / "tiny-austen", devs)
    assert "for tiny-austen (fp32, 6 layers)" in out
    assert json.loads(_plan_cli(ROOT / "models" / "tiny-austen", devs, "--json"))["dtype"] == "fp32"


def _quantize(src: Path, out: Path, dtype: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "meshllm", "quantize", str(src), str(out), "--dtype", dtype],
                          capture_output=True, text=True, env=env, timeout=300)


def test_a_really_quantized_export_plans_on_fewer_devices(tmp_path: Path) -> None:
    """The same with a real ``meshllm quantize`` of the bundled model."""
    src = ROOT / "models" / "tiny-austen"
    r = _quantize(src, tmp_path / "q4", "int4")
    assert r.returncode == 0, r.stderr
    m32, m4 = load_manifest(src), load_manifest(tmp_path / "q4")
    fp32, int4 = ModelCosts.from_manifest(m32), ModelCosts.from_manifest(m4)
    assert int4.dtype == "int4" and int4.total_weight_bytes < 0.3 * fp32.total_weight_bytes
    mem = (int4.total_weight_bytes + fp32.total_weight_bytes) / 2 + 2 * MB  # room for some KV cache
    devs = devices(4, mem)
    p32, p4 = plan_mesh(devs, fp32, WORKLOAD), plan_mesh(devs, int4, WORKLOAD)
    assert p4.replicas and max_stages(p4) == 1 and p4.dtype == "int4"
    assert not p32.replicas or min(len(r.stages) for r in p32.replicas) > 1
    devs_file = tmp_path / "devices.json"
    devs_file.write_text(json.dumps([d.to_json() for d in devs]))
    assert "(int4, 6 layers)" in _plan_cli(tmp_path / "q4", devs_file)
