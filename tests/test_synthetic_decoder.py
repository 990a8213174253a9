"""Tier 3: the synthetic Gemma-4 MoE decoder from tools/make_synthetic.py on the real llama.cpp.

Each weight type loads through llama-cpp-python, round-trips English through the embedded tokenizer and
generates deterministically; an eval callback reads the router's nodes (ffn_moe_probs, ffn_moe_topk,
ffn_moe_weights) out of the running graph to show that tokens really go through the experts.
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
from itertools import islice
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="gguf is not installed: pip install gguf")
llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed: pip install llama-cpp-python==0.3.36"
)

TOOLS = Path(__file__).resolve().parent.parent / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

import make_synthetic

FTYPES = ("f32", "f16", "q8_0", "q4_0")
SENTENCE = "The camera sees a red cup on the table. Where are my keys?"
CORPUS_TEXT = " ".join(make_synthetic.CORPUS.split())
GGML_TYPE_F32, GGML_TYPE_I32 = 0, 26


@pytest.fixture(autouse=True)
def _no_extra_buffer_types():
    """llama-cpp-python's `Llama` loads with llama.cpp's extra buffer types on, whose AMX one crashes on some
    hosts: these tests check the model file, so they load it the way the product does (extra types off)."""
    from edgevision.decoder.native import high_level_without_extra_buffer_types

    with high_level_without_extra_buffer_types():
        yield


@pytest.fixture(scope="session")
def decoders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("synthetic")
    return {ftype: make_synthetic.write_moe_decoder(folder / f"{ftype}.gguf", ftype=ftype) for ftype in FTYPES}


class GgmlTensor(ctypes.Structure):
    """struct ggml_tensor from the bundled ggml/include/ggml.h (GGML_MAX_DIMS 4, MAX_SRC 10, MAX_NAME 64)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


def _ggml_base() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
    lib.ggml_nbytes.restype = ctypes.c_size_t
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    lib.ggml_backend_tensor_get.restype = None
    return lib


def run_graph(model_path: Path, text: str, wanted: tuple[str, ...]) -> tuple[set[str], dict[str, np.ndarray]]:
    """Decode ``text`` in one batch with an eval callback; return every node name and the wanted nodes.

    A node's data comes back 4-D in ggml order reversed, [ne3, ne2, ne1, ne0], read with the node's own
    byte strides nb: ffn_moe_topk is a view into the full argsort, its rows n_expert * 4 bytes apart.
    """
    ggml = _ggml_base()
    names: set[str] = set()
    captured: dict[str, np.ndarray] = {}

    def on_node(pointer: int, ask: bool, _user_data: int) -> bool:
        node = GgmlTensor.from_address(pointer)
        name = node.name.decode()
        if ask:
            names.add(name)
            return name.rsplit("-", 1)[0] in wanted
        size = ggml.ggml_nbytes(pointer)
        raw = ctypes.create_string_buffer(size)
        ggml.ggml_backend_tensor_get(pointer, raw, 0, size)
        dtype = {GGML_TYPE_F32: np.float32, GGML_TYPE_I32: np.int32}[node.type]
        shape = tuple(node.ne[i] for i in reversed(range(4)))
        strides = tuple(node.nb[i] for i in reversed(range(4)))
        flat = np.frombuffer(raw.raw, dtype=dtype)
        captured[name] = np.lib.stride_tricks.as_strided(flat, shape=shape, strides=strides).copy()
        return True

    callback = llama_cpp.ggml_backend_sched_eval_callback(on_node)
    model_params = llama_cpp.llama_model_default_params()
    model_params.use_extra_bufts = False  # llama.cpp's AMX buffer type crashes on some hosts
    model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), model_params)
    assert model, f"llama.cpp could not load {model_path}"
    try:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = 512
        params.cb_eval = callback
        context = llama_cpp.llama_init_from_model(model, params)
        assert context, "llama.cpp could not create a context"
        try:
            vocab = llama_cpp.llama_model_get_vocab(model)
            data = text.encode()
            tokens = (llama_cpp.llama_token * 512)()
            n_tokens = llama_cpp.llama_tokenize(vocab, data, len(data), tokens, 512, True, False)
            assert 0 < n_tokens <= 512
            assert llama_cpp.llama_decode(context, llama_cpp.llama_batch_get_one(tokens, n_tokens)) == 0
        finally:
            llama_cpp.llama_free(context)
    finally:
        llama_cpp.llama_model_free(model)
    return names, captured


