"""`edgevision prune`: REAP saliency from the running graph, GGUF expert slicing without re-quantizing, and
the quality report.

Tier 1: expert choice, budgets, sizes. Tier 3: synthetic Gemma-4 MoE decoders (tools/make_synthetic.py)
sliced and loaded back into the real llama.cpp; the real CLI as a subprocess.
"""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgevision.errors import InputError
from edgevision.moe.prune import choose_experts, parse_size

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools"


# -- tier 1 ---------------------------------------------------------------------------------------------


def test_choose_experts_keeps_the_most_salient_and_breaks_ties_by_mass():
    saliency = np.array([[0.1, 0.9, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0]])
    mass = np.array([[1, 1, 1, 1], [0, 3, 2, 0.0]])
    kept = choose_experts(saliency, 2, mass)
    assert kept.tolist() == [[1, 3], [1, 2]]  # ascending ids; layer 1 all-zero saliency: by mass
    with pytest.raises(InputError):
        choose_experts(saliency, 5)


def test_parse_size():
    assert parse_size("800MiB") == 800 * 2**20
    assert parse_size("6.5G") == int(6.5 * 2**30)
    assert parse_size("123456") == 123456
    for bad in ("lots", "-1M", "0"):
        with pytest.raises(InputError):
            parse_size(bad)


# -- tier 3 ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def make_synthetic():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install llama-cpp-python==0.3.36")
    sys.path.insert(0, str(TOOLS))
    try:
        import make_synthetic
    finally:
        sys.path.remove(str(TOOLS))
    return make_synthetic


