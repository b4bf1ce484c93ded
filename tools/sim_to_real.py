"""Sim-to-real: serve one request stream on a real mesh on this machine and in the simulator; compare.

1. Times the model's segments in this process (onnxruntime, one thread, as the nodes run them) for
   the layer ranges of the pinned plan: prefill chunks and batched decode steps (the calibration
   samples).
2. Starts Mosquitto and one ``meshllm node`` process per emulated device on 127.0.0.1, every node
   with ``--emulate-compute-scale`` (its stage sleeps ``(scale - 1) x`` each measured run) and the
   same ``--plan-file``, and waits until every stage of the plan is loaded.
3. Reads the profiles the nodes measured and advertise (their retained member records, as
   ``meshllm status --json`` shows them) and builds the planner's ``CostModel`` from them, raw and
   calibrated (``meshllm.plan.fit_factors`` on the samples of step 1 times each node's scale).
   A calibration stream (another seed) is served first; each node's stages measure their serving
   overhead per run (from when a run's work is all at the stage, and the previous run has ended, to
   the start of the run: taking work from the inbox, batching, the previous run's replies, feeding
   tokens back), and each node advertises that figure in its profile (``serving_overhead_s``), which
   the planner's cost model and the simulator charge on every run of the device. The "advertised
   profile" simulation uses the profiles as the nodes advertise them after that stream (what the
   planner sees once the mesh has served); the "raw profile" one those they advertised at start,
   without the serving overhead. The planner measures its dispatch delay over that stream too (from
   routing a prompt to having sent it: it journals the route first; ``dispatch_s`` / ``dispatched`` in
   its stats), which the "advertised + dispatch" simulation charges on every request.
4. Makes a seeded Poisson stream (``meshllm.sim.requests``) at ``--load`` x the rate the calibrated
   simulator sustains, with prompts of exactly the drawn lengths and outputs of exactly the drawn
   lengths (greedy, checked in this process not to stop early), and drives it through
   ``meshllm.Client``, bounded in count and in wall time.
5. Replays the same requests (the arrival times at which they were actually sent, the prompt and
   output lengths the mesh reported) in ``meshllm.sim`` with the same plan, and prints real vs
   simulated waiting time (mean, p50, p95), TTFT, end-to-end and throughput with the relative
   errors, for the raw and the calibrated cost model, beside the planner's own prediction.

Definitions (as in meshllm/sim/engine.py): waiting time = arrival to the start of the prompt's
first stage (the mesh's ``timings.queue_s``: request received by the scheduler -> first prefill
stage starts it); TTFT = arrival to the end of the prefill (``timings.ttft_s``); end-to-end =
arrival to the last token (``timings.total_s``); throughput = completed / (first send to last
completion, measured by the client).

Usage: python tools/sim_to_real.py [--setting prefill-decode|mixed] [--requests 150] [--load 0.7] [--seed 1]
                                   [--max-wall 240] [--timing scale|model] [--json out.json]
About 2-3 minutes on the 2-core development machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meshllm.model.manifest import Manifest, load_manifest  # noqa: E402
from meshllm.plan import (  # noqa: E402
    CostModel,
    DeviceFactors,
    ModelCosts,
    Plan,
    Sample,
    Workload,
    fit_factors,
    rescore,
    system_model,
)
from meshllm.plan.objective import infeasible_metrics  # noqa: E402
from meshllm.profile import DeviceProfile  # noqa: E402
from meshllm.sim import Request, SimResult, requests, simulate  # noqa: E402

MODEL = ROOT / "models" / "tiny-austen"
WORKLOAD = "in=48,in_std=24,out=24,out_std=12"  # tokens; the bundled model's context is 256
BATCHING = "serving"  # the simulator's decode batching that mirrors meshllm's stages


@dataclass(frozen=True)
class Setting:
    """Emulated devices (node id -> compute slow-down) and the plan's replicas pinned on them."""

    scales: dict[str, float]
    # (role, slots, [(node id, first layer, stop layer)])
    replicas: tuple[tuple[str, int, tuple[tuple[str, int, int], ...]], ...]
    # node id -> pinned figures (``meshllm node --emulate-device``: flops, mem_bandwidth_Bps, mem_bytes) instead
    # of measured ones divided by the scale: with ``timing="model"`` every run then lasts the same whatever the
    # host's noise at start-up (a quick measurement swings 2x from run to run on a shared machine); the scale is then
    # not applied
    devices: dict[str, dict[str, float]] | None = None

    @property
    def node_ids(self) -> list[str]:
        return list(self.scales)


