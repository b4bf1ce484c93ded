"""Regenerate docs/evaluation.md (tables) and docs/eval/*.png (plots) with the discrete-event simulator.

Every system is planned for the same devices, model and workload and serves the same seeded
request streams in meshllm.sim:

- meshllm: what a mesh deploys (``plan_mesh`` defaults: the GA on mean wait with MIXED replicas
  as a candidate, the best candidates re-scored by a short seeded simulation, meshllm.plan.elect);
- E2LLM: the GA with roles on the analytic model alone (the reconstruction of the paper);
- GA without roles: ``PlanOptions(allow_mixed=True, objective="wait")``, analytic only;
- Splitwise as published (speed-blind prompt routing) and Splitwise with expected-completion
  routing (the fair heterogeneous variant): SplitwiseSim's MixedPoolScheduler
  (meshllm.sim.routing.SplitwiseRouter) on one-class machines, pools sized by simulation at each
  rate (meshllm.sim.baselines);
- Splitwise's routing (expected completion) on E2LLM's device groups, pools sized the same way;
- random grouping, exo (one pipeline, layers by memory), DP-only (one pipeline, the DP).

Load: every system's capacity is measured in simulation on its own plan (a burst far beyond what
it serves); "high demand" is anchored to the largest of those capacities (``--high`` of it), and
every load of the sweep is a fraction of it. At every rate each system plans again for that rate
(Splitwise sizes its pools again), and the plan evaluated is the plan whose capacity is reported.
Each point is ``--seeds`` request streams (seeds ``--seed`` ...), reported as mean ± the half-width
of the 95% interval (Student's t over the seeds).

The tool checks the claim it is built for: at every load from 0.4 to 1.0, meshllm's mean wait is
no longer than the best baseline's within the 95% interval of the paired per-seed difference; it
prints every failure and exits 1 if there is one (after writing the page).

Only the text between the GENERATED markers of docs/evaluation.md is rewritten.

Usage: python tools/simulate.py [--requests 400] [--seeds 5] [--quick] [--no-plots]
Needs matplotlib for the plots (pip install matplotlib, or --no-plots).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from meshllm.plan import CostModel, ModelCosts, Plan, PlanOptions, Role, Workload  # noqa: E402
from meshllm.plan.baselines import splitwise_machines  # noqa: E402
from meshllm.plan.devices import class_devices  # noqa: E402
from meshllm.plan.elect import candidates  # noqa: E402
from meshllm.plan.planner import plan_with  # noqa: E402
from meshllm.plan.system import SystemModel  # noqa: E402
from meshllm.profile import DeviceProfile  # noqa: E402
from meshllm.sim import Request, SimResult, requests, simulate  # noqa: E402
from meshllm.sim.baselines import capacity, pilot, sized_by_simulation, splitwise_router  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "evaluation.md"
PLOTS = ROOT / "docs" / "eval"
BEGIN, END = "<!-- BEGIN GENERATED (tools/simulate.py) -->", "<!-- END GENERATED -->"

MODEL = ModelCosts.llama("llama-1.4b-32l", n_layers=32, dim=2048, ffn_dim=5632, n_heads=32, n_kv_heads=4,
                         vocab_size=32000, max_seq_len=2048)
SETTINGS = {
    "edge-mix": [("rpi5", 2), ("jetson-orin-nano", 1), ("old-laptop", 1), ("mini-pc", 1)],
    "all-pi": [("rpi5", 6), ("rpi4", 2)],
    "fog": [("fog-server", 1), ("mini-pc", 1), ("jetson-orin-nano", 2), ("rpi5", 4)],
}
# for "where do roles help": a device fast at prefill and slow at decode (the mini-PC: 471 GFLOP/s,
# 34 GB/s) beside devices that decode well for their compute (Jetson Orin Nano: 48 GFLOP/s, 46 GB/s)
ROLE_SETTINGS = {**SETTINGS, "pd-split": [("mini-pc", 1), ("jetson-orin-nano", 3)]}
SYSTEMS = {
    "meshllm": "meshllm (deployed)",
    "e2llm": "E2LLM (GA+DP+roles)",
    "ga-noroles": "GA without roles",
    "splitwise": "Splitwise (published)",
    "splitwise-ect": "Splitwise (exp. completion)",
    "splitwise-ga": "Splitwise routing, GA groups",
    "random": "random",
    "exo": "exo (1 pipeline)",
    "dp-only": "DP-only",
}
BASELINES = [s for s in SYSTEMS if s != "meshllm"]
MIXES = {  # lengths are Splitwise-shaped, scaled for a 2,048-token edge model
    "mixed": "conversation,scale=0.25",
    "coding": "coding,scale=0.125",
    "long-in/short-out": "in=768,in_std=384,out=16,out_std=8",
    "short-in/long-out": "in=64,in_std=32,out=256,out_std=128",
}
LOADS = (0.2, 0.4, 0.6, 0.8, 1.0)
CHECK_LOADS = (0.4, 0.6, 0.8, 1.0)
E2LLM = PlanOptions(allow_mixed=False, objective="response", elect=0)
NOROLES = PlanOptions(allow_mixed=True, objective="wait", elect=0)
RouterFor = Callable[[Plan], Any] | None


def workload(spec: str, rate: float) -> Workload:
    return Workload.parse(f"{spec},rate={rate:.6g}")


def stream(spec: str, rate: float, n: int, seed: int, bursty: bool = False) -> list[Request]:
    return requests([workload(spec, rate)], [n], seed=seed, bursty=bursty, max_seq_len=MODEL.max_seq_len)


def make(system: str, devices: list[DeviceProfile], spec: str, rate: float, pilot_n: int
         ) -> tuple[Plan | None, RouterFor]:
    """``system``'s plan for this rate, and the router it runs with (None: the real scheduler)."""
    cost = CostModel(MODEL, devices)
    w = workload(spec, rate)
    if system == "meshllm":
        return plan_with(SystemModel(cost, w, PlanOptions()), "ga"), None
    if system == "e2llm":
        return plan_with(SystemModel(cost, w, E2LLM), "ga"), None
    if system == "ga-noroles":
        return plan_with(SystemModel(cost, w, NOROLES), "ga"), None
    if system in ("splitwise", "splitwise-ect", "splitwise-ga"):
        routing = "tokens" if system == "splitwise" else "ect"
        sm = SystemModel(cost, w, E2LLM)
        machines = None
        if system == "splitwise-ga":
            ga = plan_with(sm, "ga")
            machines = [[cost.index[n] for n in r.node_ids] for r in ga.replicas]
        plan = sized_by_simulation(sm, machines, routing, n=pilot_n)
        return plan, splitwise_router(cost, routing)
    return plan_with(SystemModel(cost, w, PlanOptions()), system), None


