"""Sim-to-real, small: a real 2-node mesh (real Mosquitto, real node processes, emulated devices)
serves a seeded Poisson stream near its capacity, and the simulator replays the same stream on the
same plan. The nodes emulate their devices with ``--emulate-timing model`` (each stage run lasts
what the cost model predicts for the node's advertised profile), so what is compared is the
simulator's model of the serving system: queues, decode batching, the KV hand-off, routing. The
full comparison is ``python tools/sim_to_real.py --timing model`` (docs/evaluation.md)."""

from __future__ import annotations

from meshllm.profile import SERVING_OVERHEAD_STEP
from tools.sim_to_real import Setting, run

# one PREFILL device and one DECODE device, about 20x slower than this machine's one core, with pinned figures:
# measured ones (``--quick-profile``) swung 2x from run to run here, and with them every modeled time, so that the
# host's fixed overheads weighed from 10% to 45% of a request and the comparison failed at random
SMALL = Setting(scales={"p": 20.0, "d": 20.0},
                replicas=(("prefill", 2, (("p", 0, 6),)), ("decode", 4, (("d", 0, 6),))),
                devices={"p": {"flops": 4e9, "mem_bandwidth_Bps": 1.0e9, "mem_bytes": 4e9},
                         "d": {"flops": 4e9, "mem_bandwidth_Bps": 1.5e9, "mem_bytes": 4e9}})


def test_real_mesh_and_simulator_agree_near_capacity() -> None:
    # a calibration stream of 30 requests: the PREFILL node makes 20 runs or more, enough to advertise its overhead
    out = run(SMALL, n_requests=40, load=0.85, seed=3, max_wall=90.0, log=lambda *_: None, timing="model",
              n_calibration=30)
    assert out.real.completed == 40, out.notes  # every request streamed to its end
    assert not out.notes, out.notes  # and with exactly the planned prompt and output lengths
    sim = out.sims["raw profile"]
    assert sim.completed == 40
    # docs/evaluation.md measures these within 20% on the 4-node setting; the bounds here leave room for
    # a busy CI machine (the mesh's Python and MQTT overheads are the part the simulator does not model)
    assert 0.6 < sim.e2e_mean / out.real.e2e_mean < 1.4, (sim, out.real)
    # the simulator does not model intake (the MQTT hops to the planner and to the PREFILL stage, tokenizing,
    # dispatch): on this 2-core machine that adds 60-120 ms to each real first token (measured 2026-12-03,
    # ratio 0.45-0.78 on the commit before the security work and after it alike), and 250 ms in one clean-clone CI
    # run (2026-12-03 12:10 UTC, pinned devices; every request alike: wait p50 0.37 s real vs 0.09 s simulated), so
    # the bound is on the gap
    assert -0.03 < out.real.ttft_mean - sim.ttft_mean < 0.35, (sim, out.real)
    assert 0.85 < sim.throughput_rps / out.real.throughput_rps < 1.15, (sim, out.real)
    for node in SMALL.node_ids:  # each stage was busy about as long in both
        assert 0.7 < out.busy_sim[node] / out.busy_real[node] < 1.3, (node, out.busy_sim, out.busy_real)
    # every node measured its serving overhead per stage run on the calibration stream (about 1 ms on this
    # machine; the bound is loose for a busy CI machine) and advertised it in its gossiped profile: the figure its
    # stats show, rounded, and restated only when it moves by a quarter (meshllm.profile.serving_overhead_update)
    assert set(out.overhead) == set(out.advertised) == set(SMALL.node_ids), (out.overhead, out.advertised)
    assert all(0 < o < 0.05 for o in out.overhead.values()), out.overhead
    # (restated when the figure moves by more than SERVING_OVERHEAD_STEP of the advertised one or 0.1 ms: so the
    # two may differ by that much, and by a little more, since the stats are read a moment after the node's last
    # check; a bound of 0.3 on advertised / measured - 1 failed once at 1.4 ms against 1.07, within the rule)
    assert all(abs(out.overhead[n] - out.advertised[n]) <= 1.2 * max(SERVING_OVERHEAD_STEP * out.advertised[n], 1e-4)
               for n in SMALL.node_ids), (out.advertised, out.overhead)
    # the simulation on the advertised profiles (what the planner now sees) served every request, and it charged
    # the overhead: every request took longer than on the bare profiles
    assert out.sims["advertised profile"].completed == 40
    assert out.sims["advertised profile"].e2e_mean > sim.e2e_mean, out.sims
    # the planner measured its dispatch (routing a prompt to having sent it, its route journaled first: a broker
    # round trip, about 1-2 ms here) on both streams, and the simulation that charges it waits longer
    assert 0 < out.dispatch < 0.1 and 0 < out.dispatch_measured < 0.1, (out.dispatch, out.dispatch_measured)
    charged = out.sims["advertised + dispatch"]
    assert charged.completed == 40
    assert charged.wait_mean > out.sims["advertised profile"].wait_mean, out.sims
