"""The MoE benchmark's pieces: replacement policies on hand-made traces (tier 1)."""

from __future__ import annotations

import numpy as np
import pytest

from edgevision.moe.policy import BeladyCache, LruCache, RoutingTrace, TraceRecorder, load_policy, simulate

# one layer, one expert per evaluation: the textbook sequence 1 2 3 1 4 1 2 with room for two
TEXTBOOK = RoutingTrace(tuple((0, (e,)) for e in (1, 2, 3, 1, 4, 1, 2)))


def test_lru_on_a_hand_trace_evicts_the_least_recently_used():
    cache = LruCache(2)
    hits = [cache.access([(0, e)])[0] for e in (1, 2, 3, 1, 4, 1, 2)]
    # 3 evicts 1, so the second 1 misses; only the third 1 (right after the second) hits
    assert hits == [0, 0, 0, 0, 0, 1, 0]
    assert cache.resident == {(0, 1), (0, 2)}
    assert simulate(TEXTBOOK, 2, "lru").hits == 1


def test_belady_on_a_hand_trace_keeps_what_is_used_soonest():
    cache = BeladyCache(2, [[(0, e)] for e in (1, 2, 3, 1, 4, 1, 2)])
    steps = [cache.access([(0, e)]) for e in (1, 2, 3, 1, 4, 1, 2)]
    # at 3: 1 comes back at step 3, 2 only at step 6, so 2 goes; at 4: 3 never comes back, so 3 goes
    assert [hits for hits, _ in steps] == [0, 0, 0, 1, 0, 1, 0]
    assert [evicted for _, evicted in steps][2:5] == [[(0, 2)], [], [(0, 3)]]
    assert cache.diverged == 0
    rate = simulate(TEXTBOOK, 2, "belady")
    assert (rate.hits, rate.accesses) == (2, 7)


def test_belady_is_never_beaten_by_lru_and_counts_a_diverging_run():
    rng = np.random.default_rng(7)
    events = tuple(
        (int(layer), tuple(sorted({int(e) for e in rng.zipf(1.5, 2) % 16}))) for layer in rng.integers(0, 4, 400)
    )
    trace = RoutingTrace(events)
    for capacity in (2, 6, 12, 24):
        assert simulate(trace, capacity, "belady").hits >= simulate(trace, capacity, "lru").hits
    cache = BeladyCache(4, trace.accesses())
    cache.access([(9, 9)])
    assert cache.diverged == 1


def test_trace_recorder_round_trips_through_a_file(tmp_path):
    recorder = TraceRecorder()
    recorder(0, np.array([[3, 1], [1, 5]], dtype=np.int32), np.ones((2, 2), dtype=np.float32))
    recorder(1, np.array([[2, 0]], dtype=np.int32), np.ones((1, 2), dtype=np.float32))
    trace = recorder.trace()
    assert trace.events == ((0, (1, 3, 5)), (1, (0, 2)))
    trace.save(tmp_path / "t.npz")
    assert RoutingTrace.load(tmp_path / "t.npz") == trace


def test_unknown_policy_names_the_known_ones():
    with pytest.raises(ValueError, match="expert-lru"):
        load_policy("fifo")
