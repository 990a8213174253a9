"""The decoder: prompt assembly (pure) and the llama.cpp context on real GGUF models (Gemma 3 270M, and the
synthetic Gemma 4 MoE where tools/make_synthetic.py is present)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest

from edgevision.decoder import native
from edgevision.decoder.prompt import GEMMA4, Image, Text, build_turn, merge_text, run_prompt
from edgevision.errors import EdgevisionError, InputError, ModelError

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "What is in front of me?"

# -- tier 1: prompt assembly ------------------------------------------------------------------------


def test_gemma3_turn_folds_system_into_user_turn_and_puts_image_before_question() -> None:
    turn = build_turn(f"  {QUESTION}\n", image_tokens=4, system="Answer in one sentence.")
    assert turn.prefix == (
        Text("<bos><start_of_turn>user\nAnswer in one sentence.\n\n\n\n<start_of_image>"),
        Image(4, causal=False),
        Text("<end_of_image>\n\n"),
    )
    assert turn.question == (Text(QUESTION, special=False), Text("<end_of_turn>\n<start_of_turn>model\n"))
    assert turn.segments == turn.prefix + turn.question
    assert turn.image_tokens == 4


def test_turn_without_image_or_system_is_plain_chat() -> None:
    turn = build_turn("Hi")
    assert turn.prefix == (Text("<bos><start_of_turn>user\n"),)
    assert turn.question == (Text("Hi", special=False), Text("<end_of_turn>\n<start_of_turn>model\n"))
    assert turn.image_tokens == 0


def test_gemma4_turn_has_system_role_and_image_markers() -> None:
    turn = build_turn(QUESTION, image_tokens=2, system="Be brief.", fmt=GEMMA4)
    assert turn.prefix == (
        Text("<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\n<|image>"),
        Image(2, causal=False),
        Text("<image|>"),
    )
    assert turn.question == (
        Text(QUESTION, special=False),
        Text("<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"),
    )


def test_merge_text_joins_neighbours_and_drops_empty() -> None:
    merged = merge_text([Text("a"), Text(""), Text("b"), Image(1), Text(""), Image(2), Text("c")])
    assert merged == (Text("ab"), Image(1), Image(2), Text("c"))
    assert merge_text([Text("a"), Text("b", special=False), Text("c")]) == (
        Text("a"),
        Text("b", special=False),
        Text("c"),
    )  # the user's text is never joined into the template's


def test_image_needs_a_token() -> None:
    with pytest.raises(ValueError):
        Image(0)


class RecordingDecoder:
    """A software decoder: records what run_prompt feeds it, one token per character."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.n_past = 0

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        assert not add_special and parse_special
        return [ord(c) for c in text]

    def prefill_tokens(self, tokens) -> None:
        self.calls.append(("text", "".join(map(chr, tokens))))
        self.n_past += len(tokens)

    def prefill_embeddings(self, embeddings, *, causal: bool = True) -> None:
        self.calls.append(("image", embeddings[:, 0].tolist(), causal))
        self.n_past += len(embeddings)


def test_run_prompt_feeds_segments_in_order_and_splits_rows_between_images() -> None:
    rows = np.arange(5, dtype=np.float32)[:, None].repeat(3, axis=1)
    dec = RecordingDecoder()
    n = run_prompt(dec, (Text("ab"), Image(2), Text("c"), Image(3, causal=False), Text("d")), rows)
    assert dec.calls == [
        ("text", "ab"),
        ("image", [0.0, 1.0], True),
        ("text", "c"),
        ("image", [2.0, 3.0, 4.0], False),
        ("text", "d"),
    ]
    assert n == 9


@pytest.mark.parametrize("rows", [None, np.zeros((3, 8), np.float32)])
def test_run_prompt_refuses_embeddings_that_do_not_fit_the_prompt(rows) -> None:
    with pytest.raises(InputError, match="4 image embedding rows"):
        run_prompt(RecordingDecoder(), build_turn("q", image_tokens=4).segments, rows)


# -- tier 3: llama.cpp on real models ----------------------------------------------------------------

CTX = {"n_ctx": 512, "n_batch": 256}


@pytest.fixture(scope="module")
def llama_mod():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from edgevision.decoder import llama

    return llama


