"""A device's capability profile: what the planner needs to know about a node, and how to measure it.

The profile is a small frozen value gossiped by every node and read by the
planner's cost model. Measurements use onnxruntime itself (the engine that
will run the layers): a matrix-matrix product for compute throughput, a
matrix-vector product over a buffer much larger than the caches for memory
bandwidth. Emulation factors let one machine pretend to be several slower
devices (demos, tests, the sim-to-real check); they are part of the profile
so that nobody mistakes an emulated figure for a measured one.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

GB = 1e9


@dataclass(frozen=True)
class Link:
    """Measured (or assumed) link from one node to a peer."""

    latency_s: float  # one-way latency
    bandwidth_Bps: float  # bytes per second


@dataclass(frozen=True)
class DeviceProfile:
    node_id: str
    name: str
    flops: float  # sustained FLOP/s of float32 matmul (prefill, compute-bound)
    mem_bandwidth_Bps: float  # sustained bytes/s of a matrix-vector product (decode, memory-bound)
    mem_bytes: int  # memory meshllm may use for weights and KV caches
    device_class: str = "measured"
    emulated: bool = False  # figures were scaled by emulation options, not measured as is
    links: dict[str, Link] = field(default_factory=dict)  # peer node_id -> link
    default_link: Link = Link(latency_s=0.5e-3, bandwidth_Bps=1e9 / 8 * 0.9)  # gigabit LAN when unmeasured
    # seconds the node's serving stack spends per stage run besides the run itself (taking work from the inbox,
    # batching, the replies, feeding tokens back): measured while serving (``serving_overhead_update``), 0 until
    # the node has served enough runs; the cost model charges it on every run of the device
    serving_overhead_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DeviceProfile:
        d = dict(d)
        d["links"] = {k: Link(**v) for k, v in (d.get("links") or {}).items()}
        if "default_link" in d and isinstance(d["default_link"], dict):
            d["default_link"] = Link(**d["default_link"])
        return cls(**d)

    def check(self) -> None:
        """ValueError naming the first figure the cost model cannot use (a gossiped record is anyone's writing)."""
        def number(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        for name in ("flops", "mem_bandwidth_Bps", "mem_bytes"):
            v = getattr(self, name)
            if not (number(v) and v > 0):
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        if not (number(self.serving_overhead_s) and 0.0 <= self.serving_overhead_s < 1.0):
            raise ValueError(f"serving_overhead_s must be a number of seconds in [0, 1), "
                             f"got {self.serving_overhead_s!r}")

    def compute_only(self) -> DeviceProfile:
        """This profile without its serving overhead: what predicts a bare segment run (the emulation's pace, a
        calibration against timed segments)."""
        return replace(self, serving_overhead_s=0.0) if self.serving_overhead_s else self

    def emulate(self, compute_scale: float = 1.0, memory_cap: int | None = None,
                extra_latency_s: float = 0.0) -> DeviceProfile:
        """This profile as a device ``compute_scale`` times slower (compute and bandwidth), with capped memory."""
        if compute_scale == 1.0 and memory_cap is None and extra_latency_s == 0.0:
            return self
        link = Link(self.default_link.latency_s + extra_latency_s, self.default_link.bandwidth_Bps)
        return replace(
            self,
            flops=self.flops / compute_scale,
            mem_bandwidth_Bps=self.mem_bandwidth_Bps / compute_scale,
            mem_bytes=min(self.mem_bytes, memory_cap) if memory_cap else self.mem_bytes,
            emulated=True,
            default_link=link,
        )


def pinned_profile(spec: str, node_id: str, name: str) -> DeviceProfile:
    """The profile a node announces under ``--emulate-device JSON``: these very figures, never measured.

    For demos and tests whose plan must not depend on the host's noise. ``spec`` is a JSON object with
    ``flops``, ``mem_bandwidth_Bps`` and ``mem_bytes`` (and optionally ``device_class``); a bad one is
    a one-line :class:`~meshllm.errors.ConfigError`.
    """
    import json

    from meshllm.errors import ConfigError

    try:
        d = json.loads(spec)
    except ValueError as e:
        raise ConfigError(f"--emulate-device: not JSON ({e})") from None
    keys = {"flops", "mem_bandwidth_Bps", "mem_bytes"}
    if not isinstance(d, dict) or not keys <= set(d) or set(d) - keys - {"device_class"}:
        raise ConfigError("--emulate-device wants a JSON object with flops, mem_bandwidth_Bps and mem_bytes "
                          "(and optionally device_class)")
    figures = {k: d[k] for k in keys}
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf")
               for v in figures.values()):
        raise ConfigError("--emulate-device: flops, mem_bandwidth_Bps and mem_bytes must be positive numbers")
    return DeviceProfile(node_id=node_id, name=name, flops=float(figures["flops"]),
                         mem_bandwidth_Bps=float(figures["mem_bandwidth_Bps"]), mem_bytes=int(figures["mem_bytes"]),
                         device_class=str(d.get("device_class", "emulated")), emulated=True)


SERVING_OVERHEAD_MIN_RUNS = 20  # stage runs before a node advertises its measured serving overhead
SERVING_OVERHEAD_STEP = 0.25  # ... and the relative change (or 0.1 ms) that makes it advertise it again


def serving_overhead_update(advertised: float, overhead_s: float, runs: int) -> float | None:
    """The serving overhead per run a node should advertise now, or None to keep ``advertised``.

    ``overhead_s`` and ``runs`` are its stages' counters (the time from a run's work being all there, and the
    previous run having ended, to the run's start; and the runs). The figure is rounded to two significant
    digits and restated only when it moved by a quarter or 0.1 ms: each restatement is a retained record that
    every member reads, and the planner charges the figure from its next plan, so noise must not churn.
    """
    if runs < SERVING_OVERHEAD_MIN_RUNS or not (0.0 <= overhead_s < float("inf")):
        return None
    figure = float(f"{overhead_s / runs:.2g}")
    if abs(figure - advertised) <= max(SERVING_OVERHEAD_STEP * advertised, 1e-4):
        return None
    return figure


# --- measurement ---------------------------------------------------------


def matmul_session(m: int, k: int, n: int, threads: int | None) -> tuple[Any, np.ndarray]:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((k, n), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "bench",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or os.cpu_count() or 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess, np.ones((m, k), np.float32)


def median_seconds(sess: Any, x: np.ndarray, reps: int) -> float:
    for _ in range(3):  # warm up (first runs pre-pack and fault in the weights)
        sess.run(None, {"x": x})
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        sess.run(None, {"x": x})
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure_flops(threads: int | None = None, size: int = 512, reps: int = 5) -> float:
    """FLOP/s of a (size x size) @ (size x size) float32 matmul in onnxruntime."""
    sess, x = matmul_session(size, size, size, threads)
    return 2.0 * size**3 / median_seconds(sess, x, reps)


def measure_bandwidth(threads: int | None = None, n_bytes: int = 64 << 20, reps: int = 7) -> float:
    """Bytes/s read by a float32 matrix-vector product over an ``n_bytes`` weight matrix."""
    k = 1024
    sess, x = matmul_session(1, k, n_bytes // 4 // k, threads)
    return n_bytes / median_seconds(sess, x, reps)


def available_memory() -> int:
    """Bytes of memory available to new allocations (Linux MemAvailable, else physical pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def measure_profile(node_id: str, name: str, *, threads: int | None = None, quick: bool = False) -> DeviceProfile:
    """Measures this machine (about a second; ``quick`` trades accuracy for ~0.2 s)."""
    return DeviceProfile(
        node_id=node_id,
        name=name,
        flops=measure_flops(threads, size=256 if quick else 512, reps=3 if quick else 5),
        mem_bandwidth_Bps=measure_bandwidth(threads, n_bytes=(16 if quick else 64) << 20, reps=3 if quick else 7),
        mem_bytes=available_memory(),
    )
