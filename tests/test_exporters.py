"""Tower exporters (tools/export_tower.py): the Hugging Face CLIP + LLaVA exporter against a direct numpy
evaluation of the same checkpoint, the CLI, and the errors a user can run into."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from edgevision.vision.onnxruntime import OrtEncoder
from edgevision.vision.preprocess import TowerSpec

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tools():
    sys.path[:0] = [str(ROOT / "tools")]
    try:
        import export_tower
        import make_mmproj
        from exporters import hf
    finally:
        del sys.path[0]
    return export_tower, make_mmproj, hf


def _numpy_llava(checkpoint: Path, projector: Path, pixels: np.ndarray) -> np.ndarray:
    """LLaVA-1.5's image features, straight from the HF tensors: CLIP embeddings (class token first),
    pre-LayerNorm, every block but the last (hidden_states[-2]), drop the class token, Linear-GELU-Linear."""
    from math import erf

    cfg = json.loads((checkpoint / "config.json").read_text())
    t = {k: v.astype(np.float64) for k, v in load_file(str(checkpoint / "model.safetensors")).items()}
    p = {k: v.astype(np.float64) for k, v in load_file(str(projector)).items()}
    width, heads, eps, patch = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"], cfg["patch_size"]
    v = "vision_model."

    def ln(x, name):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * t[v + name + ".weight"] + t[v + name + ".bias"]

    def lin(x, name, w=t, prefix=v):
        return x @ w[prefix + name + ".weight"].T + w[prefix + name + ".bias"]

    img = pixels[0].astype(np.float64)
    g = img.shape[-1] // patch
    cells = img.reshape(3, g, patch, g, patch).transpose(1, 3, 0, 2, 4).reshape(g * g, -1)
    x = cells @ t[v + "embeddings.patch_embedding.weight"].reshape(width, -1).T
    x = np.concatenate([t[v + "embeddings.class_embedding"][None], x]) + t[v + "embeddings.position_embedding.weight"]
    x = ln(x, "pre_layrnorm")
    d = width // heads
    for il in range(cfg["num_hidden_layers"] - 1):
        b = f"encoder.layers.{il}."
        h = ln(x, b + "layer_norm1")
        q, k, vv = (lin(h, b + f"self_attn.{n}_proj").reshape(-1, heads, d).transpose(1, 0, 2) for n in "qkv")
        s = q @ k.transpose(0, 2, 1) / np.sqrt(d)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        x = x + lin((a @ vv).transpose(1, 0, 2).reshape(-1, width), b + "self_attn.out_proj")
        h = lin(ln(x, b + "layer_norm2"), b + "mlp.fc1")
        x = x + lin(h / (1 + np.exp(-1.702 * h)), b + "mlp.fc2")
    h = lin(x[1:], "model.mm_projector.0", p, "")
    h = 0.5 * h * (1 + np.vectorize(erf)(h / np.sqrt(2)))
    return lin(h, "model.mm_projector.2", p, "")


def test_hf_exporter_matches_numpy_evaluation(tools, tmp_path) -> None:
    export_tower, _, hf = tools
    checkpoint, projector = hf.write_tiny_checkpoint(tmp_path / "clip", n_embd=48, seed=2)
    spec = export_tower.export_hf(checkpoint, projector, tmp_path / "tower.onnx")
    assert (spec.n_tokens, spec.n_embd, spec.image_size) == (16, 48, 32)
    pixels = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    with OrtEncoder(tmp_path / "tower.onnx") as enc:
        ours = enc.encode_pixels(pixels)
    expected = _numpy_llava(checkpoint, projector, pixels)
    assert np.abs(ours - expected).max() < 1e-4 * np.abs(expected).max()


def test_cli_exports_an_mmproj_and_refuses_a_bad_file(tools, tmp_path) -> None:
    _, make_mmproj, _ = tools
    mmproj = make_mmproj.write_mmproj(
        tmp_path / "mmproj.gguf", projector="gemma4v", n_embd=64, grid=3, patch=4, ftype="f16"
    )
    out = tmp_path / "tower.onnx"
    cli = [sys.executable, str(ROOT / "tools" / "export_tower.py"), "mmproj"]
    done = subprocess.run(
        [*cli, str(mmproj), "--out", str(out)], check=False, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "9 image tokens × 64" in done.stdout
    with OrtEncoder(out) as enc:
        assert enc.spec.source == "mmproj:gemma4v"
        assert enc.encode_pixels(np.zeros((1, 3, enc.spec.image_size, enc.spec.image_size), np.float32)).shape == (
            9,
            64,
        )

    not_gguf = tmp_path / "notes.txt"
    not_gguf.write_text("hello")
    done = subprocess.run(
        [*cli, str(not_gguf), "--out", str(out)], check=False, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "not a readable GGUF" in done.stderr


def test_towers_exported_before_these_fields_still_load() -> None:
    old = json.dumps({"image_size": 224, "n_tokens": 49, "n_embd": 640, "resize": "pad"})
    spec = TowerSpec.from_json(old)
    assert (spec.pad_rounding, spec.source) == ("round", "")
    assert TowerSpec.from_json(spec.to_json()) == spec


def test_bench_vision_prints_our_time_next_to_mtmd(tools, tmp_path) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install llama-cpp-python==0.3.36")
    export_tower, make_mmproj, _ = tools
    sys.path[:0] = [str(ROOT / "tools")]
    try:
        from make_synthetic import write_moe_decoder
    finally:
        del sys.path[0]
    decoder = write_moe_decoder(tmp_path / "moe.gguf", seed=1, ftype="f32", n_layer=2)
    mmproj = make_mmproj.write_mmproj(tmp_path / "mmproj.gguf", projector="mlp", n_embd=128, grid=4)
    export_tower.export_mmproj(mmproj, tmp_path / "tower.onnx", cls_last=True)
    args = ["--mmproj", str(mmproj), "--tower", str(tmp_path / "tower.onnx"), "--decoder", str(decoder)]
    done = subprocess.run(
        [sys.executable, "-m", "edgevision", "bench", "vision", *args, "--runs", "2", "--warmup", "1", "--threads", "1"],
        check=False, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    row = next(line.split() for line in done.stdout.splitlines() if "onnxruntime" in line)
    ours, theirs, ratio = (float(v) for v in row[-3:])
    assert ours > 0 and theirs > 0 and abs(ratio - ours / theirs) <= 0.02 + 0.05 * ratio