@pytest.fixture(scope="module")
def decoder(llama_mod, gemma3_gguf):
    with llama_mod.LlamaDecoder(gemma3_gguf, **CTX) as dec:
        yield dec


@pytest.fixture()
def dec(decoder):
    decoder.reset()
    return decoder


@pytest.fixture(scope="module")
def token_rows(llama_mod, gemma3_gguf):
    """``ids -> token_embd[ids] * sqrt(n_embd)``: what Gemma's first layer sees for those tokens, read from
    the graph node ``inp_scaled`` through cb_eval while the tokens are decoded."""
    captured: list[np.ndarray] = []

    def capture(tensor: int, ask: bool) -> bool:
        if ask:
            return native.tensor_name(tensor) == "inp_scaled"
        captured.append(native.tensor_array(tensor))
        return True

    with llama_mod.LlamaDecoder(gemma3_gguf, cb_eval=capture, **CTX) as watched:

        def rows(ids: list[int]) -> np.ndarray:
            captured.clear()
            watched.reset()
            watched.prefill_tokens(ids)
            (block,) = captured
            return block.reshape(len(ids), watched.n_embd).copy()

        yield rows


def test_tokenize_detokenize_round_trip(dec) -> None:
    text = "Hello, wörld! The café's 2+2=4 𝔘𝔫𝔦"
    ids = dec.tokenize(text)
    assert ids[0] == dec.special_tokens.bos
    assert dec.detokenize(ids) == text
    assert dec.detokenize(ids, special=True) == "<bos>" + text
    assert dec.tokenize(text, add_special=False) == ids[1:]


def test_chat_markers_are_single_special_tokens(dec) -> None:
    assert dec.tokenize("<end_of_turn>", add_special=False) == [dec.special_tokens.eot]
    assert dec.is_eog(dec.special_tokens.eot)
    for marker in ("<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>"):
        (token,) = dec.tokenize(marker, add_special=False)
        assert dec.detokenize([token], special=True) == marker
    # control tokens are parsed only on request (the image markers are user-defined tokens, always parsed)
    assert len(dec.tokenize("<start_of_turn>", add_special=False, parse_special=False)) > 1
    assert dec.detokenize(dec.tokenize("<start_of_turn>user\nhi<end_of_turn>")) == "user\nhi"  # not spoken


def test_pieces_keep_characters_split_across_tokens_whole(dec) -> None:
    ids = dec.tokenize("𝔘𝔫𝔦", add_special=False)
    assert any(_broken_utf8(dec.token_bytes(i)) for i in ids), "expected byte-fallback tokens"
    assert list(dec.pieces(ids)) == ["𝔘", "𝔫", "𝔦"]


def _broken_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def test_greedy_generation_knows_paris(dec) -> None:
    # the 270M base model continues the bare "The capital of France is" with " the capital of the country"
    prompt = dec.tokenize("The capital of France is the city of")
    dec.prefill_tokens(prompt)
    answer = "".join(dec.generate(6))
    assert answer.startswith(" Paris")
    assert dec.n_past == len(prompt) + 5  # the prompt and every generated token but the last


def test_sampling_with_a_seed_repeats(dec) -> None:
    prompt = dec.tokenize("My favourite animal is")
    answers = []
    for _ in range(2):
        dec.reset()
        dec.prefill_tokens(prompt)
        answers.append("".join(dec.generate(8, temperature=1.0, seed=7)))
    assert answers[0] == answers[1]
    assert answers[0].strip()


def test_generate_needs_a_prompt(dec) -> None:
    with pytest.raises(EdgevisionError, match="prefill"):
        next(dec.generate(4))


def test_token_embeddings_injected_as_rows_give_the_same_logits(dec, token_rows) -> None:
    ids = dec.tokenize("The capital of France is")
    dec.prefill_tokens(ids[:2])
    dec.prefill_tokens(ids[2:])
    by_tokens = dec.logits()

    dec.reset()
    dec.prefill_tokens(ids[:2])
    dec.prefill_embeddings(token_rows(ids[2:]))
    by_rows = dec.logits()
    assert dec.n_past == len(ids)
    assert np.abs(by_rows - by_tokens).max() < 1e-3

    # rows without Gemma's sqrt(n_embd) factor are something else entirely: the scale is the caller's job
    dec.reset()
    dec.prefill_tokens(ids[:2])
    dec.prefill_embeddings(token_rows(ids[2:]) / np.float32(np.sqrt(dec.n_embd)))
    assert np.abs(dec.logits() - by_tokens).max() > 1.0


