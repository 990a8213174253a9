"""LLaVA-1.5 style towers (CLIP ViT + 2-layer GELU MLP projector) as ONNX.

`ClipTower` holds the weights in PyTorch layout, whatever the source: an mmproj GGUF of projector type
``mlp`` (`from_mmproj`) or a Hugging Face checkpoint (exporters/hf.py). `build` writes the graph:

    patches (+ class token) + positions → pre-LN → the first ``len(layers)`` blocks → [post-LN]
    → drop the class token's row → Linear → GELU → Linear

LLaVA takes the second-to-last block's output (``vision_feature_layer = -2``), so `layers` holds every
block but the last. The class token goes first (position 0) as in CLIP. The llama.cpp in
llama-cpp-python 0.3.36 appends it last instead (its llava graph concatenates it after the patches but
still fills positions and the kept rows for class-first: upstream issue ggml-org/llama.cpp#25814); so that
its embeddings can be reproduced exactly, ``cls_last=True`` exports that layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from edgevision.vision.preprocess import METADATA_KEY, TowerSpec
from exporters.graph import Graph
from exporters.mmproj import Mmproj, MmprojError

LLAVA_PAD = (122, 116, 104)


@dataclass
class ClipLayer:
    ln1: tuple[np.ndarray, np.ndarray | None]
    q: tuple[np.ndarray, np.ndarray | None]
    k: tuple[np.ndarray, np.ndarray | None]
    v: tuple[np.ndarray, np.ndarray | None]
    o: tuple[np.ndarray, np.ndarray | None]
    ln2: tuple[np.ndarray, np.ndarray | None]
    up: tuple[np.ndarray, np.ndarray | None]
    down: tuple[np.ndarray, np.ndarray | None]


@dataclass
class ClipTower:
    """A CLIP vision tower cut at its feature layer, with its LLaVA projector."""

    image_size: int
    n_head: int
    eps: float
    act: str  # the blocks' MLP activation: gelu_quick (OpenAI CLIP), gelu, gelu_erf or silu
    patch_w: np.ndarray  # (width, 3, patch, patch)
    pos: np.ndarray  # (n_positions, width)
    layers: list[ClipLayer]
    mm0: tuple[np.ndarray, np.ndarray | None]
    mm2: tuple[np.ndarray, np.ndarray | None] | None
    proj_act: str = "gelu"  # llama.cpp's ggml_gelu is the tanh form; PyTorch's nn.GELU() is gelu_erf
    patch_b: np.ndarray | None = None
    class_embd: np.ndarray | None = None
    pre_ln: tuple[np.ndarray, np.ndarray | None] | None = None
    post_ln: tuple[np.ndarray, np.ndarray | None] | None = None
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    cls_last: bool = False
    source: str = ""
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def patch(self) -> int:
        return int(self.patch_w.shape[-1])

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    @property
    def width(self) -> int:
        return int(self.patch_w.shape[0])

    @property
    def n_embd(self) -> int:
        return int((self.mm2 or self.mm0)[0].shape[0])

    def spec(self) -> TowerSpec:
        return TowerSpec(
            image_size=self.image_size,
            n_tokens=self.grid * self.grid,
            n_embd=self.n_embd,
            resize="pad",
            mean=tuple(float(v) for v in self.mean),
            std=tuple(float(v) for v in self.std),
            pad_value=LLAVA_PAD,
            pad_rounding="ceil",
            source=self.source,
        )


def build(t: ClipTower) -> onnx.ModelProto:
    g = Graph()
    n_patch = t.grid * t.grid
    n_pos = n_patch + (1 if t.class_embd is not None else 0)
    if t.pos.shape[0] != n_pos:
        raise MmprojError(f"position table has {t.pos.shape[0]} rows, the image needs {n_pos}")
    d_head = t.width // t.n_head
    x = g.patches("pixel_values", t.patch_w, t.patch_b, t.grid, t.grid)
    if t.class_embd is not None:
        batch = g.op("Shape", x, start=0, end=1)
        shape = g.op("Concat", batch, g.const([1, t.width], "shape", np.int64), axis=0)
        cls = g.op("Expand", g.const(t.class_embd.reshape(1, 1, -1), "cls"), shape)
        x = g.op("Concat", *((x, cls) if t.cls_last else (cls, x)), axis=1)
    x = g.add(x, g.const(t.pos, "pos"))
    if t.pre_ln is not None:
        x = g.layer_norm(x, *t.pre_ln, t.eps)
    for layer in t.layers:
        h = g.layer_norm(x, *layer.ln1, t.eps)
        q, k, v = (g.heads(y, n_pos, t.n_head, d_head) for y in g.linears(h, [layer.q, layer.k, layer.v], "qkv"))
        x = g.add(x, g.linear(g.attention(q, k, v, 1.0 / np.sqrt(d_head), n_pos, t.width), *layer.o))
        h = g.layer_norm(x, *layer.ln2, t.eps)
        x = g.add(x, g.linear(g.act(g.linear(h, *layer.up), t.act), *layer.down))
    if t.post_ln is not None:
        x = g.layer_norm(x, *t.post_ln, t.eps)
    if t.class_embd is not None:  # keep rows 1..n_patch (llama.cpp's "patches" input does the same)
        x = g.op(
            "Slice", x, g.const([1], "i", np.int64), g.const([n_patch + 1], "i", np.int64), g.const([1], "i", np.int64)
        )
    x = g.act(g.linear(x, *t.mm0), t.proj_act)
    if t.mm2 is not None:
        x = g.linear(x, *t.mm2)
    spec = t.spec()
    meta = {METADATA_KEY: spec.to_json(), "edgevision.kind": "llava-mlp", **t.metadata}
    return g.model(x, t.image_size, spec.n_tokens, spec.n_embd, meta)


def _pair(mm: Mmproj, name: str, required: bool = True) -> tuple[np.ndarray, np.ndarray | None] | None:
    w = mm.tensor(f"{name}.weight", required)
    return None if w is None else (w, mm.tensor(f"{name}.bias", False))


def from_mmproj(mm: Mmproj, *, cls_last: bool = False) -> ClipTower:
    """The tower an mmproj GGUF of projector type ``mlp`` describes (llama.cpp's llava graph)."""
    if mm.projector != "mlp":
        raise MmprojError(f"{mm.path}: projector type {mm.projector!r}, this exporter reads 'mlp'")
    if mm.kv("clip.vision.feature_layer", None) is not None:
        raise MmprojError(f"{mm.path}: explicit feature layers (granite-style stacking) are not supported")
    if mm.tensor("mm.3.weight", False) is not None:
        raise MmprojError(f"{mm.path}: an mlp_norm (Yi-style) projector is not supported")
    n_layer = int(mm.kv("clip.vision.block_count"))
    act = "gelu" if mm.kv("clip.use_gelu", False) else "silu" if mm.kv("clip.use_silu", False) else "gelu_quick"
    layers = []
    for il in range(n_layer - 1):  # llama.cpp runs every block but the last (the second-to-last's output)
        p = f"v.blk.{il}"
        up, down = _pair(mm, f"{p}.ffn_up"), _pair(mm, f"{p}.ffn_down")
        if down[0].shape[1] == up[0].shape[1]:  # legacy conversions named up/down the other way round
            up, down = down, up
        layers.append(
            ClipLayer(
                ln1=_pair(mm, f"{p}.ln1"), q=_pair(mm, f"{p}.attn_q"), k=_pair(mm, f"{p}.attn_k"),
                v=_pair(mm, f"{p}.attn_v"), o=_pair(mm, f"{p}.attn_out"), ln2=_pair(mm, f"{p}.ln2"),
                up=up, down=down,
            )
        )  # fmt: skip
    return ClipTower(
        image_size=int(mm.kv("clip.vision.image_size")),
        n_head=int(mm.kv("clip.vision.attention.head_count")),
        eps=float(mm.kv("clip.vision.attention.layer_norm_epsilon")),
        act=act,
        patch_w=mm.tensor("v.patch_embd.weight"),
        patch_b=mm.tensor("v.patch_embd.bias", False),
        class_embd=mm.tensor("v.class_embd", False),
        pos=mm.tensor("v.position_embd.weight"),
        pre_ln=_pair(mm, "v.pre_ln", False),
        post_ln=_pair(mm, "v.post_ln", False),
        layers=layers,
        mm0=_pair(mm, "mm.0"),
        mm2=_pair(mm, "mm.2", False),
        proj_act="gelu",
        mean=tuple(mm.kv("clip.vision.image_mean")),
        std=tuple(mm.kv("clip.vision.image_std")),
        cls_last=cls_last,
        source="mmproj:mlp" + (":cls-last" if cls_last else ""),
        metadata={"edgevision.source_file": Path(mm.path).name},
    )
