"""What the planner's objective gives users: plans elected on the mean wait (the default) and on the mean
end-to-end time (``meshllm node --objective response``), side by side, in simulation.

For each setting of docs/evaluation.md and each load of its check (fractions of the setting's anchor: the
largest capacity of the systems there, measured as tools/simulate.py does, so that the rates and the wait
objective's plans are exactly those of its check table), both objectives plan for the rate and serve the
same seeded request streams (the mixed workload, Poisson). Printed per point: each plan's mean wait,
mean TTFT, median time per output token and mean end-to-end time (mean ± the 95% interval over the
seeds), and the paired per-seed differences, response − wait, of the wait and of the end-to-end time.

Usage: python tools/objective_tradeoff.py [--requests 400] [--seeds 5] [--markdown]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simulate import (  # noqa: E402
    CHECK_LOADS,
    E2LLM,
    MIXES,
    MODEL,
    SETTINGS,
    SYSTEMS,
    Evaluator,
    mean_ci,
    paired_diff,
    plan_summary,
    pm,
    stream,
    workload,
)

from meshllm.plan import CostModel, PlanOptions  # noqa: E402
from meshllm.plan.devices import class_devices  # noqa: E402
from meshllm.plan.planner import plan_with  # noqa: E402
from meshllm.plan.system import SystemModel  # noqa: E402
from meshllm.sim import simulate  # noqa: E402

OBJECTIVES = ("wait", "response")
PILOT = 300  # requests of the pilots that size Splitwise's pools for the anchors (tools/simulate.py's default)
KEYS = ("wait_mean", "ttft_mean", "tpot_p50", "e2e_mean")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--markdown", action="store_true", help="one markdown table (for docs/evaluation.md)")
    args = ap.parse_args()
    t0 = time.monotonic()
    seeds = list(range(1, args.seeds + 1))
    rows = []
    ev = Evaluator(args.requests, seeds, PILOT, lambda msg: None)
    for setting, spec in SETTINGS.items():
        devices = class_devices(spec)
        cost = CostModel(MODEL, devices)
        guess = plan_with(SystemModel(cost, workload(MIXES["mixed"], 0.1), E2LLM),
                          "splitwise").metrics.sustainable_rate * 0.5
        anchor = max(ev.own_capacity(devices, "mixed", system, guess) for system in SYSTEMS)
        print(f"[{time.monotonic() - t0:5.0f} s] {setting}: anchor {anchor:.4f} req/s", file=sys.stderr, flush=True)
        for load in CHECK_LOADS:
            rate = load * anchor
            w = workload(MIXES["mixed"], rate)
            runs = {}
            plans = {}
            for objective in OBJECTIVES:
                plan = plan_with(SystemModel(cost, w, PlanOptions(objective=objective)), "ga")
                plans[objective] = plan
                runs[objective] = [simulate(plan, cost, stream(MIXES["mixed"], rate, args.requests, s))
                                   for s in seeds]
            same = plan_summary(plans["wait"]) == plan_summary(plans["response"])
            stats = {o: {k: mean_ci([r.summary()[k] for r in runs[o]]) for k in KEYS} for o in OBJECTIVES}
            rows.append((setting, load, rate, same, stats, paired_diff(runs["response"], runs["wait"], "wait_mean"),
                         paired_diff(runs["response"], runs["wait"], "e2e_mean"), plans))
            print(f"[{time.monotonic() - t0:5.0f} s] {setting} load {load:g} done", file=sys.stderr, flush=True)
    if args.markdown:
        print("| setting | load | rate | same plan | wait: wait / response | TTFT | TPOT p50 | end-to-end "
              "| Δ wait (response − wait) | Δ end-to-end |")
        print("|---|---|---|---|---|---|---|---|---|---|")
    for setting, load, rate, same, st, dw, de, plans in rows:
        cells = [" / ".join(pm(*st[o][k]) for o in OBJECTIVES) for k in KEYS]
        if args.markdown:
            print(f"| {setting} | {load:g} | {rate:.3f} | {'yes' if same else 'no'} | " + " | ".join(cells)
                  + f" | {pm(*dw)} | {pm(*de)} |")
        else:
            print(f"{setting} load {load:g} ({rate:.3f} req/s): wait {cells[0]}; TTFT {cells[1]}; TPOT p50 {cells[2]}; "
                  f"end-to-end {cells[3]}; response − wait: wait {pm(*dw)}, end-to-end {pm(*de)}")
            for o in OBJECTIVES:
                print(f"    {o}: {plan_summary(plans[o])}")
    print(f"{len(rows)} points, {args.seeds} seeds x {args.requests} requests, {time.monotonic() - t0:.0f} s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
