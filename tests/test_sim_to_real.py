"""Sim-to-real, small: a real 2-node mesh (real Mosquitto, real node processes, emulated devices)
serves a seeded Poisson stream, and the simulator replays the same stream on the same plan with
the cost model calibrated on the same runtime. The full comparison is ``python tools/sim_to_real.py``
(docs/evaluation.md); this test pins that the pipeline works end to end and that, at low load,
the simulator's service times are those of the mesh."""

from __future__ import annotations

from tools.sim_to_real import Setting, run

# one PREFILL device and one DECODE device, each 20x slower than this machine's one core
SMALL = Setting(scales={"p": 20.0, "d": 20.0},
                replicas=(("prefill", 2, (("p", 0, 6),)), ("decode", 4, (("d", 0, 6),))))


def test_real_mesh_and_simulator_agree_on_a_low_load_stream() -> None:
    out = run(SMALL, n_requests=8, load=0.3, seed=3, max_wall=60.0, n_calibration=0, log=lambda *_: None)
    assert out.real.completed == 8, out.notes  # every request streamed to its end
    assert not out.notes, out.notes  # and with exactly the planned prompt and output lengths
    sim = out.sims["segment-calibrated"]
    assert sim.completed == 8
    # At low load a request's latency is its service: prefill on "p", KV hand-off, one decode step
    # per token on "d". The calibrated simulation must find it, not the raw profile's guess.
    assert 0.6 < sim.e2e_mean / out.real.e2e_mean < 1.6, (sim, out.real)
    assert 0.6 < sim.ttft_mean / out.real.ttft_mean < 1.6, (sim, out.real)
    assert 0.75 < sim.throughput_rps / out.real.throughput_rps < 1.33, (sim, out.real)
    for node in SMALL.node_ids:  # each stage computed about as long in both
        assert 0.6 < out.busy_sim[node] / out.busy_real[node] < 1.6, (node, out.busy_sim, out.busy_real)