def test_metadata_names_gemma4_with_the_experts_set(decoders: dict[str, Path]) -> None:
    spec = make_synthetic.MoeDecoderSpec()
    for ftype, path in decoders.items():
        reader = gguf.GGUFReader(path)
        fields = reader.fields
        assert fields["general.architecture"].contents() == "gemma4"
        assert fields["gemma4.expert_count"].contents() == spec.n_expert
        assert fields["gemma4.expert_used_count"].contents() == spec.n_expert_used
        assert fields["tokenizer.ggml.model"].contents() == "gemma4"
        tensors = {tensor.name: tensor for tensor in reader.tensors}
        experts = tensors["blk.0.ffn_gate_up_exps.weight"]
        assert [int(n) for n in experts.shape] == [spec.n_embd, 2 * spec.n_ff_exp, spec.n_expert]
        assert experts.tensor_type.name == ftype.upper()
        assert tensors["blk.0.ffn_down_exps.weight"].tensor_type.name == ftype.upper()
        assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32"


def test_same_seed_gives_the_same_bytes(tmp_path: Path) -> None:
    first = make_synthetic.write_moe_decoder(tmp_path / "a.gguf", seed=7, ftype="q4_0", router_skew=1.5)
    again = make_synthetic.write_moe_decoder(tmp_path / "b.gguf", seed=7, ftype="q4_0", router_skew=1.5)
    other = make_synthetic.write_moe_decoder(tmp_path / "c.gguf", seed=8, ftype="q4_0", router_skew=1.5)
    assert first.read_bytes() == again.read_bytes()
    assert first.read_bytes() != other.read_bytes()


def _experts(path: Path, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """(gate_up, down) expert weights of a float32 file's layer, one flattened row per expert."""
    tensors = {tensor.name: tensor for tensor in gguf.GGUFReader(path).tensors}
    gate_up, down = (
        np.asarray(tensors[f"blk.{layer}.{name}.weight"].data) for name in ("ffn_gate_up_exps", "ffn_down_exps")
    )
    return gate_up.reshape(gate_up.shape[0], -1), down.reshape(down.shape[0], -1)


def test_upcycled_experts_are_variations_of_one_shared_ffn(tmp_path: Path) -> None:
    independent = make_synthetic.write_moe_decoder(tmp_path / "independent.gguf", n_expert=8)
    zero = make_synthetic.write_moe_decoder(tmp_path / "zero.gguf", n_expert=8, upcycle_noise=0.0)
    upcycled = make_synthetic.write_moe_decoder(tmp_path / "upcycled.gguf", n_expert=8, upcycle_noise=0.1)
    # 0 means today's independent experts, bytes and all (no extra metadata key either)
    assert zero.read_bytes() == independent.read_bytes()
    assert gguf.GGUFReader(independent).get_field(make_synthetic.UPCYCLE_KEY) is None
    assert gguf.GGUFReader(upcycled).get_field(make_synthetic.UPCYCLE_KEY).contents() == pytest.approx(0.1)
    assert make_synthetic.default_filename(make_synthetic.MoeDecoderSpec(upcycle_noise=0.1)).endswith("-up0.1-f32.gguf")

    def distance_to_mean(path: Path) -> np.ndarray:
        """Each expert's relative distance to the layer's mean expert, for both matrices and all layers."""
        out = []
        for layer in range(4):
            for weights in _experts(path, layer):
                base = weights.mean(axis=0)
                out.append(np.linalg.norm(weights - base, axis=1) / np.linalg.norm(base))
        return np.concatenate(out)

    # upcycled: every expert within ~10% of the shared FFN (the mean of 8 estimates it); independent: the mean
    # of 8 random matrices is ~1/sqrt(8) of one, so each expert is ~2.6 of it away
    assert distance_to_mean(upcycled).max() < 0.15
    assert distance_to_mean(independent).min() > 2.0
    # the weights keep their scale, so activations (and the router's view of them) stay as before
    for mine, theirs in zip(_experts(upcycled, 1), _experts(independent, 1), strict=True):
        assert np.linalg.norm(mine) == pytest.approx(np.linalg.norm(theirs), rel=0.1)


def test_quantized_files_are_smaller(decoders: dict[str, Path]) -> None:
    sizes = [decoders[ftype].stat().st_size for ftype in FTYPES]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)


@pytest.mark.parametrize("ftype", FTYPES)
def test_english_round_trips_through_the_tokenizer(decoders: dict[str, Path], ftype: str) -> None:
    llm = llama_cpp.Llama(model_path=str(decoders[ftype]), n_ctx=256, verbose=False)
    tokens = llm.tokenize(SENTENCE.encode(), add_bos=True)
    assert tokens[0] == llm.token_bos() == make_synthetic.BOS_ID
    assert len(tokens) < len(SENTENCE) // 2, "the learned merges should make common words single tokens"
    assert llm.detokenize(tokens[1:]).decode() == SENTENCE

    vocab = make_synthetic.build_vocab()
    turn = llm.tokenize(b"<|turn>user\n<|image><image|>hi<turn|>", add_bos=False, special=True)
    assert turn[0] == vocab.id("<|turn>")
    assert [vocab.id("<|image>"), vocab.id("<image|>")] == turn[turn.index(vocab.id("<|image>")) :][:2]
    assert turn[-1] == vocab.id("<turn|>")
    assert llm.tokenize("naïve café".encode(), add_bos=False), "byte fallback covers letters outside the vocab"
    assert llm.detokenize(llm.tokenize("naïve café".encode(), add_bos=False)).decode() == "naïve café"


