"""The batching step shared by the stage and the simulator (meshllm/serve/batching.py): pure, property-tested."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshllm.serve.batching import Lanes, lanes_for, next_batch, prompts_together, stragglers

QUEUES = st.lists(st.none() | st.sampled_from([f"s{i}" for i in range(24)]), max_size=40)


@settings(max_examples=300, deadline=None)
@given(QUEUES, st.integers(1, 4), st.integers(1, 20), st.booleans())
def test_next_batch_is_the_first_steps_lane_once_each_and_bounded(waiting, n_lanes, max_batch, use_lanes) -> None:
    lanes = Lanes(n_lanes) if use_lanes else None
    chosen = next_batch(waiting, lanes, max_batch)
    seqs = [waiting[i] for i in chosen]
    assert chosen == sorted(chosen) and len(chosen) <= max_batch
    assert None not in seqs and len(set(seqs)) == len(seqs)
    steps = [s for s in waiting if s is not None]
    if not steps:
        assert chosen == []
        return
    assert seqs[0] == steps[0]  # the oldest step always runs: nothing starves
    if lanes is not None:
        assert len({lanes.lane_of(s) for s in seqs}) == 1
        lane = lanes.lane_of(seqs[0])
        same = list(dict.fromkeys(s for s in steps if lanes.lane_of(s) == lane))
        assert seqs == same[:max_batch]  # every queued step of the lane, in arrival order, up to the bound
    else:
        assert seqs == list(dict.fromkeys(steps))[:max_batch]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5), st.lists(st.tuples(st.booleans(), st.integers(0, 30)), max_size=80))
def test_lanes_stay_balanced_as_sequences_join(n_lanes, ops) -> None:
    """Joining fills the smallest lane, so lanes differ by at most one as long as nobody leaves; a sequence
    keeps its lane."""
    lanes = Lanes(n_lanes)
    first: dict[int, int] = {}
    left = False
    for join, seq in ops:
        if join:
            lane = lanes.lane_of(seq)
            assert first.setdefault(seq, lane) == lane
        else:
            lanes.drop(seq)
            left = left or seq in first
            first.pop(seq, None)
        sizes = [len(lanes.members(i)) for i in range(n_lanes)]
        assert sum(sizes) == len(first)
        if not left:
            assert max(sizes) - min(sizes) <= 1


def test_a_stage_splits_sixteen_sequences_into_one_lane_per_stage() -> None:
    lanes = Lanes(3)
    seqs = [f"s{i}" for i in range(16)]
    waiting = [*seqs, None, *seqs]  # two rounds of steps queued and a prompt between them
    batches = []
    while any(s is not None for s in waiting):
        chosen = next_batch(waiting, lanes, 16)
        batches.append([waiting[i] for i in chosen])
        waiting = [s for i, s in enumerate(waiting) if i not in chosen]
    assert [len(b) for b in batches] == [6, 5, 5, 6, 5, 5]
    assert batches[:3] == batches[3:]


def test_stragglers_are_the_missing_steps_of_the_batchs_lane_only() -> None:
    lanes = Lanes(2)
    for s in ("a", "b", "c", "d"):
        lanes.lane_of(s)  # a, c in lane 0; b, d in lane 1
    decoding = {"a", "b", "c", "d"}
    assert stragglers(["a"], lanes, decoding) == {"c"}
    assert stragglers(["b", "d"], lanes, decoding) == set()
    assert stragglers(["a"], None, decoding) == {"b", "c", "d"}
    lanes.drop("c")
    assert stragglers(["a"], lanes, decoding - {"c"}) == set()


def test_a_stage_needs_a_lane() -> None:
    with pytest.raises(ValueError):
        Lanes(0)


def test_one_lane_per_machine_the_stages_run_on() -> None:
    assert lanes_for(["a", "b", "c"]) == 3
    assert lanes_for(["127.0.0.1"] * 3) == 1  # the loopback mesh: its stages share the machine's cores
    assert lanes_for(["h1", "h1", "h2"]) == 2
    assert lanes_for([]) == 1


def test_one_lane_is_one_batch_of_every_sequence_held() -> None:
    """With one lane the first stage runs every step waiting and waits for every sequence it decodes."""
    lanes = Lanes(1)
    waiting = ["a", None, "b", "a", "c"]
    assert next_batch(waiting, lanes, 16) == [0, 2, 4]
    assert stragglers(["a", "b"], lanes, {"a", "b", "c", "d"}) == {"c"}  # d has not run here yet


@settings(max_examples=300, deadline=None)
@given(st.lists(st.none() | st.integers(1, 200), min_size=1, max_size=40), st.integers(1, 16), st.integers(1, 600))
def test_prompts_together_lead_with_the_first_and_stay_within_both_bounds(waiting, max_rows, max_tokens) -> None:
    chosen = prompts_together(waiting, max_rows, max_tokens)
    assert chosen[0] == 0 and chosen == sorted(set(chosen))  # the first prompt always runs: nothing starves
    if len(chosen) == 1:
        return
    sizes = [waiting[i] for i in chosen]
    assert None not in sizes  # only prompts that can join, and only with a first that can
    assert len(chosen) <= max_rows and len(chosen) * max(s for s in sizes if s is not None) <= max_tokens
    # greedy in arrival order: a joinable prompt left out would not have fitted when its turn came
    taken = [0]
    for i in range(1, len(waiting)):
        n = waiting[i]
        if i in chosen:
            taken.append(i)
        elif n is not None and len(taken) < max_rows and i < chosen[-1]:
            longest = max(waiting[j] for j in taken)  # type: ignore[type-var]
            assert max(longest, n) * (len(taken) + 1) > max_tokens


def test_a_burst_of_short_prompts_is_one_step() -> None:
    queue: list[object] = [9, None, 11, "x", 10, 12]
    assert prompts_together([n if isinstance(n, int) else None for n in queue], 16, 512) == [0, 2, 4, 5]
    assert prompts_together([9, 11, 10, 12], 2, 512) == [0, 1]  # as many rows as the segment holds
    assert prompts_together([100, 300, 20], 16, 256) == [0, 2]  # 2 x 300 > 256: the long one waits its turn
    assert prompts_together([None, 5, 5], 16, 512) == [0]  # a prompt that cannot join runs alone
    assert prompts_together([], 16, 512) == []