@dataclass
class Point:
    setting: str
    mix: str
    system: str
    load: float
    rate: float
    plan: Plan | None
    capacity: float
    runs: list[SimResult]  # one per seed
    spans: list[tuple[float, float]] = field(default_factory=list)  # per seed: first and last arrival

    def vals(self, key: str) -> list[float]:
        return [r.summary()[key] for r in self.runs]

    def stat(self, key: str) -> tuple[float, float]:
        return mean_ci(self.vals(key))

    @property
    def kept_up(self) -> bool:
        """No seed left a backlog that took more than a quarter of the arrival span to drain."""
        return all(not r.bounded and (a + r.makespan_s - b) <= 0.25 * (b - a)
                   for r, (a, b) in zip(self.runs, self.spans, strict=True))


# Student's t, 97.5% quantile, by degrees of freedom (1 ... 10; 1.96 beyond 30)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def mean_ci(xs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Student's t; nan for one value)."""
    xs = [x for x in xs if math.isfinite(x)]
    if len(xs) < 2:
        return (xs[0] if xs else math.nan), math.nan
    df = len(xs) - 1
    t = T975[df - 1] if df <= len(T975) else (2.09 if df < 20 else 2.04 if df <= 30 else 1.96)
    return float(np.mean(xs)), t * float(np.std(xs, ddof=1)) / math.sqrt(len(xs))


def fmt(x: float) -> str:
    if not math.isfinite(x):
        return "–"
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def pm(m: float, h: float) -> str:
    return fmt(m) + ("" if not math.isfinite(h) else f" ± {fmt(h)}")


def plan_summary(plan: Plan | None) -> str:
    if plan is None or not plan.replicas:
        return "no feasible plan"
    parts = [f"{r.role.value[0].upper()}[{'+'.join(r.node_ids)}]" for r in plan.replicas]
    return " ".join(parts) + (f" (idle: {len(plan.idle)})" if plan.idle else "")