@pytest.mark.parametrize("ftype", FTYPES)
def test_greedy_continuation_is_finite_and_deterministic(decoders: dict[str, Path], ftype: str) -> None:
    runs = []
    for _ in range(2):
        llm = llama_cpp.Llama(model_path=str(decoders[ftype]), n_ctx=256, logits_all=True, verbose=False)
        prompt = llm.tokenize(SENTENCE.encode(), add_bos=True)
        llm.eval(prompt)
        logits = np.asarray(llm.scores[: llm.n_tokens])  # [prompt tokens, n_vocab]
        assert np.isfinite(logits).all() and (logits.std(axis=1) > 0.1).all()
        runs.append(list(islice(llm.generate(prompt, temp=0.0), 12)))
    assert runs[0] == runs[1]
    assert len(set(runs[0])) > 1, "greedy decoding should not repeat one token"
    assert min(runs[0]) >= make_synthetic.FIRST_TEXT_ID, "special and byte tokens are never generated"


@pytest.mark.parametrize("ftype", ["f32", "q4_0"])
def test_tokens_go_through_the_experts(decoders: dict[str, Path], ftype: str) -> None:
    spec = make_synthetic.MoeDecoderSpec()
    names, nodes = run_graph(decoders[ftype], SENTENCE, ("ffn_moe_probs", "ffn_moe_topk", "ffn_moe_weights"))
    for il in range(spec.n_layer):
        assert {f"ffn_moe_logits-{il}", f"ffn_moe_gate_up-{il}", f"ffn_moe_weights_norm-{il}"} <= names
        probs = nodes[f"ffn_moe_probs-{il}"][0, 0]  # [n_tokens, n_expert], softmax of the router logits
        ids = nodes[f"ffn_moe_topk-{il}"][0, 0]  # [n_tokens, n_expert_used], in falling probability
        weights = nodes[f"ffn_moe_weights-{il}"][0]  # [n_tokens, n_expert_used, 1], probs at ids
        assert probs.shape[1] == spec.n_expert and ids.shape == (probs.shape[0], spec.n_expert_used)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
        assert ((ids >= 0) & (ids < spec.n_expert)).all()
        assert all(len(set(row)) == spec.n_expert_used for row in ids)
        chosen = np.take_along_axis(probs, ids, axis=1)
        np.testing.assert_array_equal(weights[:, :, 0], chosen)
        others = probs.copy()
        np.put_along_axis(others, ids, -1.0, axis=1)
        assert (chosen.min(axis=1) >= others.max(axis=1)).all()


def test_router_skew_sends_most_tokens_to_the_preferred_experts(tmp_path: Path) -> None:
    def preferred_share(router_skew: float) -> np.ndarray:
        spec = make_synthetic.MoeDecoderSpec(router_skew=router_skew)
        path = make_synthetic.write_moe_decoder(tmp_path / f"skew{router_skew}.gguf", spec)
        preference = gguf.GGUFReader(path).fields[make_synthetic.PREFERENCE_KEY].contents()
        preference = np.array(preference).reshape(spec.n_layer, spec.n_expert)
        np.testing.assert_array_equal(preference, make_synthetic.expert_preference(spec))
        _, nodes = run_graph(path, CORPUS_TEXT, ("ffn_moe_topk",))
        shares = []
        for il in range(spec.n_layer):
            ids = nodes[f"ffn_moe_topk-{il}"][0, 0]
            favourites = preference[il, : spec.n_expert_used]
            shares.append(np.isin(ids, favourites).mean())
        return np.array(shares)

    assert (preferred_share(0.0) < 0.5).all()
    assert (preferred_share(4.0) > 0.85).all()


def test_cli_writes_the_files_it_reports(tmp_path: Path) -> None:
    script = TOOLS / "make_synthetic.py"
    done = subprocess.run(
        [
            sys.executable,
            str(script),
            "decoder",
            "--out",
            str(tmp_path),
            "--ftype",
            "q8_0",
            "q4_0",
            "--n-layer",
            "2",
            "--router-skew",
            "1.5",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    written = [Path(line.split("\t")[0]) for line in done.stdout.splitlines()]
    assert [path.name for path in written] == [
        "gemma4-moe-synthetic-l2-e8k2-skew1.5-q8_0.gguf",
        "gemma4-moe-synthetic-l2-e8k2-skew1.5-q4_0.gguf",
    ]
    assert all(path.is_file() for path in written)

    refused = subprocess.run(
        [sys.executable, str(script), "decoder", "--out", str(tmp_path), "--n-embd", "100"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert refused.returncode == 2 and "multiple of 32" in refused.stderr
