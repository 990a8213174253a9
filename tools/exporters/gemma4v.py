"""Gemma 4's vision tower (mmproj projector type ``gemma4v``) as ONNX, following llama.cpp's graph
(``tools/mtmd/models/gemma4v.cpp`` and ``clip_graph::build_vit``):

    2·x − 1 → patch conv (no bias) → + x-table[col] + y-table[row]
    → blocks: RMS(ln1) → q, k, v → per-head RMS q/k norms (weighted), weightless RMS v norm → 2-D RoPE
      (NeoX pairs, θ = 100: the first half of each head rotates with the column, the second with the row)
      → attention with scale 1 → out → RMS(attn_post_norm) → + residual → RMS(ln2) → GELU(gate)·up → down
      → RMS(ffn_post_norm) → + residual [→ · out_scale]
    → k×k average pooling of the patch grid → · √width → [(x − std_bias) · std_scale] → RMS → projection

Linears may carry Gemma4ClippableLinear scalars (``<name>.input_min`` … ``output_max``): inputs and outputs
are clamped as llama.cpp does. llama.cpp sizes Gemma 4 images dynamically (keeping the aspect ratio, 70 to
1120 tokens); an ONNX tower has one fixed square grid, `tokens_per_side` cells a side (the mmproj's
``image_size`` rounded to a multiple of patch · k by default). A square image of exactly that size goes
through both paths unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from edgevision.vision.preprocess import METADATA_KEY, TowerSpec
from exporters.graph import Graph
from exporters.mmproj import Mmproj, MmprojError

ROPE_THETA = 100.0
_CLAMPS = ("input_min", "input_max", "output_min", "output_max")


@dataclass
class _Linear:
    w: np.ndarray
    clamp: tuple[float, float, float, float] | None = None


def _linear(mm: Mmproj, name: str) -> _Linear:
    w = mm.tensor(f"{name}.weight")
    values = [mm.tensor(f"{name}.{s}", False) for s in _CLAMPS]
    if all(v is None for v in values):
        return _Linear(w)
    lo_hi = [
        float(v.reshape(-1)[0]) if v is not None else d for v, d in zip(values, (-np.inf, np.inf) * 2, strict=True)
    ]
    return _Linear(w, tuple(lo_hi))


def _apply(g: Graph, x: str, lin: _Linear) -> str:
    if lin.clamp is None:
        return g.linear(x, lin.w)
    in_min, in_max, out_min, out_max = lin.clamp
    return g.clip(g.linear(g.clip(x, in_min, in_max), lin.w), out_min, out_max)


def _rope_tables(n_side: int, d_head: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cos, signed sin (T, d_head) and the partner index of each channel, for ggml's NeoX RoPE applied to
    channels [0, d/2) with the column and [d/2, d) with the row (ggml_rope_ext + ggml_rope_set_offset)."""
    half = d_head // 2
    quarter = half // 2
    t = np.arange(n_side * n_side)
    cols, rows = t % n_side, t // n_side
    theta_scale = np.float32(ROPE_THETA) ** (np.float32(-2.0) / np.float32(half))
    freqs = theta_scale ** np.arange(quarter, dtype=np.float32)  # ggml multiplies theta by theta_scale
    cos = np.empty((len(t), d_head), np.float32)
    sin = np.empty((len(t), d_head), np.float32)
    partner = np.empty(d_head, np.int64)
    for offset, pos in ((0, cols), (half, rows)):
        angle = pos[:, None].astype(np.float32) * freqs[None, :]
        c, s = np.cos(angle), np.sin(angle)
        lo = offset + np.arange(quarter)
        hi = lo + quarter
        cos[:, lo], cos[:, hi] = c, c
        sin[:, lo], sin[:, hi] = -s, s  # x0' = x0·cos − x1·sin; x1' = x0·sin + x1·cos
        partner[lo], partner[hi] = hi, lo
    return cos, sin, partner


