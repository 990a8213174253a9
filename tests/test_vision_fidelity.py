"""Our ONNX towers and prompt assembly against llama.cpp's own multimodal implementation (libmtmd).

On synthetic mmproj files of both projector types (tools/make_mmproj.py) paired with the synthetic
Gemma-4 MoE decoder: the exported tower (ONNX Runtime) must give mtmd's image embeddings token for token,
and the whole prompt (system, image, question) prefilled through edgevision.decoder.prompt and
`LlamaDecoder.prefill_embeddings` must leave the decoder where mtmd's own path (mtmd_tokenize +
mtmd_helper_eval_chunks) leaves it: the same tokens and image positions, the same next-token logits, the
same greedy answer. Measured numbers are printed (pytest -s) and written to $EDGEVISION_FIDELITY_OUT if set.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from edgevision.decoder.prompt import GEMMA4, LLAVA, Image, Text, build_turn, run_prompt
from edgevision.vision.encoder import encode_image
from edgevision.vision.onnxruntime import OrtEncoder

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "What is in front of me?"
SYSTEM = "Answer briefly."
RESULTS: dict[str, dict[str, float]] = {}

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install llama-cpp-python==0.3.36")


def _tools():
    sys.path[:0] = [str(ROOT / "tools")]
    try:
        import export_tower
        import make_mmproj
        import make_synthetic
    finally:
        del sys.path[0]
    return export_tower, make_mmproj, make_synthetic


def _record(kind: str, **values: float) -> None:
    RESULTS.setdefault(kind, {}).update(values)
    print(f"\n[fidelity {kind}] " + ", ".join(f"{k}={v:.6g}" for k, v in values.items()))
    out = os.environ.get("EDGEVISION_FIDELITY_OUT")
    if out:
        Path(out).write_text(json.dumps(RESULTS, indent=2), encoding="utf-8")


def _image(width: int, height: int, seed: int):
    """A smooth colour field with texture, so resizing and every patch matter."""
    from PIL import Image as PILImage

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([np.sin(6 * x + 1), np.cos(5 * y), np.sin(4 * (x + y))], -1) * 90 + 128
    return PILImage.fromarray(np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def decoder_path(tmp_path_factory) -> Path:
    _, _, make_synthetic = _tools()
    return make_synthetic.write_moe_decoder(tmp_path_factory.mktemp("fidelity") / "moe.gguf", seed=1, ftype="f32")


@pytest.fixture(scope="module", params=["mlp", "gemma4v"])
def case(request, tmp_path_factory):
    """(projector type, mmproj GGUF, exported ONNX tower, test image, chat format)."""
    export_tower, make_mmproj, _ = _tools()
    kind = request.param
    folder = tmp_path_factory.mktemp(kind)
    mmproj = make_mmproj.write_mmproj(folder / "mmproj.gguf", projector=kind, n_embd=128, seed=3)
    tower = folder / "tower.onnx"
    # mlp: the llama.cpp under test orders CLIP's class token last (ggml-org/llama.cpp#25814); export that.
    spec = export_tower.export_mmproj(mmproj, tower, cls_last=kind == "mlp")
    # mlp: a landscape frame (letterboxed by both paths); gemma4v: a square frame both resize to the grid.
    image = _image(100, 80, seed=5) if kind == "mlp" else _image(spec.image_size + 4, spec.image_size + 4, seed=6)
    return kind, mmproj, tower, image, LLAVA if kind == "mlp" else GEMMA4


def _reference(mmproj: Path, decoder):
    from edgevision.vision.mtmd import MtmdReference

    return MtmdReference(mmproj, decoder, n_threads=2)


def test_onnx_tower_matches_mtmd_on_every_image_token(case, decoder_path) -> None:
    from edgevision.decoder.llama import LlamaDecoder

    kind, mmproj, tower, image, _ = case
    with LlamaDecoder(decoder_path, n_ctx=256, n_batch=256, n_threads=2) as dec, _reference(mmproj, dec) as ref:
        theirs = ref.encode(image)
    with OrtEncoder(tower, threads=2) as enc:
        ours = encode_image(enc, image)
    assert ours.shape == theirs.shape
    cos = np.sum(ours * theirs, 1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
    rel = np.abs(ours - theirs).max(1) / np.abs(theirs).max(1)
    _record(kind, tokens=len(cos), min_cosine=float(cos.min()), max_rel_err=float(rel.max()))
    assert cos.min() >= 0.999, f"token {int(cos.argmin())} has cosine {cos.min():.5f}"


@pytest.mark.parametrize("kind", ["mlp", "gemma4v"])
def test_f16_mmproj_under_llama_cpp_defaults_still_matches(kind, decoder_path, tmp_path) -> None:
    """Real mmproj files hold f16 matrices and llama.cpp picks flash attention itself (f16 K/V on the CPU)."""
    from edgevision.decoder.llama import LlamaDecoder
    from edgevision.vision.mtmd import MtmdReference

    export_tower, make_mmproj, _ = _tools()
    mmproj = make_mmproj.write_mmproj(tmp_path / "mmproj.gguf", projector=kind, n_embd=128, seed=4, ftype="f16")
    spec = export_tower.export_mmproj(mmproj, tmp_path / "tower.onnx", cls_last=kind == "mlp")
    image = _image(spec.image_size, spec.image_size, seed=7)
    with (
        LlamaDecoder(decoder_path, n_ctx=256, n_batch=256, n_threads=2) as dec,
        MtmdReference(mmproj, dec, n_threads=2, flash_attn=None) as ref,
    ):
        theirs = ref.encode(image)
    with OrtEncoder(tmp_path / "tower.onnx", threads=2) as enc:
        ours = encode_image(enc, image)
    cos = np.sum(ours * theirs, 1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
    rel = np.abs(ours - theirs).max(1) / np.abs(theirs).max(1)
    _record(f"{kind}-f16", min_cosine=float(cos.min()), max_rel_err=float(rel.max()))
    assert cos.min() >= 0.999


def _segments_tokens(dec, segments) -> list[int]:
    """The prompt as token ids, with -1 for each image row."""
    out: list[int] = []
    for seg in segments:
        match seg:
            case Text(text=text, special=special):
                out += dec.tokenize(text, add_special=False, parse_special=special)
            case Image(n_tokens=n):
                out += [-1] * n
    return out


def _greedy(dec, n: int) -> list[str]:
    return list(dec.generate(n, stop_on_eog=False))


def test_whole_prompt_matches_mtmd_multimodal_path(case, decoder_path) -> None:
    from edgevision.decoder.llama import LlamaDecoder

    kind, mmproj, tower, image, fmt = case
    with OrtEncoder(tower, threads=2) as enc:
        rows = encode_image(enc, image)
    turn = build_turn(QUESTION, image_tokens=len(rows), system=SYSTEM, fmt=fmt)

    with LlamaDecoder(decoder_path, n_ctx=512, n_batch=256, n_threads=2) as dec:
        ours_tokens = _segments_tokens(dec, turn.segments)
        n_past = run_prompt(dec, turn.segments, rows)
        ours_logits = dec.logits()
        ours_answer = _greedy(dec, 12)

    with LlamaDecoder(decoder_path, n_ctx=512, n_batch=256, n_threads=2) as dec, _reference(mmproj, dec) as ref:
        # The same prompt as text with mtmd's media marker where our Image segment is; for gemma4v mtmd
        # writes <|image> and <image|> itself.
        text = "".join(ref.marker if isinstance(s, Image) else s.text for s in turn.segments)
        if kind == "gemma4v":
            text = text.replace(fmt.image_start + ref.marker + fmt.image_end, ref.marker)
        theirs_tokens = [
            t for c in ref.layout(text, [image]) for t in (c.tokens if c.kind == "text" else [-1] * c.n_tokens)
        ]
        assert ref.non_causal == (not fmt.image_causal)
        assert ref.prefill(text, [image]) == n_past
        theirs_logits = dec.logits()
        theirs_answer = _greedy(dec, 12)

    assert ours_tokens == theirs_tokens  # markers, whitespace and the image's place, token for token
    diff = float(np.abs(ours_logits - theirs_logits).max())
    _record(kind, max_abs_logit_diff=diff, logit_scale=float(np.abs(theirs_logits).max()))
    assert int(ours_logits.argmax()) == int(theirs_logits.argmax())
    assert diff < 0.05, f"next-token logits differ by up to {diff:.4f}"
    assert "".join(ours_answer) == "".join(theirs_answer)