# One PREFILL replica on a fast device, a 2-stage DECODE replica and a 1-stage DECODE replica on
# slower ones. The scales make a decode step last tens of milliseconds and a prompt a few hundred,
# so that the emulated compute, not the host's Python and MQTT overheads, sets the pace.
SETTING = Setting(
    scales={"pre": 40.0, "dec-a": 40.0, "dec-b": 40.0, "dec-c": 60.0},
    replicas=(("prefill", 2, (("pre", 0, 6),)),
              ("decode", 6, (("dec-a", 0, 3), ("dec-b", 3, 6))),
              ("decode", 4, (("dec-c", 0, 6),))),
)
# What the election often deploys instead: role-less replicas, here two one-stage MIXED ones.
MIXED_SETTING = Setting(
    scales={"a": 40.0, "b": 40.0},
    replicas=(("mixed", 4, (("a", 0, 6),)), ("mixed", 4, (("b", 0, 6),))),
)
SETTINGS = {"prefill-decode": SETTING, "mixed": MIXED_SETTING}
# With ``--timing model`` the devices are pinned to these figures (about what the scales above make of this
# machine): the nodes' own start-up measurement swung 2x from run to run (the PREFILL node 2.3-5.4 GFLOP/s),
# and with it the offered rate (5.8-12.7 req/s at one load), so runs were not comparable.
_PI = {"flops": 2.6e9, "mem_bandwidth_Bps": 1.2e9, "mem_bytes": 4e9}
PINNED = {"prefill-decode": {"pre": _PI, "dec-a": _PI, "dec-b": _PI,
                             "dec-c": {"flops": 1.7e9, "mem_bandwidth_Bps": 0.8e9, "mem_bytes": 4e9}},
          "mixed": {"a": _PI, "b": _PI}}


def pinned_plan(setting: Setting, manifest: Manifest, workload: Workload) -> Plan:
    """The setting as a plan (predicted figures are filled in later by ``rescore``)."""
    ctx = manifest.config.max_seq_len
    reps = [{"id": i, "role": role, "slots": slots, "context": ctx, "bottleneck_s": None, "latency_s": None,
             "prefill_rate": 1.0, "decode_token_rate": 1.0, "order_exact": True,
             "stages": [{"node_id": n, "start": a, "stop": b, "run_s": 0.0, "send_s": 0.0, "memory_bytes": 0.0,
                         "memory_capacity": 0.0} for n, a, b in stages]}
            for i, (role, slots, stages) in enumerate(setting.replicas)]
    return Plan.from_json({"format": "meshllm-plan", "format_version": 1, "version": 1, "model": manifest.name,
                           "n_layers": manifest.config.n_layers, "method": "pinned", "seed": None,
                           "workload": workload.to_json(), "metrics": infeasible_metrics(workload.rate).to_json(),
                           "replicas": reps, "idle": [], "notes": [], "extra": {}})


# --- 1. calibration samples: the runtime timed in this process --------------------------------------


async def _time_stage(model_dir: Path, a: int, b: int, scale: float, reps: int) -> list[tuple[str, int, int, float]]:
    """(kind, tokens or context, batch, mean seconds) of Segment runs of layers [a, b) on an emulated device.

    Timed exactly as a node's stage times the run it then stretches (``StageRunner._compute``): through a
    one-thread executor, and followed by the emulation's sleep of ``(scale - 1) x`` the run. The sleep
    matters: after it the caches are cold and a run of this small model takes about three times as long
    as back to back. Means, not medians: the emulated device's service time is ``scale x`` the mean run,
    host hiccups included.
    """
    from concurrent.futures import ThreadPoolExecutor

    from meshllm.runtime.segment import Segment

    loop = asyncio.get_running_loop()
    rng = np.random.default_rng(a * 100 + b)
    with ThreadPoolExecutor(max_workers=1) as ex:
        seg = await loop.run_in_executor(ex, lambda: Segment(model_dir, a, b, max_batch=8, threads=1, verify=False,
                                                              spinning=False))

        def x(batch: int, n: int) -> np.ndarray:
            return (rng.integers(3, seg.config.vocab_size, size=batch * n) if seg.has_embed
                    else rng.standard_normal((batch, n, seg.config.dim), dtype=np.float32))

        async def timed(fn: Any) -> float:
            t = time.perf_counter()
            await loop.run_in_executor(ex, fn)
            took = time.perf_counter() - t
            await asyncio.sleep(took * (scale - 1.0))
            return took

        rows = []
        for n in (16, 48, 96):
            times = []
            for r in range(reps + 1):
                seg.open(r)
                xs = x(1, n)
                took = await timed(lambda r=r, xs=xs: seg.prefill(r, xs))
                if r:
                    times.append(took)
                seg.close(r)
            rows.append(("prefill", n, 1, statistics.fmean(times)))
        for ctx, batch in ((16, 1), (120, 1), (48, 2), (48, 4), (96, 6)):
            seqs = list(range(batch))
            for s in seqs:
                seg.open(s)
                seg.prefill(s, x(1, ctx))
            times = []
            for i in range(2 * reps + 1):
                xs = x(batch, 1).reshape(batch) if seg.has_embed else x(batch, 1)
                took = await timed(lambda seqs=seqs, xs=xs: seg.decode(seqs, xs))
                if i:
                    times.append(took)
            for s in seqs:
                seg.close(s)
            rows.append(("decode", ctx + reps, batch, statistics.fmean(times)))
    return rows