def _image(seed: int, n: int, scale: float, n_embd: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, n_embd)) * scale).astype(np.float32)


def test_image_embeddings_reach_the_decoder(dec, token_rows) -> None:
    n_img = 8
    scale = float(token_rows(dec.tokenize("a photo of a red bicycle")).std())  # like real inputs
    turn = build_turn(QUESTION, image_tokens=n_img, system="Describe the image.")

    def answer_logits(image: np.ndarray | None, segments=turn.segments) -> np.ndarray:
        dec.reset()
        n = run_prompt(dec, segments, image)
        assert n == dec.n_past
        return dec.logits()

    first = answer_logits(_image(1, n_img, scale, dec.n_embd))
    other = answer_logits(_image(2, n_img, scale, dec.n_embd))
    again = answer_logits(_image(1, n_img, scale, dec.n_embd))
    assert np.abs(first - other).max() > 0.1
    np.testing.assert_array_equal(first, again)

    # control: the same question without the image does not depend on which image came before
    text_only = build_turn(QUESTION, system="Describe the image.").segments
    np.testing.assert_array_equal(answer_logits(None, text_only), answer_logits(None, text_only))


def test_truncate_reuses_the_cached_image_prefix_exactly(llama_mod, gemma3_gguf, dec) -> None:
    image = _image(3, 6, 1.0, dec.n_embd)
    first = build_turn(QUESTION, image_tokens=6, system="Be brief.")
    follow_up = build_turn("And what colour is it?", image_tokens=6, system="Be brief.")
    assert first.prefix == follow_up.prefix

    n_prefix = run_prompt(dec, first.prefix, image)
    run_prompt(dec, first.question)
    assert len(list(dec.generate(5))) > 0
    assert dec.truncate(n_prefix) == n_prefix
    assert dec.n_past == n_prefix
    with pytest.raises(EdgevisionError):
        dec.logits()  # the prefix's logits are gone until something is prefilled
    run_prompt(dec, follow_up.question)
    reused = dec.logits()

    with llama_mod.LlamaDecoder(gemma3_gguf, **CTX) as fresh:
        run_prompt(fresh, follow_up.prefix, image)
        run_prompt(fresh, follow_up.question)
        np.testing.assert_array_equal(reused, fresh.logits())


def test_truncate_cannot_grow_the_cache(dec) -> None:
    dec.prefill_tokens(dec.tokenize("one two"))
    with pytest.raises(ValueError):
        dec.truncate(dec.n_past + 1)
    assert dec.truncate(dec.n_past) == dec.n_past
    dec.logits()  # nothing was dropped, the logits stay


def test_truncate_reports_a_sliding_window_that_lost_the_prefix(llama_mod, gemma3_gguf) -> None:
    # without swa_full, Gemma 3's 512-token window layers keep window + n_batch cells, rounded up to 256: 768
    with llama_mod.LlamaDecoder(gemma3_gguf, n_ctx=1024, n_batch=256, swa_full=False) as small:
        small.prefill_tokens(small.tokenize("word " * 800, add_special=False)[:780])  # 768 cells: 0..11 lost
        assert small.truncate(700) == 700  # the window before position 700 is still held
        assert small.truncate(100) == 0  # positions before 100 were overwritten: the cache starts over
        assert small.n_past == 0


def _head(path: Path, n: int) -> bytes:
    with path.open("rb") as f:
        return f.read(n)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda p, real: None, id="missing"),
        pytest.param(lambda p, real: p.write_text("not a model, just text\n"), id="text-renamed"),
        pytest.param(lambda p, real: p.write_bytes(_head(real, 2000)), id="cut-in-metadata"),
        pytest.param(lambda p, real: p.write_bytes(_head(real, 20_000_000)), id="cut-in-tensors"),
        pytest.param(lambda p, real: p.write_bytes(b"GGUF\x07\x00\x00\x00" + bytes(64)), id="future-version"),
        pytest.param(lambda p, real: p.mkdir(), id="directory"),
    ],
)
def test_unusable_model_files_raise_model_error(llama_mod, gemma3_gguf, tmp_path, make) -> None:
    path = tmp_path / "decoder.gguf"
    make(path, gemma3_gguf)
    with pytest.raises(ModelError, match="decoder.gguf"):
        llama_mod.LlamaDecoder(path, n_ctx=64)