def has_roles(plan: Plan | None) -> bool:
    return plan is not None and any(r.role is not Role.MIXED for r in plan.replicas)


class Evaluator:
    def __init__(self, n: int, seeds: list[int], pilot_n: int, log: Callable[[str], None]) -> None:
        self.n, self.seeds, self.pilot_n, self.log = n, seeds, pilot_n, log
        self.sims = 0

    def point(self, setting: str, devices: list[DeviceProfile], mix: str, system: str, load: float, rate: float,
              bursty: bool = False) -> Point:
        plan, router = make(system, devices, MIXES[mix], rate, self.pilot_n)
        cost = CostModel(MODEL, devices)
        if plan is None or not plan.replicas:
            return Point(setting, mix, system, load, rate, plan, 0.0, [])
        sm = SystemModel(cost, workload(MIXES[mix], rate))
        cap = capacity(plan, sm, router, n=self.n)
        runs, spans = run_seeds(plan, cost, MIXES[mix], rate, self.n, self.seeds, bursty, router)
        self.sims += 1 + len(runs)
        return Point(setting, mix, system, load, rate, plan, cap, runs, spans)

    def own_capacity(self, devices: list[DeviceProfile], mix: str, system: str, guess: float) -> float:
        """The capacity measured on the plan the system makes near its capacity (two rounds from a guess)."""
        cost = CostModel(MODEL, devices)
        rate = guess
        cap = 0.0
        for _ in range(2):
            plan, router = make(system, devices, MIXES[mix], rate, self.pilot_n)
            if plan is None or not plan.replicas:
                return 0.0
            cap = capacity(plan, SystemModel(cost, workload(MIXES[mix], rate)), router, n=self.n)
            self.sims += 1
            rate = 0.9 * cap
        return cap


def run_seeds(plan: Plan, cost: CostModel, spec: str, rate: float, n: int, seeds: list[int], bursty: bool,
              router: RouterFor) -> tuple[list[SimResult], list[tuple[float, float]]]:
    runs, spans = [], []
    for s in seeds:
        reqs = stream(spec, rate, n, s, bursty)
        runs.append(simulate(plan, cost, reqs, router=router(plan) if router else None))
        spans.append((reqs[0].arrival, reqs[-1].arrival))
    return runs, spans


def paired_diff(xs: list[SimResult], ys: list[SimResult], key: str = "wait_mean") -> tuple[float, float]:
    """Mean and 95% half-width of (xs' ``key`` - ys') over the shared seeds (runs in seed order)."""
    return mean_ci([x.summary()[key] - y.summary()[key] for x, y in zip(xs, ys, strict=True)])


def paired_gap(a: Point, b: Point) -> tuple[float, float]:
    """Mean and 95% half-width of (a's mean wait - b's) over the shared seeds."""
    return paired_diff(a.runs, b.runs)


