"""A discrete-event simulation of a mesh serving a request stream.

Data flow: :mod:`~meshllm.sim.arrivals` makes a seeded request stream
(Poisson or bursty arrivals, length mixes, a shift during the run);
:mod:`~meshllm.sim.routing` decides where each request goes (the real
:class:`meshllm.serve.scheduler.Scheduler` for meshllm/E2LLM plans, Splitwise's
pools for the Splitwise baseline); :mod:`~meshllm.sim.engine` advances time,
asking the planner's :class:`~meshllm.plan.cost.CostModel` for every stage
run, activation send and KV hand-off of a :class:`~meshllm.plan.plan.Plan`.
Nothing here re-derives a cost formula. Pure: no I/O, no wall clock.
See docs/evaluation.md for what is modelled and what is simplified.
"""

from meshllm.sim.arrivals import Request, bursty_arrivals, poisson_arrivals, requests
from meshllm.sim.engine import SimLimits, SimResult, simulate
from meshllm.sim.routing import MeshRouter, SplitwiseRouter, router_for

__all__ = [
    "MeshRouter",
    "Request",
    "SimLimits",
    "SimResult",
    "SplitwiseRouter",
    "bursty_arrivals",
    "poisson_arrivals",
    "requests",
    "router_for",
    "simulate",
]
