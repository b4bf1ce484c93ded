"""Regenerate docs/evaluation.md (tables) and docs/eval/*.png (plots) with the discrete-event simulator.

Settings are built from the device classes in meshllm/data/device_classes.json;
every system (Splitwise pools, exo-style single pipeline, DP-only, E2LLM =
GA + DP + roles) is planned by meshllm.plan for the same devices, model and
workload, and serves the same seeded request streams in meshllm.sim.

"High load" is defined from the simulator, not from the planner's
prediction: it is ``--high`` (default 0.8) of the request rate Splitwise
actually sustains in simulation (its throughput when offered twice its
predicted capacity). Every system's plan is made for the workload at that
rate and kept for the whole rate sweep.

Only the text between the GENERATED markers of docs/evaluation.md is
rewritten; the hand-written parts stay.

The headline comparison (E2LLM vs Splitwise, mixed workload, Poisson, loads 0.4 ... 1.0) is
repeated with ``--seeds`` request streams (seeds ``--seed``, ``--seed`` + 1, ...; the load levels
stay those of the first seed) and reported as mean +/- a 95% confidence interval (Student's t
over the seeds) of the mean-wait reduction.

Usage: python tools/simulate.py [--requests 500] [--seeds 5] [--quick] [--no-plots]
Needs matplotlib for the plots (pip install matplotlib, or --no-plots).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from meshllm.plan import CostModel, ModelCosts, Plan, Workload, plan_mesh, replan  # noqa: E402
from meshllm.plan.devices import class_devices  # noqa: E402
from meshllm.sim import Request, SimResult, requests, simulate  # noqa: E402

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
SYSTEMS = {"splitwise": "Splitwise", "exo": "exo (1 pipeline)", "dp-only": "DP-only", "ga": "E2LLM (GA+DP+roles)"}
MIXES = {  # name -> (workload phases); lengths are Splitwise-shaped, scaled for a 2,048-token edge model
    "mixed": ["conversation,scale=0.25"],
    "short-in/long-out": ["in=64,in_std=32,out=256,out_std=128"],
    "long-in/short-out": ["in=768,in_std=384,out=16,out_std=8"],
    "shift": ["in=768,in_std=384,out=16,out_std=8", "in=64,in_std=32,out=256,out_std=128"],
}
LOADS = (0.2, 0.4, 0.6, 0.8, 1.0)
HEADLINE = ("splitwise", "ga")  # the systems of the headline comparison, run with every seed
HEADLINE_LOADS = (0.4, 0.6, 0.8, 1.0)
REPLAN = "ga-replan"  # our improvement over E2LLM, run on the shift workload only
REPLAN_LABEL = "meshllm: E2LLM + re-plan at the shift"
LOAD_BPS = 100e6  # bytes/s a node reads weights from local storage when a new plan moves layers (assumed)


def workload(spec: str, rate: float) -> Workload:
    return Workload.parse(f"{spec},rate={rate:.6g}")


@dataclass
class Run:
    setting: str
    mix: str
    arrivals: str
    system: str
    rate: float
    res: SimResult

    first_arrival: float = 0.0
    last_arrival: float = 0.0

    @property
    def saturated(self) -> bool:
        """The backlog left when arrivals stop takes long to drain: the system did not keep up."""
        if self.res.bounded:
            return True
        span = self.last_arrival - self.first_arrival
        drain = self.first_arrival + self.res.makespan_s - self.last_arrival
        return drain > 0.25 * span


def stream(mix: str, rate: float, n: int, bursty: bool, seed: int):  # type: ignore[no-untyped-def]
    phases = MIXES[mix]
    ws = [workload(p, rate) for p in phases]
    per = [n // len(ws)] * len(ws)
    per[-1] += n - sum(per)
    return requests(ws, per, seed=seed, bursty=bursty, max_seq_len=MODEL.max_seq_len)


def replanned(devices, cost: CostModel, first: Plan, mix: str, rate: float, reqs: list[Request]  # type: ignore[no-untyped-def]
              ) -> SimResult:
    """E2LLM's plan for the first phase, then meshllm.plan.replan for the second phase at the shift.

    The shift is detected when it happens (an oracle: real detection adds a delay). The new
    plan starts when every request of the first phase has finished and every stage whose
    layers moved has loaded its weights (stage weight bytes / LOAD_BPS); requests arriving
    meanwhile wait, and that counts.
    """
    half = len(reqs) // len(MIXES[mix])
    r1, r2 = reqs[:half], reqs[half:]
    res1 = simulate(first, cost, r1)
    second, changed = replan(first, devices, MODEL, workload(MIXES[mix][1], rate))
    if not changed:
        return simulate(first, cost, reqs)
    drained = r1[0].arrival + res1.makespan_s
    old = {(s.node_id, s.start, s.stop) for r in first.replicas for s in r.stages}
    load = max([cost.memory(s.start, s.stop, 0) / LOAD_BPS for r in second.replicas for s in r.stages
                if (s.node_id, s.start, s.stop) not in old] + [0.0])
    res2 = simulate(second, cost, r2, ready_s=max(drained, r2[0].arrival) + load)
    end = r2[0].arrival + res2.makespan_s
    return SimResult(len(reqs), res1.completed + res2.completed, np.concatenate([res1.wait, res2.wait]),
                     np.concatenate([res1.ttft, res2.ttft]), np.concatenate([res1.e2e, res2.e2e]),
                     res1.tokens_out + res2.tokens_out, max(end, drained) - r1[0].arrival,
                     res1.events + res2.events, res1.bounded or res2.bounded, {"load_s": load})


def reference_rate(devices, cost: CostModel, mix: str, n: int, seed: int) -> float:  # type: ignore[no-untyped-def]
    """Requests/s Splitwise sustains in simulation (offered twice its predicted capacity)."""
    w = workload(MIXES[mix][0], 0.1)
    rate = 0.1
    for _ in range(4):  # the predicted capacity depends a little on the rate planned for
        rate = plan_mesh(devices, MODEL, w.with_rate(rate), method="splitwise").metrics.sustainable_rate
        w = w.with_rate(rate)
    plan = plan_mesh(devices, MODEL, w, method="splitwise")
    res = simulate(plan, cost, stream(mix, 2 * rate, n, False, seed))
    return res.throughput_rps


def fmt(x: float, saturated: bool = False) -> str:
    if not math.isfinite(x):
        return "–"
    s = f"{x:.3g}" if x < 100 else f"{x:.0f}"
    return s + ("*" if saturated else "")


def plan_summary(plan: Plan) -> str:
    parts = []
    for r in plan.replicas:
        parts.append(f"{r.role.value[0].upper()}[{'+'.join(r.node_ids)}]×{r.slots}")
    return " ".join(parts) + (f" (idle: {len(plan.idle)})" if plan.idle else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=500, help="requests per simulated run")
    ap.add_argument("--high", type=float, default=0.8,
                    help="high load, as a fraction of Splitwise's simulated capacity")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--seeds", type=int, default=5, help="request streams per headline comparison (for the CIs)")
    ap.add_argument("--quick", action="store_true", help="one setting, fewer requests (a smoke run)")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args()
    plt: Any = None
    if not args.no_plots:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("error: the plots need matplotlib: pip install matplotlib (or run with --no-plots)",
                  file=sys.stderr)
            return 2
    t_start = time.monotonic()
    n = 150 if args.quick else args.requests
    settings = dict(list(SETTINGS.items())[:1]) if args.quick else SETTINGS
    runs: list[Run] = []
    seed_runs: list[tuple[int, Run]] = []  # (seed, run): the headline repeated with the other seeds
    plans: dict[tuple[str, str], Plan] = {}
    refs: dict[tuple[str, str], float] = {}
    for sname, spec in settings.items():
        devices = class_devices(spec)
        cost = CostModel(MODEL, devices)
        for mix in MIXES:
            ref = refs[sname, mix] = reference_rate(devices, cost, mix, n, args.seed)
            high = args.high * ref
            for system in SYSTEMS:
                plan = plan_mesh(devices, MODEL, workload(MIXES[mix][0], high), method=system)
                if mix == "mixed":
                    plans[sname, system] = plan
                if not plan.replicas:
                    continue
                for bursty in (False, True):
                    reqs = stream(mix, high, n, bursty, args.seed)
                    runs.append(Run(sname, mix, "bursty" if bursty else "poisson", system, high,
                                    simulate(plan, cost, reqs), reqs[0].arrival, reqs[-1].arrival))
                if mix == "shift" and system == "ga":
                    for bursty in (False, True):
                        reqs = stream(mix, high, n, bursty, args.seed)
                        runs.append(Run(sname, mix, "bursty" if bursty else "poisson", REPLAN, high,
                                        replanned(devices, cost, plan, mix, high, reqs),
                                        reqs[0].arrival, reqs[-1].arrival))
                if mix == "mixed":  # the rate sweep
                    for load in LOADS:
                        if load == args.high:
                            continue
                        reqs = stream(mix, load * ref, n, False, args.seed)
                        runs.append(Run(sname, mix, "poisson", system, load * ref, simulate(plan, cost, reqs),
                                        reqs[0].arrival, reqs[-1].arrival))
                if mix == "mixed" and system in HEADLINE:  # the headline with the other seeds
                    for seed in range(args.seed + 1, args.seed + args.seeds):
                        for load in HEADLINE_LOADS:
                            reqs = stream(mix, load * ref, n, False, seed)
                            seed_runs.append((seed, Run(sname, mix, "poisson", system, load * ref,
                                                        simulate(plan, cost, reqs), reqs[0].arrival,
                                                        reqs[-1].arrival)))
            print(f"{sname:9s} {mix:18s} Splitwise sustains {ref:.3f} req/s  ({time.monotonic() - t_start:.0f} s)",
                  flush=True)
    elapsed = time.monotonic() - t_start
    text = report(runs, seed_runs, plans, refs, args, n, elapsed)
    if plt is not None:
        plots(plt, runs, refs, settings)
    write_doc(text)
    print(f"wrote {DOC.relative_to(ROOT)}" + ("" if plt is None else f" and {PLOTS.relative_to(ROOT)}/*.png")
          + f" in {time.monotonic() - t_start:.0f} s")
    return 0


def _get(runs: list[Run], **kw: Any) -> Run | None:
    for r in runs:
        if all(getattr(r, k) == v or (k == "rate" and math.isclose(r.rate, float(v))) for k, v in kw.items()):
            return r
    return None


def reductions(runs: list[Run], seed_runs: list[tuple[int, Run]], setting: str, rate: float, seed0: int
               ) -> tuple[list[float], int]:
    """Per seed: 1 - E2LLM's mean wait / Splitwise's at ``rate``; and how many of those runs saturated."""
    by_seed: dict[int, dict[str, Run]] = {}
    for system in HEADLINE:
        r = _get(runs, setting=setting, mix="mixed", arrivals="poisson", system=system, rate=rate)
        if r is not None:
            by_seed.setdefault(seed0, {})[system] = r
    for seed, r in seed_runs:
        if r.setting == setting and r.system in HEADLINE and math.isclose(r.rate, rate):
            by_seed.setdefault(seed, {})[r.system] = r
    out, saturated = [], 0
    for pair in by_seed.values():
        if len(pair) == 2 and pair["splitwise"].res.wait.mean() > 0:
            out.append(1.0 - pair["ga"].res.wait.mean() / pair["splitwise"].res.wait.mean())
            saturated += pair["ga"].saturated or pair["splitwise"].saturated
    return out, saturated


# Student's t, 97.5% quantile, by degrees of freedom (1 ... 10; 1.96 beyond 30)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def mean_ci(xs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Student's t; nan for one value)."""
    if len(xs) < 2:
        return (xs[0] if xs else math.nan), math.nan
    df = len(xs) - 1
    t = T975[df - 1] if df <= len(T975) else (2.09 if df < 20 else 2.04 if df <= 30 else 1.96)
    return float(np.mean(xs)), t * float(np.std(xs, ddof=1)) / math.sqrt(len(xs))