@pytest.fixture(scope="module")
def models(make_synthetic, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("moe-prune")
    return {
        "q4_0": make_synthetic.write_moe_decoder(folder / "q4_0.gguf", ftype="q4_0", n_expert=8, n_expert_used=2),
        "f32": make_synthetic.write_moe_decoder(folder / "f32.gguf", n_expert=8, n_expert_used=2),
        # strongly skewed routing: most of each layer's 16 experts never run
        "skew": make_synthetic.write_moe_decoder(folder / "skew.gguf", router_skew=3.0, n_expert=16, n_expert_used=2),
    }


def test_keeping_every_expert_writes_the_same_bytes(models: dict[str, Path], tmp_path: Path):
    from edgevision.moe.slicing import write_pruned

    for ftype in ("f32", "q4_0"):
        out = write_pruned(models[ftype], tmp_path / f"{ftype}.gguf", np.tile(np.arange(8), (4, 1)))
        assert filecmp.cmp(models[ftype], out, shallow=False), f"{ftype}: a no-op prune changed the file"


def test_pruned_model_loads_with_consistent_metadata_and_the_kept_experts_bytes(
    models: dict[str, Path], tmp_path: Path
):
    import gguf

    from edgevision.decoder.llama import LlamaDecoder
    from edgevision.moe.slicing import KEPT_KEY, inspect_moe, write_pruned

    source = models["q4_0"]
    kept = np.array([[0, 2, 5], [1, 6, 7], [3, 4, 5], [0, 1, 7]])
    out = write_pruned(source, tmp_path / "pruned.gguf", {il: kept[il][::-1] for il in range(4)})  # any order

    info = inspect_moe(out)
    assert (info.n_expert, info.n_expert_used, info.n_layer) == (3, 2, 4)
    assert out.stat().st_size < source.stat().st_size
    assert abs(out.stat().st_size - inspect_moe(source).pruned_size(3)) < 4096  # the estimate used for budgets
    old, new = gguf.GGUFReader(source), gguf.GGUFReader(out)
    assert np.array_equal(np.asarray(new.get_field(KEPT_KEY).contents()).reshape(4, 3), kept)
    old_tensors = {t.name: t for t in old.tensors}
    sliced = 0
    for tensor in new.tensors:
        before = old_tensors[tensor.name]
        assert tensor.tensor_type == before.tensor_type  # nothing re-quantized
        if list(tensor.shape) == list(before.shape):
            assert np.array_equal(tensor.data, before.data), tensor.name
            continue
        sliced += 1
        assert int(tensor.shape[-1]) == 3 and int(before.shape[-1]) == 8
        layer = int(tensor.name.split(".")[1])
        # each kept expert's raw bytes (quantized blocks and all) are copied unchanged
        assert np.array_equal(np.asarray(tensor.data), np.asarray(before.data)[kept[layer]]), tensor.name
    assert sliced == 4 * 4  # router rows, gate_up, down and the per-expert scale of every layer

    with LlamaDecoder(out, n_ctx=128, n_threads=1) as decoder:
        assert decoder.meta("gemma4.expert_count") == "3"
        assert int(decoder.meta("gemma4.expert_used_count")) <= 3
        decoder.prefill_tokens(decoder.tokenize("<|turn>user\nWhat is on the table?"))
        assert len("".join(decoder.generate(8, stop_on_eog=False))) > 0

    with pytest.raises(InputError, match="fewer than the 2 each token uses"):
        write_pruned(source, tmp_path / "x.gguf", np.zeros((4, 1), dtype=int))
    with pytest.raises(InputError, match="same number"):
        write_pruned(source, tmp_path / "x.gguf", {0: [0, 1], 1: [0, 1, 2], 2: [0, 1], 3: [0, 1]})


def test_dropping_never_used_experts_keeps_the_answers(models: dict[str, Path], tmp_path: Path):
    from edgevision.moe.calibrate import load_calibration, read_questions, run_calibration
    from edgevision.moe.prune import SaliencyObserver, compare_models, prune_file

    source = models["skew"]
    observer = SaliencyObserver.for_model(source)
    run_calibration(source, load_calibration(ROOT / "calibration"), observer, max_tokens=8, n_threads=1)
    saliency = observer.saliency
    assert ((saliency > 0) == (observer.routed > 0)).all()  # REAP: only experts that ran have saliency
    assert np.array_equal(observer.routed, observer.counts.sum(axis=0))
    # the other criteria rank by the same measurements, summed instead of averaged
    assert observer.scores("reap-sum") == pytest.approx(saliency * observer.routed)
    assert np.array_equal(observer.scores("mass"), observer.mass.sum(axis=0))
    with pytest.raises(InputError, match="unknown pruning criterion"):
        observer.scores("random")
    unused = (observer.routed == 0).sum(axis=1)
    assert unused.min() >= 8, "the skewed model should leave most experts idle"
    keep = 16 - int(unused.min())
    kept = prune_file(source, tmp_path / "pruned.gguf", saliency, keep, observer.mass.sum(axis=0))
    for il in range(4):  # every expert that ran is kept
        assert set(np.flatnonzero(observer.routed[il])) <= set(kept[il].tolist())

    quality = compare_models(
        source, tmp_path / "pruned.gguf", read_questions(ROOT / "calibration" / "heldout.txt"), n_threads=1
    )
    assert quality.positions == 6 * 24
    assert quality.agreement >= 0.99 and quality.mean_kl < 0.01, quality

    # keeping the two least salient experts instead (never used) damages the answers, and the report shows it
    from edgevision.moe.slicing import write_pruned

    write_pruned(source, tmp_path / "bad.gguf", np.argsort(saliency, axis=1, kind="stable")[:, :2])
    damaged = compare_models(source, tmp_path / "bad.gguf", ["Where are my keys?"], max_tokens=12, n_threads=1)
    assert damaged.agreement < quality.agreement and damaged.mean_kl > 10 * quality.mean_kl


def test_prune_command_fits_a_budget(models: dict[str, Path], tmp_path: Path):
    from edgevision.moe.slicing import inspect_moe

    source = models["f32"]
    info = inspect_moe(source)
    budget = info.pruned_size(5) + 1000  # room for 5 of the 8 experts, not 6
    out = tmp_path / "fit.gguf"
    result = subprocess.run(
        [sys.executable, "-m", "edgevision", "prune", "--decoder", str(source), "--budget", str(budget),
         "--no-images", "--out", str(out), "--threads", "1", "--max-tokens", "4", "--report-tokens", "4"],
        check=False, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size <= budget
    assert inspect_moe(out).n_expert == 5
    assert "5 of 8 experts per layer" in result.stdout
    assert "top-1 next-token agreement" in result.stdout and "mean KL" in result.stdout

    too_small = subprocess.run(
        [sys.executable, "-m", "edgevision", "prune", "--decoder", str(source), "--budget", "1MiB", "--no-images"],
        check=False, capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert too_small.returncode == 2 and "too small" in too_small.stderr


def _gelu(x: np.ndarray) -> np.ndarray:
    """ggml's GELU (the tanh approximation)."""
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def test_saliency_is_gate_times_each_experts_output_norm(models: dict[str, Path]):
    """The expert outputs read from the graph equal Gemma 4's expert FFN computed in numpy from the GGUF
    weights on the experts' input captured from the same graph."""
    import gguf

    from edgevision.decoder.llama import LlamaDecoder
    from edgevision.decoder.native import tensor_array, tensor_name
    from edgevision.moe.prune import SaliencyObserver

    source = models["f32"]
    observer = SaliencyObserver.for_model(source)
    inputs: dict[int, list[np.ndarray]] = {il: [] for il in range(4)}
    routes: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {il: [] for il in range(4)}
    observer.listeners.insert(0, lambda il, ids, w: routes[il].append((ids.copy(), w.copy())))

    def callback(tensor: int, ask: bool) -> bool:
        name = tensor_name(tensor)
        if name.startswith("ffn_norm_2-") and " " not in name:  # what the experts read (not its reshape)
            if not ask:
                inputs[int(name.split("-")[1])].append(tensor_array(tensor).reshape(-1, 128).astype(np.float64))
            return True
        return observer(tensor, ask)

    with LlamaDecoder(source, n_ctx=128, n_threads=1, cb_eval=callback) as decoder:
        decoder.prefill_tokens(decoder.tokenize("<|turn>user\nRead the label on the bottle."))
        list(decoder.generate(4, stop_on_eog=False))

    weights = {t.name: np.asarray(t.data, dtype=np.float64) for t in gguf.GGUFReader(source).tensors}
    for il in range(4):
        x = np.concatenate(inputs[il])
        ids = np.concatenate([r[0] for r in routes[il]])
        gates = np.concatenate([r[1] for r in routes[il]])
        gate_up = weights[f"blk.{il}.ffn_gate_up_exps.weight"][ids] @ x[:, None, :, None]  # (T, k, 2 n_ff, 1)
        gate, up = np.split(gate_up[..., 0], 2, axis=-1)
        down = (weights[f"blk.{il}.ffn_down_exps.weight"][ids] @ (_gelu(gate) * up)[..., None])[..., 0]
        out = down * weights[f"blk.{il}.ffn_down_exps.scale"][ids][..., None]
        reference = np.bincount(ids.ravel(), (gates * np.linalg.norm(out, axis=-1)).ravel(), minlength=8)
        assert observer.reap_sum[il] == pytest.approx(reference, rel=5e-4), f"layer {il}"  # ggml: f16 GELU table
        assert np.array_equal(observer.routed[il], np.bincount(ids.ravel(), minlength=8))


def test_pruning_upcycled_experts_keeps_the_answers_pruning_independent_ones_does_not(make_synthetic, tmp_path: Path):
    """Half of each layer's 16 experts dropped, on skewed routing where the dropped ones still get tokens.

    Experts upcycled from one FFN (upcycle_noise) stand in for each other, so the pruned model still agrees
    with the unpruned one; independent random experts do not, which is why the benchmark model is upcycled.
    """
    from edgevision.moe.calibrate import load_calibration, read_questions, run_calibration
    from edgevision.moe.prune import SaliencyObserver, compare_models, prune_file

    heldout = read_questions(ROOT / "calibration" / "heldout.txt")[:3]
    calibration = load_calibration(ROOT / "calibration")
    quality = {}
    for noise in (0.05, 0.0):
        source = make_synthetic.write_moe_decoder(
            tmp_path / f"up{noise}.gguf",
            ftype="q8_0",
            n_expert=16,
            n_expert_used=2,
            router_skew=0.8,
            upcycle_noise=noise,
        )
        observer = SaliencyObserver.for_model(source)
        run_calibration(source, calibration, observer, max_tokens=4, n_threads=1)
        kept = prune_file(source, tmp_path / f"up{noise}-keep8.gguf", observer.scores(), 8, observer.mass.sum(axis=0))
        dropped_mass = 1 - np.take_along_axis(observer.mass.sum(axis=0), kept, axis=1).sum() / observer.mass.sum()
        assert dropped_mass > 0.02, "the dropped experts should still get some of the routing"
        quality[noise] = compare_models(source, tmp_path / f"up{noise}-keep8.gguf", heldout, max_tokens=12, n_threads=1)
    assert quality[0.05].agreement >= 0.95 and quality[0.05].mean_kl < 0.01, quality
    assert quality[0.0].agreement < 0.9 and quality[0.0].mean_kl > 10 * quality[0.05].mean_kl, quality