def calibration_samples(setting: Setting, model_dir: Path, reps: int = 4) -> list[Sample]:
    """Every stage of the setting timed as its emulated node runs it, all stages at once (as in the mesh)."""
    from meshllm.cli import run_async

    stages = [(n, a, b) for _, _, st in setting.replicas for n, a, b in st]

    async def go() -> list[list[tuple[str, int, int, float]]]:
        return list(await asyncio.gather(*(_time_stage(model_dir, a, b, setting.scales[n], reps)
                                           for n, a, b in stages)))

    out = []
    for (node, a, b), rows in zip(stages, run_async(go()), strict=True):
        k = setting.scales[node]
        for kind, n, batch, sec in rows:
            out.append(Sample.prefill(node, a, b, n, k * sec) if kind == "prefill"
                       else Sample.decode(node, a, b, n, k * sec, batch))
    return out


# --- 2. the real mesh -----------------------------------------------------------------------------


def emulated(setting: Setting, node_id: str) -> list[str]:
    """The ``meshllm node`` options of one emulated device: its pinned figures, or its slow-down."""
    if setting.devices and node_id in setting.devices:
        return ["--emulate-device", json.dumps(setting.devices[node_id])]
    return ["--emulate-compute-scale", f"{setting.scales[node_id]:g}"]


@contextlib.contextmanager
def real_mesh(setting: Setting, model_dir: Path, plan: Plan, broker: str, tmp: Path, mesh: str,
              ready_timeout: float = 90.0, timing: str = "scale") -> Iterator[dict[str, Any]]:
    """The nodes of ``setting`` serving ``plan``; yields the mesh state once every stage is loaded."""
    from tests.mesh_harness import NodeProc, state, wait_until
    from tests.serving_harness import all_ready

    (tmp / "plan.json").write_text(json.dumps(plan.to_json()))
    procs = [NodeProc(mesh, n, broker=broker, log_dir=tmp,
                      extra=["--model", str(model_dir), "--plan-file", str(tmp / "plan.json"), "--threads", "1",
                             "--emulate-timing", timing, *emulated(setting, n)])
             for n in setting.node_ids]
    try:
        for p in procs:
            p.wait_started()
        wait_until(lambda: all_ready(mesh, broker), ready_timeout, "every stage of the plan loaded")
        yield state(mesh, broker)
    finally:
        for p in procs:
            with contextlib.suppress(AssertionError):
                p.stop()


def advertised_profiles(st: dict[str, Any], setting: Setting) -> list[DeviceProfile]:
    """The profiles the nodes gossip (measured, then divided by their emulation scale; with the serving overhead
    they measured once they have served), with their links."""
    from meshllm.serve.planning import member_profiles

    members = {n: st["members"][n] for n in setting.node_ids}
    return member_profiles(members)


# --- 4. the request stream ------------------------------------------------------------------------


@dataclass
class Item:
    req: Request  # planned id, arrival, prompt and output lengths
    prompt: str


def make_prompts(model_dir: Path, reqs: Sequence[Request], seed: int) -> list[Item]:
    """A prompt of exactly ``n_in`` tokens per request whose greedy answer does not stop before ``n_out``."""
    from meshllm.runtime.generate import LocalModel
    from meshllm.runtime.sampling import SamplingParams

    lm = LocalModel(model_dir, threads=1, verify=False)
    tok = lm.tokenizer
    words = ("the she was not her had been very said would of and to a in that it which for Mr Mrs Miss "
             "Elizabeth Darcy Jane sister mother house letter day morning evening manner heart mind "
             "happy little great such time as could be with at his all might own").split()
    rng = np.random.default_rng(seed + 1000)
    out = []
    for q in reqs:
        for _ in range(200):
            text = ""
            while len(tok.encode(text, bos=True)) < q.n_in:
                text = f"{text} {words[rng.integers(len(words))]}".strip()
            if len(tok.encode(text, bos=True)) != q.n_in:
                continue  # the last word took two tokens past the target: draw again
            got = lm.generate(text, SamplingParams(max_tokens=q.n_out, temperature=0))
            if len(got.token_ids) == q.n_out:
                out.append(Item(q, text))
                break
        else:
            raise RuntimeError(f"no prompt of {q.n_in} tokens with {q.n_out} greedy tokens found")
    return out


