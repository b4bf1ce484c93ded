"""Genetic algorithm: group the devices into replicas.

Our reconstruction (E2LLM names the GA, not its design). A chromosome has one
gene per device: the label of its replica, 0 for idle. Labels carry no
meaning beyond "same label, same replica", so every integer vector is a valid
chromosome; the number of replicas is free. Fitness is
:meth:`SystemModel.score` — DP inside each group, the role rule, the
queueing objective (lower is better); groups that cannot hold the model are
left idle by the scorer.

- Initial population: greedy packings (devices sorted by memory, compute,
  bandwidth, or as listed, added to a group until it can hold the model),
  the best of their groups alone, every device alone, all devices together,
  caller-supplied seeds (the baselines' groupings); the rest newcomers: 3/4
  greedy packings of random device orders (each group 0-2 devices beyond
  what it needs to hold the model), 1/4 random labels.
- Selection: tournaments; elitism keeps the best ``elite`` unchanged;
  ``immigrants`` newcomers per generation keep the population diverse.
- Crossover (grouping crossover): the child is parent B with a random subset
  of parent A's groups injected whole (their devices leave their B groups).
- Mutation: move a device to another group, to idle or to a new group;
  swap two devices; merge two groups; split one; leave a whole group idle;
  deal the devices of two groups anew into two groups.
- Stop after ``patience`` generations without an improvement of more than
  ``min_improvement`` (relative), after ``generations``, or once the GA has
  scored its budget of distinct groupings (``max_evaluations``, by default
  8000/n clamped to [200, 2000]: deterministic, unlike a time limit); then
  hill-climb the best with single-device moves, group merges and
  whole-group idling until no move improves.

Small meshes get independent restarts (3 up to 7 devices, 2 up to 12) and
keep the best. Seeded (``numpy.random.Generator``) and deterministic; pure;
no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from meshllm.plan.system import Group, PlanOptions, Scored, SystemModel

Chromosome = np.ndarray
SWAP_LIMIT = 12  # local search tries device swaps only on meshes up to this size
SMALL_MESH = 12  # meshes up to this size get a larger population and more patience (scoring is cheap there)


@dataclass(frozen=True)
class GAResult:
    groups: tuple[Group, ...]
    scored: Scored
    generations: int
    evaluations: int  # distinct groupings scored
    history: tuple[float, ...]  # best fitness after each generation
    converged: bool  # stopped by patience rather than by the generation cap


def groups_of(chrom: Chromosome) -> tuple[Group, ...]:
    out: dict[int, list[int]] = {}
    for i, label in enumerate(chrom.tolist()):
        if label:
            out.setdefault(label, []).append(i)
    return tuple(sorted(tuple(g) for g in out.values()))


def chromosome(groups: Sequence[Sequence[int]], n: int) -> Chromosome:
    c = np.zeros(n, dtype=np.int64)
    for label, g in enumerate(groups, start=1):
        c[list(g)] = label
    return c


def _greedy_pack(sm: SystemModel, order: Sequence[int], extra: Sequence[int] = ()) -> list[list[int]]:
    """Devices in ``order`` added to a group until it holds the model, plus ``extra[i]`` more for group i."""
    groups: list[list[int]] = []
    current: list[int] = []
    more = -1
    for d in order:
        current.append(d)
        if more < 0 and sm.can_hold(current):
            more = extra[len(groups)] if len(groups) < len(extra) else 0
        if more == 0:
            groups.append(current)
            current, more = [], -1
        elif more > 0:
            more -= 1
    if current and more >= 0:
        groups.append(current)
    elif current and groups:
        merged = groups[-1] + current
        if sm.can_hold(merged):
            groups[-1] = merged
    return groups


def _seeds(sm: SystemModel) -> list[list[list[int]]]:
    n = len(sm.cost.devices)
    c = sm.cost
    keys = [-c.mem, -c.eff_flops, -c.eff_bw, np.arange(n)]
    seeds = [_greedy_pack(sm, [int(i) for i in np.lexsort((np.arange(n), k))]) for k in keys]
    # the best of those groups alone (a single MIXED replica wins at low load)
    alone = {tuple(sorted(g)) for packing in seeds for g in packing}
    if alone:
        seeds.append([list(min(sorted(alone), key=lambda g: sm.score([g]).fitness))])
    seeds.append([[i] for i in range(n)])
    if n <= c.L:
        seeds.append([list(range(n))])
    return [s for s in seeds if s]


class _Search:
    def __init__(self, sm: SystemModel, options: PlanOptions, rng: np.random.Generator) -> None:
        self.sm = sm
        self.o = options
        self.n = len(sm.cost.devices)
        self.rng = rng
        self.seen: dict[tuple[Group, ...], float] = {}

    def fitness(self, c: Chromosome) -> float:
        key = groups_of(c)
        f = self.seen.get(key)
        if f is None:
            f = self.sm.score(key).fitness
            self.seen[key] = f
        return f

    # --- operators ---------------------------------------------------------------

    def random_chromosome(self) -> Chromosome:
        r = int(self.rng.integers(1, self.n + 1))
        c = self.rng.integers(1, r + 1, size=self.n)
        c[self.rng.random(self.n) < 0.1] = 0
        return c

    def newcomer(self) -> Chromosome:
        """Mostly greedy packings of a random device order (0-2 spare devices per group), some random labels."""
        if self.rng.random() < 0.75:
            order = [int(i) for i in self.rng.permutation(self.n)]
            extra = [int(x) for x in self.rng.integers(0, 3, size=self.n)]
            return chromosome(_greedy_pack(self.sm, order, extra), self.n)
        return self.random_chromosome()

    def crossover(self, a: Chromosome, b: Chromosome) -> Chromosome:
        child = b.copy()
        ga = groups_of(a)
        if not ga:
            return child
        pick = self.rng.random(len(ga)) < 0.5
        if not pick.any():
            pick[int(self.rng.integers(len(ga)))] = True
        label = int(child.max()) + 1
        for g, chosen in zip(ga, pick, strict=True):
            if chosen:
                child[list(g)] = label
                label += 1
        return child

    def mutate(self, c: Chromosome) -> Chromosome:
        c = c.copy()
        rng = self.rng
        labels = sorted(set(c.tolist()) - {0})
        op = int(rng.integers(6))
        if op == 0 or len(labels) < 2:  # move one device
            i = int(rng.integers(self.n))
            choices = [lab for lab in [0, *labels, max(labels, default=0) + 1] if lab != c[i]]
            c[i] = choices[int(rng.integers(len(choices)))]
        elif op == 1:  # swap two devices of different groups (or a grouped and an idle one)
            i, j = (int(x) for x in rng.choice(self.n, size=2, replace=False))
            c[i], c[j] = c[j], c[i]
        elif op == 2:  # merge two groups
            x, y = (int(v) for v in rng.choice(labels, size=2, replace=False))
            c[c == y] = x
        elif op == 3:  # leave a whole group idle
            c[c == labels[int(rng.integers(len(labels)))]] = 0
        elif op == 4:  # deal the devices of two groups anew into two groups
            x, y = (int(v) for v in rng.choice(labels, size=2, replace=False))
            members = np.flatnonzero((c == x) | (c == y))
            mask = rng.random(members.size) < 0.5
            if mask.all() or not mask.any():
                mask[0] = not mask[0]
            c[members[mask]], c[members[~mask]] = x, y
        else:  # split a group of two or more
            big = [lab for lab in labels if (c == lab).sum() >= 2]
            if big:
                lab = big[int(rng.integers(len(big)))]
                members = np.flatnonzero(c == lab)
                mask = rng.random(members.size) < 0.5
                if mask.all() or not mask.any():
                    mask[0] = not mask[0]
                c[members[mask]] = int(c.max()) + 1
        return c

    def tournament(self, pop: list[Chromosome], fit: list[float]) -> Chromosome:
        idx = self.rng.integers(len(pop), size=self.o.tournament)
        best: Chromosome = pop[min(idx.tolist(), key=lambda i: (fit[i], i))]
        return best

    # --- local search --------------------------------------------------------------

    def neighbours(self, c: Chromosome) -> Iterator[Chromosome]:
        """Single-device moves, whole-group idling and merges; swaps too on small meshes."""
        labels = sorted(set(c.tolist()) - {0})
        new = max(labels, default=0) + 1
        for i in range(self.n):
            for lab in [0, *labels, new]:
                if lab != c[i]:
                    d = c.copy()
                    d[i] = lab
                    yield d
        if self.n <= SWAP_LIMIT:
            for i in range(self.n):
                for j in range(i + 1, self.n):
                    if c[i] != c[j]:
                        d = c.copy()
                        d[i], d[j] = c[j], c[i]
                        yield d
        for x in labels:
            d = c.copy()
            d[d == x] = 0
            yield d
            for y in labels:
                if x < y:
                    d = c.copy()
                    d[d == y] = x
                    yield d

    def hill_climb(self, c: Chromosome, f: float, budget: int) -> tuple[Chromosome, float]:
        """First-improvement descent; stops at a local optimum or after ``budget`` new groupings."""
        start = len(self.seen)
        improved = True
        while improved and len(self.seen) - start < budget:
            improved = False
            for d in self.neighbours(c):
                fd = self.fitness(d)
                if fd < f * (1 - 1e-12):
                    c, f, improved = d, fd, True
                    break
                if len(self.seen) - start >= budget:
                    break
        return c, f


def run_ga(sm: SystemModel, seeds: Sequence[Sequence[Sequence[int]]] = (),
           options: PlanOptions | None = None) -> GAResult:
    """The best grouping found for ``sm``'s devices, model and workload.

    Small meshes (where a run costs little) get independent restarts from
    derived seeds; the best result wins (ties: the earliest run).
    """
    o = options or sm.options
    n = len(sm.cost.devices)
    restarts = o.restarts if o.restarts is not None else (3 if n <= 7 else 2 if n <= SMALL_MESH else 1)
    best: GAResult | None = None
    for k in range(max(restarts, 1)):
        r = _run_once(sm, seeds, o, np.random.default_rng([o.seed, k]))
        if best is None or r.scored.fitness < best.scored.fitness:
            best = r
    assert best is not None
    return best


def _run_once(sm: SystemModel, seeds: Sequence[Sequence[Sequence[int]]], o: PlanOptions,
              rng: np.random.Generator) -> GAResult:
    s = _Search(sm, o, rng)
    n = s.n
    budget = o.max_evaluations if o.max_evaluations is not None else evaluation_budget(n)
    population = o.population if o.population is not None else (32 if n <= SMALL_MESH else 24)
    patience = o.patience if o.patience is not None else (15 if n <= SMALL_MESH else 8)
    pop: list[Chromosome] = []
    for groups in [*seeds, *_seeds(sm)]:
        if len(pop) < population:
            pop.append(chromosome(groups, n))
    while len(pop) < population:
        pop.append(s.newcomer())
    fit = [s.fitness(c) for c in pop]
    best_i = min(range(len(pop)), key=lambda i: (fit[i], i))
    best, best_f = pop[best_i], fit[best_i]
    history = [best_f]
    stale = 0
    gen = 0
    converged = False
    for gen in range(1, o.generations + 1):  # noqa: B007  (reported)
        ranked = sorted(range(len(pop)), key=lambda i: (fit[i], i))
        new = [pop[i] for i in ranked[: o.elite]]
        new += [s.newcomer() for _ in range(o.immigrants)]
        while len(new) < population:
            a = s.tournament(pop, fit)
            child = s.crossover(a, s.tournament(pop, fit)) if s.rng.random() < o.crossover_rate else a.copy()
            if s.rng.random() < o.mutation_rate:
                child = s.mutate(child)
                if s.rng.random() < 0.5:
                    child = s.mutate(child)
            new.append(child)
        pop = new
        fit = [s.fitness(c) for c in pop]
        i = min(range(len(pop)), key=lambda j: (fit[j], j))
        if fit[i] < best_f * (1 - o.min_improvement):
            best, best_f, stale = pop[i], fit[i], 0
        else:
            if fit[i] < best_f:
                best, best_f = pop[i], fit[i]  # keep it, but a crumb does not reset the patience
            stale += 1
        history.append(best_f)
        if stale >= patience:
            converged = True
            break
        if len(s.seen) >= budget:
            break
    if o.local_search and math.isfinite(best_f):
        best, best_f = s.hill_climb(best, best_f, o.local_search_budget)
        history.append(best_f)
    groups = groups_of(best)
    return GAResult(groups, sm.score(groups), gen, len(s.seen), tuple(history), converged)


def evaluation_budget(n: int) -> int:
    """Default cap on distinct groupings scored by the GA phase: the cost of one grows with the mesh."""
    return int(min(2000, max(200, 8000 // max(n, 1))))


def set_partitions(n: int) -> Iterator[Chromosome]:
    """Every grouping of n devices, idle allowed (restricted growth strings; Bell(n+1) of them)."""
    c = np.zeros(n, dtype=np.int64)

    def rec(i: int, top: int) -> Iterator[Chromosome]:
        if i == n:
            yield c.copy()
            return
        for lab in range(top + 2):
            c[i] = lab
            yield from rec(i + 1, max(top, lab))

    yield from rec(0, 0)


def exhaustive(sm: SystemModel) -> tuple[tuple[Group, ...], Scored]:
    """The optimum of the same fitness by enumeration (small meshes only: Bell(n+1) groupings)."""
    best: tuple[tuple[Group, ...], Scored] | None = None
    for c in set_partitions(len(sm.cost.devices)):
        groups = groups_of(c)
        sc = sm.score(groups)
        if best is None or sc.fitness < best[1].fitness:
            best = (groups, sc)
    assert best is not None
    return best
