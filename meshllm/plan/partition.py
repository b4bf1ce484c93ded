"""Dynamic programming: place the L layers of a model on a group of devices as a pipeline.

Given a group, a run's :class:`~meshllm.plan.cost.Work` and a KV budget, find
the device order and the contiguous layer ranges (every device of the group
holds at least one layer) that minimise the bottleneck: the largest stage
time, a stage's time being its run time plus the transfer of its outgoing
activations to the next stage (the last stage sends only a token id back,
which is not counted). Stages that do not fit their device's memory are
excluded.

Fixed order ``d_0..d_{k-1}`` (recurrence over the end layer ``l`` of stage ``m``)::

    F_0[l] = T(d_0, 0, l) + X(d_0 -> d_1, l)
    F_m[l] = min_{l' < l} max(F_{m-1}[l'], T(d_m, l', l) + X(d_m -> d_{m+1}, l))
    bottleneck = F_{k-1}[L]                      (no outgoing transfer for the last stage)

``T`` and ``X`` are numpy tables built from prefix sums, so each step is one
(L+1) x (L+1) array operation: O(k L^2).

Device order, exact, by the cheapest method that applies:

- identical layers and one link figure between every pair of devices of the
  group (a LAN of devices on the same kind of link): a stage's time and
  memory depend only on its device, its layer count and whether it is first
  (embedding) or last (head), so the middle order is irrelevant and the
  fixed-order DP over every (first, last) pair is exact: k(k-1) orders, run
  as one batched numpy DP;
- otherwise up to 4 devices: all k! orders, batched the same way;
- up to ``exact_limit`` devices: DP over subsets, suffix first — G(S, j, a)
  is the best bottleneck for layers [a, L) on the devices S, all used, with
  j holding the stage that starts at a::

    G({j}, j, a) = T(j, a, L)
    G(S, j, a)   = min_{j' in S-{j}, b > a} max(T(j, a, b) + X(j -> j', b), G(S-{j}, j', b))

  O(2^k k^2 L^2);
- beyond: a stated heuristic — start from the devices sorted by outgoing
  bandwidth (slow links last: the last stage sends nothing), try every
  device as the last and then as the first stage, then swap adjacent
  devices while the fixed-order DP improves.

Pure functions of the cost model; no I/O.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from meshllm.plan.cost import CostModel, StageRef, Work

DEFAULT_EXACT_LIMIT = 6


@dataclass(frozen=True)
class Placement:
    """One stage of a partition: a device (cost-model index) running layers [start, stop)."""

    device: int
    start: int
    stop: int
    run_s: float  # one run of the stage's layers
    send_s: float  # its outgoing activations to the next stage (0 for the last)

    @property
    def time_s(self) -> float:
        return self.run_s + self.send_s


@dataclass(frozen=True)
class Partition:
    stages: tuple[Placement, ...]
    bottleneck_s: float
    order_exact: bool  # the device order is optimal (exact DP) rather than heuristic

    @property
    def devices(self) -> tuple[int, ...]:
        return tuple(s.device for s in self.stages)

    @property
    def latency_s(self) -> float:
        """One run through the whole pipeline (sum of stage times)."""
        return sum(s.time_s for s in self.stages)

    @property
    def refs(self) -> tuple[StageRef, ...]:
        return tuple(StageRef(s.device, s.start, s.stop) for s in self.stages)

    @property
    def feasible(self) -> bool:
        return True


@dataclass(frozen=True)
class Infeasible:
    devices: tuple[int, ...]
    reason: str

    @property
    def feasible(self) -> bool:
        return False


def tables(cost: CostModel, devices: Sequence[int], work: Work, kv_tokens: float) -> tuple[np.ndarray, np.ndarray]:
    """(T, X) for the DP, indexed by position in ``devices``."""
    return cost.stage_table(devices, work, kv_tokens), cost.transfer_table(devices, work)


def _fixed_order(T: np.ndarray, X: np.ndarray, order: Sequence[int]) -> tuple[float, list[int]]:
    """Best bottleneck and cut points [0, c1, ..., L] with every device of ``order`` used in that order."""
    L = T.shape[1] - 1
    k = len(order)
    if k == 1:
        return float(T[order[0], 0, L]), [0, L]
    F = T[order[0], 0, :] + X[order[0], order[1], :]
    cols = np.arange(L + 1)
    back = []
    for m in range(1, k):
        d = order[m]
        stage = T[d] + X[d, order[m + 1]][None, :] if m < k - 1 else T[d]
        cand = np.maximum(F[:, None], stage)
        arg = cand.argmin(axis=0)
        F = cand[arg, cols]
        back.append(arg)
    value = float(F[L])
    cuts = [L]
    b = L
    for arg in reversed(back):
        b = int(arg[b])
        cuts.append(b)
    cuts.append(0)
    return value, cuts[::-1]


def _batched_orders(T: np.ndarray, X: np.ndarray, perms: np.ndarray) -> tuple[float, list[int], list[int]]:
    """The fixed-order DP for many orders at once (rows of ``perms``); the best (first on ties)."""
    n_perm, k = perms.shape
    L = T.shape[1] - 1
    if k == 1:
        return float(T[perms[0, 0], 0, L]), [int(perms[0, 0])], [0, L]
    F = T[perms[:, 0], 0, :] + X[perms[:, 0], perms[:, 1], :]
    for m in range(1, k):
        d = perms[:, m]
        stage = T[d] + X[d, perms[:, m + 1]][:, None, :] if m < k - 1 else T[d]
        F = np.maximum(F[:, :, None], stage).min(axis=1)  # (orders, b)
    best = int(np.argmin(F[:, L]))
    order = [int(x) for x in perms[best]]
    value, cuts = _fixed_order(T, X, order)  # the winner's cut points
    return value, order, cuts


def _end_pairs(k: int) -> np.ndarray:
    """Orders that differ in their first or last device only (the middle in index order)."""
    rows = [[f, *[x for x in range(k) if x not in (f, last)], last] for f in range(k) for last in range(k) if f != last]
    return np.array(rows if k > 1 else [[0]], dtype=np.int64)


def best_order(T: np.ndarray, X: np.ndarray, *, symmetric: bool, exact_limit: int
               ) -> tuple[float, list[int], list[int], bool]:
    """(bottleneck, order, cuts, exact) over device orders, by the cheapest exact method that applies.

    ``symmetric``: identical layers and one link figure between every pair of
    the group's devices. Then a stage's time and memory depend only on its
    device, its layer count and whether it is first or last, so the order of
    the middle devices is irrelevant: trying every (first, last) pair is exact.
    """
    k = T.shape[0]
    if symmetric:
        v, order, cuts = _batched_orders(T, X, _end_pairs(k))
        return v, order, cuts, True
    if k <= 4:
        v, order, cuts = _batched_orders(T, X, np.array(list(itertools.permutations(range(k))), dtype=np.int64))
        return v, order, cuts, True
    if k <= exact_limit:
        v, order, cuts = _subset_order(T, X)
        return v, order, cuts, True
    v, order, cuts = _heuristic_order(T, X)
    return v, order, cuts, False


def _subset_order(T: np.ndarray, X: np.ndarray) -> tuple[float, list[int], list[int]]:
    """Exact DP over device subsets: (bottleneck, order, cuts)."""
    k, L = T.shape[0], T.shape[1] - 1
    full = (1 << k) - 1
    G = np.full((1 << k, k, L + 1), np.inf)
    nxt = np.full((1 << k, k, L + 1), -1, dtype=np.int64)
    cut = np.full((1 << k, k, L + 1), -1, dtype=np.int64)
    for j in range(k):
        G[1 << j, j, :] = T[j, :, L]
    rows = np.arange(L + 1)
    for mask in range(3, full + 1):
        members = [j for j in range(k) if mask >> j & 1]
        if len(members) < 2:
            continue
        for j in members:
            rest = mask & ~(1 << j)
            others = [n for n in members if n != j]
            g = G[rest, others]  # (s-1, L+1) over the next stage's start b
            cand = np.maximum(T[j][None, :, :] + X[j, others][:, None, :], g[:, None, :])  # (s-1, a, b)
            flat = cand.transpose(1, 0, 2).reshape(L + 1, -1)
            arg = flat.argmin(axis=1)
            G[mask, j] = flat[rows, arg]
            nxt[mask, j] = np.asarray(others)[arg // (L + 1)]
            cut[mask, j] = arg % (L + 1)
    j = int(np.argmin(G[full, :, 0]))
    value = float(G[full, j, 0])
    order, cuts = [j], [0]
    mask, a = full, 0
    while mask != (1 << j) and np.isfinite(value):
        b, n = int(cut[mask, j, a]), int(nxt[mask, j, a])
        cuts.append(b)
        mask &= ~(1 << j)
        j, a = n, b
        order.append(j)
    cuts.append(L)
    return value, order, cuts


def _heuristic_order(T: np.ndarray, X: np.ndarray) -> tuple[float, list[int], list[int]]:
    k = T.shape[0]
    out_bw = np.array([np.min(X[i, [j for j in range(k) if j != i], 1]) for i in range(k)])
    base = [int(i) for i in np.argsort(out_bw, kind="stable")]  # fastest sender first, slowest link last
    # every device as the last stage, then every other device as the first (batched DPs)
    lasts = np.array([[x for x in base if x != d] + [d] for d in base], dtype=np.int64)
    _, order, _ = _batched_orders(T, X, lasts)
    firsts = np.array([order] + [[d] + [x for x in order if x != d] for d in order[:-1]], dtype=np.int64)
    best, order, cuts = _batched_orders(T, X, firsts)
    for _ in range(2):  # adjacent swaps, all at once, while one improves
        swaps = []
        for i in range(k - 1):
            cand = list(order)
            cand[i], cand[i + 1] = cand[i + 1], cand[i]
            swaps.append(cand)
        value, cand, c = _batched_orders(T, X, np.array(swaps, dtype=np.int64))
        if not value < best * (1 - 1e-12):
            break
        best, order, cuts = value, cand, c
    return best, order, cuts


def infeasibility_reason(cost: CostModel, devices: Sequence[int], kv_tokens: float) -> str:
    k, L = len(devices), cost.L
    if k > L:
        return f"{k} devices for {L} layers: every device of a group must hold at least one layer"
    have = float(sum(cost.mem[list(devices)]))
    need = cost.memory_needed(kv_tokens)
    if have < need:
        return (f"the group has {have / 1e9:.2f} GB of memory but the model needs {need / 1e9:.2f} GB "
                f"(weights + KV cache for {kv_tokens:.0f} positions)")
    return "no contiguous split fits every device's memory (the embedding, the head or a layer range does not fit)"


def partition(cost: CostModel, devices: Sequence[int], work: Work, kv_tokens: float, *,
              exact_limit: int = DEFAULT_EXACT_LIMIT, order: Sequence[int] | None = None) -> Partition | Infeasible:
    """Best pipeline of ``devices`` (cost-model indices) for ``work``; ``order`` fixes the device order."""
    devices = tuple(int(d) for d in devices)
    if not devices or len(set(devices)) != len(devices):
        raise ValueError(f"a group needs distinct devices, got {devices}")
    if len(devices) > cost.L:
        return Infeasible(devices, infeasibility_reason(cost, devices, kv_tokens))
    T, X = tables(cost, devices, work, kv_tokens)
    pos = {d: i for i, d in enumerate(devices)}
    if order is not None:
        if sorted(order) != sorted(devices):
            raise ValueError(f"order {tuple(order)} is not a permutation of the group {devices}")
        local = [pos[d] for d in order]
        value, cuts = _fixed_order(T, X, local)
        exact = len(devices) == 1
    else:
        value, local, cuts, exact = best_order(T, X, symmetric=cost.symmetric(devices), exact_limit=exact_limit)
    if not np.isfinite(value):
        return Infeasible(devices, infeasibility_reason(cost, devices, kv_tokens))
    stages = []
    for m, i in enumerate(local):
        a, b = cuts[m], cuts[m + 1]
        send = float(X[i, local[m + 1], b]) if m + 1 < len(local) else 0.0
        stages.append(Placement(devices[i], a, b, float(T[i, a, b]), send))
    return Partition(tuple(stages), value, exact)


def max_kv_tokens(cost: CostModel, devices: Sequence[int], *, exact_limit: int = DEFAULT_EXACT_LIMIT) -> float:
    """The largest KV budget (positions per layer) for which some split of ``devices`` fits in memory.

    The same DP with another stage cost: maximise over splits the smallest
    ``(memory - weights) / KV bytes per position`` of a stage (minimise its
    negative; transfers cost nothing). -inf when even the weights do not fit.
    """
    devices = tuple(int(d) for d in devices)
    if len(devices) > cost.L:
        return -np.inf
    T = -cost.kv_room_table(devices)
    X = np.zeros((len(devices), len(devices), cost.L + 1))
    value, _, _, _ = best_order(T, X, symmetric=cost.uniform_layers, exact_limit=exact_limit)
    return -value