@dataclass
class Record:
    id: int
    sent: float  # wall clock (time.time()) when the client sent it
    done: float = math.nan  # wall clock of the final reply at the client
    first: float = math.nan  # wall clock of the first token at the client
    timings: dict[str, Any] = field(default_factory=dict)  # the mesh's
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and math.isfinite(self.done)


WITH_DISPATCH = "advertised + dispatch"  # the advertised profiles, and the planner's dispatch delay per request
STAGE_COUNTERS = ("busy_s", "overhead_s", "runs")  # what the stage counters of a node's stats add up
DISPATCH_COUNTERS = ("dispatch_s", "dispatched")  # the planner's (its stats' "scheduler")
COUNTERS = STAGE_COUNTERS + DISPATCH_COUNTERS


async def _watch_stats(broker: str, mesh: str, latest: dict[str, dict[str, float]]) -> None:
    """Keeps the latest counters each node publishes in its stats: ``busy_s`` (seconds its stage ran,
    emulation included), ``overhead_s`` (the serving stack's own time before its runs) and ``runs``; at the
    planner also ``dispatch_s`` (routing to prompt sent, summed) and ``dispatched`` (0 elsewhere)."""
    import aiomqtt

    from meshllm.mesh.broker import BrokerURL
    from meshllm.mesh.topics import Topics

    async with aiomqtt.Client(**BrokerURL.parse(broker).client_kwargs()) as c:
        await c.subscribe(Topics(mesh).all_stats, qos=0)
        async for m in c.messages:
            with contextlib.suppress(ValueError, TypeError, KeyError):
                d = json.loads(m.payload)  # type: ignore[arg-type]
                sc = d.get("scheduler") or {}
                if d.get("busy_s") is not None or sc:
                    latest[str(d["node_id"])] = {**{k: float(d.get(k) or 0.0) for k in STAGE_COUNTERS},
                                                 **{k: float(sc.get(k) or 0.0) for k in DISPATCH_COUNTERS}}


async def drive(broker: str, mesh: str, items: Sequence[Item], max_wall: float, stream: str
                ) -> tuple[list[Record], dict[str, dict[str, float]]]:
    """Sends every item at its arrival time (from now), collects replies; gives up after ``max_wall`` s.

    Request ids are ``s2r-<stream>-<n>``: a stream that reused another's ids would be refused (the mesh
    refuses an id that ended less than two minutes ago with other contents).

    Returns the records and each node's counters over the run (:data:`COUNTERS`, from the nodes' stats).
    """
    from meshllm.serve.client import Client, RequestFailed

    records = [Record(it.req.id, math.nan) for it in items]
    latest: dict[str, dict[str, float]] = {}

    async def one(c: Client, it: Item, rec: Record, t0: float) -> None:
        await asyncio.sleep(max(0.0, t0 + it.req.arrival - time.monotonic()))
        rec.sent = time.time()
        try:
            async with contextlib.aclosing(c.stream(it.prompt, max_tokens=it.req.n_out, temperature=0,
                                                    request_id=f"s2r-{stream}-{it.req.id}")) as chunks:
                async for ch in chunks:
                    if math.isnan(rec.first):
                        rec.first = time.time()
                    if ch.done:
                        rec.done = time.time()
                        rec.timings = dict(ch.timings or {})
                        assert ch.usage is not None
                        rec.prompt_tokens, rec.completion_tokens = ch.usage.prompt_tokens, ch.usage.completion_tokens
        except RequestFailed as e:
            rec.error = f"{e.code}: {e.message}"

    async with asyncio.TaskGroup() as outer:
        watcher = outer.create_task(_watch_stats(broker, mesh, latest))
        await asyncio.sleep(1.5)  # the nodes' first stats (their counters before the stream) are in
        before = dict(latest)
        async with Client(mesh=mesh, broker=broker, first_token_timeout=max_wall, idle_timeout=max_wall) as client:
            t0 = time.monotonic() + 0.2 - items[0].req.arrival
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max_wall):
                    async with asyncio.TaskGroup() as tg:
                        for it, rec in zip(items, records, strict=True):
                            tg.create_task(one(client, it, rec, t0))
        await asyncio.sleep(1.5)  # the nodes publish their stats once a second
        watcher.cancel()
    for rec in records:
        if not rec.ok and not rec.error:
            rec.error = "not finished within --max-wall"
    zero = dict.fromkeys(COUNTERS, 0.0)
    return records, {n: {k: c[k] - before.get(n, zero)[k] for k in COUNTERS} for n, c in latest.items()}


