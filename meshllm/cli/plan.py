"""``meshllm plan``: the planner offline. Reads files, calls :mod:`meshllm.plan.planner`, prints.

``meshllm plan --devices devices.json --model DIR [--workload SPEC|FILE] [--json]``

``DIR`` is a meshllm model directory (only its manifest is read) or a Hugging
Face model directory (only its config.json is read: no weights needed to
plan). The device file is described in :mod:`meshllm.plan.devices`. Register
the subcommand with :func:`add_plan_parser`.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from meshllm.plan.cost import DeviceFactors, ModelCosts
from meshllm.plan.devices import load_device_classes, parse_devices
from meshllm.plan.errors import PlanError
from meshllm.plan.objective import OBJECTIVES
from meshllm.plan.plan import Plan, Role
from meshllm.plan.planner import METHODS, plan_with, system_model
from meshllm.plan.system import PlanOptions
from meshllm.plan.workload import Workload
from meshllm.profile import DeviceProfile

DEFAULT_WORKLOAD = "in=512,out=128,rate=0.2"


def _read_json(path: str, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except OSError as e:
        raise PlanError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise PlanError(f"{what} {path} is not valid JSON: {e}") from None


def load_model_costs(path: str) -> ModelCosts:
    d = Path(path)
    if (d / "manifest.json").is_file():
        from meshllm.model.manifest import load_manifest

        return ModelCosts.from_manifest(load_manifest(d))
    if (d / "config.json").is_file():
        from meshllm.model.hf import read_hf_config

        return ModelCosts.from_config(read_hf_config(d), name=d.name)
    raise PlanError(f"{path} is neither a meshllm model directory (manifest.json) nor a Hugging Face model "
                    f"directory (config.json)")


def load_devices(path: str) -> list[DeviceProfile]:
    return parse_devices(_read_json(path, "device file"), load_device_classes(), where=path)


def load_workload(spec: str) -> Workload:
    if Path(spec).is_file():
        return Workload.from_json(_read_json(spec, "workload file"), where=spec)
    return Workload.parse(spec)


def load_factors(path: str) -> dict[str, DeviceFactors]:
    data = _read_json(path, "calibration file")
    if not isinstance(data, dict):
        raise PlanError(f"{path}: expected an object mapping node ids to calibration factors")
    try:
        return {str(k): DeviceFactors.from_json(v) for k, v in data.items()}
    except (TypeError, ValueError) as e:
        raise PlanError(f"{path}: malformed calibration factors ({e})") from None


def _ms(s: float) -> str:
    return f"{s * 1e3:.1f}" if math.isfinite(s) else "inf"


def _sec(s: float) -> str:
    return f"{s:.2f} s" if math.isfinite(s) else "unbounded"


def format_plan(plan: Plan) -> str:
    w = plan.workload
    lines = [
        f"plan v{plan.version} ({plan.method}{'' if plan.seed is None else f', seed {plan.seed}'}) for {plan.model} "
        f"({plan.dtype}, {plan.n_layers} layers); workload {w.name or 'custom'}: {w.rate:g} req/s, "
        f"input {w.input.mean:.0f}±{w.input.std:.0f} tokens, output {w.output.mean:.0f}±{w.output.std:.0f} tokens",
        "",
        f"{'replica':<8} {'role':<8} {'node':<18} {'layers':<8} {'run ms':>9} {'send ms':>8} {'memory GB':>13}",
    ]
    for r in plan.replicas:
        for j, s in enumerate(r.stages):
            head = (f"{r.id:<8} {r.role.value.upper():<8}" if j == 0 else " " * 17)
            layers = f"{s.start}-{s.stop - 1}"
            lines.append(f"{head} {s.node_id:<18} {layers:<8} {_ms(s.run_s):>9} {_ms(s.send_s):>8} "
                         f"{s.memory_bytes / 1e9:>5.2f} / {s.memory_capacity / 1e9:<5.1f}")
    lines += ["", f"{'replica':<8} {'role':<8} {'slots':>5} {'ctx':>6} {'bottleneck ms':>14} {'pass ms':>9} "
                  f"{'prompts/s':>10} {'tokens/s':>9}"]
    for r in plan.replicas:
        lines.append(f"{r.id:<8} {r.role.value.upper():<8} {r.slots:>5} {r.context:>6} {_ms(r.bottleneck_s):>14} "
                     f"{_ms(r.latency_s):>9} {r.prefill_rate:>10.3f} {r.decode_token_rate:>9.1f}"
                     + ("" if r.order_exact else "  (device order heuristic)"))
    m = plan.metrics
    lines += [
        "",
        f"demand {m.rate:g} req/s, sustainable {m.sustainable_rate:.3f} req/s "
        f"({'stable' if m.stable else 'OVERLOADED'}; utilisation prefill {m.prefill_utilisation:.0%}, "
        f"decode {m.decode_utilisation:.0%})",
        f"mean waiting {_sec(m.mean_wait_s)} (prefill queue {_sec(m.prefill_wait_s)}, decode slot "
        f"{_sec(m.decode_wait_s)}); time to first token {_sec(m.ttft_s)}; KV hand-off {_sec(m.handoff_s)}; "
        f"{_ms(m.tbt_s)} ms between tokens; end to end {_sec(m.e2e_s)}",
    ]
    if plan.idle:
        lines.append(f"idle: {', '.join(plan.idle)}")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def format_comparison(plans: list[Plan]) -> str:
    lines = [f"{'method':<10} {'replicas':<22} {'sustainable':>12} {'mean wait':>11} {'TTFT':>9} "
             f"{'end to end':>11}"]
    for p in plans:
        roles = {Role.PREFILL: "P", Role.DECODE: "D", Role.MIXED: "M"}
        shape = " ".join(f"{roles[r.role]}{len(r.stages)}" for r in p.replicas) or "-"
        m = p.metrics
        lines.append(f"{p.method:<10} {shape:<22} {m.sustainable_rate:>8.3f}/s {_sec(m.mean_wait_s):>11} "
                     f"{_sec(m.ttft_s):>9} {_sec(m.e2e_s):>11}")
    return "\n".join(lines)


def cmd_plan(args: argparse.Namespace) -> int:
    devices = load_devices(args.devices)
    model = load_model_costs(args.model)
    workload = load_workload(args.workload)
    factors = load_factors(args.factors) if args.factors else None
    options = PlanOptions(max_decode_slots=args.max_batch, seed=args.seed, objective=args.objective)
    sm = system_model(devices, model, workload, options, factors)
    plan = plan_with(sm, args.method)
    others = [plan_with(sm, m) for m in METHODS if m != args.method] if args.compare else []
    if args.out:
        Path(args.out).write_text(json.dumps(plan.to_json(), indent=1) + "\n")
    if args.json:
        out: dict[str, Any] = plan.to_json()
        if others:
            out = {"plan": out, "compare": {p.method: p.to_json() for p in others}}
        print(json.dumps(out, indent=1))
        return 0
    print(format_plan(plan))
    if others:
        print()
        print(format_comparison([plan, *others]))
    return 0


def add_plan_parser(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "plan", help="plan replicas, roles and layer ranges for a mesh (offline)")
    p.add_argument("--devices", required=True,
                   help="JSON list of device profiles or of {\"class\": \"rpi5\", \"name\": ...} entries")
    p.add_argument("--model", required=True,
                   help="meshllm model directory (its manifest) or Hugging Face model directory (its config.json)")
    p.add_argument("--workload", default=DEFAULT_WORKLOAD,
                   help=f"'in=512,out=128,rate=2[,in_std=..,out_std=..]', 'conversation,scale=0.25,rate=1', "
                        f"or a JSON file (default: {DEFAULT_WORKLOAD})")
    p.add_argument("--method", choices=METHODS, default="ga", help="the planner (ga) or a baseline")
    p.add_argument("--compare", action="store_true", help="also score every other method, side by side")
    p.add_argument("--seed", type=int, default=0, help="GA seed (plans are deterministic per seed)")
    p.add_argument("--objective", choices=OBJECTIVES, default="wait",
                   help="minimise the mean wait (default) or the mean end-to-end time (as `meshllm node`)")
    p.add_argument("--max-batch", type=int, default=PlanOptions.max_decode_slots,
                   help="sequences a DECODE replica batches at most")
    p.add_argument("--factors", help="calibration factors: JSON object node_id -> DeviceFactors")
    p.add_argument("--out", help="also write the plan as JSON to this file")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)
    return p
