"""Shared instance builders for the planner tests (no tests here)."""

from __future__ import annotations

import itertools

import numpy as np

from meshllm.plan.cost import CostModel, ModelCosts, Work
from meshllm.plan.devices import load_device_classes
from meshllm.profile import DeviceProfile, Link

GB = 1e9

# A 32-layer Llama-shaped model of about 1.4 B parameters (6.2 GB in float32).
LLAMA_1B = ModelCosts.llama("llama-1.4b", n_layers=32, dim=2048, ffn_dim=5632, n_heads=32, n_kv_heads=4,
                            vocab_size=32000, max_seq_len=2048)


def random_model(rng: np.random.Generator, n_layers: int, uniform: bool = False) -> ModelCosts:
    def per_layer(lo: float, hi: float) -> tuple[float, ...]:
        if uniform:
            return (float(rng.uniform(lo, hi)),) * n_layers
        return tuple(float(x) for x in rng.uniform(lo, hi, n_layers))

    return ModelCosts("random", per_layer(1e6, 5e6), per_layer(0, 1e3), per_layer(1e6, 4e6), per_layer(1e3, 4e3),
                      per_layer(1e3, 8e3), float(rng.uniform(0, 4e6)), float(rng.uniform(0, 2e7)),
                      float(rng.uniform(0, 6e6)), 512)


def random_devices(rng: np.random.Generator, k: int, *, same_link: bool = False, mem: tuple[float, float] = (5e6, 3e7)
                   ) -> list[DeviceProfile]:
    shared = Link(float(rng.uniform(1e-4, 3e-3)), float(rng.uniform(1e6, 1e8)))
    out = []
    for i in range(k):
        link = shared if same_link else Link(float(rng.uniform(1e-4, 3e-3)), float(rng.uniform(1e6, 1e8)))
        out.append(DeviceProfile(f"d{i}", f"d{i}", float(rng.uniform(1e9, 1e10)), float(rng.uniform(1e9, 1e10)),
                                 int(rng.uniform(*mem)), default_link=link))
    return out


def random_work(rng: np.random.Generator) -> Work:
    if rng.random() < 0.5:
        return Work.prefill(float(rng.integers(1, 64)))
    return Work.decode(float(rng.integers(1, 8)), float(rng.integers(0, 400)))


def brute_force(cost: CostModel, devices: list[int], work: Work, kv_tokens: float, orders: bool = True) -> float:
    """Best bottleneck by enumerating every order and split, from the scalar cost model."""
    L, k = cost.L, len(devices)
    if k > L:
        return float("inf")
    run = {}
    for d in devices:
        for a in range(L):
            for b in range(a + 1, L + 1):
                run[d, a, b] = cost.run_time(d, a, b, work) if cost.fits(d, a, b, kv_tokens) else float("inf")
    best = float("inf")
    for order in itertools.permutations(devices) if orders else [tuple(devices)]:
        for inner in itertools.combinations(range(1, L), k - 1):
            cuts = (0, *inner, L)
            worst = 0.0
            for m, d in enumerate(order):
                t = run[d, cuts[m], cuts[m + 1]]
                if m + 1 < k:
                    t += cost.activation_time(d, order[m + 1], cuts[m + 1], work.tokens)
                worst = max(worst, t)
                if worst >= best:
                    break
            best = min(best, worst)
    return best


def class_mesh(spec: list[tuple[str, int]], jitter: float = 0.0, seed: int = 0) -> list[DeviceProfile]:
    """Devices of named classes, figures scaled by up to +-``jitter`` (measured profiles vary)."""
    from dataclasses import replace

    classes = load_device_classes()
    rng = np.random.default_rng(seed)
    out = []
    for key, n in spec:
        for j in range(n):
            p = classes[key].profile(f"{key}-{j + 1}")
            if jitter:
                p = replace(p, flops=p.flops * rng.uniform(1 - jitter, 1 + jitter),
                            mem_bandwidth_Bps=p.mem_bandwidth_Bps * rng.uniform(1 - jitter, 1 + jitter))
            out.append(p)
    return out


def random_mesh(seed: int, n: int) -> list[DeviceProfile]:
    """Heterogeneous devices for GA tests: compute, bandwidth, memory and links drawn over wide ranges."""
    rng = np.random.default_rng(seed)
    return [DeviceProfile(f"d{i}", f"d{i}", float(10 ** rng.uniform(10, 11.7)), float(10 ** rng.uniform(9.7, 10.7)),
                          int(rng.uniform(2, 12) * GB),
                          default_link=Link(float(rng.uniform(2e-4, 3e-3)), float(rng.choice([12.5e6, 112e6]))))
            for i in range(n)]
