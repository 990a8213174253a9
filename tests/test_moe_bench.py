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


# -- routing presets on tiny generated models (tier 3: the real llama.cpp) ------------------------------


def _preset_report(tmp_path_factory, preset):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install llama-cpp-python==0.3.36")
    import sys
    from pathlib import Path

    tools = Path(__file__).resolve().parent.parent / "tools"
    sys.path.insert(0, str(tools))
    try:
        import make_synthetic
    finally:
        sys.path.remove(str(tools))
    from edgevision.moe.routing import routing_report

    spec = make_synthetic.MoeDecoderSpec(
        n_layer=4,
        n_embd=128,
        n_head=4,
        n_ff=128,
        n_ff_exp=32,
        n_expert=32,
        n_expert_used=2,
        **make_synthetic.PRESETS[preset],
    )
    path = make_synthetic.write_moe_decoder(tmp_path_factory.mktemp(preset) / "model.gguf", spec)
    calibration = Path(__file__).resolve().parent.parent / "calibration"
    return routing_report(path, calibration, tokens=16, n_threads=1)


def test_static_preset_routes_the_same_whatever_the_questions(tmp_path_factory):
    report = _preset_report(tmp_path_factory, "static")
    assert report.calibration.hottest_quarter().mean() > 0.85
    # a hot list learned on the calibration questions serves the held-out ones as well as their own
    from edgevision.moe.routing import covered_by

    transfer = covered_by(report.calibration.mass, report.heldout.mass).mean()
    assert transfer > report.heldout.hottest_quarter().mean() - 0.03


def test_realistic_low_skew_preset_spreads_the_load(tmp_path_factory):
    report = _preset_report(tmp_path_factory, "realistic-0.5")
    for routing in (report.calibration, report.heldout):
        assert 0.45 <= routing.hottest_quarter().mean() <= 0.62
    assert report.image_mass is not None


def test_realistic_local_preset_has_temporal_locality_and_poor_transfer(tmp_path_factory):
    from edgevision.moe.routing import covered_by, hottest_share, mask_hottest

    report = _preset_report(tmp_path_factory, "realistic-0.7")
    for routing in (report.calibration, report.heldout):
        lru25, lru12 = routing.lru(0.25).mean(), routing.lru(0.125).mean()
        assert 0.65 <= lru25 <= 0.85, lru25
        assert 0.55 <= lru12 <= 0.75, lru12
        assert routing.lru(0.25, "belady").mean() >= lru25
        assert 0.65 <= routing.hottest_quarter().mean() <= 0.9
    # what the calibration set made hot carries clearly less of the held-out routing than the held-out's own
    transfer = covered_by(report.calibration.mass, report.heldout.mass).mean()
    assert transfer < report.heldout.hottest_quarter().mean() - 0.05
    # image-like rows route differently from text: at most half of their hottest quarter is the text's
    text_hot = mask_hottest(report.calibration.mass + report.heldout.mass, 0.25)
    image_hot = mask_hottest(report.image_mass, 0.25)
    assert (text_hot & image_hot).sum() / image_hot.sum() <= 0.5
    assert hottest_share(report.image_mass, 0.25).mean() < report.heldout.hottest_quarter().mean()


def test_residency_probe_sees_whether_the_chosen_experts_are_in_ram(tmp_path):
    import sys
    from pathlib import Path

    tools = Path(__file__).resolve().parent.parent / "tools"
    sys.path.insert(0, str(tools))
    try:
        import make_synthetic
    finally:
        sys.path.remove(str(tools))
    from edgevision.moe.cgroup import drop_page_cache
    from edgevision.moe.layout import read_layout
    from edgevision.moe.probe import ResidencyProbe

    path = make_synthetic.write_moe_decoder(tmp_path / "m.gguf", n_expert=8, n_ff_exp=1024, n_embd=256)
    layout = read_layout(path)
    probe = ResidencyProbe(layout)
    try:
        ids = np.array([[1, 6]], dtype=np.int32)
        probe(0, ids, np.ones((1, 2), np.float32))
        assert probe.accesses == 0  # inactive: outside the timed decode steps
        probe.active = True
        if drop_page_cache(path) > 0.0:
            pytest.skip("the page cache keeps this file (a tmpfs?): residency cannot be dropped here")
        probe(0, ids, np.ones((1, 2), np.float32))
        assert (probe.hits, probe.accesses) == (0, 2)
        with open(path, "rb") as f:  # read expert 6 of layer 0 (all its tensors) into the page cache
            for start, end in layout.expert_ranges(0, 6):
                f.seek(start)
                f.read(end - start)
        probe(0, ids, np.ones((1, 2), np.float32))
        assert (probe.hits, probe.accesses) == (1, 4)
    finally:
        probe.close()


