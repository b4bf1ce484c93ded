"""The workload the planner optimises for: request rate and the input/output length distributions.

A length distribution is held as a small deterministic quadrature (values and
weights), so that every expectation the cost model needs (mean tokens, mean
of n(n+1)/2 for attention, the spread of prefill times) is a weighted sum.
It is built from a mean and standard deviation (a log-normal, discretised at
equal-probability midpoints), from raw samples (binned by quantile), or from
one fixed length.

Specs: ``"in=512,out=128,rate=2"`` with optional ``in_std=``/``out_std=``
(default 0: fixed lengths), or a preset of Splitwise's Azure trace shapes
scaled down for edge models: ``"conversation,scale=0.25,rate=1"``,
``"coding,scale=0.125,rate=0.5"``. JSON: ``{"rate": 2, "input": 512 |
{"mean": m, "std": s} | {"samples": [...]}, "output": ...}``.

Pure values; parsing a file's text is the caller's business (:mod:`meshllm.cli.plan`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from meshllm.plan.errors import PlanError

# Splitwise (Patel et al., ISCA 2024), Azure LLM inference traces 2023: (mean, std, min, max) tokens.
PRESETS: dict[str, dict[str, tuple[float, float, float, float]]] = {
    "coding": {"input": (2048, 1973, 3, 7437), "output": (28, 60, 1, 1000)},
    "conversation": {"input": (1155, 1109, 2, 14050), "output": (211, 163, 7, 1000)},
}
_QUAD_POINTS = 16


@dataclass(frozen=True)
class LengthDist:
    """A distribution of token counts as weighted points (weights sum to 1)."""

    values: tuple[float, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.values or len(self.values) != len(self.weights):
            raise PlanError("a length distribution needs as many weights as values, and at least one")
        if min(self.values) < 1 or any(not math.isfinite(v) for v in self.values):
            raise PlanError(f"token lengths must be finite and at least 1, got {min(self.values)}")
        if min(self.weights) < 0 or abs(sum(self.weights) - 1.0) > 1e-6:
            raise PlanError("length distribution weights must be non-negative and sum to 1")

    @classmethod
    def fixed(cls, n: float) -> LengthDist:
        return cls((float(n),), (1.0,))

    @classmethod
    def from_mean_std(cls, mean: float, std: float = 0.0, lo: float = 1.0, hi: float | None = None,
                      points: int = _QUAD_POINTS) -> LengthDist:
        """A log-normal with this mean and std, clipped to [lo, hi], at ``points`` equal-probability midpoints."""
        if not mean >= 1:
            raise PlanError(f"mean length must be at least 1 token, got {mean}")
        if not std >= 0:
            raise PlanError(f"length std must be non-negative, got {std}")
        if std == 0:
            return cls.fixed(mean)
        sigma2 = math.log1p((std / mean) ** 2)
        mu, sigma = math.log(mean) - sigma2 / 2, math.sqrt(sigma2)
        nd = NormalDist()
        qs = [nd.inv_cdf((i + 0.5) / points) for i in range(points)]
        vals = np.exp(mu + sigma * np.array(qs))
        vals *= mean / vals.mean()  # the midpoint rule loses a little of the tail; keep the mean exact
        vals = np.clip(vals, lo, hi if hi is not None else np.inf)
        return cls(tuple(float(v) for v in vals), tuple([1.0 / points] * points))

    @classmethod
    def from_samples(cls, samples: Sequence[float], points: int = 32) -> LengthDist:
        """Samples binned into at most ``points`` equal-count bins (each bin's mean, its share)."""
        xs = np.sort(np.asarray(samples, dtype=float))
        if xs.size == 0:
            raise PlanError("a length distribution from samples needs at least one sample")
        bins = np.array_split(xs, min(points, xs.size))
        return cls(tuple(float(b.mean()) for b in bins), tuple(b.size / xs.size for b in bins))

    # --- moments ----------------------------------------------------------

    @property
    def array(self) -> np.ndarray:
        return np.asarray(self.values, dtype=float)

    @property
    def probs(self) -> np.ndarray:
        return np.asarray(self.weights, dtype=float)

    def expect(self, f: np.ndarray) -> float:
        """Expectation of ``f`` evaluated at :attr:`values`."""
        return float(np.dot(self.probs, f))

    @property
    def mean(self) -> float:
        return self.expect(self.array)

    @property
    def std(self) -> float:
        return math.sqrt(max(self.expect(self.array**2) - self.mean**2, 0.0))

    def quantile(self, q: float) -> float:
        order = np.argsort(self.values)
        cum = np.cumsum(self.probs[order])
        return float(self.array[order][min(int(np.searchsorted(cum, q - 1e-12)), len(cum) - 1)])

    def to_json(self) -> dict[str, Any]:
        return {"values": list(self.values), "weights": list(self.weights)}

    @classmethod
    def from_json(cls, d: Any, where: str = "length") -> LengthDist:
        if isinstance(d, (int, float)) and not isinstance(d, bool):
            return cls.fixed(float(d))
        if not isinstance(d, dict):
            raise PlanError(f"{where}: expected a number or an object with mean/std, samples or values/weights")
        if "values" in d:
            return cls(tuple(float(v) for v in d["values"]), tuple(float(w) for w in d["weights"]))
        if "samples" in d:
            return cls.from_samples([float(v) for v in d["samples"]])
        if "mean" in d:
            return cls.from_mean_std(float(d["mean"]), float(d.get("std", 0.0)), float(d.get("min", 1.0)),
                                     float(d["max"]) if "max" in d else None)
        raise PlanError(f"{where}: expected keys mean/std, samples, or values/weights; got {sorted(d)}")


@dataclass(frozen=True)
class Workload:
    """Poisson arrivals at ``rate`` requests/s with independent input and output lengths."""

    rate: float
    input: LengthDist
    output: LengthDist
    name: str = ""

    def __post_init__(self) -> None:
        if not (self.rate > 0 and math.isfinite(self.rate)):
            raise PlanError(f"request rate must be a positive number of requests/s, got {self.rate}")

    @classmethod
    def simple(cls, input_tokens: float, output_tokens: float, rate: float, input_std: float = 0.0,
               output_std: float = 0.0, name: str = "") -> Workload:
        return cls(rate, LengthDist.from_mean_std(input_tokens, input_std),
                   LengthDist.from_mean_std(output_tokens, output_std), name)

    @classmethod
    def preset(cls, kind: str, rate: float, scale: float = 1.0) -> Workload:
        """Splitwise's trace shapes, lengths multiplied by ``scale`` (edge models have short contexts)."""
        if kind not in PRESETS:
            raise PlanError(f"unknown workload preset {kind!r} (choose from {', '.join(PRESETS)})")
        p = PRESETS[kind]
        dists = []
        for key in ("input", "output"):
            mean, std, lo, hi = p[key]
            s = scale if key == "input" else max(scale, 1.0 / mean)
            dists.append(LengthDist.from_mean_std(max(mean * s, 1), std * s, max(lo * s, 1), max(hi * s, 1)))
        return cls(rate, dists[0], dists[1], f"{kind}x{scale:g}")

    def with_rate(self, rate: float) -> Workload:
        return Workload(rate, self.input, self.output, self.name)

    # --- what the planner needs ---------------------------------------------

    def decode_tokens(self) -> float:
        """Mean tokens made by decode steps per request (the first comes from the prefill)."""
        return max(self.output.mean - 1.0, 0.0)

    def decode_context(self) -> float:
        """Mean cached positions before a decode step: E[I] + E[s(s-1)/2] / E[s], s = O - 1 steps."""
        o = self.output.array
        steps = np.maximum(o - 1.0, 0.0)
        denom = self.output.expect(steps)
        if denom <= 0:
            return self.input.mean
        return self.input.mean + self.output.expect(steps * (steps - 1.0) / 2.0) / denom

    def context_budget(self, q: float = 0.99, max_seq_len: int | None = None) -> int:
        """KV positions to reserve per sequence: the ``q`` quantiles of input plus output."""
        n = math.ceil(self.input.quantile(q) + self.output.quantile(q))
        return min(n, max_seq_len) if max_seq_len else n

    # --- (de)serialisation ------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "rate": self.rate, "input": self.input.to_json(), "output": self.output.to_json()}

    @classmethod
    def from_json(cls, d: Any, where: str = "workload") -> Workload:
        if not isinstance(d, dict):
            raise PlanError(f"{where}: a workload is a JSON object with rate, input and output")
        try:
            return cls(float(d["rate"]), LengthDist.from_json(d["input"], f"{where}.input"),
                       LengthDist.from_json(d["output"], f"{where}.output"), str(d.get("name", "")))
        except KeyError as e:
            raise PlanError(f"{where}: missing key {e.args[0]!r} (need rate, input, output)") from None

    @classmethod
    def parse(cls, spec: str) -> Workload:
        """``"in=512,out=128,rate=2[,in_std=..,out_std=..]"``, ``"conversation,scale=0.25,rate=1"`` or JSON text."""
        spec = spec.strip()
        if spec.startswith("{"):
            try:
                return cls.from_json(json.loads(spec))
            except json.JSONDecodeError as e:
                raise PlanError(f"workload spec is not valid JSON: {e}") from None
        kv: dict[str, float] = {}
        preset = None
        for item in (s.strip() for s in spec.split(",") if s.strip()):
            if "=" not in item:
                if preset is not None or item not in PRESETS:
                    raise PlanError(f"workload spec: {item!r} is not key=value nor a preset ({', '.join(PRESETS)})")
                preset = item
                continue
            key, _, value = item.partition("=")
            key = key.strip()
            if key not in {"in", "out", "rate", "in_std", "out_std", "scale"}:
                raise PlanError(f"workload spec: unknown key {key!r} (in, out, rate, in_std, out_std, scale)")
            try:
                kv[key] = float(value)
            except ValueError:
                raise PlanError(f"workload spec: {key}={value!r} is not a number") from None
        rate = kv.get("rate", 1.0)
        if preset is not None:
            if {"in", "out", "in_std", "out_std"} & kv.keys():
                raise PlanError("workload spec: a preset takes only rate= and scale=")
            return cls.preset(preset, rate, kv.get("scale", 1.0))
        if "in" not in kv or "out" not in kv:
            raise PlanError("workload spec needs in= and out= (mean tokens), e.g. in=512,out=128,rate=2")
        return cls.simple(kv["in"], kv["out"], rate, kv.get("in_std", 0.0), kv.get("out_std", 0.0),
                          name=spec)