def reduction(a: Point, b: Point) -> tuple[float, float]:
    """1 - a's mean wait / b's, per seed: mean and 95% half-width."""
    xs = [1 - x.summary()["wait_mean"] / y.summary()["wait_mean"] for x, y in zip(a.runs, b.runs, strict=True)
          if y.summary()["wait_mean"] > 0]
    return mean_ci(xs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=400, help="requests per simulated run")
    ap.add_argument("--high", type=float, default=0.8, help="high demand, as a fraction of the larger capacity")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--seeds", type=int, default=5, help="request streams per point (for the 95%% intervals)")
    ap.add_argument("--pilot", type=int, default=300, help="requests of the pilot runs that size Splitwise's pools")
    ap.add_argument("--quick", action="store_true", help="one setting, fewer requests and seeds (a smoke run)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-roles-study", action="store_true", help="skip 'where do roles help'")
    args = ap.parse_args()
    plt: Any = None
    if not args.no_plots:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("error: the plots need matplotlib: pip install matplotlib (or run with --no-plots)", file=sys.stderr)
            return 2
    t0 = time.monotonic()
    n = 150 if args.quick else args.requests
    seeds = list(range(args.seed, args.seed + (3 if args.quick else args.seeds)))
    settings = dict(list(SETTINGS.items())[:1]) if args.quick else SETTINGS

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t0:5.0f} s] {msg}", flush=True)

    ev = Evaluator(n, seeds, args.pilot, log)
    caps: dict[tuple[str, str], float] = {}
    anchors: dict[str, float] = {}
    points: list[Point] = []
    for sname, spec in settings.items():
        devices = class_devices(spec)
        guess = plan_with(SystemModel(CostModel(MODEL, devices), workload(MIXES["mixed"], 0.1), E2LLM),
                          "splitwise").metrics.sustainable_rate * 0.5
        for system in SYSTEMS:
            caps[sname, system] = ev.own_capacity(devices, "mixed", system, guess)
        anchors[sname] = max(caps[sname, s] for s in SYSTEMS)
        log(f"{sname}: capacities " + ", ".join(f"{s} {caps[sname, s]:.3f}" for s in SYSTEMS))
        for load in LOADS:
            for system in SYSTEMS:
                points.append(ev.point(sname, devices, "mixed", system, load, load * anchors[sname]))
            log(f"{sname}: load {load:g} done")
    roles: list[tuple[str, str, str, Point, Point, Point]] = []
    if not args.no_roles_study and not args.quick:
        roles = roles_study(ev, log)
    elapsed = time.monotonic() - t0
    failures = check(points, settings)
    text = report(points, caps, anchors, roles, failures, args, n, seeds, elapsed, ev.sims)
    if plt is not None:
        plots(plt, points, settings)
    write_doc(text)
    log(f"wrote {DOC.relative_to(ROOT)}" + ("" if plt is None else f" and {PLOTS.relative_to(ROOT)}/*.png"))
    for f in failures:
        print("CHECK FAILED:", f, file=sys.stderr)
    return 1 if failures else 0


def best_baseline(points: list[Point], setting: str, load: float) -> Point | None:
    cands = [p for p in points if p.setting == setting and p.load == load and p.system in BASELINES and p.runs]
    return min(cands, key=lambda p: p.stat("wait_mean")[0], default=None)


def get(points: list[Point], setting: str, system: str, load: float) -> Point | None:
    for p in points:
        if p.setting == setting and p.system == system and p.load == load:
            return p
    return None


def check(points: list[Point], settings: dict[str, Any]) -> list[str]:
    """meshllm's mean wait <= the best baseline's within the 95% interval of the paired difference."""
    out = []
    for s in settings:
        for load in CHECK_LOADS:
            ours, best = get(points, s, "meshllm", load), best_baseline(points, s, load)
            if ours is None or best is None or not ours.runs:
                out.append(f"{s} load {load}: no meshllm plan or no baseline")
                continue
            if best.system == "meshllm":
                continue
            gap, h = paired_gap(ours, best)
            if gap - (h if math.isfinite(h) else 0.0) > 0:
                out.append(f"{s} load {load}: meshllm waits {gap:.3g} ± {h:.3g} s longer than {best.system}")
    return out


def dominating(points: list[Point], setting: str, load: float) -> list[str]:
    """The baselines that beat meshllm's plan on mean wait, mean TTFT and mean end-to-end at once, each
    significantly (the paired per-seed difference's 95% interval below zero)."""
    ours = get(points, setting, "meshllm", load)
    if ours is None or not ours.runs:
        return []
    out = []
    for b in points:
        if b.setting != setting or b.load != load or b.system not in BASELINES or not b.runs:
            continue
        gaps = [paired_diff(b.runs, ours.runs, k) for k in ("wait_mean", "ttft_mean", "e2e_mean")]
        if all(math.isfinite(g) and g + (h if math.isfinite(h) else 0.0) < 0 for g, h in gaps):
            out.append(b.system)
    return out


