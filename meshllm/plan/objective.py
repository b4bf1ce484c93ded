"""The system objective: mean waiting and response time of a set of replicas under a workload.

Every replica is a pipeline. As a *prefill server* it is summarised by its
bottleneck stage time per prompt ``b`` (it can accept a new prompt that often),
the time ``s`` of one prompt through all stages, and its depth ``k`` (one
prompt in flight per stage): with ``i`` prompts inside it completes
``min(i/E[s], 1/E[b])`` prompts per second. As a *decode server* with ``S``
slots (KV budget) and ``n`` active sequences in ``m <= min(n, k)``
micro-batches of ``n/m``, one token for every sequence takes
``cycle(n, m) = max(sum_j t_j(n/m) + return, m * max_j t_j(n/m))`` — the
latency of one pass when the pipeline is not full, ``m`` bottleneck slots
when it is — and the replica makes ``rate(n) = max_m n / cycle(n, m)``
tokens per second (the scheduler picks ``m``).

Each role pool is a birth-death chain on the number ``n`` of requests in it
(Poisson arrivals ``lambda``; completion rate ``M(n)``; admission waits when
all slots are taken)::

    pi(n) ∝ prod_{i<=n} lambda / M(i)          (geometric tail beyond the pool's capacity c)
    W = E[(N - c)+] / lambda * (1 + C^2) / 2   (queueing delay; Allen-Cunneen factor for
                                                service-time variability C^2)
    T = E[N] / lambda + (W - W_exp)            (time in the pool)

Prefill pool: ``M(n)`` gives each of the ``n`` prompts to the replica with the
largest marginal rate (a work-conserving least-pending-tokens router).
Decode pool: the same for sequences ("fastest": a new sequence goes where it
adds the most tokens/s), ``M(n) = (n largest marginal token rates) / E[O-1]``;
or, for the Splitwise baseline, spread in proportion to slots (its
least-scheduled-memory router), ``M(n) = sum_r rate_r(n S_r / c) / E[O-1]``.
The response time of a request is::

    E2E = T_prefill + H + T_decode,    H = mean KV hand-off (prefill -> decode replica)
    waiting = W_prefill + W_decode,    sustainable rate = min over pools of M(c)

The fitness to minimise (:meth:`Metrics.score`) is the mean waiting time (the
planner's default objective, ties broken by ``E2E``) or the mean response time
``E2E`` (``objective="response"``, E2LLM's reconstruction) when the plan is
stable (``lambda`` below the sustainable rate); an unstable plan scores
``1e6 * (1 + lambda / sustainable rate)``, so that any stable plan beats it
and among unstable ones the larger capacity wins. A single replica serves
both phases (MIXED): decode steps take priority and prompts get the
time they leave, ``M_P (1 - rho_D)``. These are approximations of
ours (the E2LLM paper does not publish its fitness), documented in
docs/planner.md. Pure numpy; no I/O.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from meshllm.plan.workload import Workload

UNSTABLE = 1e6
OBJECTIVES = ("wait", "response")  # what a plan can minimise: mean queueing, or mean end-to-end time


@dataclass(frozen=True)
class PrefillService:
    """A replica as a prefill server (expectations over the workload's input lengths)."""

    occupancy_s: float  # E[b]: bottleneck stage time of one prompt
    occupancy_sq: float  # E[b^2]
    latency_s: float  # E[s]: one prompt through every stage
    depth: int  # prompts in flight at most (stages)
    max_rate: float = field(default=0.0, compare=False)  # prompts/s at saturation, 1/E[b]
    _gains: np.ndarray = field(default_factory=lambda: np.zeros(0), compare=False, repr=False)

    def __post_init__(self) -> None:
        rate = 1.0 / self.occupancy_s
        object.__setattr__(self, "max_rate", rate)
        i = np.arange(self.depth + 1, dtype=float)
        object.__setattr__(self, "_gains", np.diff(np.minimum(i / self.latency_s, rate)))

    def gains(self) -> np.ndarray:
        """Marginal completion rate of the 1st, 2nd, ... prompt inside: min(i/E[s], 1/E[b]) steps."""
        return self._gains


@dataclass(frozen=True)
class DecodeService:
    """A replica as a decode server: per-stage times linear in the micro-batch size."""

    fixed_s: tuple[float, ...]  # per stage: batch-independent part of run + outgoing transfer
    per_seq_s: tuple[float, ...]  # per stage: added per sequence in the micro-batch
    return_s: float  # last stage -> first stage (the sampled token)
    slots: int  # concurrent sequences (KV budget)
    rates: tuple[float, ...] = ()  # tokens/s with n = 0..slots active sequences (filled by build)
    gains: np.ndarray = field(default_factory=lambda: np.zeros(0), compare=False, repr=False)  # diff(rates)
    max_token_rate: float = field(default=0.0, compare=False)  # tokens/s with every slot busy

    @classmethod
    def build(cls, fixed_s: Sequence[float], per_seq_s: Sequence[float], return_s: float, slots: int
              ) -> DecodeService:
        s = cls(tuple(float(x) for x in fixed_s), tuple(float(x) for x in per_seq_s), float(return_s), int(slots))
        n = np.arange(1, s.slots + 1, dtype=float)
        best = np.zeros_like(n)
        for m in range(1, s.depth + 1):  # the scheduler picks the number of micro-batches in flight
            ok = n >= m
            best = np.where(ok, np.maximum(best, n / s.cycle(n, m)), best)
        rates = (0.0, *(float(x) for x in np.maximum.accumulate(best)))  # never admit a sequence that slows all
        return cls(s.fixed_s, s.per_seq_s, s.return_s, s.slots, rates, np.diff(rates), max(rates))

    @property
    def depth(self) -> int:
        return len(self.fixed_s)

    def cycle(self, n: np.ndarray, m: int) -> np.ndarray:
        """Seconds for each of ``n`` active sequences to get one token, in ``m`` micro-batches."""
        beta = np.asarray(n, dtype=float) / m
        st = np.asarray(self.fixed_s)[:, None] + np.asarray(self.per_seq_s)[:, None] * beta[None, :]
        out: np.ndarray = np.maximum(st.sum(axis=0) + self.return_s, m * st.max(axis=0))
        return out

    def token_rate(self, n: np.ndarray | float) -> np.ndarray:
        """Tokens/s with ``n`` (possibly fractional: a routing share) active sequences."""
        out: np.ndarray = np.interp(np.asarray(n, dtype=float), np.arange(self.slots + 1), self.rates)
        return out


@dataclass(frozen=True)
class Metrics:
    """Predicted figures of a plan under a workload."""

    rate: float  # offered requests/s
    sustainable_rate: float  # requests/s at which a pool saturates
    stable: bool
    mean_wait_s: float  # queueing: waiting for a prefill replica + for a decode slot
    prefill_wait_s: float
    decode_wait_s: float
    ttft_s: float  # arrival -> first token (made by the prefill)
    handoff_s: float  # mean KV hand-off prefill -> decode
    tbt_s: float  # mean time between tokens while decoding
    e2e_s: float  # arrival -> last token
    prefill_utilisation: float
    decode_utilisation: float

    @property
    def fitness(self) -> float:
        """To minimise: mean response time if stable, else a penalty ranked by capacity."""
        return self.score("response")

    def score(self, objective: str = "response") -> float:
        """The fitness under ``objective``: "response" (mean end-to-end time) or "wait" (mean
        queueing delay, ties broken by response time). Unstable plans rank by capacity."""
        if not self.stable:
            return unstable_fitness(self.rate, self.sustainable_rate)
        if objective == "wait":
            return self.mean_wait_s + 1e-3 * self.e2e_s
        if objective == "response":
            return self.e2e_s
        raise ValueError(f"unknown objective {objective!r} (response or wait)")

    def to_json(self) -> dict[str, Any]:
        return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Metrics:
        return cls(**{k: (math.inf if v is None else v) for k, v in d.items()})  # type: ignore[arg-type]


def infeasible_metrics(rate: float) -> Metrics:
    inf = math.inf
    return Metrics(rate, 0.0, False, inf, inf, inf, inf, 0.0, inf, inf, inf, inf)


def _chain(lam: float, M: np.ndarray) -> tuple[float, float, bool]:
    """E[N], E[queue] of a birth-death chain with completion rates M[n-1] for n = 1..c, M[c-1] beyond."""
    c = len(M)
    r = lam / M[-1]
    if not r < 1:
        return math.inf, math.inf, False
    logp = np.concatenate([[0.0], np.cumsum(math.log(lam) - np.log(M))])  # p(0..c)
    logp -= logp.max()
    p = np.exp(logp)
    pc = p[c]
    n = np.arange(c)
    z = p[:c].sum() + pc / (1 - r)
    en = (np.dot(n, p[:c]) + pc * (c / (1 - r) + r / (1 - r) ** 2)) / z
    eq = pc * r / (1 - r) ** 2 / z
    return float(en), float(eq), True


def _served_by_first(lam: float, M: np.ndarray, own: np.ndarray) -> float:
    """Throughput E[own(N)] of the servers behind the first ``len(own)`` rates of the chain ``M``.

    ``own`` is the completion rate of the pool's own servers with n = 1.. requests present
    (constant beyond its length); the rest of ``M`` is lent servers.
    """
    c = len(M)
    r = lam / M[-1]
    if not r < 1:
        return float(own[-1])
    logp = np.concatenate([[0.0], np.cumsum(math.log(lam) - np.log(M))])
    logp -= logp.max()
    p = np.exp(logp)
    z = p[:c].sum() + p[c] / (1 - r)
    f = np.concatenate([[0.0], own[: c - 1], np.full(max(0, c - len(own)), own[-1])])[:c]
    return float((np.dot(p[:c], f) + p[c] / (1 - r) * own[-1]) / z)


def _lent_share(lam: float, M: np.ndarray, own: np.ndarray, lent_capacity: float, own_first: bool) -> float:
    """Requests/s that lent servers carry: what the own servers do not (own first), or in
    proportion to capacity (servers ranked together)."""
    if lent_capacity <= 0:
        return 0.0
    if own_first:
        return max(0.0, lam - _served_by_first(lam, M, own)) if len(M) > len(own) else 0.0
    return float(lam * lent_capacity / (own[-1] + lent_capacity))


def _prefill_gains(services: Sequence[PrefillService]) -> np.ndarray:
    return np.sort(np.concatenate([s.gains() for s in services]))[::-1]


def _prefill_rates(services: Sequence[PrefillService], scale: float = 1.0,
                   borrowed: Sequence[PrefillService] = (), available: float = 0.0, own_first: bool = True
                   ) -> np.ndarray:
    """Completion rate (prompts/s) with n = 1..c prompts in the prefill pool.

    ``borrowed`` servers (lent by the other pool) serve for the ``available`` share
    of their time: only when the pool's own are all busy (``own_first``, Splitwise)
    or ranked with them, fastest first.
    """
    g = _prefill_gains(services) * scale
    if borrowed and available > 0:
        g = np.concatenate([g, _prefill_gains(borrowed) * available])
        if not own_first:
            g = np.sort(g)[::-1]
    return np.cumsum(g)


def _decode_rates(services: Sequence[DecodeService], tokens_per_request: float, scale: float = 1.0,
                  routing: str = "fastest", borrowed: Sequence[DecodeService] = (), available: float = 0.0
                  ) -> np.ndarray:
    """Completion rate (requests/s) with n = 1..c sequences in the decode pool.

    Borrowed slots (lent by the other pool, ``available`` share of the time) come
    after the pool's own with Splitwise's "memory" routing, ranked with them with "fastest".
    """
    if borrowed and available > 0 and routing == "memory":
        own = _decode_rates(services, tokens_per_request, scale, routing)
        extra = _decode_rates(borrowed, tokens_per_request, available, "fastest")
        return np.concatenate([own, own[-1] + extra])
    if borrowed and available > 0:
        gains = np.sort(np.concatenate([s.gains * scale for s in services]
                                       + [s.gains * available for s in borrowed]))[::-1]
        total = np.cumsum(np.maximum(gains, 0.0))
        return total[: max(int(np.count_nonzero(gains > 0)), 1)] / tokens_per_request
    if routing == "fastest":  # each new sequence goes where it adds the most tokens/s
        gains = np.sort(np.concatenate([s.gains for s in services]))[::-1]
        total = np.cumsum(np.maximum(gains, 0.0))
        total = total[: max(int(np.count_nonzero(gains > 0)), 1)]
    elif routing == "memory":  # Splitwise: least scheduled memory, i.e. shares in proportion to slots
        slots = np.array([s.slots for s in services], dtype=float)
        n = np.arange(1, int(slots.sum()) + 1, dtype=float)
        total = np.zeros(n.size)
        for s, share in zip(services, slots / slots.sum(), strict=True):
            total += s.token_rate(n * share)
    else:
        raise ValueError(f"unknown decode routing {routing!r}")
    return total / tokens_per_request * scale


def _cv2_prefill(services: Sequence[PrefillService]) -> float:
    w = 0.0
    m1 = m2 = 0.0
    for s in services:  # weighted by the share of prompts each serves (its capacity)
        w += s.max_rate
        m1 += s.max_rate * s.occupancy_s
        m2 += s.max_rate * s.occupancy_sq
    m1, m2 = m1 / w, m2 / w
    return max(m2 / m1**2 - 1.0, 0.0)


@functools.lru_cache(maxsize=64)
def _cv2_decode(workload: Workload) -> float:
    steps = np.maximum(workload.output.array - 1.0, 0.0)
    m1 = workload.output.expect(steps)
    if m1 <= 0:
        return 0.0
    return max(workload.output.expect(steps**2) / m1**2 - 1.0, 0.0)


def _pool(lam: float, M: np.ndarray, cv2: float) -> tuple[float, float, float]:
    """(waiting, time in pool, in-service time) with the variability correction on the wait."""
    en, eq, ok = _chain(lam, M)
    if not ok:
        return math.inf, math.inf, math.inf
    w_exp = eq / lam
    w = w_exp * (1 + cv2) / 2
    return w, en / lam + (w - w_exp), (en - eq) / lam


def capacities(prefill: Sequence[PrefillService], decode: Sequence[DecodeService], workload: Workload,
               borrow: tuple[Sequence[PrefillService], Sequence[DecodeService]] | None = None
               ) -> tuple[float, float, float, float]:
    """(prefill pool requests/s, decode pool requests/s, share lent to prefill, share lent to decode)."""
    lam = workload.rate
    tokens = workload.decode_tokens()
    cap_p = sum(s.max_rate for s in prefill)
    cap_d = sum(s.max_token_rate for s in decode) / tokens if tokens > 0 else math.inf
    if borrow is None:
        return cap_p, cap_d, 0.0, 0.0
    # each pool lends the share of time its own work leaves idle
    extra_p = sum(s.max_rate for s in borrow[0])
    extra_d = sum(s.max_token_rate for s in borrow[1]) / tokens if tokens > 0 else 0.0
    avail_p = max(0.0, 1.0 - lam / cap_d) if tokens > 0 else 1.0
    avail_d = max(0.0, 1.0 - lam / cap_p)
    return cap_p + avail_p * extra_p, cap_d + avail_d * extra_d, avail_p, avail_d


def unstable_fitness(rate: float, sustainable: float) -> float:
    return UNSTABLE * (1.0 + rate / max(sustainable, 1e-300))


def evaluate(prefill: Sequence[PrefillService], decode: Sequence[DecodeService], handoff_s: float,
             workload: Workload, *, borrow: tuple[Sequence[PrefillService], Sequence[DecodeService]] | None = None,
             routing: str = "fastest") -> Metrics:
    """Disaggregated replicas: ``prefill`` pool and ``decode`` pool (both non-empty).

    ``borrow``: a mixed pool — the decode replicas as prefill servers and the
    prefill replicas as decode servers. A pool lends the share of time its own
    work leaves idle (``1 - lambda / own capacity``).
    ``routing``: "fastest" — a prompt or sequence goes to the server (own or lent)
    that adds the most rate; "memory" — Splitwise: prompts to its own pool first
    (least pending tokens), sequences in proportion to KV memory, lent servers
    only when the own pool is full. The throughput lent servers carry (from the
    chain) is time their own pool loses: its rates are scaled by the share kept
    (a fixed point, three rounds).
    """
    lam = workload.rate
    tokens = workload.decode_tokens()
    sus_p, sus_d, avail_p, avail_d = capacities(prefill, decode, workload, borrow)
    sustainable = min(sus_p, sus_d)
    lend_p, lend_d = borrow if borrow is not None else ((), ())
    own_first = routing == "memory"
    keep_p = keep_d = 1.0  # share of its time a pool keeps for its own phase (the rest it lends)
    for _ in range(3 if borrow is not None else 1):
        mp = _prefill_rates(prefill, keep_p, lend_p, avail_p, own_first)
        wp, tp, _ = _pool(lam, mp, _cv2_prefill(prefill))
        if tokens > 0:
            md = _decode_rates(decode, tokens, keep_d, routing, lend_d, avail_d)
            wd, td, service_d = _pool(lam, md, _cv2_decode(workload))
            tbt = service_d / tokens
        else:
            md = np.zeros(0)
            wd = td = tbt = 0.0
        if borrow is None or not (math.isfinite(tp) and math.isfinite(td)):
            break
        # lending is not free: the time a pool's replicas spend on the other phase slows their own
        own_p = _prefill_rates(prefill, keep_p)
        extra_p = sum(x.max_rate for x in lend_p)
        lent_p = _lent_share(lam, mp, own_p, extra_p * avail_p, own_first)
        keep_d = max(1e-6, 1.0 - lent_p / extra_p) if extra_p > 0 else 1.0
        if tokens > 0 and len(lend_d):
            own_d = _decode_rates(decode, tokens, keep_d, routing)
            extra_d = sum(x.max_token_rate for x in lend_d) / tokens
            lent_d = _lent_share(lam, md, own_d, extra_d * avail_d, own_first)
            keep_p = max(1e-6, 1.0 - lent_d / extra_d) if extra_d > 0 else 1.0
    stable = math.isfinite(tp) and math.isfinite(td)
    return Metrics(
        rate=lam, sustainable_rate=float(sustainable), stable=stable,
        mean_wait_s=wp + wd, prefill_wait_s=wp, decode_wait_s=wd, ttft_s=tp, handoff_s=float(handoff_s),
        tbt_s=tbt, e2e_s=float(tp + handoff_s + td),
        prefill_utilisation=float(lam / sus_p), decode_utilisation=float(lam / sus_d),
    )


def evaluate_mixed(prefill: PrefillService | Sequence[PrefillService], decode: DecodeService | Sequence[DecodeService],
                   workload: Workload) -> Metrics:
    """Replicas that each serve both phases of their requests (MIXED), time-shared.

    Decode steps go first (short, and every active sequence waits for them);
    prompts get the time they leave: the prefill pool's rates are scaled by
    ``1 - rho_D``. Stable iff ``rho_P + rho_D < 1``. No KV hand-off.
    """
    pre = [prefill] if isinstance(prefill, PrefillService) else list(prefill)
    dec = [decode] if isinstance(decode, DecodeService) else list(decode)
    lam = workload.rate
    tokens = workload.decode_tokens()
    cap_p = sum(s.max_rate for s in pre)
    cap_d = sum(s.max_token_rate for s in dec)
    rho_p = lam / cap_p
    rho_d = lam * tokens / cap_d
    sustainable = 1.0 / (1.0 / cap_p + tokens / cap_d)
    if rho_p + rho_d >= 1:
        m = infeasible_metrics(lam)
        return Metrics(**{**asdict(m), "sustainable_rate": sustainable, "prefill_utilisation": rho_p + rho_d,
                          "decode_utilisation": rho_p + rho_d})
    wp, tp, _ = _pool(lam, _prefill_rates(pre, 1 - rho_d), _cv2_prefill(pre))
    if tokens > 0:
        wd, td, service_d = _pool(lam, _decode_rates(dec, tokens), _cv2_decode(workload))
        tbt = service_d / tokens
    else:
        wd = td = tbt = 0.0
    return Metrics(
        rate=lam, sustainable_rate=sustainable, stable=True, mean_wait_s=wp + wd, prefill_wait_s=wp,
        decode_wait_s=wd, ttft_s=tp, handoff_s=0.0, tbt_s=tbt, e2e_s=tp + td,
        prefill_utilisation=rho_p + rho_d, decode_utilisation=rho_p + rho_d,
    )
