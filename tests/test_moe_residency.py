"""Expert residency: the planner, the experts' byte ranges, pinning, online re-planning, buffer-type overrides
and `edgevision bench moe`.

Tier 1: the planner on hand-made layouts. Tier 3: a tiny synthetic Gemma-4 MoE (Q8_0, which llama.cpp serves
from its mapping on x86) in the real llama.cpp: the byte ranges hold exactly each expert's quantized weights,
and pinning, re-planning and placing expert tensors in the CPU buffer type never change the generated tokens.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgevision.errors import ConfigError
from edgevision.moe.layout import ExpertLayout, ExpertTensor, read_layout
from edgevision.moe.residency import plan_diff, plan_residency

TOOLS = Path(__file__).resolve().parent.parent / "tools"
ROOT = TOOLS.parent
PROMPT = "The camera sees a person standing next to a table."
KIB = 1024


def _layout(n_layer: int = 3, n_expert: int = 4, expert_bytes: int = 100, other: int = 1000) -> ExpertLayout:
    """A layout with one fused expert tensor per layer, `expert_bytes` per expert."""
    tensors = tuple(
        ExpertTensor(f"blk.{il}.ffn_gate_up_exps.weight", il, 10_000 * (il + 1), expert_bytes * n_expert, n_expert)
        for il in range(n_layer)
    )
    return ExpertLayout(Path("m.gguf"), 10**6, n_layer, n_expert, 2, tensors, other)


# -- tier 1: the planner --------------------------------------------------------------------------------


def test_plan_pins_the_hottest_mass_within_the_budget():
    layout = _layout()
    share = np.array(
        [
            [0.70, 0.20, 0.10, 0.00],
            [0.25, 0.25, 0.25, 0.25],
            [0.05, 0.05, 0.10, 0.80],
        ]
    )
    plan = plan_residency(layout, share, ram_budget=1000 + 3 * 100 + 99)  # room for 3 experts, not 4
    assert plan.pinned == ((0, 0), (1, 0), (2, 3))  # 0.80, 0.70, then the first of the 0.25 ties
    assert plan.pinned_bytes == 300 and plan.resident_bytes + plan.pinned_bytes <= plan.ram_budget
    assert plan.covered_mass == pytest.approx((0.7 + 0.25 + 0.8) / 3)

    # more budget pins more, never an expert the profile never saw routed
    everything = plan_residency(layout, share, ram_budget=10**6)
    assert (0, 3) not in everything.pinned and len(everything.pinned) == 11
    assert everything.covered_mass == pytest.approx(1.0)
    # the same inputs give the same plan; shares need not be normalized
    assert plan_residency(layout, share * 7, ram_budget=1399) == plan
    assert plan_diff(plan.pinned, everything.pinned) == ([], sorted(set(everything.pinned) - set(plan.pinned)))


def test_plan_weighs_mass_per_byte_and_refuses_an_impossible_budget():
    small = ExpertTensor("blk.0.ffn_down_exps.weight", 0, 0, 4 * 50, 4)
    big = ExpertTensor("blk.1.ffn_down_exps.weight", 1, 1000, 4 * 200, 4)
    layout = ExpertLayout(Path("m.gguf"), 10**6, 2, 4, 1, (small, big), 500)
    share = np.array([[0.4, 0.3, 0.2, 0.1], [0.5, 0.3, 0.2, 0.0]])
    plan = plan_residency(layout, share, ram_budget=500 + 150)
    assert plan.pinned == ((0, 0), (0, 1), (0, 2))  # 0.4/50 beats 0.5/200

    with pytest.raises(ConfigError, match="non-expert weights"):
        plan_residency(layout, share, ram_budget=499)
    with pytest.raises(ConfigError, match="calibrate"):
        plan_residency(layout, np.ones((3, 4)), ram_budget=10**6)


def test_gpu_takes_whole_evenly_routed_layers_and_the_rest_is_overridden_to_cpu():
    import re

    layout = _layout(n_layer=4)
    share = np.array([[1, 0, 0, 0], [1, 1, 1, 1], [2, 1, 1, 0], [1, 1, 1, 1]], dtype=float)
    plan = plan_residency(layout, share, ram_budget=1000 + 400, gpu_budget=2 * 400 + 10)
    assert plan.gpu_layers == (1, 3)  # the two uniform (highest-entropy) layers
    assert all(layer not in plan.gpu_layers for layer, _ in plan.pinned)
    ((pattern, buft),) = plan.tensor_overrides(layout)
    assert buft == "CPU"
    names = [f"blk.{il}.{kind}" for il in range(4) for kind in ("ffn_gate_up_exps.weight", "ffn_down_exps.scale")]
    on_cpu = {name.split(".")[1] for name in names if re.search(pattern, name)}
    assert on_cpu == {"0", "2"}
    assert not re.search(pattern, "blk.0.ffn_gate_inp.weight")  # the router stays with its layer


def test_memory_cgroup_says_plainly_when_it_cannot_be_made(monkeypatch):
    import os

    from edgevision.moe.cgroup import CgroupUnavailable, MemoryCgroup

    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # as a normal user
    with pytest.raises(CgroupUnavailable, match="needs root"):
        MemoryCgroup.create("edgevision-test", 2**30)


# -- tier 3: the real file and llama.cpp ----------------------------------------------------------------


@pytest.fixture(scope="module")
def make_synthetic():
    sys.path.insert(0, str(TOOLS))
    try:
        return importlib.import_module("make_synthetic")
    finally:
        sys.path.remove(str(TOOLS))


@pytest.fixture(scope="module")
def moe_q8(make_synthetic, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("moe") / "moe-q8_0.gguf"
    return make_synthetic.write_moe_decoder(path, ftype="q8_0", router_skew=1.5, n_ff_exp=256)


def _generate(path: Path, n: int = 24, **options) -> list[int]:
    from edgevision.decoder.llama import LlamaDecoder

    with LlamaDecoder(path, n_ctx=256, n_threads=1, **options) as decoder:
        decoder.prefill_tokens(decoder.tokenize(PROMPT))
        text_ids = []
        for _ in range(n):
            token = int(np.argmax(decoder.logits()))
            text_ids.append(token)
            decoder.prefill_tokens([token])
        return text_ids


@pytest.fixture(scope="module")
def baseline(moe_q8: Path) -> list[int]:
    return _generate(moe_q8)


def _locked_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmLck:"):
            return int(line.split()[1])
    raise AssertionError("no VmLck in /proc/self/status")


def test_byte_ranges_hold_exactly_each_experts_weights(make_synthetic, moe_q8: Path):
    import gguf

    spec = make_synthetic.MoeDecoderSpec(ftype="q8_0", router_skew=1.5, n_ff_exp=256)
    layout = read_layout(moe_q8)
    assert layout.moe_layers == (0, 1, 2, 3) and layout.n_expert == 8
    assert layout.other_bytes + layout.expert_total < layout.file_size
    data = moe_q8.read_bytes()
    weights = make_synthetic._Weights(spec.seed)  # the generator's own weights, quantized here independently
    n, ff = spec.n_embd, spec.n_ff_exp
    for layer in (0, 3):
        gate_up = weights.reader(f"blk.{layer}.ffn_gate_up_exps.weight", (8, 2 * ff, n))
        down = weights.writer(f"blk.{layer}.ffn_down_exps.weight", (8, n, ff))
        for expert in range(8):
            (a, b), (c, d), (e, f) = layout.expert_ranges(layer, expert)
            assert data[a:b] == gguf.quants.quantize(gate_up[expert], gguf.GGMLQuantizationType.Q8_0).tobytes()
            assert data[c:d] == gguf.quants.quantize(down[expert], gguf.GGMLQuantizationType.Q8_0).tobytes()
            assert f - e == 4  # the f32 per-expert output scale
    for tensor in layout.tensors:  # experts tile each tensor exactly
        starts = [tensor.expert_range(e)[0] for e in range(8)]
        assert starts[0] == tensor.offset and tensor.expert_range(7)[1] == tensor.offset + tensor.nbytes


def test_pinning_locks_and_prefaults_experts_and_never_changes_tokens(moe_q8: Path, baseline: list[int]):
    from edgevision.moe.pinning import ExpertPinner

    layout = read_layout(moe_q8)
    before = _locked_kib()
    hot = [(0, 0), (0, 1), (0, 2), (2, 5), (3, 7)]
    with ExpertPinner(layout) as pinner:
        pinner.lock_resident()
        change = pinner.pin(hot)
        assert change.pinned == 5 and pinner.pinned == set(hot)
        assert _locked_kib() - before == pinner.locked_bytes // KIB
        assert pinner.resident_fraction(hot) == 1.0
        assert _generate(moe_q8) == baseline

        # dropping a neighbour keeps the shared boundary page of the experts still pinned
        pinner.pin([(0, 0), (0, 2)])
        assert pinner.pinned == {(0, 0), (0, 2)} and pinner.resident_fraction([(0, 0), (0, 2)]) == 1.0
        assert _locked_kib() - before == pinner.locked_bytes // KIB
        assert _generate(moe_q8) == baseline
    assert _locked_kib() == before  # close unlocked everything


def test_online_replanning_follows_live_routing_and_never_changes_tokens(moe_q8: Path, baseline: list[int]):
    from edgevision.moe.online import OnlineResidency
    from edgevision.moe.pinning import ExpertPinner
    from edgevision.moe.router import RouterObserver

    layout = read_layout(moe_q8)
    observer = RouterObserver.for_model(moe_q8)
    budget = layout.other_bytes + 8 * layout.expert_bytes(0)  # room for 8 experts
    wrong_prior = np.tile(np.arange(8, dtype=float), (4, 1))  # prefers expert 7, then 6, ...
    with (
        ExpertPinner(layout) as pinner,
        OnlineResidency(
            layout,
            pinner,
            wrong_prior,
            ram_budget=budget,
            replan_every=4,
            half_life=1e9,
            prior_tokens=1e-3,
            prefetch=True,
        ) as online,
    ):
        observer.listeners.append(online.observe)
        online.start()
        assert pinner.pinned == {(layer, e) for layer in range(4) for e in (6, 7)}
        assert _generate(moe_q8, cb_eval=observer) == baseline
        online.drain()
        stats = online.stats
        assert stats.replans >= 1 and stats.pins_moved > 0
        assert online.prefetches > 0  # experts the router chose outside the pins were read ahead
        live = observer.profile("m").share()  # the pins are now the 8 experts with the most live mass
        ranked = sorted((-live[layer, e], layer, e) for layer in range(4) for e in range(8) if live[layer, e] > 0)
        assert pinner.pinned == {(layer, e) for _, layer, e in ranked[:8]}


def test_expert_tensors_overridden_to_the_cpu_buffer_type_load_and_match(moe_q8: Path, baseline: list[int]):
    from edgevision.decoder.llama import LlamaDecoder
    from edgevision.moe import buft

    assert "CPU" in buft.buffer_types()
    plan = plan_residency(read_layout(moe_q8), np.ones((4, 8)), ram_budget=10**9)
    overrides = plan.tensor_overrides(read_layout(moe_q8))  # no GPU layers: every layer's experts on the CPU
    assert _generate(moe_q8, tensor_overrides=overrides) == baseline
    with pytest.raises(ConfigError, match="CUDA0"):
        LlamaDecoder(moe_q8, tensor_overrides=[("_exps", "CUDA0")])


@pytest.mark.board
def test_cuda_placement_keeps_cpu_layers_experts_in_ram(moe_q8: Path, baseline: list[int]):
    from edgevision.moe import buft

    if not buft.has_gpu():
        pytest.skip("needs a CUDA build of llama.cpp and a GPU (a Jetson board): this build has only the CPU")
    layout = read_layout(moe_q8)
    plan = plan_residency(layout, np.ones((4, 8)), ram_budget=10**9, gpu_budget=2 * layout.layer_bytes(0))
    assert len(plan.gpu_layers) == 2
    tokens = _generate(moe_q8, n_gpu_layers=-1, tensor_overrides=plan.tensor_overrides(layout))
    assert tokens[:8] == baseline[:8]  # GPU kernels round differently; the greedy start agrees


def test_bench_moe_command_runs_every_configuration(moe_q8: Path, tmp_path: Path):
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    (calibration / "prompts.txt").write_text("What is in front of me?\nDescribe the room.\n")
    (calibration / "heldout.txt").write_text("Is the path ahead safe to walk?\n")
    cmd = [sys.executable, "-m", "edgevision", "bench", "moe", "--model", str(moe_q8), "--tokens", "4"]
    cmd += ["--calibration", str(calibration), "--cap-mib", "600", "--threads", "1", "--repeats", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "unconstrained (mmap)" in out and "read_ahead_kb" in out  # the storage settings are in the header
    if "memory-capped runs skipped" not in out:  # needs root and a memory cgroup
        rows = {line.split("  ")[0]: line for line in out.splitlines()}
        for row in ("plain mmap", "expert LRU", "router-aware", "Belady (ceiling)"):
            assert row in rows and rows[row].rstrip().split("  ")[-1], row
        # top-1 agreement: residency decides only which pages stay in RAM, never the tokens
        assert "100.0%" in rows["plain mmap"] and "100.0%" in rows["router-aware"]
        assert "router-aware / plain mmap under the cap" in out

    missing = subprocess.run(
        [sys.executable, "-m", "edgevision", "bench", "moe", "--model", str(tmp_path / "none.gguf")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert missing.returncode == 2 and "make bench-model" in missing.stderr
