"""Router observation, router profiles and `edgevision calibrate`.

Tier 1: profile statistics and files. Tier 3: the observer on the synthetic Gemma-4 MoE decoder in the real
llama.cpp, checked against a router recomputed in numpy from the GGUF weights and the router's input node
captured from the same graph; and the real CLI as a subprocess.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgevision.errors import InputError, ModelError
from edgevision.moe.profile import PHASES, RouterProfile

TOOLS = Path(__file__).resolve().parent.parent / "tools"
ROOT = TOOLS.parent


def _profile(mass: np.ndarray, n_used: int = 2, model: str = "m") -> RouterProfile:
    """A profile with `mass` (n_layer, n_expert) in the prompt phase."""
    n_layer, n_expert = mass.shape
    full = np.zeros((len(PHASES), n_layer, n_expert))
    full[1] = mass
    counts = np.rint(full * 10).astype(np.int64)
    return RouterProfile(model, n_layer, n_expert, n_used, counts, full, np.array([0, 10, 0]))


# -- tier 1: statistics and files -----------------------------------------------------------------------


def test_profile_statistics_on_known_routing():
    uniform = np.full(8, 1.0)
    one_hot = np.eye(8)[3] * 5
    zipf = 1.0 / np.arange(1, 9)
    profile = _profile(np.stack([uniform, one_hot, zipf, np.zeros(8)]))

    assert profile.entropy() == pytest.approx([3.0, 0.0, -np.sum(zipf / zipf.sum() * np.log2(zipf / zipf.sum())), 0])
    # hottest 10% of 8 experts is 1 expert, 25% is 2
    assert profile.top_share(0.10) == pytest.approx([1 / 8, 1.0, zipf[0] / zipf.sum(), 0.0])
    assert profile.top_share(0.25) == pytest.approx([2 / 8, 1.0, zipf[:2].sum() / zipf.sum(), 0.0])
    assert profile.share()[1].tolist() == [0, 0, 0, 1, 0, 0, 0, 0]
    assert profile.share("image").sum() == 0  # nothing observed in that phase
    assert profile.ranking()[1][0] == 3 and profile.ranking()[2].tolist() == list(range(8))

    merged = profile.merge(profile, weight=0.5)
    assert merged.mass == pytest.approx(1.5 * profile.mass)
    assert merged.tokens.tolist() == [0, 15, 0]
    other = _profile(np.ones((2, 8)))
    with pytest.raises(ModelError, match="different models"):
        profile.merge(other)
    with pytest.raises(ModelError, match="calibrate"):
        profile.check_model(30, 128, "gemma-4-26b-a4b.gguf")


def test_profile_file_round_trip_and_bad_files(tmp_path: Path):
    profile = _profile(np.random.default_rng(0).random((3, 16)), n_used=4, model="x.gguf")
    path = tmp_path / "p.json"
    profile.save(path)
    again = RouterProfile.load(path)
    assert (again.model, again.n_layer, again.n_expert, again.n_expert_used) == ("x.gguf", 3, 16, 4)
    assert np.array_equal(again.counts, profile.counts) and np.array_equal(again.tokens, profile.tokens)
    assert again.mass == pytest.approx(profile.mass, abs=1e-6)
    assert again.entropy() == pytest.approx(profile.entropy(), abs=1e-5)

    bad = tmp_path / "bad.json"
    for text, message in (
        ("{not json", "not readable JSON"),
        ('{"format": "something else"}', "not an edgevision router profile"),
        (path.read_text().replace('"n_expert":16', '"n_expert":15'), "shape"),
        (path.read_text().replace('"mass"', '"masses"'), "lacks the field 'mass'"),
    ):
        bad.write_text(text)
        with pytest.raises(InputError, match=message):
            RouterProfile.load(bad)
    with pytest.raises(InputError, match="does not exist"):
        RouterProfile.load(tmp_path / "missing.json")


# -- tier 3: the observer in llama.cpp ------------------------------------------------------------------


@pytest.fixture(scope="module")
def skewed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install llama-cpp-python==0.3.36")
    sys.path.insert(0, str(TOOLS))
    try:
        import make_synthetic
    finally:
        sys.path.remove(str(TOOLS))
    folder = tmp_path_factory.mktemp("moe-router")
    return make_synthetic.write_moe_decoder(folder / "skew.gguf", router_skew=1.0, n_expert=16, n_expert_used=4)


def _router_weights(path: Path) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], float]:
    """Per layer: ffn_gate_inp.weight (n_expert, n_embd), ffn_gate_inp.scale (n_embd,); and the RMS eps."""
    import gguf

    reader = gguf.GGUFReader(path)
    weight, scale = {}, {}
    for tensor in reader.tensors:
        parts = tensor.name.split(".")
        if parts[0] == "blk" and parts[2] == "ffn_gate_inp":
            target = weight if parts[3] == "weight" else scale
            target[int(parts[1])] = np.asarray(tensor.data, dtype=np.float64)
    eps = float(reader.get_field("gemma4.attention.layer_norm_rms_epsilon").contents())
    return weight, scale, eps


def _reference_routing(x: np.ndarray, weight: np.ndarray, scale: np.ndarray, eps: float, k: int):
    """Gemma 4's router (llama.cpp src/models/gemma4.cpp + build_moe_ffn) in float64: the router reads
    rms_norm(attn_out) / sqrt(n_embd) * scale; softmax over all experts; the top k; their probabilities
    renormalised to sum to 1."""
    n_embd = x.shape[1]
    normed = x / np.sqrt(np.mean(x * x, axis=1, keepdims=True) + eps) / math.sqrt(n_embd) * scale
    logits = normed @ weight.T
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    ids = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    gates = np.take_along_axis(probs, ids, axis=1)
    return ids, gates / gates.sum(axis=1, keepdims=True), np.sort(probs, axis=1)[:, ::-1]


def test_observer_matches_a_numpy_router_token_by_token(skewed: Path):
    from edgevision.decoder.llama import LlamaDecoder, embedding_scale
    from edgevision.decoder.native import tensor_array, tensor_name
    from edgevision.moe.router import RouterObserver

    observer = RouterObserver.for_model(skewed)
    assert (observer.n_layer, observer.n_expert, observer.n_expert_used) == (4, 16, 4)
    inputs: dict[int, list[np.ndarray]] = {il: [] for il in range(4)}
    seen: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {il: [] for il in range(4)}
    observer.listeners.append(lambda il, ids, w: seen[il].append((ids.copy(), w.copy())))

    def callback(tensor: int, ask: bool) -> bool:
        name = tensor_name(tensor)
        if name.startswith("attn_out-"):  # the router's input, captured from the same graph
            if not ask:
                inputs[int(name.split("-")[1])].append(tensor_array(tensor).reshape(-1, 128).astype(np.float64))
            return True
        return observer(tensor, ask)

    rng = np.random.default_rng(7)
    with LlamaDecoder(skewed, n_ctx=256, n_threads=1, cb_eval=callback) as decoder:
        observer.phase = "prompt"
        decoder.prefill_tokens(decoder.tokenize("<|turn>user\nWhat is on the table in front of me?"))
        observer.phase = "image"
        table = rng.standard_normal((12, 128)).astype(np.float32) / math.sqrt(128) * embedding_scale(128)
        decoder.prefill_embeddings(table, causal=False)
        observer.phase = "generated"
        observed_text = "".join(decoder.generate(10, stop_on_eog=False))
    with LlamaDecoder(skewed, n_ctx=256, n_threads=1) as plain:
        plain.prefill_tokens(plain.tokenize("<|turn>user\nWhat is on the table in front of me?"))
        plain.prefill_embeddings(table, causal=False)
        assert "".join(plain.generate(10, stop_on_eog=False)) == observed_text  # watching changes nothing

    weight, scale, eps = _router_weights(skewed)
    for il in range(4):
        x = np.concatenate(inputs[il])
        ids = np.concatenate([s[0] for s in seen[il]])
        gates = np.concatenate([s[1] for s in seen[il]])
        assert len(x) == len(ids) == observer.tokens.sum()
        ref_ids, ref_gates, sorted_probs = _reference_routing(x, weight[il], scale[il], eps, 4)
        # llama.cpp computes in float32: a near-tie at the top-k boundary (a gap below 1e-6 in probability)
        # could go either way; here there is none, so every token must get exactly the reference's experts
        assert (sorted_probs[:, 3] - sorted_probs[:, 4]).min() > 1e-6
        assert np.array_equal(np.sort(ids, axis=1), np.sort(ref_ids, axis=1)), f"layer {il}: other experts"
        order_ref, order = np.argsort(ref_ids, axis=1), np.argsort(ids, axis=1)
        assert np.take_along_axis(gates, order, 1) == pytest.approx(
            np.take_along_axis(ref_gates, order_ref, 1), abs=1e-5
        )
        # the accumulated statistics are these selections summed
        counts = np.bincount(ref_ids.ravel(), minlength=16)
        assert np.array_equal(observer.counts[:, il].sum(axis=0), counts)
        assert observer.mass[:, il].sum(axis=0) == pytest.approx(
            np.bincount(ref_ids.ravel(), ref_gates.ravel(), 16), abs=1e-4
        )
        assert observer.mass[:, il].sum() == pytest.approx(len(x), abs=1e-3)  # gates sum to 1 per token
    # the skew shows: the 4 experts the model prefers take most of each layer's selections
    profile = observer.profile(skewed.name)
    assert profile.top_share(0.25).min() > 0.4


def test_the_c_node_filter_spares_python_the_other_nodes_and_sees_the_same_routing(skewed: Path):
    """llama.cpp asks about every graph node; with the C filter only the router's nodes reach Python, and the
    observer counts exactly what it counts when Python answers for every node (the fallback)."""
    from edgevision.decoder.llama import LlamaDecoder
    from edgevision.moe.predict import PredictingObserver

    prompt = "<|turn>user\nWhat is on the table in front of me?"
    filtered = PredictingObserver.for_model(skewed)
    everything = PredictingObserver.for_model(skewed)
    calls = {"python": 0}

    def every_node(tensor: int, ask: bool) -> bool:  # no node_prefix: the decoder passes every node to Python
        calls["python"] += 1
        return everything(tensor, ask)

    texts = []
    with LlamaDecoder(skewed, n_ctx=256, n_threads=1, cb_eval=filtered) as decoder:
        assert decoder._node_filter is not None, "the C node filter was not built (is there a C compiler?)"
        decoder.prefill_tokens(decoder.tokenize(prompt))
        texts.append("".join(decoder.generate(8, stop_on_eog=False)))
        asked, passed = decoder._node_filter.counts
        assert filtered.placement  # the first graph's expert matmuls were still probed
    with LlamaDecoder(skewed, n_ctx=256, n_threads=1, cb_eval=every_node) as decoder:
        assert decoder._node_filter is None
        decoder.prefill_tokens(decoder.tokenize(prompt))
        texts.append("".join(decoder.generate(8, stop_on_eog=False)))
    assert texts[0] == texts[1]
    assert np.array_equal(filtered.counts, everything.counts) and filtered.counts.sum() > 0
    assert filtered.placement == everything.placement
    assert asked > 10 * passed and calls["python"] > 10 * passed  # most nodes never reached Python


@pytest.mark.parametrize("sample_every", [1, 3])
def test_captured_observation_counts_what_live_observation_counts_without_python_in_the_decode(
    skewed: Path, monkeypatch: pytest.MonkeyPatch, sample_every: int
):
    """With ``capture=True`` the C filter copies the router logits during the decode (sampling, if any, decided
    there too) and the observer reads them afterwards: the same counts and the same listener calls as an
    observer Python answers for every node, and no decoded token enters Python. A ring too small for a node
    sends it to Python instead (nothing lost), and grows for the next decode."""
    from edgevision.decoder import nodefilter
    from edgevision.decoder.llama import LlamaDecoder
    from edgevision.moe.predict import PredictingObserver

    monkeypatch.setattr(nodefilter, "RING", 256)  # the prompt's logits do not fit at first
    prompt = "<|turn>user\nRead me the label on this tin, please."
    captured = PredictingObserver.for_model(skewed, capture=True, sample_every=sample_every)
    live = PredictingObserver.for_model(skewed, sample_every=sample_every)
    seen: dict[str, list[tuple[int, list[int]]]] = {"captured": [], "live": []}
    captured.listeners.append(lambda layer, ids, w: seen["captured"].append((layer, ids.ravel().tolist())))
    live.listeners.append(lambda layer, ids, w: seen["live"].append((layer, ids.ravel().tolist())))

    def every_node(tensor: int, ask: bool) -> bool:  # no node_prefix: Python answers for every node
        return live(tensor, ask)

    follow_up = " And what does the small print under it say?"
    texts = []
    with LlamaDecoder(skewed, n_ctx=256, n_threads=1, cb_eval=captured) as decoder:
        assert decoder._node_filter is not None, "the C node filter was not built (is there a C compiler?)"
        decoder.prefill_tokens(decoder.tokenize(prompt))  # the first graphs are probed for placement
        texts.append("".join(decoder.generate(4, stop_on_eog=False)))
        assert captured.captures
        decoder.prefill_tokens(decoder.tokenize(follow_up, add_special=False))  # its logits overflow the ring
        texts[-1] += "".join(decoder.generate(2, stop_on_eog=False))
        if sample_every == 1:  # (sampled: that graph may not have been observed)
            assert decoder._node_filter._ring_size > 256  # it grew
        before = decoder._node_filter.counts[1]
        texts[-1] += "".join(decoder.generate(9, stop_on_eog=False))
        assert decoder._node_filter.counts[1] == before  # nine decodes, not one call into Python
    with LlamaDecoder(skewed, n_ctx=256, n_threads=1, cb_eval=every_node) as decoder:
        decoder.prefill_tokens(decoder.tokenize(prompt))
        texts.append("".join(decoder.generate(4, stop_on_eog=False)))
        decoder.prefill_tokens(decoder.tokenize(follow_up, add_special=False))
        texts[-1] += "".join(decoder.generate(2, stop_on_eog=False))
        texts[-1] += "".join(decoder.generate(9, stop_on_eog=False))
    assert texts[0] == texts[1]
    assert np.array_equal(captured.counts, live.counts) and captured.counts.sum() > 0
    assert sorted(seen["captured"]) == sorted(seen["live"]) and seen["live"]


def test_without_a_c_compiler_the_node_filter_is_not_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from edgevision.decoder import nodefilter

    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.raises(OSError):
        nodefilter.build(tmp_path)
    assert not list(tmp_path.glob("*.so")) and not list(tmp_path.glob(".nodefilter-*"))  # nothing half-built


def test_phases_count_image_rows_prompt_text_and_generated_tokens(skewed: Path):
    from edgevision.decoder.llama import LlamaDecoder, embedding_scale
    from edgevision.decoder.prompt import GEMMA4, build_turn
    from edgevision.moe.router import RouterObserver, observe_turn

    observer = RouterObserver.for_model(skewed)
    turn = build_turn("Where are my keys?", image_tokens=9, system="Answer briefly.", fmt=GEMMA4)
    rows = np.random.default_rng(1).standard_normal((9, 128)).astype(np.float32) / math.sqrt(128) * embedding_scale(128)
    with LlamaDecoder(skewed, n_ctx=256, n_threads=1, cb_eval=observer) as decoder:
        n_past = observe_turn(decoder, observer, turn.segments, rows)
        observer.phase = "generated"
        n_pieces = len(list(decoder.generate(6, stop_on_eog=False)))
    assert n_pieces >= 1
    # the first generated token comes from the prompt's logits; each later one is decoded once
    assert observer.tokens.tolist() == [9, n_past - 9, 5]
    for p in range(len(PHASES)):
        assert (observer.counts[p].sum(axis=1) == 4 * observer.tokens[p]).all()
    with pytest.raises(ValueError, match="phase must be one of"):
        observer.phase = "audio"
    observer.reset()
    assert observer.counts.sum() == 0 and observer.tokens.sum() == 0


def test_observer_needs_a_moe_model(tmp_path: Path):
    from edgevision.moe.router import RouterObserver

    with pytest.raises(ModelError, match="does not exist"):
        RouterObserver.for_model(tmp_path / "missing.gguf")
    (tmp_path / "text.gguf").write_text("not a model")
    with pytest.raises(ModelError, match="not a readable GGUF"):
        RouterObserver.for_model(tmp_path / "text.gguf")


def test_calibrate_command_writes_profile_and_heatmap(skewed: Path, make_tower, tmp_path: Path):
    tower = tmp_path / "tower.onnx"
    assert make_tower.main(["--out", str(tower), "--match-gguf", str(skewed)]) == 0
    calibration = tmp_path / "calibration"
    (calibration / "images").mkdir(parents=True)
    (calibration / "prompts.txt").write_text(
        "# three questions\nWhat is in front of me?\nRead the label.\nIs it safe?\n"
    )
    for name in sorted((ROOT / "calibration" / "images").glob("*.png"))[:2]:
        (calibration / "images" / name.name).write_bytes(name.read_bytes())
    out = tmp_path / "out" / "profile.json"
    result = subprocess.run(
        [sys.executable, "-m", "edgevision", "calibrate", "--decoder", str(skewed), "--tower", str(tower),
         "--calibration", str(calibration), "--max-tokens", "4", "--threads", "1", "--out", str(out)],
        check=False, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "[  3/3] done" in result.stderr  # progress
    assert "entropy" in result.stdout and "top-25%" in result.stdout
    profile = RouterProfile.load(out)
    assert profile.model == skewed.name and profile.n_expert == 16
    assert profile.tokens[0] == 3 * 49  # 7x7 image tokens per question, each asked about an image
    assert profile.tokens[2] == 3 * 3
    assert json.loads(out.read_text())["phases"] == list(PHASES)
    from PIL import Image

    with Image.open(out.with_suffix(".png")) as picture:
        assert picture.format == "PNG" and picture.width > 300 and picture.height > 200

    missing = subprocess.run(
        [sys.executable, "-m", "edgevision", "calibrate", "--decoder", str(tmp_path / "none.gguf")],
        check=False, capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert missing.returncode == 2 and "edgevision: error: decoder model" in missing.stderr