def advertised_after_serving(mesh: str, broker: str, setting: Setting, timeout: float = 10.0,
                             log: Any = print) -> list[DeviceProfile]:
    """The nodes' profiles once every one advertises the serving overhead it measured (they restate their
    profile within a second or two of having served enough runs), or as they are after ``timeout``: a node
    whose stages made fewer than 20 runs (prompts prefilled together make fewer runs) advertises none yet,
    and what the planner sees is then what is simulated."""
    from tests.mesh_harness import state, wait_until

    def check() -> list[DeviceProfile] | None:
        got = advertised_profiles(state(mesh, broker), setting)
        return got if all(p.serving_overhead_s > 0 for p in got) else None
    try:
        return wait_until(check, timeout, "every node advertising its serving overhead", interval=0.5)
    except AssertionError:
        got = advertised_profiles(state(mesh, broker), setting)
        log("  not advertised yet (fewer than 20 runs): "
            + ", ".join(p.node_id for p in got if p.serving_overhead_s <= 0))
        return got


def dispatch_per_request(counters: dict[str, dict[str, float]]) -> float:
    """The planner's mean time from routing a prompt to having sent it, over a stream (seconds; 0 if none)."""
    n = sum(c["dispatched"] for c in counters.values())
    return sum(c["dispatch_s"] for c in counters.values()) / n if n else 0.0


