"""Seeded request streams: arrival times (Poisson, bursty on/off MMPP) and lengths from a Workload.

Lengths are drawn from the :class:`~meshllm.plan.workload.Workload`'s own
length distributions (its quadrature points, with their weights), so the
simulator and the planner describe the same mix. A *shift* is two workloads
one after the other. Pure: values in, values out; randomness only from the
``numpy.random.Generator`` seeded by the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from meshllm.plan.workload import LengthDist, Workload


@dataclass(frozen=True)
class Request:
    id: int
    arrival: float  # seconds since the start of the run
    n_in: int  # prompt tokens
    n_out: int  # output tokens (the first is made by the prefill)


def poisson_arrivals(rate: float, n: int, rng: np.random.Generator, start: float = 0.0) -> np.ndarray:
    """``n`` arrival times of a Poisson process of ``rate`` requests/s."""
    return start + np.cumsum(rng.exponential(1.0 / rate, size=n))


def bursty_arrivals(rate: float, n: int, rng: np.random.Generator, burst: float = 4.0, on_fraction: float = 0.2,
                    mean_period_s: float = 60.0, start: float = 0.0) -> np.ndarray:
    """A 2-state MMPP with mean ``rate``: an ON state at ``burst`` x the OFF state's rate.

    The process spends ``on_fraction`` of the time ON on average; sojourns are
    exponential with mean ``on_fraction * mean_period_s`` (ON) and
    ``(1 - on_fraction) * mean_period_s`` (OFF). Rates are set so the long-run
    mean is ``rate``.
    """
    low = rate / (on_fraction * burst + (1.0 - on_fraction))
    rates = (low, low * burst)
    mean_stay = ((1.0 - on_fraction) * mean_period_s, on_fraction * mean_period_s)
    out: list[float] = []
    t, state = start, 0
    leave = t + rng.exponential(mean_stay[state])
    while len(out) < n:
        t_next = t + rng.exponential(1.0 / rates[state])
        if t_next < leave:
            t = t_next
            out.append(t)
        else:  # memoryless: restart the inter-arrival draw in the new state
            t = leave
            state = 1 - state
            leave = t + rng.exponential(mean_stay[state])
    return np.asarray(out)


def _draw(dist: LengthDist, n: int, rng: np.random.Generator) -> np.ndarray:
    idx = rng.choice(len(dist.values), size=n, p=dist.probs)
    lengths: np.ndarray = np.maximum(np.rint(dist.array[idx]), 1).astype(int)
    return lengths


def requests(workloads: Sequence[Workload], n_per: Sequence[int], seed: int, bursty: bool = False,
             max_seq_len: int | None = None, **burst_kw: float) -> list[Request]:
    """A stream made of ``workloads`` one after the other (``n_per[i]`` requests each, at each one's rate).

    ``max_seq_len`` clips prompts so that prompt + output fits the model's context.
    """
    rng = np.random.default_rng(seed)
    out: list[Request] = []
    t = 0.0
    for w, n in zip(workloads, n_per, strict=True):
        times = (bursty_arrivals(w.rate, n, rng, start=t, **burst_kw) if bursty
                 else poisson_arrivals(w.rate, n, rng, start=t))
        outs = _draw(w.output, n, rng)
        ins = _draw(w.input, n, rng)
        if max_seq_len:
            outs = np.minimum(outs, max_seq_len // 2)
            ins = np.minimum(ins, max_seq_len - outs)
        for a, i, o in zip(times, ins, outs, strict=True):
            out.append(Request(len(out), float(a), int(i), int(o)))
        t = float(times[-1]) if n else t
    return out