def pct_ci(xs: list[float]) -> str:
    m, h = mean_ci(xs)
    return f"{100 * m:.0f}%" + ("" if not math.isfinite(h) else f" ± {100 * h:.0f}")


def report(runs: list[Run], seed_runs: list[tuple[int, Run]], plans: dict[tuple[str, str], Plan],
           refs: dict[tuple[str, str], float], args: argparse.Namespace, n: int, elapsed: float) -> str:
    total = len(runs) + len(seed_runs)
    out = [f"Generated by `python tools/simulate.py{' --quick' if args.quick else ''}` "
           f"({n} requests per run, seed {args.seed}, high load = {args.high:g} × Splitwise's simulated capacity; "
           f"{total} runs in {elapsed:.0f} s on this machine). Times in seconds; `*` = the system did not keep up "
           "(the backlog left when arrivals stop takes more than a quarter of the arrival span to drain: "
           "the figure grows with the run's length).", ""]
    out += ["### Headline: mean waiting time, E2LLM vs Splitwise (mixed workload, Poisson)", "",
            "Reduction = 1 − E2LLM's mean wait / Splitwise's, at each load (fraction of Splitwise's simulated "
            f"capacity); the 0.8 column is the high-load figure. Waits and p95 are seed {args.seed}'s; the "
            f"reductions are the mean ± the half-width of the 95% confidence interval over {args.seeds} seeds "
            "(request streams; Student's t), with how many of the seeds' runs did not keep up in brackets.", "",
            "| setting | load 0.8: rate (req/s) | Splitwise wait | E2LLM wait | Splitwise p95 | E2LLM p95 | "
            "reduction at 0.4 / 0.6 / 0.8 / 1.0 |",
            "|---|---|---|---|---|---|---|"]
    settings = sorted({r.setting for r in runs}, key=list(SETTINGS).index)
    for s in settings:
        hi = args.high * refs[s, "mixed"]
        a, b = _get(runs, setting=s, mix="mixed", arrivals="poisson", system="splitwise", rate=hi), \
            _get(runs, setting=s, mix="mixed", arrivals="poisson", system="ga", rate=hi)
        if a is None or b is None:
            continue
        reds = []
        for load in HEADLINE_LOADS:
            xs, sat = reductions(runs, seed_runs, s, load * refs[s, "mixed"], args.seed)
            reds.append(pct_ci(xs) + (f" [{sat}*]" if sat else "") if xs else "–")
        sa, sb = a.res.summary(), b.res.summary()
        out.append(f"| {s} | {hi:.3f} | {fmt(sa['wait_mean'], a.saturated)} | {fmt(sb['wait_mean'], b.saturated)} | "
                   f"{fmt(sa['wait_p95'], a.saturated)} | {fmt(sb['wait_p95'], b.saturated)} | {' / '.join(reds)} |")
    out += ["", "### Plans (made for the mixed workload at high load)", "",
            "P = PREFILL, D = DECODE, M = MIXED replica; `×n` = KV slots.", "",
            "| setting | system | replicas | predicted sustainable req/s |", "|---|---|---|---|"]
    for s in settings:
        for system, label in SYSTEMS.items():
            p = plans.get((s, system))
            if p is not None:
                out.append(f"| {s} | {label} | {plan_summary(p)} | {p.metrics.sustainable_rate:.3f} |")
    out += ["", "### Every workload at high load", "",
            "Mean wait / mean TTFT / mean end-to-end (s), throughput (req/s); p50 and p95 waits in the last column.",
            ""]
    for s in settings:
        out += [f"#### {s}", "",
                "| workload | arrivals | rate | system | wait | TTFT | e2e | throughput | wait p50 / p95 |",
                "|---|---|---|---|---|---|---|---|---|"]
        for mix in MIXES:
            hi = args.high * refs[s, mix]
            for arr in ("poisson", "bursty"):
                systems = {**SYSTEMS, REPLAN: REPLAN_LABEL} if mix == "shift" else SYSTEMS
                for system, label in systems.items():
                    r = _get(runs, setting=s, mix=mix, arrivals=arr, system=system, rate=hi)
                    if r is None:
                        out.append(f"| {mix} | {arr} | {hi:.3f} | {label} | no feasible plan | | | | |")
                        continue
                    m, sat = r.res.summary(), r.saturated
                    out.append(f"| {mix} | {arr} | {hi:.3f} | {label} | {fmt(m['wait_mean'], sat)} | "
                               f"{fmt(m['ttft_mean'], sat)} | {fmt(m['e2e_mean'], sat)} | {m['throughput_rps']:.3f} | "
                               f"{fmt(m['wait_p50'])} / {fmt(m['wait_p95'])} |")
        out.append("")
    out += ["### Rate sweep (mixed workload, Poisson)", "",
            "| setting | load | rate | system | wait | TTFT | e2e | throughput |", "|---|---|---|---|---|---|---|---|"]
    for s in settings:
        for load in LOADS:
            rate = load * refs[s, "mixed"]
            for system, label in SYSTEMS.items():
                r = _get(runs, setting=s, mix="mixed", arrivals="poisson", system=system, rate=rate)
                if r is not None:
                    m = r.res.summary()
                    out.append(f"| {s} | {load:g} | {rate:.3f} | {label} | {fmt(m['wait_mean'], r.saturated)} | "
                               f"{fmt(m['ttft_mean'], r.saturated)} | {fmt(m['e2e_mean'], r.saturated)} | "
                               f"{m['throughput_rps']:.3f} |")
    out += ["", "Plots: " + ", ".join(f"[{s}](eval/{s}.png)" for s in settings), ""]
    return "\n".join(out)


