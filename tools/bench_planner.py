"""Benchmark the planner: plan time for 8/16/32/64 devices, and plan quality against the baselines.

The mesh cycles through named device classes (meshllm/data/device_classes.json:
Raspberry Pi 5 and 4, Jetson Orin Nano and Nano, an old laptop on Wi-Fi, a
mini-PC), each device's compute and bandwidth drawn within ±3% of its class
(measured profiles differ a little). The model is a synthetic 32-layer
Llama-shaped model of 1.4 B parameters (dim 2048, FFN 5632, 32/4 heads, vocab
32000; 6.2 GB in float32, the runtime's type). The workload has Splitwise's
conversation shape scaled to a quarter (prompts 289±233 tokens, outputs 53±36)
at a rate where the Splitwise baseline runs at ``--load`` of its capacity
("high demand").

Plan time is the best of ``--repeat`` runs (the machine is shared; the least
disturbed run is the fairest figure), CPU seconds of this process and wall
seconds, of the planner a mesh elects: the GA, then the election of its best
candidates by a short seeded simulation (meshllm.plan.elect). The goal is
under 2 s of CPU for 64 devices; the tool says whether it is met. Quality:
the predicted mean waiting time, time to first token, end-to-end time and
sustainable rate of every method's plan, side by side, and the mean waiting
time the simulator measures for it (``--sim`` requests, a seeded stream;
Splitwise with its own router).

Usage: python tools/bench_planner.py [--sizes 8,16,32,64] [--load 0.8] [--repeat 3] [--workload conversation]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshllm.plan.cost import CostModel, ModelCosts  # noqa: E402
from meshllm.plan.devices import load_device_classes  # noqa: E402
from meshllm.plan.elect import pilot_wait  # noqa: E402
from meshllm.plan.planner import METHODS, plan_with  # noqa: E402
from meshllm.plan.system import PlanOptions, SystemModel  # noqa: E402
from meshllm.plan.workload import Workload  # noqa: E402
from meshllm.profile import DeviceProfile  # noqa: E402

MODEL = ModelCosts.llama("llama-1.4b-32l", n_layers=32, dim=2048, ffn_dim=5632, n_heads=32, n_kv_heads=4,
                         vocab_size=32000, max_seq_len=2048)
CYCLE = ["rpi5", "rpi4", "jetson-orin-nano", "rpi5", "old-laptop", "mini-pc", "jetson-nano", "rpi4"]
SHAPES = {"conversation": "conversation,scale=0.25", "coding": "coding,scale=0.125"}


def mesh(n: int, seed: int = 0) -> list[DeviceProfile]:
    classes = load_device_classes()
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        c = classes[CYCLE[i % len(CYCLE)]]
        p = c.profile(f"{c.key}-{i + 1}")
        out.append(replace(p, flops=p.flops * rng.uniform(0.97, 1.03),
                           mem_bandwidth_Bps=p.mem_bandwidth_Bps * rng.uniform(0.97, 1.03)))
    return out


def splitwise_rate(devices: list[DeviceProfile], shape: str, load: float) -> float:
    """The rate at which Splitwise runs at ``load`` of its capacity (which depends on the rate)."""
    rate = 0.01
    for _ in range(6):
        sm = SystemModel(CostModel(MODEL, devices), Workload.parse(f"{shape},rate={rate:.6f}"))
        rate = load * plan_with(sm, "splitwise").metrics.sustainable_rate
    return rate


def fmt(x: float, unit: str = "s") -> str:
    return f"{x:.2f} {unit}" if np.isfinite(x) else "unbounded"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="8,16,32,64")
    ap.add_argument("--load", type=float, default=0.8, help="fraction of the Splitwise baseline's capacity")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workload", choices=SHAPES, default="conversation")
    ap.add_argument("--sim", type=int, default=300, help="requests of the simulated check of each plan (0: skip)")
    args = ap.parse_args()
    shape = SHAPES[args.workload]
    print(f"model {MODEL.name}: {MODEL.n_layers} layers, {MODEL.total_weight_bytes / 1e9:.1f} GB float32; "
          f"workload {shape} at {args.load:.0%} of Splitwise's capacity\n")
    timing, quality = [], []
    for n in (int(s) for s in args.sizes.split(",")):
        devices = mesh(n)
        rate = splitwise_rate(devices, shape, args.load)
        w = Workload.parse(f"{shape},rate={rate:.4f}")
        best_cpu = best_wall = float("inf")
        plan = None
        for _ in range(args.repeat):
            sm = SystemModel(CostModel(MODEL, devices), w, PlanOptions())
            c0, t0 = time.process_time(), time.perf_counter()
            plan = plan_with(sm, "ga")
            best_cpu = min(best_cpu, time.process_time() - c0)
            best_wall = min(best_wall, time.perf_counter() - t0)
        assert plan is not None
        timing.append((n, best_cpu, best_wall, plan.extra))
        sm = SystemModel(CostModel(MODEL, devices), w, PlanOptions())
        plans = [("meshllm", plan),
                 ("e2llm", plan_with(SystemModel(sm.cost, w, PlanOptions(allow_mixed=False, objective="response",
                                                                          elect=0)), "ga")),
                 ("ga-noroles", plan_with(SystemModel(sm.cost, w, PlanOptions(elect=0)), "ga"))]
        plans += [(m, plan_with(sm, m)) for m in METHODS if m != "ga"]
        quality.append((n, rate, plans, sm))

    print(f"{'devices':>7} {'cpu s':>7} {'wall s':>7} {'generations':>11} {'groupings':>9} {'DP runs':>8}")
    for n, cpu, wall, extra in timing:
        print(f"{n:>7} {cpu:>7.2f} {wall:>7.2f} {extra['generations']:>11} {extra['evaluations']:>9} "
              f"{extra['dp_runs']:>8}")
    slow = [cpu for n, cpu, _, _ in timing if n == 64 and cpu >= 2.0]
    if any(n == 64 for n, *_ in timing):
        print(f"\n64 devices in under 2 s of CPU: {'missed' if slow else 'met'}")
    for n, rate, plans, sm in quality:
        print(f"\n{n} devices, {rate:.3f} req/s")
        print(f"  {'method':<10} {'replicas':>8} {'idle':>5} {'sustainable':>12} {'mean wait':>11} {'TTFT':>10} "
              f"{'end to end':>11} {'simulated wait':>15}")
        for label, p in plans:
            m = p.metrics
            shape_ = f"{sum(r.role.value == 'prefill' for r in p.replicas)}P/" \
                     f"{sum(r.role.value == 'decode' for r in p.replicas)}D" if any(
                         r.role.value != "mixed" for r in p.replicas) else f"{len(p.replicas)}M"
            simulated = fmt(pilot_wait(sm, p, args.sim, seed=1)) if args.sim > 0 and p.replicas else "–"
            print(f"  {label:<10} {shape_:>8} {len(p.idle):>5} {m.sustainable_rate:>8.3f}/s "
                  f"{fmt(m.mean_wait_s):>11} {fmt(m.ttft_s):>10} {fmt(m.e2e_s):>11} {simulated:>15}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
