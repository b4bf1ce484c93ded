"""Cost model and workload: the figures the planner reasons with."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshllm.model.config import ModelConfig
from meshllm.model.export import export, part_costs
from meshllm.model.llama2c import make_llama2c_config, random_llama2c_weights, write_llama2c
from meshllm.model.manifest import load_manifest
from meshllm.model.tokenizer import random_llama2c_vocab, write_tokenizer_bin
from meshllm.plan.cost import CostModel, ModelCosts, StageRef, Work, combined_link
from meshllm.plan.devices import load_device_classes, parse_devices
from meshllm.plan.errors import PlanError
from meshllm.plan.workload import LengthDist, Workload
from meshllm.profile import (
    SERVING_OVERHEAD_MIN_RUNS,
    SERVING_OVERHEAD_STEP,
    DeviceProfile,
    Link,
    serving_overhead_update,
)
from tests.test_plan_fixtures import LLAMA_1B, random_devices, random_model


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("plan-model")
    cfg = make_llama2c_config(64, 160, 4, 4, 2, 300, 128)
    write_llama2c(root / "m.bin", cfg, random_llama2c_weights(cfg, seed=3))
    write_tokenizer_bin(root / "tokenizer.bin", *random_llama2c_vocab(300, seed=3))
    export(root / "m.bin", root / "model")
    return root / "model"


def test_model_costs_from_manifest_match_the_exporters_price_list(tiny_model_dir: Path) -> None:
    m = load_manifest(tiny_model_dir)
    mc = ModelCosts.from_manifest(m)
    layer = m.part("layer.0").cost
    assert mc.n_layers == 4 and mc.max_seq_len == 128
    assert mc.layer_flops == (layer.flops_per_token,) * 4
    assert mc.layer_weight_bytes == (layer.runtime_weight_bytes,) * 4
    assert mc.head_weight_bytes == m.part("head").cost.runtime_weight_bytes
    assert mc == ModelCosts.from_config(m.config, name=m.name)


def test_synthetic_llama_costs_are_the_exporters_formula() -> None:
    cfg = ModelConfig(arch="llama", dim=2048, n_layers=32, n_heads=32, n_kv_heads=4, head_dim=64, ffn_dim=5632,
                      vocab_size=32000, max_seq_len=2048)
    layer = part_costs(cfg, "fp32")["layer"]
    assert LLAMA_1B.layer_flops[0] == layer.flops_per_token
    assert LLAMA_1B.layer_kv_bytes[0] == 2 * 256 * 4
    assert LLAMA_1B.total_weight_bytes == pytest.approx(6.16e9, rel=0.01)


def test_model_costs_json_round_trip_and_validation() -> None:
    assert ModelCosts.from_json(json.loads(json.dumps(LLAMA_1B.to_json()))) == LLAMA_1B
    with pytest.raises(PlanError, match="same length"):
        ModelCosts("bad", (1.0,), (1.0, 2.0), (1.0,), (1.0,), (1.0,), 0, 0, 0, 8)


def test_prefill_is_compute_bound_and_decode_memory_bound_growing_with_context() -> None:
    dev = DeviceProfile("a", "a", flops=50e9, mem_bandwidth_Bps=10e9, mem_bytes=int(8e9))
    cost = CostModel(LLAMA_1B, [dev])
    w = LLAMA_1B.total_weight_bytes - LLAMA_1B.embed_weight_bytes
    f = sum(LLAMA_1B.layer_flops) + LLAMA_1B.head_flops
    # decode: the bytes of weights (+KV) over the bandwidth, plus a little compute (additive roofline)
    assert cost.decode_time("a", 0, 32, context=10) == pytest.approx(w / 10e9 + f / 50e9, rel=0.01)
    assert w / 10e9 > 5 * f / 50e9
    assert cost.decode_time("a", 0, 32, context=1500) > cost.decode_time("a", 0, 32, context=10) * 1.02
    # prefill: about 2 x params x tokens FLOPs over the FLOP/s
    t512 = cost.prefill_time("a", 0, 32, 512)
    flops = 512 * (sum(LLAMA_1B.layer_flops) + 0) + LLAMA_1B.head_flops
    assert t512 == pytest.approx(flops / 50e9, rel=0.25)
    assert cost.prefill_time("a", 0, 32, 1024) > 1.9 * t512


def test_stage_table_and_coefficients_agree_with_the_scalar_model() -> None:
    rng = np.random.default_rng(5)
    cost = CostModel(random_model(rng, 6), random_devices(rng, 3))
    for work in (Work.prefill(17, 3), Work.decode(3, 120), Work.prefill(5) + Work.decode(2, 9).scale(3)):
        T = cost.stage_table([2, 0, 1], work, 0.0)
        for i, d in enumerate([2, 0, 1]):
            for a in range(6):
                for b in range(a + 1, 7):
                    t = cost.run_time(d, a, b, work)
                    if cost.fits(d, a, b, 0.0):
                        assert T[i, a, b] == pytest.approx(t, rel=1e-12)
                    vec = np.array([work.runs, work.tokens, work.attn, work.kv_tokens, work.head_tokens])
                    assert cost.run_coeffs(d, a, b) @ vec == pytest.approx(t, rel=1e-12)
        assert np.all(np.isinf(T[:, 3, 2]))


def test_links_use_a_measurement_from_either_end_else_the_worse_default() -> None:
    a = DeviceProfile("a", "a", 1e9, 1e9, 1, default_link=Link(1e-3, 1e8))
    b = DeviceProfile("b", "b", 1e9, 1e9, 1, default_link=Link(5e-3, 1e7))
    assert combined_link(a, b) == Link(5e-3, 1e7)
    c = DeviceProfile("c", "c", 1e9, 1e9, 1, links={"a": Link(2e-4, 5e8)})
    assert combined_link(a, c) == Link(2e-4, 5e8) == combined_link(c, a)
    cost = CostModel(LLAMA_1B, [a, b])
    assert cost.transfer_time("a", "b", 1e7) == pytest.approx(5e-3 + 1.0)
    assert cost.activation_time("a", "b", 5, 100) == pytest.approx(5e-3 + 100 * 2048 * 4 / 1e7)


def test_kv_handoff_sends_each_layer_to_its_new_holder_senders_in_parallel() -> None:
    devs = [DeviceProfile(f"n{i}", f"n{i}", 1e9, 1e9, 10**10, default_link=Link(1e-3, 1e8)) for i in range(4)]
    cost = CostModel(LLAMA_1B, devs)
    kv = LLAMA_1B.layer_kv_bytes[0] * 100  # one layer, 100 tokens
    # prefill [0,16) on n0, [16,32) on n1; decode [0,8) n2, [8,32) n3
    src = [StageRef(0, 0, 16), StageRef(1, 16, 32)]
    dst = [StageRef(2, 0, 8), StageRef(3, 8, 32)]
    n0 = (1e-3 + 8 * kv / 1e8) + (1e-3 + 8 * kv / 1e8)  # n0 sends 8 layers to n2 and 8 to n3
    n3 = (1e-3 + 8 * kv / 1e8) + (1e-3 + 16 * kv / 1e8)  # n3 receives 8 from n0 and 16 from n1
    assert cost.kv_handoff_time(src, dst, 100) == pytest.approx(max(n0, n3))


def test_device_classes_name_a_source_for_every_figure() -> None:
    classes = load_device_classes()
    assert {"rpi4", "rpi5", "jetson-nano", "jetson-orin-nano", "old-laptop", "mini-pc", "fog-server"} <= set(classes)
    for c in classes.values():
        assert set(c.sources) == {"flops", "mem_bandwidth_Bps", "mem_bytes", "link.latency_s", "link.bandwidth_Bps"}
        assert all(len(s) > 10 for s in c.sources.values())
        assert c.flops > 1e9 and c.mem_bandwidth_Bps > 1e9 and c.mem_bytes > 1e9
    assert classes["rpi5"].mem_bandwidth_Bps == 11.4e9


def test_device_files_mix_classes_and_measured_profiles() -> None:
    classes = load_device_classes()
    measured = DeviceProfile("bench", "bench", 1e11, 2e10, 8 * 10**9).to_json()
    devs = parse_devices([{"class": "rpi5", "name": "pi", "count": 2}, {"class": "mini-pc", "name": "box"},
                          measured], classes)
    assert [d.node_id for d in devs] == ["pi-1", "pi-2", "box", "bench"]
    assert devs[0].device_class == "rpi5" and devs[0].default_link == classes["rpi5"].link
    with pytest.raises(PlanError, match="unknown device class 'cray'"):
        parse_devices([{"class": "cray"}], classes)
    with pytest.raises(PlanError, match="unique"):
        parse_devices([{"class": "rpi5", "name": "x"}, {"class": "rpi4", "name": "x"}], classes)


# --- workload ------------------------------------------------------------------------


def test_workload_spec_and_json_round_trip() -> None:
    w = Workload.parse("in=512,out=128,rate=2,in_std=300")
    assert w.rate == 2 and w.input.mean == pytest.approx(512) and w.output.values == (128.0,)
    assert w.input.std == pytest.approx(300, rel=0.15)
    assert Workload.from_json(json.loads(json.dumps(w.to_json()))) == w
    j = Workload.from_json({"rate": 1, "input": {"samples": [10, 20, 30, 40]}, "output": 7})
    assert j.input.mean == 25 and j.output.mean == 7
    assert Workload.parse('{"rate": 1, "input": 100, "output": {"mean": 20, "std": 5}}').output.mean == \
        pytest.approx(20)


def test_workload_presets_keep_splitwise_shapes_scaled() -> None:
    w = Workload.parse("conversation,scale=0.25,rate=0.5")
    assert w.input.mean == pytest.approx(1155 * 0.25, rel=0.05)
    assert w.output.mean == pytest.approx(211 * 0.25, rel=0.05)
    assert w.input.std / w.input.mean == pytest.approx(1109 / 1155, rel=0.25)


@pytest.mark.parametrize("spec, message", [
    ("in=512,rate=1", "needs in= and out="), ("in=x,out=1", "not a number"), ("in=5,out=1,rate=0", "positive"),
    ("foo=1", "unknown key"), ("chatty", "preset"), ("coding,in=5", "only rate= and scale="),
])
def test_bad_workload_specs_say_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        Workload.parse(spec)


def test_decode_context_is_the_mean_cached_length_over_decode_steps() -> None:
    w = Workload.simple(100, 11, 1.0)  # 10 decode steps at 100..109 cached positions
    assert w.decode_tokens() == 10
    assert w.decode_context() == pytest.approx(104.5)
    assert w.context_budget() == 111
    d = LengthDist.from_mean_std(500, 400, hi=2000)
    assert d.mean == pytest.approx(500, rel=0.02) and max(d.values) <= 2000 and math.isclose(sum(d.weights), 1)


def test_a_gossiped_profile_the_cost_model_cannot_use_costs_only_its_member() -> None:
    from meshllm.serve.planning import member_profiles

    good = DeviceProfile("x", "x", flops=1e10, mem_bandwidth_Bps=1e9, mem_bytes=10**9, serving_overhead_s=0.002)
    bad_profiles = {
        "no-profile": None, "not-a-dict": [1, 2], "unknown-field": {**good.to_json(), "evil": 1},
        "string-flops": {**good.to_json(), "flops": "fast"}, "nan-bandwidth": {**good.to_json(),
                                                                               "mem_bandwidth_Bps": math.nan},
        "zero-memory": {**good.to_json(), "mem_bytes": 0}, "negative-overhead": {**good.to_json(),
                                                                                  "serving_overhead_s": -1e-3},
        "huge-overhead": {**good.to_json(), "serving_overhead_s": 5.0},
        "bool-overhead": {**good.to_json(), "serving_overhead_s": True},
        "bad-link": {**good.to_json()},
    }
    members = {k: {"profile": v} for k, v in bad_profiles.items()}
    members["bad-link"]["links"] = {"peer": {"latency_s": 1e-3}}  # a link without its bandwidth
    members["ok"] = {"profile": good.to_json(), "links": {"peer": {"latency_s": 1e-3, "bandwidth_Bps": 1e8}}}
    got = member_profiles(members)
    assert [p.node_id for p in got] == ["ok"]
    assert got[0].serving_overhead_s == 0.002 and got[0].links == {"peer": Link(1e-3, 1e8)}
    # the cost model names the device and the figure when handed such a profile directly
    with pytest.raises(PlanError, match="'y': serving_overhead_s must be a number of seconds in \\[0, 1\\)"):
        CostModel(LLAMA_1B, [dataclasses.replace(good, node_id="y", serving_overhead_s=-1.0)])
    with pytest.raises(PlanError, match="'y': flops must be a positive number"):
        CostModel(LLAMA_1B, [dataclasses.replace(good, node_id="y", flops=math.inf)])


def test_the_serving_overhead_is_a_per_run_term_that_a_bare_run_leaves_out() -> None:
    bare = random_devices(np.random.default_rng(5), 3)
    served = [dataclasses.replace(d, serving_overhead_s=1e-3 * (i + 1)) for i, d in enumerate(bare)]
    c_bare, c_served = CostModel(LLAMA_1B, bare), CostModel(LLAMA_1B, served)
    for i in range(3):
        for work in (Work.prefill(200), Work.decode(4, 300)):
            extra = c_served.run_time(i, 2, 9, work) - c_bare.run_time(i, 2, 9, work)
            assert extra == pytest.approx(work.runs * 1e-3 * (i + 1), rel=1e-9)
    assert [d.compute_only() for d in served] == bare
    assert bare[0].compute_only() is bare[0]


@given(st.floats(0, 0.05), st.floats(1e-5, 0.02), st.integers(0, 10_000))
def test_a_node_restates_its_serving_overhead_only_when_it_moved(advertised: float, per_run: float,
                                                                 runs: int) -> None:
    got = serving_overhead_update(advertised, per_run * runs, runs)
    if runs < SERVING_OVERHEAD_MIN_RUNS:
        assert got is None  # too few runs to say
        return
    figure = float(f"{per_run:.2g}")
    moved = abs(figure - advertised) > max(SERVING_OVERHEAD_STEP * advertised, 1e-4)
    assert got == (figure if moved else None)
    if got is not None:  # once restated, the same counters never restate it again (no churn)
        assert serving_overhead_update(got, per_run * runs, runs) is None


def test_serving_overhead_update_known_answers() -> None:
    assert serving_overhead_update(0.0, 0.0123, 10) is None  # 10 runs: not yet
    assert serving_overhead_update(0.0, 19 * 1e-3, 19) is None and serving_overhead_update(0.0, 20e-3, 20) == 1e-3
    assert serving_overhead_update(0.0, 30 * 1.234e-3, 30) == 1.2e-3  # the first figure, two digits
    assert serving_overhead_update(1.2e-3, 30 * 1.4e-3, 30) is None  # +17%: kept
    assert serving_overhead_update(1.2e-3, 30 * 1.6e-3, 30) == 1.6e-3  # +33%: restated
    assert serving_overhead_update(0.0, 30 * 5e-5, 30) is None  # 0.05 ms: not worth a replan
    assert serving_overhead_update(0.0, math.nan, 30) is None and serving_overhead_update(0.0, -1.0, 30) is None


def test_meshllm_status_shows_each_members_advertised_serving_overhead() -> None:
    from meshllm.mesh.status import render

    served = DeviceProfile("a", "a", flops=2e9, mem_bandwidth_Bps=1e9, mem_bytes=10**9, serving_overhead_s=0.0012)
    fresh = dataclasses.replace(served, node_id="b", name="b", serving_overhead_s=0.0)
    members = {p.node_id: {"profile": p.to_json(), "host": "10.0.0.1", "port": 7000} for p in (served, fresh)}
    lines = render({"mesh": "m", "broker": "b", "members": members, "planner": "a", "term": 1, "plan": None}
                   ).splitlines()
    assert next(line for line in lines if line.startswith("node")).split()[:7] == [
        "node", "GFLOP/s", "GB/s", "mem", "GB", "serve", "ms"]
    rows = {line.split()[0]: line.split() for line in lines if line.split() and line.split()[0] in members}
    assert rows["a"][1:5] == ["2.0", "1.0", "1.0", "1.20"] and rows["b"][1:5] == ["2.0", "1.0", "1.0", "-"]