def build(mm: Mmproj, *, tokens_per_side: int | None = None) -> onnx.ModelProto:
    if mm.projector != "gemma4v":
        raise MmprojError(f"{mm.path}: projector type {mm.projector!r}, this exporter reads 'gemma4v'")
    patch = int(mm.kv("clip.vision.patch_size"))
    k = int(mm.kv("clip.vision.projector.scale_factor", 3))
    n_head = int(mm.kv("clip.vision.attention.head_count"))
    eps = float(mm.kv("clip.vision.attention.layer_norm_epsilon"))
    n_layer = int(mm.kv("clip.vision.block_count"))
    if not mm.kv("clip.use_gelu", False):
        raise MmprojError(f"{mm.path}: expected clip.use_gelu (Gemma 4's GELU MLP)")
    side = tokens_per_side or max(1, int(mm.kv("clip.vision.image_size")) // (patch * k))
    n_side = side * k  # patches per side
    image_size = n_side * patch
    patch_w = mm.tensor("v.patch_embd.weight")
    width = int(patch_w.shape[0])
    d_head = width // n_head
    if d_head % 4:
        raise MmprojError(f"{mm.path}: head size {d_head} is not a multiple of 4 (2-D RoPE)")
    pos_table = mm.tensor("v.position_embd.weight")  # (2, pos_size, width)
    if pos_table.ndim != 3 or pos_table.shape[0] != 2 or pos_table.shape[1] < n_side:
        raise MmprojError(f"{mm.path}: position table {pos_table.shape} does not cover {n_side} patches a side")
    q_norm = mm.tensor("v.blk.0.attn_q_norm.weight", False)
    if q_norm is not None and q_norm.shape[-1] != d_head:
        raise MmprojError(f"{mm.path}: q/k norms of width {q_norm.shape[-1]}; this exporter reads per-head norms")
    proj = _linear(mm, "mm.input_projection")
    n_embd = int(proj.w.shape[0])

    g = Graph()
    x = g.scale("pixel_values", 2.0, -1.0)
    x = g.patches(x, patch_w, None, n_side, n_side)
    t = np.arange(n_side * n_side)
    x = g.add(x, g.const(pos_table[0, t % n_side] + pos_table[1, t // n_side], "pos"))
    cos, sin, partner = _rope_tables(n_side, d_head)
    cos_c, sin_c, partner_c = g.const(cos[:, None, :], "rope_cos"), g.const(sin[:, None, :], "rope_sin"), None
    partner_c = g.const(partner, "rope_partner", np.int64)

    def rope(h: str) -> str:  # h: (B, T, H, D)
        return g.add(g.mul(h, cos_c), g.mul(g.op("Gather", h, partner_c, axis=3), sin_c))

    T = n_side * n_side
    for il in range(n_layer):
        p = f"v.blk.{il}"

        def norm(h: str, name: str, _p: str = p) -> str:
            w = mm.tensor(f"{_p}.{name}.weight", False)
            return g.rms_norm(h, eps, w) if w is not None else h

        h = norm(x, "ln1")
        qkv = [_linear(mm, f"{p}.attn_{n}") for n in "qkv"]
        if any(lin.clamp for lin in qkv):
            parts = [_apply(g, h, lin) for lin in qkv]
        else:
            parts = g.linears(h, [(lin.w, None) for lin in qkv], "qkv")
        q, kk, v = (g.reshape(part, [-1, T, n_head, d_head]) for part in parts)
        q, kk = rope(norm(q, "attn_q_norm")), rope(norm(kk, "attn_k_norm"))
        v = g.rms_norm(v, eps)
        heads = [g.transpose(a, [0, 2, 1, 3]) for a in (q, kk, v)]
        attn = _apply(g, g.attention(*heads, 1.0, T, width), _linear(mm, f"{p}.attn_out"))
        x = g.add(x, norm(attn, "attn_post_norm"))
        h = norm(x, "ln2")
        gate = g.gelu_tanh(_apply(g, h, _linear(mm, f"{p}.ffn_gate")))
        ffn = _apply(g, g.mul(gate, _apply(g, h, _linear(mm, f"{p}.ffn_up"))), _linear(mm, f"{p}.ffn_down"))
        x = g.add(x, norm(ffn, "ffn_post_norm"))
        scale = mm.tensor(f"{p}.out_scale.weight", False)
        if scale is not None:
            x = g.mul(x, g.const(scale))
    post = mm.tensor("v.post_ln.weight", False)
    if post is not None:
        x = g.rms_norm(x, eps, post)

    # Pooling: (B, T, W) → (B, W, rows, cols) → k×k mean → (B, side², W) · √W
    grid = g.reshape(g.transpose(x, [0, 2, 1]), [-1, width, n_side, n_side])
    pooled = g.op("AveragePool", grid, kernel_shape=[k, k], strides=[k, k])
    x = g.scale(g.transpose(g.reshape(pooled, [-1, width, side * side]), [0, 2, 1]), float(np.sqrt(np.float32(width))))
    std_bias, std_scale = mm.tensor("v.std_bias", False), mm.tensor("v.std_scale", False)
    if std_bias is not None and std_scale is not None:
        x = g.mul(g.op("Sub", x, g.const(std_bias)), g.const(std_scale))
    x = _apply(g, g.rms_norm(x, eps), proj)

    spec = TowerSpec(
        image_size=image_size,
        n_tokens=side * side,
        n_embd=n_embd,
        resize="pad",
        mean=tuple(float(v) for v in mm.kv("clip.vision.image_mean")),
        std=tuple(float(v) for v in mm.kv("clip.vision.image_std")),
        pad_value=(0, 0, 0),
        source="mmproj:gemma4v",
    )
    meta = {METADATA_KEY: spec.to_json(), "edgevision.kind": "gemma4v", "edgevision.source_file": Path(mm.path).name}
    return g.model(x, image_size, spec.n_tokens, n_embd, meta)