def roles_study(ev: Evaluator, log: Callable[[str], None]) -> list[tuple[str, str, str, Point, Point, Point]]:
    """Per setting and workload: the best plan with PREFILL/DECODE replicas against the best without.

    Both come from the same candidates meshllm's election sees (the GA's grouping and one-class
    machines, every role assignment); the best of each kind is picked by the pilot simulation at the
    rate, then served the evaluation streams. The rate is 0.8 x the larger of the two plans' capacities
    (two rounds from the Splitwise estimate, like the sweep).
    """
    out = []
    cases = [(s, mix, False) for s in ROLE_SETTINGS for mix in MIXES] + [(s, "mixed", True) for s in ROLE_SETTINGS]
    for sname, mix, bursty in cases:
        devices = class_devices(ROLE_SETTINGS[sname])
        cost = CostModel(MODEL, devices)
        rate = 0.5 * plan_with(SystemModel(cost, workload(MIXES[mix], 0.1), E2LLM),
                               "splitwise").metrics.sustainable_rate
        best: dict[bool, Plan] = {}
        for _ in range(2):
            sm = SystemModel(cost, workload(MIXES[mix], rate), PlanOptions())
            ga = plan_with(SystemModel(cost, sm.workload, NOROLES), "ga")
            groupings = [[[cost.index[x] for x in r.node_ids] for r in ga.replicas], splitwise_machines(sm)]
            e2 = plan_with(SystemModel(cost, sm.workload, E2LLM), "ga")
            groupings.append([[cost.index[x] for x in r.node_ids] for r in e2.replicas])
            cands = candidates(sm, groupings)
            best = {}
            scores: dict[bool, float] = {}
            for c in cands[:8]:
                p = sm.to_plan(c, "ga")
                res = pilot(sm, p, ev.pilot_n)
                w = float(res.wait.mean()) if res.completed == res.n else math.inf
                k = has_roles(p)
                if k not in best or w < scores[k]:
                    best[k], scores[k] = p, w
            rate = 0.8 * max(capacity(p, sm, None, n=ev.n) for p in best.values())
        sm = SystemModel(cost, workload(MIXES[mix], rate))
        pts = []
        for kind in (True, False):
            p = best.get(kind)
            if p is None:
                pts.append(Point(sname, mix, "roles" if kind else "role-less", 0.8, rate, None, 0.0, []))
                continue
            runs, spans = run_seeds(p, cost, MIXES[mix], rate, ev.n, ev.seeds, bursty, None)
            ev.sims += len(runs) + 1
            pts.append(Point(sname, mix, "roles" if kind else "role-less", 0.8, rate, p, capacity(p, sm, None, ev.n),
                             runs, spans))
        deployed, _ = make("meshllm", devices, MIXES[mix], rate, ev.pilot_n)
        dep = Point(sname, mix, "meshllm", 0.8, rate, deployed, 0.0, [])
        out.append((sname, mix, "bursty" if bursty else "poisson", pts[0], pts[1], dep))
        log(f"roles study: {sname} {mix} {'bursty' if bursty else 'poisson'} done")
    return out