def test_table_compares_the_policies_and_never_hides_a_failed_row():
    from edgevision.moe.bench import RunResult
    from edgevision.moe.bench_table import table

    ref = [[1, 2, 3]]
    free = RunResult("unconstrained (mmap)", tokens_per_s=160, top1=ref)
    plain = RunResult("plain mmap", tokens_per_s=40, read_bytes_per_token=13.4e6, pages_in=80, pages=100, top1=ref)
    aware = RunResult(
        "router-aware",
        tokens_per_s=60,
        read_bytes_per_token=4e6,
        hits=8,
        accesses=10,
        pages_in=9,
        pages=10,
        top1=[[1, 2, 4]],
    )
    lru = RunResult("expert LRU", error="killed (out of memory under the cap?)")
    belady = RunResult(
        "Belady (ceiling)",
        tokens_per_s=70,
        read_bytes_per_token=3e6,
        hits=9,
        accesses=10,
        pages_in=95,
        pages=100,
        top1=ref,
    )
    rows = [(free, "no cap"), (plain, "cap"), (lru, "cap"), (aware, "cap"), (belady, "cap")]
    text = "\n".join(table(rows, ref, bandwidth=2e9))
    assert "router-aware / plain mmap under the cap: 1.50x" in text
    assert "router-aware / expert LRU" not in text  # the LRU row failed: no ratio made up for it
    assert "killed (out of memory under the cap?)" in text
    assert "66.7%" in text  # top-1 agreement of the row that changed one token
    assert "5.0 points below Belady's" in text  # pages in RAM: 95% against 90%
    # the storage model: 1 / (1/160 + 13.4e6 / 2e9) = 77.2 tokens/s for plain mmap
    assert "77.2" in text.splitlines()[3]


def test_table_puts_top1_agreement_and_kl_beside_the_speed_of_rerouting():
    """Cache-aware routing changes the model: its row's speed-up is printed with the top-1 agreement and the KL
    of its next-token distributions against the reference run's; unchanged rows show KL 0."""
    import math

    from edgevision.moe.bench import RunResult
    from edgevision.moe.bench_table import table

    ref = [[1, 2, 3, 4]]
    same = [[[math.log(0.5), math.log(0.25)]] * 4]  # the reference's two likeliest tokens, the rest holds 0.25
    moved = [[[math.log(0.5), math.log(0.25)]] * 3 + [[math.log(0.25), math.log(0.5)]]]
    free = RunResult("unconstrained (mmap)", tokens_per_s=160, top1=ref, logprobs=same)
    plain = RunResult("plain mmap", tokens_per_s=40, median_tokens_per_s=32, top1=ref, logprobs=same)
    exact = RunResult("router-aware", tokens_per_s=50, top1=ref, logprobs=same)
    rerouted = RunResult(
        "router-aware (reroute=1.0)", tokens_per_s=80, median_tokens_per_s=72, top1=[[1, 2, 3, 9]], logprobs=moved
    )
    rows = [(free, "no cap"), (plain, "cap"), (exact, "cap"), (rerouted, "cap")]
    text = "\n".join(table(rows, ref, reference_logprobs=same))
    assert "router-aware / plain mmap under the cap: 1.25x" in text  # the exact policy's ratio, as before
    # one position of four moved: KL there 0.5 ln 2 + 0.25 ln 0.5 = 0.1733 nats, mean 0.0433
    assert (
        "router-aware (reroute=1.0) / plain mmap under the cap: 2.00x; of the medians of the repeats 2.25x; it "
        "changes the model's output: top-1 agreement 75.0%, KL 0.0433 nats"
    ) in text
    exact_row = next(line for line in text.splitlines() if line.startswith("router-aware   "))
    rerouted_row = next(line for line in text.splitlines() if line.startswith("router-aware (reroute=1.0) cap"))
    assert " 0.0000 " in exact_row and " 0.0433 " in rerouted_row