def plots(plt: Any, runs: list[Run], refs: dict[tuple[str, str], float], settings: dict[str, Any]) -> None:
    PLOTS.mkdir(parents=True, exist_ok=True)
    metrics = [("wait_mean", "mean waiting time (s)"), ("ttft_mean", "mean TTFT (s)"),
               ("e2e_mean", "mean end-to-end latency (s)"), ("throughput_rps", "throughput (req/s)")]
    for s in settings:
        fig, axes = plt.subplots(1, 4, figsize=(18, 4))
        for system, label in SYSTEMS.items():
            pts = sorted((r.rate, r.res.summary()) for r in runs
                         if r.setting == s and r.mix == "mixed" and r.arrivals == "poisson" and r.system == system)
            if not pts:
                continue
            for ax, (key, title) in zip(axes, metrics, strict=True):
                ax.plot([p[0] for p in pts], [max(p[1][key], 1e-3) for p in pts], marker="o", label=label)
                ax.set_title(title)
                ax.set_xlabel("offered rate (req/s)")
                if key != "throughput_rps":
                    ax.set_yscale("log")
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{s}: {', '.join(f'{n}×{c}' for c, n in SETTINGS[s])} — mixed workload, Poisson arrivals")
        fig.tight_layout()
        fig.savefig(PLOTS / f"{s}.png", dpi=90)
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
