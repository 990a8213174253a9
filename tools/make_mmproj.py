"""Make tiny, seeded llama.cpp mmproj GGUFs (vision tower + projector) that mtmd loads like real ones.

Two projector types, with the keys and tensor names llama.cpp's ``tools/mtmd/clip.cpp`` reads:

``mlp``      LLaVA-1.5: a CLIP ViT (class token, learned positions, pre-LayerNorm, LayerNorm blocks with
             biases and quick-GELU MLPs); the projector takes the second-to-last block's patch features and
             applies Linear → GELU → Linear (``mm.0``, ``mm.2``).
``gemma4v``  Gemma 4's vision tower: patches from ``2·x − 1`` pixels, separate x/y learned position tables,
             RMS-norm blocks with per-head q/k norms, weightless v norm, 2-D RoPE (θ = 100), post-attention
             and post-FFN norms, a gated GELU MLP, k×k average pooling scaled by √width, optional
             standardisation (``v.std_bias``/``v.std_scale``), RMS norm and one projection; some linears
             carry Gemma4ClippableLinear clamp scalars.

The output width (``--n-embd``) must equal the decoder's ``n_embd`` (mtmd refuses a mismatch); the
synthetic Gemma-4 MoE decoder from tools/make_synthetic.py has 128. Weights are random: the files prove
that exporters and prompt assembly reproduce llama.cpp, not that the tower understands images.

    python tools/make_mmproj.py --type mlp --out models/synthetic/mmproj-mlp.gguf --n-embd 128
    python tools/make_mmproj.py --type gemma4v --out models/synthetic/mmproj-gemma4v.gguf --n-embd 128
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import Path

import gguf
import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROJECTOR_TYPES = ("mlp", "gemma4v")


@dataclass(frozen=True)
class MmprojSpec:
    """Shape of a synthetic mmproj; every field is also a CLI option."""

    projector: str = "mlp"
    n_embd: int = 128  # output width = the decoder's n_embd
    seed: int = 0
    width: int = 64  # vision hidden size
    n_head: int = 4
    n_ff: int = 128
    n_layer: int = 3
    patch: int = 8
    grid: int = 9  # image tokens per side (mlp: patches; gemma4v: pooled cells; mtmd wants >= 70 tokens)
    n_merge: int = 3  # gemma4v pooling kernel
    pos_size: int = 32  # gemma4v position table length per axis
    ftype: str = "f32"  # f32 | f16 for the matrices

    @property
    def image_size(self) -> int:
        return self.grid * self.patch * (self.n_merge if self.projector == "gemma4v" else 1)


def _tensors_mlp(spec: MmprojSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    w, f, n = spec.width, spec.n_ff, spec.n_embd
    n_pos = spec.grid * spec.grid + 1

    def lin(out_f: int, in_f: int) -> np.ndarray:
        return rng.standard_normal((out_f, in_f)) / np.sqrt(in_f)

    def vec(size: int, base: float = 0.0, scale: float = 0.02) -> np.ndarray:
        return base + scale * rng.standard_normal(size)

    t: dict[str, np.ndarray] = {
        "v.patch_embd.weight": rng.standard_normal((w, 3, spec.patch, spec.patch)) / np.sqrt(3 * spec.patch**2),
        "v.class_embd": vec(w, scale=1.0),
        "v.position_embd.weight": rng.standard_normal((n_pos, w)) * 0.5,
        "v.pre_ln.weight": vec(w, 1.0, 0.1),
        "v.pre_ln.bias": vec(w),
    }
    for il in range(spec.n_layer):
        p = f"v.blk.{il}"
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            t[f"{p}.{name}.weight"] = lin(w, w)
            t[f"{p}.{name}.bias"] = vec(w)
        t[f"{p}.ln1.weight"], t[f"{p}.ln1.bias"] = vec(w, 1.0, 0.1), vec(w)
        t[f"{p}.ln2.weight"], t[f"{p}.ln2.bias"] = vec(w, 1.0, 0.1), vec(w)
        t[f"{p}.ffn_up.weight"], t[f"{p}.ffn_up.bias"] = lin(f, w), vec(f)
        t[f"{p}.ffn_down.weight"], t[f"{p}.ffn_down.bias"] = lin(w, f), vec(w)
    t["mm.0.weight"], t["mm.0.bias"] = lin(n, w), vec(n)
    t["mm.2.weight"], t["mm.2.bias"] = lin(n, n), vec(n)
    return t


def _tensors_gemma4v(spec: MmprojSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    w, f, n, dh = spec.width, spec.n_ff, spec.n_embd, spec.width // spec.n_head

    def lin(out_f: int, in_f: int) -> np.ndarray:
        return rng.standard_normal((out_f, in_f)) / np.sqrt(in_f)

    def norm(size: int) -> np.ndarray:
        return 1.0 + 0.1 * rng.standard_normal(size)

    t: dict[str, np.ndarray] = {
        "v.patch_embd.weight": rng.standard_normal((w, 3, spec.patch, spec.patch)) / np.sqrt(3 * spec.patch**2),
        # (2, pos_size, width): the x table, then the y table
        "v.position_embd.weight": rng.standard_normal((2, spec.pos_size, w)) * 0.5,
        "v.std_bias": 0.1 * rng.standard_normal(w),
        "v.std_scale": 1.0 + 0.1 * rng.standard_normal(w),
        "mm.input_projection.weight": lin(n, w),
    }
    for il in range(spec.n_layer):
        p = f"v.blk.{il}"
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            t[f"{p}.{name}.weight"] = lin(w, w)
        t[f"{p}.attn_q_norm.weight"] = norm(dh)
        t[f"{p}.attn_k_norm.weight"] = norm(dh)
        for name in ("ln1", "ln2", "attn_post_norm", "ffn_post_norm"):
            t[f"{p}.{name}.weight"] = norm(w)
        t[f"{p}.ffn_gate.weight"], t[f"{p}.ffn_up.weight"] = lin(f, w), lin(f, w)
        t[f"{p}.ffn_down.weight"] = lin(w, f)
    # Gemma4ClippableLinear: scalars beside a weight clamp its input and output.
    clamps = {"v.blk.0.ffn_down": (-1.5, 1.5, -2.0, 2.0), "mm.input_projection": (-2.5, 2.5, -3.0, 3.0)}
    for base, (in_min, in_max, out_min, out_max) in clamps.items():
        for suffix, value in (
            ("input_min", in_min),
            ("input_max", in_max),
            ("output_min", out_min),
            ("output_max", out_max),
        ):
            t[f"{base}.{suffix}"] = np.array([value])
    return t


def write_mmproj(path: str | Path, spec: MmprojSpec | None = None, **overrides: object) -> Path:
    """Write a synthetic mmproj GGUF to `path` and return it; `overrides` replace `spec` fields."""
    spec = MmprojSpec(**{**(spec.__dict__ if spec else {}), **overrides})
    if spec.projector not in PROJECTOR_TYPES:
        raise ValueError(f"projector must be one of {PROJECTOR_TYPES}, not {spec.projector!r}")
    if spec.width % spec.n_head or (spec.width // spec.n_head) % 4:
        raise ValueError("width / n_head must be a multiple of 4 (2-D RoPE splits each head in halves of pairs)")
    if spec.projector == "gemma4v" and spec.grid * spec.n_merge > spec.pos_size:
        raise ValueError("gemma4v: patches per side (grid · n_merge) exceed pos_size")
    rng = np.random.default_rng(spec.seed)
    is_gemma = spec.projector == "gemma4v"
    tensors = (_tensors_gemma4v if is_gemma else _tensors_mlp)(spec, rng)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, "clip")
    try:
        writer.add_string("general.name", f"edgevision synthetic {spec.projector} mmproj (seed {spec.seed})")
        writer.add_uint32("general.file_type", 1 if spec.ftype == "f16" else 0)
        writer.add_bool("clip.has_vision_encoder", True)
        writer.add_string("clip.projector_type", spec.projector)
        writer.add_bool("clip.use_gelu", is_gemma)  # mlp: CLIP's quick GELU; gemma4v: GELU (tanh)
        writer.add_uint32("clip.vision.image_size", spec.image_size)
        writer.add_uint32("clip.vision.patch_size", spec.patch)
        writer.add_uint32("clip.vision.embedding_length", spec.width)
        writer.add_uint32("clip.vision.feed_forward_length", spec.n_ff)
        writer.add_uint32("clip.vision.block_count", spec.n_layer)
        writer.add_uint32("clip.vision.projection_dim", spec.n_embd)
        writer.add_uint32("clip.vision.attention.head_count", spec.n_head)
        writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6 if is_gemma else 1e-5)
        writer.add_array("clip.vision.image_mean", [0.0, 0.0, 0.0] if is_gemma else list(CLIP_MEAN))
        writer.add_array("clip.vision.image_std", [1.0, 1.0, 1.0] if is_gemma else list(CLIP_STD))
        if is_gemma:
            writer.add_uint32("clip.vision.projector.scale_factor", spec.n_merge)
        for name, array in tensors.items():
            matrix = array.ndim >= 2 and name != "v.position_embd.weight"
            dtype = np.float16 if matrix and spec.ftype == "f16" else np.float32
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=dtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="GGUF file to write")
    parser.add_argument("--type", dest="projector", choices=PROJECTOR_TYPES, default="mlp")
    for fld in fields(MmprojSpec):
        if fld.name != "projector":
            parser.add_argument(f"--{fld.name.replace('_', '-')}", type=type(fld.default), default=fld.default)
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    spec = MmprojSpec(**args)
    write_mmproj(out, spec)
    tokens = spec.grid * spec.grid
    print(
        f"wrote {out}: {spec.projector}, {spec.image_size}px → {tokens} image tokens × {spec.n_embd}, seed {spec.seed}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