def test_truncated_tensor_data_is_explained(llama_mod, gemma3_gguf, tmp_path) -> None:
    path = tmp_path / "cut.gguf"
    path.write_bytes(_head(gemma3_gguf, 20_000_000))
    with pytest.raises(ModelError, match="not within the file bounds"):
        llama_mod.LlamaDecoder(path, n_ctx=64)


@pytest.mark.parametrize("shape", [(4, 320), (4, 641), (640,), (1, 2, 640)])
def test_embeddings_of_the_wrong_shape_are_refused(dec, shape) -> None:
    dec.prefill_tokens(dec.tokenize("x"))
    with pytest.raises(InputError, match="width 640"):
        dec.prefill_embeddings(np.zeros(shape, np.float32))
    assert dec.n_past == 2


def test_non_finite_embeddings_are_refused(dec) -> None:
    rows = np.zeros((2, dec.n_embd), np.float32)
    rows[1, 3] = np.nan
    with pytest.raises(InputError, match="finite"):
        dec.prefill_embeddings(rows)


def test_prompt_longer_than_the_context_is_refused_before_decoding(dec) -> None:
    dec.prefill_tokens([dec.special_tokens.bos])
    with pytest.raises(InputError, match="n_ctx"):
        dec.prefill_tokens([dec.special_tokens.nl] * dec.n_ctx)
    with pytest.raises(InputError, match="n_ctx"):
        dec.prefill_embeddings(np.zeros((dec.n_ctx, dec.n_embd), np.float32))
    assert dec.n_past == 1


def test_cb_eval_observes_graph_nodes(llama_mod, gemma3_gguf, decoder) -> None:
    asked: list[str] = []
    observed: list[tuple[str, bool]] = []

    def watch(tensor: int, ask: bool) -> bool:
        name = native.tensor_name(tensor)
        if ask:
            asked.append(name)
            return name.startswith("ffn_out-")
        observed.append((name, ask))
        return False  # ignored: the graph must still run to the end

    ids = decoder.tokenize("The capital of France is")
    decoder.reset()
    decoder.prefill_tokens(ids)
    expected = decoder.logits()
    with llama_mod.LlamaDecoder(gemma3_gguf, cb_eval=watch, **CTX) as watched:
        watched.prefill_tokens(ids)
        logits = watched.logits()
    assert {"inp_scaled", "attn_norm-0", "result_output"} <= set(asked)
    assert observed == [(f"ffn_out-{i}", False) for i in range(18)]
    np.testing.assert_array_equal(logits, expected)


def test_cb_eval_errors_surface_from_the_call(llama_mod, gemma3_gguf) -> None:
    def broken(tensor: int, ask: bool) -> bool:
        raise RuntimeError("observer failed")

    with (
        llama_mod.LlamaDecoder(gemma3_gguf, cb_eval=broken, **CTX) as watched,
        pytest.raises(RuntimeError, match="observer failed"),
    ):
        watched.prefill_tokens(watched.tokenize("hello"))


def test_native_logs_go_to_logging_not_the_terminal(llama_mod, gemma3_gguf, caplog, capfd) -> None:
    capfd.readouterr()
    caplog.set_level(logging.DEBUG, logger="edgevision.decoder.native")
    with llama_mod.LlamaDecoder(gemma3_gguf, **CTX) as dec:
        dec.prefill_tokens(dec.tokenize("hi"))
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    native = [r for r in caplog.records if r.name == "edgevision.decoder.native"]
    assert any("gemma3" in r.getMessage() for r in native)
    assert all(not r.getMessage().endswith("\n") for r in native)


def test_closed_decoder_refuses_work(llama_mod, gemma3_gguf) -> None:
    with llama_mod.LlamaDecoder(gemma3_gguf, **CTX) as dec:
        dec.prefill_tokens(dec.tokenize("hi"))
    with pytest.raises(EdgevisionError, match="closed"):
        dec.prefill_tokens([1])
    dec.close()  # twice is fine


