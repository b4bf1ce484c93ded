"""The planner's cost model: predicted seconds and bytes for layer ranges on devices.

Owns the arithmetic that turns a model's per-layer price list
(:class:`ModelCosts`) and device profiles into times:

- one *run* of layers ``[a, b)`` on device ``d`` (a prefill chunk or a batched
  decode step) takes ``o_run + o_layer*(b-a) + FLOPs/(eta_f*F_d) + bytes/(eta_b*B_d)``
  — an additive roofline: compute-bound when FLOPs dominate (prefill),
  memory-bound when the bytes of weights and KV cache read dominate (decode,
  growing with context). ``eta_f, eta_b, o_run, o_layer`` are per-device
  :class:`DeviceFactors`, 1/1/0/0 until calibrated (:mod:`meshllm.plan.calibrate`);
- moving activations or KV caches between two devices takes
  ``latency + bytes/bandwidth`` over their link;
- a stage fits when its weights plus the KV budget (slots x context x KV bytes
  per token of its layers) fit the device's memory.

A run's work is a :class:`Work`: coefficients that are linear in the prefix
sums of the per-layer costs, so expectations over a workload are exact and
the DP can build whole (L+1) x (L+1) tables of stage times with numpy.
Pure: no I/O, no clocks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from meshllm.model.config import ModelConfig
from meshllm.model.manifest import Manifest, Part
from meshllm.plan.errors import PlanError
from meshllm.profile import DeviceProfile, Link

F32 = 4
TOKEN_ID_BYTES = 8  # a sampled token sent back from the last stage to the first


@dataclass(frozen=True)
class ModelCosts:
    """Per-layer costs of a decoder (run-time figures), plus embedding and head.

    Weight bytes are what a loaded part holds and a run reads: the manifest's
    ``runtime_bytes`` of a part when it records one (quantized exports), else
    the float32 size. Build it from a model manifest (:meth:`from_manifest`),
    from an architecture (:meth:`from_config`, :meth:`llama`) or directly from
    numbers (:meth:`uniform`).
    """

    name: str
    layer_flops: tuple[float, ...]  # FLOPs per token (weight matmuls)
    layer_attn_flops: tuple[float, ...]  # extra FLOPs per token per attended position
    layer_weight_bytes: tuple[float, ...]  # held in memory and read once per run
    layer_kv_bytes: tuple[float, ...]  # K+V cache bytes per token
    layer_act_bytes: tuple[float, ...]  # hidden-state bytes per token leaving the layer
    embed_weight_bytes: float
    head_flops: float  # per sequence per run (the head computes the last position only)
    head_weight_bytes: float
    max_seq_len: int
    dtype: str = "fp32"  # of the weights as exported; plans carry it so nodes load the same files

    def __post_init__(self) -> None:
        n = len(self.layer_flops)
        lens = {len(self.layer_attn_flops), len(self.layer_weight_bytes), len(self.layer_kv_bytes),
                len(self.layer_act_bytes)}
        if n < 1 or lens != {n}:
            raise PlanError(f"model costs of {self.name!r}: every per-layer list needs the same length >= 1")
        values = [*self.layer_flops, *self.layer_attn_flops, *self.layer_weight_bytes, *self.layer_kv_bytes,
                  *self.layer_act_bytes, self.embed_weight_bytes, self.head_flops, self.head_weight_bytes]
        if any(not (v >= 0 and math.isfinite(v)) for v in values):
            raise PlanError(f"model costs of {self.name!r}: costs must be finite and non-negative")
        if self.max_seq_len < 1:
            raise PlanError(f"model costs of {self.name!r}: max_seq_len must be positive")

    @property
    def n_layers(self) -> int:
        return len(self.layer_flops)

    @property
    def total_weight_bytes(self) -> float:
        return sum(self.layer_weight_bytes) + self.embed_weight_bytes + self.head_weight_bytes

    @classmethod
    def uniform(cls, n_layers: int, *, flops: float, attn_flops: float, weight_bytes: float, kv_bytes: float,
                act_bytes: float, embed_weight_bytes: float, head_flops: float, head_weight_bytes: float,
                max_seq_len: int, name: str = "synthetic") -> ModelCosts:
        """Every layer alike (what a Llama-family decoder is)."""
        return cls(name, (float(flops),) * n_layers, (float(attn_flops),) * n_layers,
                   (float(weight_bytes),) * n_layers, (float(kv_bytes),) * n_layers, (float(act_bytes),) * n_layers,
                   float(embed_weight_bytes), float(head_flops), float(head_weight_bytes), int(max_seq_len))

    @classmethod
    def from_manifest(cls, m: Manifest) -> ModelCosts:
        layer_parts = [m.part(f"layer.{i}") for i in range(m.config.n_layers)]
        layers = [p.cost for p in layer_parts]
        embed, head = m.part("embed"), m.part("head")
        return cls(
            name=m.name,
            layer_flops=tuple(float(c.flops_per_token) for c in layers),
            layer_attn_flops=tuple(float(c.attn_flops_per_token_per_ctx) for c in layers),
            layer_weight_bytes=tuple(part_runtime_bytes(p) for p in layer_parts),
            layer_kv_bytes=tuple(float(c.kv_bytes_per_token) for c in layers),
            layer_act_bytes=tuple(float(c.activation_bytes_per_token) for c in layers),
            embed_weight_bytes=part_runtime_bytes(embed),
            head_flops=float(head.cost.flops_per_token),
            head_weight_bytes=part_runtime_bytes(head),
            max_seq_len=m.config.max_seq_len,
            dtype=m.dtype,
        )

    @classmethod
    def from_config(cls, cfg: ModelConfig, name: str = "model") -> ModelCosts:
        """The costs ``meshllm export`` would write for this architecture (no weights needed)."""
        from meshllm.model.export import part_costs  # the one formula, shared with the exporter

        c = part_costs(cfg, "fp32")
        layer, embed, head = c["layer"], c["embed"], c["head"]
        return cls.uniform(
            cfg.n_layers, flops=layer.flops_per_token, attn_flops=layer.attn_flops_per_token_per_ctx,
            weight_bytes=layer.runtime_weight_bytes, kv_bytes=layer.kv_bytes_per_token,
            act_bytes=layer.activation_bytes_per_token, embed_weight_bytes=embed.runtime_weight_bytes,
            head_flops=head.flops_per_token, head_weight_bytes=head.runtime_weight_bytes,
            max_seq_len=cfg.max_seq_len, name=name)

    @classmethod
    def llama(cls, name: str, *, n_layers: int, dim: int, ffn_dim: int, n_heads: int, n_kv_heads: int,
              vocab_size: int, max_seq_len: int, head_dim: int | None = None) -> ModelCosts:
        """A synthetic Llama-shaped model, e.g. ``llama("7b", n_layers=32, dim=4096, ffn_dim=11008, ...)``."""
        cfg = ModelConfig(arch="llama", dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                          head_dim=head_dim or dim // n_heads, ffn_dim=ffn_dim, vocab_size=vocab_size,
                          max_seq_len=max_seq_len)
        return cls.from_config(cfg, name)

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ModelCosts:
        d = dict(d)
        for k in ("layer_flops", "layer_attn_flops", "layer_weight_bytes", "layer_kv_bytes", "layer_act_bytes"):
            d[k] = tuple(float(x) for x in d[k])
        return cls(**d)


def part_runtime_bytes(part: Part) -> float:
    """Bytes a loaded part holds in memory (and a run reads).

    A quantized export records them per part as ``runtime_bytes`` (on the part
    or in its cost figures); older manifests only have ``runtime_weight_bytes``,
    the float32 size every part had at run time before quantized weights.
    """
    for holder in (part, part.cost):
        value = getattr(holder, "runtime_bytes", None)
        if value is not None:
            return float(value)
    return float(part.cost.runtime_weight_bytes)


@dataclass(frozen=True)
class Work:
    """One run of a segment, as coefficients of the per-layer costs (expectations allowed).

    FLOPs  = tokens*flops + attn*attn_flops + head_tokens*head_flops
    bytes  = runs*weights + kv_tokens*kv_bytes (+ head weights once per run)
    acts   = tokens*act_bytes leave the stage (only the last position when the head is there)
    """

    tokens: float  # new tokens in the run (all sequences)
    attn: float  # sum over new tokens of the positions each attends to
    kv_tokens: float  # KV entries read and written per layer
    head_tokens: float  # sequences whose last position goes through the head
    runs: float = 1.0

    @classmethod
    def prefill(cls, n: float, ctx: float = 0.0) -> Work:
        """A chunk of ``n`` tokens of one sequence after ``ctx`` cached ones."""
        return cls(n, n * ctx + n * (n + 1) / 2, ctx + 2 * n, 1.0)

    @classmethod
    def decode(cls, batch: float, ctx: float) -> Work:
        """One token for each of ``batch`` sequences with ``ctx`` cached positions each."""
        return cls(batch, batch * (ctx + 1), batch * (ctx + 2), batch)

    def __add__(self, other: Work) -> Work:
        return Work(self.tokens + other.tokens, self.attn + other.attn, self.kv_tokens + other.kv_tokens,
                    self.head_tokens + other.head_tokens, self.runs + other.runs)

    def scale(self, k: float) -> Work:
        return Work(self.tokens * k, self.attn * k, self.kv_tokens * k, self.head_tokens * k, self.runs * k)


@dataclass(frozen=True)
class DeviceFactors:
    """Calibration of one device: achieved fractions of its profile and fixed overheads."""

    flops_eff: float = 1.0  # achieved / profile FLOP/s
    bw_eff: float = 1.0  # achieved / profile bytes/s
    run_overhead_s: float = 0.0  # per session run
    layer_overhead_s: float = 0.0  # per layer per run (kernel launches, small ops)

    def to_json(self) -> dict[str, float]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> DeviceFactors:
        return cls(**{k: float(v) for k, v in d.items()})


def combined_link(a: DeviceProfile, b: DeviceProfile) -> Link:
    """The link from ``a`` to ``b``: measured by either end, else the worse of the two defaults."""
    if b.node_id in a.links:
        return a.links[b.node_id]
    if a.node_id in b.links:
        return b.links[a.node_id]
    return Link(max(a.default_link.latency_s, b.default_link.latency_s),
                min(a.default_link.bandwidth_Bps, b.default_link.bandwidth_Bps))


@dataclass(frozen=True)
class StageRef:
    """A stage as the cost model sees it: device index and layer range."""

    device: int
    start: int
    stop: int


class CostModel:
    """Predictions for a fixed model and set of devices (indices follow ``devices``)."""

    def __init__(self, model: ModelCosts, devices: Sequence[DeviceProfile],
                 factors: Mapping[str, DeviceFactors] | None = None) -> None:
        if not devices:
            raise PlanError("no devices to plan for")
        ids = [d.node_id for d in devices]
        if len(set(ids)) != len(ids):
            raise PlanError(f"device node ids must be unique, got duplicates in {ids}")
        for d in devices:
            try:
                d.check()
            except ValueError as e:
                raise PlanError(f"device {d.node_id!r}: {e}") from None
        self.model = model
        self.devices = tuple(devices)
        self.index = {d.node_id: i for i, d in enumerate(devices)}
        self.factors = {d.node_id: (factors or {}).get(d.node_id, DeviceFactors()) for d in devices}
        f = [self.factors[d.node_id] for d in devices]
        self.eff_flops = np.array([d.flops * x.flops_eff for d, x in zip(devices, f, strict=True)])
        self.eff_bw = np.array([d.mem_bandwidth_Bps * x.bw_eff for d, x in zip(devices, f, strict=True)])
        # per run: the calibrated runtime's own (factors) and the serving stack's, as the device measured it
        self.run_overhead = np.array([x.run_overhead_s + d.serving_overhead_s
                                      for d, x in zip(devices, f, strict=True)])
        self.layer_overhead = np.array([x.layer_overhead_s for x in f])
        self.mem = np.array([float(d.mem_bytes) for d in devices])
        n = len(devices)
        # devices on the same kind of link with no per-peer measurement share a link class
        linked = {d.node_id for d in devices if d.links} | {p for d in devices for p in d.links}
        kinds: dict[object, int] = {}
        self._link_class = [kinds.setdefault(("node", i) if d.node_id in linked else d.default_link, len(kinds))
                            for i, d in enumerate(devices)]
        self.latency = np.zeros((n, n))
        self.bandwidth = np.full((n, n), np.inf)
        for i, a in enumerate(devices):
            for j, b in enumerate(devices):
                if i != j:
                    link = combined_link(a, b)
                    self.latency[i, j], self.bandwidth[i, j] = link.latency_s, link.bandwidth_Bps
        m = model
        self.L = m.n_layers
        z = np.zeros(1)
        self.cum_flops = np.concatenate([z, np.cumsum(m.layer_flops)])
        self.cum_attn = np.concatenate([z, np.cumsum(m.layer_attn_flops)])
        self.cum_weights = np.concatenate([z, np.cumsum(m.layer_weight_bytes)])
        self.cum_kv = np.concatenate([z, np.cumsum(m.layer_kv_bytes)])
        # act[l]: bytes per token crossing the boundary before layer l (l = 1..L-1)
        self.act = np.concatenate([z, np.asarray(m.layer_act_bytes, dtype=float)])
        a_idx, b_idx = np.meshgrid(np.arange(self.L + 1), np.arange(self.L + 1), indexing="ij")
        self._valid = b_idx > a_idx
        self._n_layers = np.where(self._valid, b_idx - a_idx, 0).astype(float)
        self._has_embed = (a_idx == 0).astype(float)
        self._has_head = (b_idx == self.L).astype(float)

        def diff(cum: np.ndarray) -> np.ndarray:
            return np.where(self._valid, cum[b_idx] - cum[a_idx], 0.0)

        self._flops = diff(self.cum_flops)
        self._attn = diff(self.cum_attn)
        self._weights = diff(self.cum_weights)
        self._kv = diff(self.cum_kv)
        self._static_mem = self._weights + self._has_embed * m.embed_weight_bytes + self._has_head * m.head_weight_bytes
        self._table_cache: dict[tuple[Work, float], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.uniform_layers = all(len(set(v)) == 1 for v in (m.layer_flops, m.layer_attn_flops, m.layer_weight_bytes,
                                                              m.layer_kv_bytes, m.layer_act_bytes))

    def symmetric(self, devices: Sequence[int]) -> bool:
        """Identical layers and the same link (latency, bandwidth) between every pair of ``devices``."""
        if not self.uniform_layers:
            return False
        if len(devices) < 3:
            return True  # with one or two devices the (first, last) pairs are every order
        return len({self._link_class[d] for d in devices}) == 1

    # --- scalar predictions (the reference the DP tables must agree with) ------

    def device_index(self, device: int | str) -> int:
        if isinstance(device, str):
            try:
                return self.index[device]
            except KeyError:
                raise PlanError(f"unknown device {device!r}") from None
        return device

    def _check_range(self, start: int, stop: int) -> None:
        if not 0 <= start < stop <= self.L:
            raise PlanError(f"layer range [{start}, {stop}) is not within [0, {self.L}) or is empty")

    def flops(self, start: int, stop: int, work: Work) -> float:
        self._check_range(start, stop)
        f = work.tokens * (self.cum_flops[stop] - self.cum_flops[start])
        f += work.attn * (self.cum_attn[stop] - self.cum_attn[start])
        if stop == self.L:
            f += work.head_tokens * self.model.head_flops
        return float(f)

    def bytes_read(self, start: int, stop: int, work: Work) -> float:
        self._check_range(start, stop)
        b = work.runs * (self.cum_weights[stop] - self.cum_weights[start])
        b += work.kv_tokens * (self.cum_kv[stop] - self.cum_kv[start])
        if stop == self.L:
            b += work.runs * self.model.head_weight_bytes
        return float(b)

    def run_time(self, device: int | str, start: int, stop: int, work: Work) -> float:
        """Seconds for one run (or the expectation of a mix of runs) of ``[start, stop)`` on ``device``."""
        i = self.device_index(device)
        return float(work.runs * (self.run_overhead[i] + self.layer_overhead[i] * (stop - start))
                     + self.flops(start, stop, work) / self.eff_flops[i]
                     + self.bytes_read(start, stop, work) / self.eff_bw[i])

    def run_coeffs(self, device: int | str, start: int, stop: int) -> np.ndarray:
        """c with ``run_time(device, start, stop, w) == c @ (runs, tokens, attn, kv_tokens, head_tokens)`` of w."""
        i = self.device_index(device)
        self._check_range(start, stop)
        head = stop == self.L
        f, b = self.eff_flops[i], self.eff_bw[i]
        return np.array([
            self.run_overhead[i] + self.layer_overhead[i] * (stop - start)
            + (self.cum_weights[stop] - self.cum_weights[start] + (self.model.head_weight_bytes if head else 0.0)) / b,
            (self.cum_flops[stop] - self.cum_flops[start]) / f,
            (self.cum_attn[stop] - self.cum_attn[start]) / f,
            (self.cum_kv[stop] - self.cum_kv[start]) / b,
            (self.model.head_flops if head else 0.0) / f,
        ])

    def prefill_time(self, device: int | str, start: int, stop: int, n_tokens: float, ctx: float = 0.0) -> float:
        """Prefill of ``n_tokens`` of one prompt (compute-bound)."""
        return self.run_time(device, start, stop, Work.prefill(n_tokens, ctx))

    def decode_time(self, device: int | str, start: int, stop: int, context: float, batch: float = 1) -> float:
        """One decode step for ``batch`` sequences with ``context`` cached positions (memory-bound)."""
        return self.run_time(device, start, stop, Work.decode(batch, context))

    def memory(self, start: int, stop: int, kv_tokens: float) -> float:
        """Bytes a stage holds: weights (with embedding/head at the ends) + KV for ``kv_tokens`` positions."""
        self._check_range(start, stop)
        return float(self._static_mem[start, stop] + kv_tokens * (self.cum_kv[stop] - self.cum_kv[start]))

    def kv_room(self, device: int | str, start: int, stop: int, capacity: float | None = None) -> float:
        """KV positions a stage of ``[start, stop)`` on ``device`` holds beside its weights (``capacity``: its
        memory, if not the device's); the scheduler admits sequences by their tokens up to this."""
        mem = capacity if capacity is not None and capacity > 0 else self.mem[self.device_index(device)]
        per_token = float(self.cum_kv[stop] - self.cum_kv[start])
        return (mem - self.memory(start, stop, 0)) / max(per_token, 1e-12)

    def fits(self, device: int | str, start: int, stop: int, kv_tokens: float) -> bool:
        return bool(self.memory(start, stop, kv_tokens) <= self.mem[self.device_index(device)])

    def transfer_time(self, src: int | str, dst: int | str, n_bytes: float) -> float:
        i, j = self.device_index(src), self.device_index(dst)
        if i == j:
            return 0.0
        return float(self.latency[i, j] + n_bytes / self.bandwidth[i, j])

    def activation_time(self, src: int | str, dst: int | str, boundary: int, tokens: float) -> float:
        """Sending ``tokens`` hidden states that cross the boundary before layer ``boundary``."""
        return self.transfer_time(src, dst, tokens * self.act[boundary])

    def kv_handoff_time(self, src: Sequence[StageRef], dst: Sequence[StageRef], n_tokens: float) -> float:
        """Moving the KV cache of ``n_tokens`` positions from one replica's stages to another's.

        Every layer's cache goes from the device that holds it in ``src`` to the
        one that holds it in ``dst``. Pairs of devices transfer in parallel, but
        a device sends (or receives) its pairs one after the other: the hand-off
        takes the longest per-device total of ``latency + bytes/bandwidth``.
        """
        per_sender: dict[int, float] = {}
        per_receiver: dict[int, float] = {}
        i = j = 0
        pos = 0
        while i < len(src) and j < len(dst):
            end = min(src[i].stop, dst[j].stop)
            if end > pos:
                t = self.transfer_time(src[i].device, dst[j].device,
                                       n_tokens * (self.cum_kv[end] - self.cum_kv[pos]))
                per_sender[src[i].device] = per_sender.get(src[i].device, 0.0) + t
                per_receiver[dst[j].device] = per_receiver.get(dst[j].device, 0.0) + t
            pos = end
            if src[i].stop == end:
                i += 1
            if dst[j].stop == end:
                j += 1
        return max([0.0, *per_sender.values(), *per_receiver.values()])

    def stage_layout(self, stages: Sequence[StageRef], width: int) -> tuple[np.ndarray, np.ndarray]:
        """(device of every layer, stage boundaries padded with L to ``width + 1`` entries)."""
        dev = np.empty(self.L, dtype=np.int64)
        cuts = np.full(width + 1, self.L, dtype=np.int64)
        cuts[0] = 0
        for j, s in enumerate(stages):
            dev[s.start:s.stop] = s.device
            cuts[j + 1] = s.stop
        return dev, cuts

    def kv_handoff_layouts(self, sdev: np.ndarray, scuts: np.ndarray, ddev: np.ndarray, dcuts: np.ndarray,
                           n_tokens: float) -> np.ndarray:
        """The hand-off matrix from layouts (:meth:`stage_layout`, stacked).

        A (sender, receiver) pair shares one contiguous run of layers, so its
        ``latency + bytes/bandwidth`` is a per-layer sum plus one latency where
        the pair starts; per-device totals are differences of cumulative sums at
        the device's stage boundaries.
        """
        L = self.L
        u, v = sdev[:, None, :], ddev[None, :, :]
        kv = n_tokens * np.diff(self.cum_kv)
        same = u == v
        bw = np.where(same, np.inf, self.bandwidth[u, v])
        lat = np.where(same, 0.0, self.latency[u, v])
        shape = (len(sdev), len(ddev))
        begins = np.ones(shape + (L,), dtype=bool)
        begins[:, :, 1:] = (u[:, :, 1:] != u[:, :, :-1]) | (v[:, :, 1:] != v[:, :, :-1])
        c = kv[None, None, :] / bw + lat * begins
        cum = np.concatenate([np.zeros(shape + (1,)), np.cumsum(c, axis=2)], axis=2)
        send = np.diff(np.take_along_axis(cum, np.broadcast_to(scuts[:, None, :], shape + scuts.shape[1:]), 2), axis=2)
        recv = np.diff(np.take_along_axis(cum, np.broadcast_to(dcuts[None, :, :], shape + dcuts.shape[1:]), 2), axis=2)
        out: np.ndarray = np.maximum(send.max(axis=2), recv.max(axis=2))
        return out

    # --- tables for the DP ---------------------------------------------------------

    def _work_tables(self, work: Work, kv_tokens: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(FLOPs, bytes, memory need) of every range [a, b) for a run; cached per work."""
        key = (work, kv_tokens)
        hit = self._table_cache.get(key)
        if hit is None:
            m = self.model
            flops = (work.tokens * self._flops + work.attn * self._attn
                     + work.head_tokens * m.head_flops * self._has_head)
            nbytes = work.runs * (self._weights + m.head_weight_bytes * self._has_head) + work.kv_tokens * self._kv
            need = self._static_mem + kv_tokens * self._kv
            if len(self._table_cache) > 256:
                self._table_cache.clear()
            hit = self._table_cache[key] = (flops, nbytes, need)
        return hit

    def stage_table(self, devices: Sequence[int], work: Work, kv_tokens: float) -> np.ndarray:
        """T[i, a, b]: run time of layers [a, b) on ``devices[i]``; inf when empty or over memory."""
        idx = np.asarray(devices, dtype=int)
        flops, nbytes, need = self._work_tables(work, kv_tokens)
        t = (work.runs * (self.run_overhead[idx, None, None] + self.layer_overhead[idx, None, None] * self._n_layers)
             + flops / self.eff_flops[idx, None, None] + nbytes / self.eff_bw[idx, None, None])
        ok = self._valid & (need[None] <= self.mem[idx, None, None])
        return np.where(ok, t, np.inf)

    def kv_room_table(self, devices: Sequence[int]) -> np.ndarray:
        """R[i, a, b]: KV positions per layer that fit beside layers [a, b) on ``devices[i]``; -inf if none."""
        idx = np.asarray(devices, dtype=int)
        free = self.mem[idx, None, None] - self._static_mem[None]
        with np.errstate(divide="ignore", invalid="ignore"):
            room = np.where(self._kv[None] > 0, free / self._kv[None], np.inf)
        return np.where(self._valid[None] & (free >= 0), room, -np.inf)

    def transfer_table(self, devices: Sequence[int], work: Work) -> np.ndarray:
        """X[i, j, l]: one run's activations at boundary l sent from ``devices[i]`` to ``devices[j]``."""
        idx = np.asarray(devices, dtype=int)
        lat = self.latency[idx][:, idx]
        bw = self.bandwidth[idx][:, idx]
        out: np.ndarray = work.runs * lat[:, :, None] + work.tokens * self.act[None, None, :] / bw[:, :, None]
        return out

    def memory_needed(self, kv_tokens: float) -> float:
        """Bytes of the whole model with a KV budget of ``kv_tokens`` positions."""
        return float(self._static_mem[0, self.L] + kv_tokens * self.cum_kv[-1])