def overhead_per_run(counters: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each node's mean serving overhead per stage run over a stream (seconds)."""
    return {n: c["overhead_s"] / c["runs"] for n, c in counters.items() if c["runs"] > 0}


# --- 5. comparison --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Figures:
    """The compared figures of one run (real or simulated)."""

    completed: int
    wait_mean: float
    wait_p50: float
    wait_p95: float
    ttft_mean: float
    e2e_mean: float
    throughput_rps: float

    KEYS = ("wait_mean", "wait_p50", "wait_p95", "ttft_mean", "e2e_mean", "throughput_rps")

    @classmethod
    def of_sim(cls, r: SimResult) -> Figures:
        s = r.summary()
        return cls(r.completed, s["wait_mean"], s["wait_p50"], s["wait_p95"], s["ttft_mean"], s["e2e_mean"],
                   s["throughput_rps"])

    @classmethod
    def of_real(cls, records: Sequence[Record]) -> Figures:
        ok = [r for r in records if r.ok]
        wait = np.array([r.timings["queue_s"] for r in ok])
        ttft = np.array([r.timings["ttft_s"] for r in ok])
        e2e = np.array([r.timings["total_s"] for r in ok])
        first = min(r.sent for r in records)
        span = max(r.done for r in ok) - first if ok else math.nan
        return cls(len(ok), float(wait.mean()), float(np.percentile(wait, 50)), float(np.percentile(wait, 95)),
                   float(ttft.mean()), float(e2e.mean()), len(ok) / span)


def replay(records: Sequence[Record]) -> list[Request]:
    """The requests as the mesh saw them: actual send times, the lengths it reported."""
    ok = [r for r in records if r.ok]
    t0 = min(r.sent for r in records)
    return [Request(r.id, r.sent - t0, r.prompt_tokens, r.completion_tokens) for r in ok]


def rel(sim: float, real: float) -> float:
    return (sim - real) / real if real else math.nan


def table(real: Figures, sims: dict[str, Figures], planner: dict[str, float]) -> str:
    names = {"wait_mean": "mean wait (s)", "wait_p50": "p50 wait (s)", "wait_p95": "p95 wait (s)",
             "ttft_mean": "mean TTFT (s)", "e2e_mean": "mean end-to-end (s)", "throughput_rps": "throughput (req/s)"}
    head = "| figure | real mesh | " + " | ".join(f"sim, {k} | error" for k in sims) + " | planner (M/G/c model) |"
    lines = [head, "|---" * (3 + 2 * len(sims)) + "|"]
    for key in Figures.KEYS:
        row = f"| {names[key]} | {getattr(real, key):.3f} | "
        row += " | ".join(f"{getattr(f, key):.3f} | {100 * rel(getattr(f, key), getattr(real, key)):+.0f}%"
                          for f in sims.values())
        p = planner.get(key)
        row += f" | {p:.3f} |" if p is not None and math.isfinite(p) else " | – |"
        lines.append(row)
    return "\n".join(lines)


@dataclass
class Outcome:
    real: Figures
    sims: dict[str, Figures]
    planner: dict[str, float]
    records: list[Record]
    rate: float
    notes: list[str]
    busy_real: dict[str, float]  # per node: seconds its stage ran during the stream (the nodes' stats)
    busy_sim: dict[str, float]  # the same in the mesh-calibrated simulation
    busy_ratio: dict[str, float]  # real / simulated busy time of the calibration stream, per node
    overhead: dict[str, float] = field(default_factory=dict)  # per node: serving overhead per run, calibration
    overhead_measured: dict[str, float] = field(default_factory=dict)  # ... and over the measured stream
    advertised: dict[str, float] = field(default_factory=dict)  # per node: the serving overhead in its profile
    dispatch: float = 0.0  # the planner's dispatch delay per request, calibration stream (charged: see run)
    dispatch_measured: float = 0.0  # ... and over the measured stream

    def max_error(self, sim: str, keys: Sequence[str] = Figures.KEYS) -> float:
        f = self.sims[sim]
        return max(abs(rel(getattr(f, k), getattr(self.real, k))) for k in keys)


def stretched(factors: dict[str, DeviceFactors], ratio: dict[str, float]) -> dict[str, DeviceFactors]:
    """Each device ``ratio[node]`` times slower than ``factors`` say (every term of its run time)."""
    out = {}
    for n, f in factors.items():
        r = ratio.get(n, 1.0)
        out[n] = DeviceFactors(f.flops_eff / r, f.bw_eff / r, f.run_overhead_s * r, f.layer_overhead_s * r)
    return out


def _stream(model_dir: Path, workload_spec: str, rate: float, n: int, seed: int, max_seq_len: int) -> list[Item]:
    w = Workload.parse(f"{workload_spec},rate={rate:.6g}")
    return make_prompts(model_dir, requests([w], [n], seed=seed, max_seq_len=max_seq_len), seed)


def _capacity(plan: Plan, cost: CostModel, workload_spec: str, seed: int, max_seq_len: int) -> float:
    """Requests/s the simulator sustains when offered far too many."""
    probe = requests([Workload.parse(f"{workload_spec},rate=100")], [200], seed=seed + 7, max_seq_len=max_seq_len)
    return simulate(plan, cost, probe, batching=BATCHING).throughput_rps


def run(setting: Setting, n_requests: int, load: float, seed: int, max_wall: float, model_dir: Path = MODEL,
        workload_spec: str = WORKLOAD, rate: float | None = None, n_calibration: int | None = None,
        log: Any = print, timing: str = "scale") -> Outcome:
    """The whole comparison (see the module docstring); ``rate`` overrides ``load``.

    ``n_calibration`` requests (default: a third of ``n_requests``, at least 20; 0 skips it) are
    served first with another seed, to calibrate on the mesh: each node's serving overhead per stage run
    (what its stages measure between a run's work being ready and the run starting), which the nodes then
    advertise in their profiles (the "advertised profile" simulation uses those profiles; ``overhead_s / runs``
    in their stats is kept in the outcome to compare); and, with scale emulation, the stage busy times
    ("mesh-calibrated").

    ``timing="model"`` makes every node's stage runs last what the cost model predicts for its
    advertised (emulated) profile (``--emulate-timing model``): the devices then *are* the cost model,
    no calibration is needed, and the comparison isolates the simulator's model of the serving system
    (queues, batching, hand-offs, routing) from its model of device speed (checked on its own by
    ``tools/calibrate_cost_model.py``).
    """
    from tests.mesh_harness import mosquitto

    t_start = time.monotonic()
    manifest = load_manifest(model_dir)
    msl = manifest.config.max_seq_len
    costs = ModelCosts.from_manifest(manifest)
    paced = timing == "model"
    samples = [] if paced else calibration_samples(setting, model_dir)
    log(f"calibration: {len(samples)} segment timings ({time.monotonic() - t_start:.0f} s)")
    plan = pinned_plan(setting, manifest, Workload.parse(f"{workload_spec},rate=1"))
    mesh = f"s2r-{secrets.token_hex(3)}"
    notes: list[str] = []
    n_cal = max(20, n_requests // 3) if n_calibration is None else n_calibration
    with mosquitto() as broker, tempfile.TemporaryDirectory() as d, \
            real_mesh(setting, model_dir, plan, broker, Path(d), mesh, timing=timing) as st:
        log(f"mesh ready: {len(setting.node_ids)} nodes ({time.monotonic() - t_start:.0f} s)")
        devices = advertised_profiles(st, setting)
        for p in devices:
            log(f"  {p.node_id:6s} advertises {p.flops / 1e9:7.2f} GFLOP/s, {p.mem_bandwidth_Bps / 1e9:6.3f} GB/s"
                f"{' (emulated)' if p.emulated else ''}")
        seg_factors = fit_factors(costs, devices, samples) if samples else {}
        for n, f in seg_factors.items():
            log(f"  {n:6s} segment-calibrated: flops x{f.flops_eff:.3g}, bandwidth x{f.bw_eff:.3g}, "
                f"{f.run_overhead_s * 1e3:.2f} ms/run, {f.layer_overhead_s * 1e3:.2f} ms/layer")
        mesh_factors, ratio, overhead, served, dispatch = seg_factors, {}, {}, devices, 0.0
        if n_cal:
            cal_rate = load * _capacity(plan, CostModel(costs, devices, seg_factors), workload_spec, seed, msl)
            cal_items = _stream(model_dir, workload_spec, cal_rate, n_cal, seed + 100, msl)
            log(f"calibration stream: {n_cal} requests at {cal_rate:.2f} req/s (seed {seed + 100})")
            cal_records, cal_counters = asyncio.run(drive(broker, mesh, cal_items, max_wall, "calibration"))
            overhead = overhead_per_run(cal_counters)
            log("  serving overhead per stage run (ms): "
                + ", ".join(f"{n} {o * 1e3:.2f}" for n, o in overhead.items()))
            dispatch = dispatch_per_request(cal_counters)
            log(f"  the planner's dispatch (routed -> prompt sent): {dispatch * 1e3:.2f} ms per request")
            served = advertised_after_serving(mesh, broker, setting, log=log)
            log("  advertised (ms): " + ", ".join(f"{p.node_id} {p.serving_overhead_s * 1e3:.2f}" for p in served))
            if not paced:  # (paced, the stages run exactly as long as the cost model says: nothing to stretch)
                cal_sim = simulate(plan, CostModel(costs, devices, seg_factors), replay(cal_records),
                                   batching=BATCHING)
                ratio = {n: c["busy_s"] / cal_sim.busy_s[n] for n, c in cal_counters.items()
                         if c["busy_s"] and cal_sim.busy_s.get(n)}
                mesh_factors = stretched(seg_factors, ratio)
                log("  stage busy real / simulated: " + ", ".join(f"{n} {r:.2f}" for n, r in ratio.items())
                    + f" ({time.monotonic() - t_start:.0f} s)")
        cost_raw = CostModel(costs, devices)
        cost_seg, cost_mesh = CostModel(costs, devices, seg_factors), CostModel(costs, devices, mesh_factors)
        cost_served = CostModel(costs, served)
        if rate is None:
            rate = load * _capacity(plan, cost_mesh, workload_spec, seed, msl)
        items = _stream(model_dir, workload_spec, rate, n_requests, seed, msl)
        log(f"measured stream: {n_requests} requests at {rate:.2f} req/s (Poisson, seed {seed}), prompts checked "
            f"({time.monotonic() - t_start:.0f} s)")
        records, counters = asyncio.run(drive(broker, mesh, items, max_wall, "measured"))
        log(f"real mesh served {sum(r.ok for r in records)}/{len(records)} ({time.monotonic() - t_start:.0f} s)")
    failed = [r for r in records if not r.ok]
    if failed:
        notes.append(f"{len(failed)} request(s) failed, first: {failed[0].error}")
    lengths = [(r.prompt_tokens, r.completion_tokens) == (it.req.n_in, it.req.n_out)
               for r, it in zip(records, items, strict=True) if r.ok]
    if not all(lengths):
        notes.append(f"{lengths.count(False)} request(s) ran with other lengths than planned (the replay uses "
                     "the mesh's)")
    replayed = replay(records)
    real = Figures.of_real(records)
    sim_mesh = simulate(plan, cost_mesh, replayed, batching=BATCHING)
    sims = {"raw profile": Figures.of_sim(simulate(plan, cost_raw, replayed, batching=BATCHING)),
            "segment-calibrated": Figures.of_sim(simulate(plan, cost_seg, replayed, batching=BATCHING))}
    if ratio:
        sims["mesh-calibrated"] = Figures.of_sim(sim_mesh)
        sims["mesh-calibrated, lane batching"] = Figures.of_sim(simulate(plan, cost_mesh, replayed, batching="lanes"))
    if served is not devices:
        sims["advertised profile"] = Figures.of_sim(simulate(plan, cost_served, replayed, batching=BATCHING))
        sims[WITH_DISPATCH] = Figures.of_sim(simulate(plan, cost_served, replayed, batching=BATCHING,
                                                      dispatch_s=dispatch))
    w = Workload.parse(f"{workload_spec},rate={rate:.6g}")
    scored = rescore(plan, system_model(served, costs, w, factors=mesh_factors))
    planner = {}
    if scored is not None:
        m = scored.metrics
        planner = {"wait_mean": m.mean_wait_s, "ttft_mean": m.ttft_s, "e2e_mean": m.e2e_s,
                   "throughput_rps": min(rate, m.sustainable_rate) if m.stable else m.sustainable_rate}
    busy = {n: c["busy_s"] for n, c in counters.items()}
    return Outcome(real, sims, planner, records, rate, notes, busy, sim_mesh.busy_s, ratio, overhead,
                   overhead_per_run(counters), {p.node_id: p.serving_overhead_s for p in served}, dispatch,
                   dispatch_per_request(counters))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=150)
    ap.add_argument("--load", type=float, default=0.7, help="fraction of the calibrated simulator's capacity")
    ap.add_argument("--rate", type=float, help="requests/s (overrides --load)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--setting", choices=list(SETTINGS), default="prefill-decode",
                    help="the pinned plan: a PREFILL and two DECODE replicas, or two MIXED replicas")
    ap.add_argument("--max-wall", type=float, default=240.0, help="seconds the stream may take at most")
    ap.add_argument("--json", help="write the figures and per-request records here")
    ap.add_argument("--measured-devices", action="store_true",
                    help="with --timing model, let each node measure its emulated profile instead of pinning it")
    ap.add_argument("--timing", choices=("scale", "model"), default="scale",
                    help="how the nodes emulate slower devices (meshllm node --emulate-timing); with 'model' the "
                    "devices run at the cost model's speed and the raw-profile simulation is the one to compare")
    args = ap.parse_args()
    t0 = time.monotonic()
    setting = SETTINGS[args.setting]
    if args.timing == "model" and not args.measured_devices:
        setting = dataclasses.replace(setting, devices=PINNED[args.setting])
    out = run(setting, args.requests, args.load, args.seed, args.max_wall, rate=args.rate, timing=args.timing)
    best = (WITH_DISPATCH if WITH_DISPATCH in out.sims and args.timing == "model" else
            "raw profile" if args.timing == "model" else
            "mesh-calibrated" if "mesh-calibrated" in out.sims else "segment-calibrated")
    print()
    print(table(out.real, out.sims, out.planner))
    print()
    print(f"{out.real.completed} of {len(out.records)} requests completed at {out.rate:.2f} req/s offered; "
          f"largest error of the {best} simulation: "
          f"{100 * out.max_error(best):.0f}%")
    print("\nstage busy time over the run (s): " + ", ".join(
        f"{n} real {out.busy_real.get(n, math.nan):.1f} / sim {out.busy_sim.get(n, math.nan):.1f}"
        for n in setting.node_ids))
    print("serving overhead per stage run (ms), calibration / measured stream / advertised: " + ", ".join(
        f"{n} {out.overhead.get(n, math.nan) * 1e3:.2f} / {out.overhead_measured.get(n, math.nan) * 1e3:.2f} / "
        f"{out.advertised.get(n, math.nan) * 1e3:.2f}" for n in setting.node_ids))
    print(f"the planner's dispatch per request (ms), calibration / measured stream: {out.dispatch * 1e3:.2f} / "
          f"{out.dispatch_measured * 1e3:.2f}")
    for n in out.notes:
        print(f"note: {n}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "rate": out.rate, "real": out.real.__dict__, "sims": {k: v.__dict__ for k, v in out.sims.items()},
            "planner": out.planner, "busy_real": out.busy_real, "busy_sim": out.busy_sim,
            "overhead": out.overhead, "overhead_measured": out.overhead_measured, "advertised": out.advertised,
            "dispatch": out.dispatch, "dispatch_measured": out.dispatch_measured,
            "records": [r.__dict__ for r in out.records]}, indent=1))
    print(f"({time.monotonic() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