# -- the synthetic Gemma 4 MoE decoder -----------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma4_moe(tmp_path_factory):
    if not (ROOT / "tools" / "make_synthetic.py").exists():
        pytest.skip("tools/make_synthetic.py is not present")
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from make_synthetic import write_moe_decoder
    finally:
        sys.path.remove(str(ROOT / "tools"))
    return write_moe_decoder(tmp_path_factory.mktemp("moe") / "moe.gguf", seed=1, ftype="f32")


def test_gemma4_moe_takes_injected_rows_and_chat_markers(llama_mod, gemma4_moe) -> None:
    gguf = pytest.importorskip("gguf", reason="gguf is not installed: pip install gguf")
    table = next(t for t in gguf.GGUFReader(gemma4_moe).tensors if t.name == "token_embd.weight")
    with llama_mod.LlamaDecoder(gemma4_moe, n_ctx=256, n_batch=128) as moe:
        assert moe.meta("general.architecture") == "gemma4"
        for marker in ("<|turn>", "<turn|>", "<|image>", "<image|>", "<|channel>", "<channel|>"):
            assert len(moe.tokenize(marker, add_special=False)) == 1, marker

        ids = moe.tokenize("hello world, this is a test")
        rows = table.data[ids].astype(np.float32) * np.float32(llama_mod.embedding_scale(moe.n_embd))
        moe.prefill_tokens(ids[:2])
        moe.prefill_tokens(ids[2:])
        by_tokens = moe.logits()
        moe.reset()
        moe.prefill_tokens(ids[:2])
        moe.prefill_embeddings(rows[2:])
        assert np.abs(moe.logits() - by_tokens).max() < 1e-3

        moe.reset()
        turn = build_turn(QUESTION, image_tokens=16, system="Be brief.", fmt=GEMMA4)
        run_prompt(moe, turn.segments, _image(0, 16, 1.0, moe.n_embd))
        assert len(list(moe.generate(4, stop_on_eog=False))) > 0


def _cpu_repacks_q4_0() -> str | None:
    """Why llama.cpp's CPU back-end would not repack Q4_0 here, or None when it would (AVX2 on x86, the
    dot-product extension on Arm): the repack buffer type is the extra buffer type every such CPU has, so it
    stands in for AMX, which only some x86 hosts have."""
    import platform

    flags = Path("/proc/cpuinfo").read_text(errors="replace") if Path("/proc/cpuinfo").exists() else ""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64") and " avx2" in flags:
        return None
    if machine in ("aarch64", "arm64") and " asimddp" in flags:
        return None
    return f"llama.cpp does not repack Q4_0 on this CPU ({machine} without AVX2 or the Arm dot-product extension)"


def test_weights_stay_in_the_file_mapping_unless_extra_buffer_types_are_asked_for(llama_mod, tmp_path) -> None:
    """The decoder loads with llama.cpp's extra buffer types off: no weight is copied into AMX or CPU_REPACK
    buffers (AMX crashes on some hosts; copies leave the file mapping that expert residency manages). Asking for
    them puts Q4_0 weights into CPU_REPACK on any AVX2 or Arm dot-product CPU, so this test would see an AMX
    buffer too: both are extra buffer types chosen by the same switch."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from make_synthetic import write_moe_decoder
    finally:
        sys.path.remove(str(ROOT / "tools"))
    path = write_moe_decoder(tmp_path / "moe-q4_0.gguf", seed=1, ftype="q4_0")

    with llama_mod.LlamaDecoder(path, n_ctx=128, n_batch=64, n_threads=1) as default:
        assert default.weight_buffers, "llama.cpp's load log named no model buffer"
        assert set(default.weight_buffers) == {"CPU_Mapped"}, default.weight_buffers

    from edgevision.decoder.native import extra_buffer_types_work

    reason = _cpu_repacks_q4_0()
    if reason:
        pytest.skip(reason)
    with llama_mod.LlamaDecoder(path, n_ctx=128, n_batch=64, n_threads=1, extra_buffer_types=True) as asked:
        # asking never crashes the process: on a host where they die (AMX on some x86 machines) the decoder
        # loads without them, and decodes
        asked.prefill_tokens(asked.tokenize("The cup is on the table."))
        assert np.isfinite(asked.logits()).all()
        if extra_buffer_types_work(str(path)):
            assert asked.extra_buffer_types and "CPU_REPACK" in asked.weight_buffers, asked.weight_buffers
        else:
            assert not asked.extra_buffer_types and set(asked.weight_buffers) == {"CPU_Mapped"}