def report(points: list[Point], caps: dict[tuple[str, str], float], anchors: dict[str, float],
           roles: list[tuple[str, str, str, Point, Point, Point]], failures: list[str], args: argparse.Namespace,
           n: int, seeds: list[int], elapsed: float, sims: int) -> str:
    settings = [s for s in SETTINGS if s in anchors]
    out = [f"Generated by `python tools/simulate.py{' --quick' if args.quick else ''}`: {n} requests per run, "
           f"seeds {seeds[0]}–{seeds[-1]} ({len(seeds)} streams per point), {sims} simulated runs in "
           f"{elapsed / 60:.1f} min on this machine. Times in seconds; `a ± b` = mean over the seeds ± the "
           "half-width of its 95% interval (Student's t). Loads are fractions of the setting's larger capacity "
           "(below). `*` = the system did not keep up in some seed (the backlog left when arrivals stop took "
           "more than a quarter of the arrival span to drain).",
           ""]
    out += ["### Capacities (req/s, mixed workload), measured in simulation on each system's own plan", "",
            "| setting | " + " | ".join(SYSTEMS.values()) + " | anchor (the largest) |",
            "|---|" + "---|" * (len(SYSTEMS) + 1)]
    for s in settings:
        out.append(f"| {s} | " + " | ".join(f"{caps[s, k]:.3f}" for k in SYSTEMS) + f" | {anchors[s]:.3f} |")
    out += ["", "### The check: meshllm's plan waits no longer than the best baseline (mixed workload, Poisson)", "",
            "Per load (fraction of the anchor): meshllm's mean wait, the best baseline's, and the paired per-seed "
            "difference (meshllm − best) with its 95% interval; it passes when the interval reaches zero or below. "
            "Beside the waits, what each serves a user: mean TTFT and end-to-end (s); and the baselines, if any, "
            "that beat meshllm's plan on mean wait, TTFT and end-to-end at once (each paired difference's 95% "
            "interval below zero).",
            "", "| setting | load | rate | meshllm wait | best baseline | its wait | difference | pass | "
            "TTFT: meshllm / best | end-to-end: meshllm / best | beaten on all three by |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    dominated = 0
    for s in settings:
        for load in CHECK_LOADS:
            ours, best = get(points, s, "meshllm", load), best_baseline(points, s, load)
            if ours is None or best is None or not ours.runs:
                continue
            g, h = paired_gap(ours, best)
            ok = g - (h if math.isfinite(h) else 0.0) <= 0
            by = dominating(points, s, load)
            dominated += bool(by)
            out.append(f"| {s} | {load:g} | {ours.rate:.3f} | {pm(*ours.stat('wait_mean'))} | {SYSTEMS[best.system]} | "
                       f"{pm(*best.stat('wait_mean'))} | {pm(g, h)} | {'yes' if ok else '**no**'} | "
                       f"{fmt(ours.stat('ttft_mean')[0])} / {fmt(best.stat('ttft_mean')[0])} | "
                       f"{fmt(ours.stat('e2e_mean')[0])} / {fmt(best.stat('e2e_mean')[0])} | "
                       f"{', '.join(SYSTEMS[b] for b in by) or 'none'} |")
    out += ["", f"Result: {'every point passes' if not failures else str(len(failures)) + ' point(s) fail'}; "
            f"a baseline beats meshllm's plan on wait, TTFT and end-to-end at once at {dominated} of "
            f"{len(settings) * len(CHECK_LOADS)} points.", ""]
    out += ["### E2LLM's claim against the faithful Splitwise (mixed workload, Poisson)", "",
            "Reduction of the mean wait = 1 − system's / Splitwise's, per seed (mean ± 95% interval). "
            "Negative: the system waits longer than Splitwise.", "",
            "| setting | load | E2LLM vs Splitwise (published) | E2LLM vs Splitwise (exp. completion) | "
            "meshllm vs Splitwise (published) | meshllm vs Splitwise (exp. completion) |", "|---|---|---|---|---|---|"]
    for s in settings:
        for load in (0.8, 1.0):
            cells = []
            for a in ("e2llm", "meshllm"):
                for b in ("splitwise", "splitwise-ect"):
                    pa, pb = get(points, s, a, load), get(points, s, b, load)
                    if pa and pb and pa.runs and pb.runs:
                        m, h = reduction(pa, pb)
                        cells.append(f"{100 * m:.0f}%" + ("" if not math.isfinite(h) else f" ± {100 * h:.0f}"))
                    else:
                        cells.append("–")
            out.append(f"| {s} | {load:g} | " + " | ".join(cells) + " |")
    out += ["", f"### Every system at high demand ({args.high:g} × the anchor; mixed workload, Poisson)", "",
            "Waits, TTFT and end-to-end are per-run means (then mean ± 95% interval over the seeds); p95 wait and "
            "TPOT (time per output token after the first) p50/p95 are per-run percentiles averaged over the seeds; "
            "capacity is that of the plan evaluated (req/s).", ""]
    for s in settings:
        out += [f"#### {s} (rate {args.high * anchors[s]:.3f} req/s)", "",
                "| system | mean wait | p95 wait | TTFT | TPOT p50 / p95 | end-to-end | throughput | capacity | plan |",
                "|---|---|---|---|---|---|---|---|---|"]
        for k, label in SYSTEMS.items():
            p = get(points, s, k, args.high)
            if p is None or not p.runs:
                out.append(f"| {label} | no feasible plan | | | | | | | |")
                continue
            star = "" if p.kept_up else "*"
            out.append(f"| {label} | {pm(*p.stat('wait_mean'))}{star} | {fmt(p.stat('wait_p95')[0])} | "
                       f"{pm(*p.stat('ttft_mean'))} | {fmt(p.stat('tpot_p50')[0])} / {fmt(p.stat('tpot_p95')[0])} | "
                       f"{pm(*p.stat('e2e_mean'))} | {fmt(p.stat('throughput_rps')[0])} | {p.capacity:.3f} | "
                       f"{plan_summary(p.plan)} |")
        out.append("")
    out += ["P = PREFILL, D = DECODE, M = MIXED replica.", "",
            "### Rate sweep: mean wait (mixed workload, Poisson)", "",
            "| setting | system | " + " | ".join(f"load {x:g}" for x in LOADS) + " |",
            "|---|---|" + "---|" * len(LOADS)]
    for s in settings:
        for k, label in SYSTEMS.items():
            cells = []
            for load in LOADS:
                p = get(points, s, k, load)
                cells.append("–" if p is None or not p.runs else pm(*p.stat("wait_mean")) + ("" if p.kept_up else "*"))
            out.append(f"| {s} | {label} | " + " | ".join(cells) + " |")
    if roles:
        out += ["", "### Where do roles help? Best plan with PREFILL/DECODE replicas vs the best without", "",
                "Same candidates as meshllm's election (the GA's groupings and one-class machines, every role "
                "assignment), the best of each kind by the pilot simulation, then the evaluation streams at 0.8 × "
                "the larger of the two plans' capacities. Difference = roles − role-less (paired, 95% interval); "
                "negative: roles wait less.", "",
                "| setting | workload | arrivals | rate | roles: wait | role-less: wait | difference | "
                "roles: TTFT / TPOT p95 | role-less: TTFT / TPOT p95 | roles plan | meshllm deploys |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for sname, mix, arr, a, b, dep in roles:
            if not a.runs or not b.runs:
                wa = "–" if not a.runs else pm(*a.stat("wait_mean"))
                wb = "–" if not b.runs else pm(*b.stat("wait_mean"))
                out.append(f"| {sname} | {mix} | {arr} | {a.rate:.3f} | {wa} | {wb} | – | | | {plan_summary(a.plan)} | "
                           f"{plan_summary(dep.plan)} |")
                continue
            g, h = paired_gap(a, b)
            out.append(f"| {sname} | {mix} | {arr} | {a.rate:.3f} | {pm(*a.stat('wait_mean'))} | "
                       f"{pm(*b.stat('wait_mean'))} | {pm(g, h)} | "
                       f"{fmt(a.stat('ttft_mean')[0])} / {fmt(a.stat('tpot_p95')[0])} | "
                       f"{fmt(b.stat('ttft_mean')[0])} / {fmt(b.stat('tpot_p95')[0])} | {plan_summary(a.plan)} | "
                       f"{plan_summary(dep.plan)} |")
    out += ["", "Plots (wait, p95 wait, TTFT, TPOT p95, throughput against the offered rate): "
            + ", ".join(f"[{s}](eval/{s}.png)" for s in settings), ""]
    return "\n".join(out)


def plots(plt: Any, points: list[Point], settings: dict[str, Any]) -> None:
    PLOTS.mkdir(parents=True, exist_ok=True)
    metrics = [("wait_mean", "mean waiting time (s)"), ("wait_p95", "p95 waiting time (s)"),
               ("ttft_mean", "mean TTFT (s)"), ("tpot_p95", "p95 time per output token (s)"),
               ("throughput_rps", "throughput (req/s)")]
    for s in settings:
        fig, axes = plt.subplots(1, len(metrics), figsize=(22, 4))
        for k, label in SYSTEMS.items():
            pts = sorted((p.rate, p) for p in points if p.setting == s and p.system == k and p.runs)
            if not pts:
                continue
            for ax, (key, title) in zip(axes, metrics, strict=True):
                ys = [p.stat(key) for _, p in pts]
                ax.errorbar([r for r, _ in pts], [max(m, 1e-3) for m, _ in ys],
                            yerr=[0 if not math.isfinite(h) else h for _, h in ys], marker="o", label=label, capsize=2)
                ax.set_title(title)
                ax.set_xlabel("offered rate (req/s)")
                if key != "throughput_rps":
                    ax.set_yscale("log")
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{s}: {', '.join(f'{n}×{c}' for c, n in SETTINGS[s])} — mixed workload, Poisson arrivals")
        fig.tight_layout()
        fig.savefig(PLOTS / f"{s}.png", dpi=80)
        plt.close(fig)


def write_doc(generated: str) -> None:
    block = f"{BEGIN}\n{generated}\n{END}"
    if DOC.exists():
        text = DOC.read_text()
        if BEGIN in text and END in text:
            text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
    else:
        text = f"# Evaluation\n\n{block}\n"
    DOC.write_text(text)


if __name__ == "__main__":
    raise SystemExit(main())
