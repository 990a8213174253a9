"""Make a small synthetic vision tower (ONNX), deterministic from a seed.

The tower has the shape of a LLaVA-style encoder, scaled down: a patch-embedding convolution, a
position embedding, one pre-norm transformer block, a final layer norm, and a 2-layer GELU MLP
projector to the decoder's embedding width. Its rows are RMS-normalised and scaled to
``--row-rms`` so injected image tokens have the magnitude of the decoder's own input embeddings.
The weights are random: the tower proves the pipeline, not understanding.

    python tools/make_tower.py --out models/synthetic/tower.onnx --n-embd 640
    python tools/make_tower.py --out tower.onnx --match-gguf models/gemma-3-270m-q4_k_m.gguf
    python tools/make_tower.py --out tower.onnx --match-gguf models/smollm2-135m-instruct-q4_1.gguf
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgevision.vision.preprocess import METADATA_KEY, TowerSpec

OPSET = 17


def _gelu(nodes: list, x: str, name: str) -> str:
    """Exact (erf) GELU from basic ops, which every ONNX Runtime and TensorRT version parses."""
    for op, inputs, out in (
        ("Div", [x, "c_sqrt2"], f"{name}_d"),
        ("Erf", [f"{name}_d"], f"{name}_e"),
        ("Add", [f"{name}_e", "c_one"], f"{name}_a"),
        ("Mul", [x, f"{name}_a"], f"{name}_m"),
        ("Mul", [f"{name}_m", "c_half"], name),
    ):
        nodes.append(helper.make_node(op, inputs, [out]))
    return name


def build_tower(
    *,
    n_embd: int,
    seed: int = 0,
    image_size: int = 224,
    patch: int = 32,
    width: int = 64,
    row_rms: float = 1.0,
) -> onnx.ModelProto:
    if image_size % patch:
        raise ValueError("image_size must be a multiple of patch")
    rng = np.random.default_rng(seed)
    grid = image_size // patch
    n_tokens = grid * grid

    def w(name: str, *shape: int, scale: float | None = None) -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        std = scale if scale is not None else 1.0 / np.sqrt(fan_in)
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * std).astype(np.float32), name))
        return name

    def const(name: str, value) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    inits: list = []
    nodes: list = []
    const("c_sqrt2", np.sqrt(2.0))
    const("c_one", 1.0)
    const("c_half", 0.5)
    const("c_eps", 1e-6)
    const("c_row_rms", row_rms)
    const("c_attn_scale", 1.0 / np.sqrt(width))
    inits.append(numpy_helper.from_array(np.array([-1, width, n_tokens], np.int64), "shape_tokens"))
    for name in ("ln1", "ln2", "lnf"):
        const(f"{name}_g", np.ones(width))
        const(f"{name}_b", np.zeros(width))

    # Patch embedding: (B,3,S,S) → (B,W,g,g) → (B,T,W)
    w("patch_w", width, 3, patch, patch)
    nodes.append(helper.make_node("Conv", ["pixel_values", "patch_w"], ["patches"], strides=[patch, patch]))
    nodes.append(helper.make_node("Reshape", ["patches", "shape_tokens"], ["patches_flat"]))
    nodes.append(helper.make_node("Transpose", ["patches_flat"], ["tokens0"], perm=[0, 2, 1]))
    w("pos", n_tokens, width, scale=0.02)
    nodes.append(helper.make_node("Add", ["tokens0", "pos"], ["x0"]))

    # Pre-norm single-head self-attention.
    nodes.append(helper.make_node("LayerNormalization", ["x0", "ln1_g", "ln1_b"], ["h1"], axis=-1, epsilon=1e-5))
    for proj in ("q", "k", "v", "o"):
        w(f"w{proj}", width, width)
    for proj in ("q", "k", "v"):
        nodes.append(helper.make_node("MatMul", ["h1", f"w{proj}"], [proj]))
    nodes.append(helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]))
    nodes.append(helper.make_node("MatMul", ["q", "kt"], ["scores0"]))
    nodes.append(helper.make_node("Mul", ["scores0", "c_attn_scale"], ["scores"]))
    nodes.append(helper.make_node("Softmax", ["scores"], ["attn"], axis=-1))
    nodes.append(helper.make_node("MatMul", ["attn", "v"], ["ctx"]))
    nodes.append(helper.make_node("MatMul", ["ctx", "wo"], ["attn_out"]))
    nodes.append(helper.make_node("Add", ["x0", "attn_out"], ["x1"]))

    # Pre-norm MLP.
    nodes.append(helper.make_node("LayerNormalization", ["x1", "ln2_g", "ln2_b"], ["h2"], axis=-1, epsilon=1e-5))
    w("fc1", width, 4 * width)
    w("fc2", 4 * width, width)
    nodes.append(helper.make_node("MatMul", ["h2", "fc1"], ["m1"]))
    _gelu(nodes, "m1", "m1_act")
    nodes.append(helper.make_node("MatMul", ["m1_act", "fc2"], ["m2"]))
    nodes.append(helper.make_node("Add", ["x1", "m2"], ["x2"]))
    nodes.append(helper.make_node("LayerNormalization", ["x2", "lnf_g", "lnf_b"], ["feats"], axis=-1, epsilon=1e-5))

    # LLaVA projector: Linear → GELU → Linear, to the decoder's width.
    w("proj1", width, n_embd)
    w("proj2", n_embd, n_embd)
    nodes.append(helper.make_node("MatMul", ["feats", "proj1"], ["p1"]))
    _gelu(nodes, "p1", "p1_act")
    nodes.append(helper.make_node("MatMul", ["p1_act", "proj2"], ["p2"]))

    # Rows scaled to the decoder's input-embedding magnitude.
    nodes.append(helper.make_node("Mul", ["p2", "p2"], ["sq"]))
    nodes.append(helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[-1], keepdims=1))
    nodes.append(helper.make_node("Add", ["ms", "c_eps"], ["ms_eps"]))
    nodes.append(helper.make_node("Sqrt", ["ms_eps"], ["rms"]))
    nodes.append(helper.make_node("Div", ["p2", "rms"], ["unit"]))
    nodes.append(helper.make_node("Mul", ["unit", "c_row_rms"], ["image_embeds"]))

    graph = helper.make_graph(
        nodes,
        "edgevision_synthetic_tower",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, image_size, image_size])],
        [helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, ["batch", n_tokens, n_embd])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgevision")
    model.ir_version = 8
    spec = TowerSpec(image_size=image_size, n_tokens=n_tokens, n_embd=n_embd)
    helper.set_model_props(
        model, {METADATA_KEY: spec.to_json(), "edgevision.kind": "synthetic", "edgevision.seed": str(seed)}
    )
    onnx.checker.check_model(model)
    return model


def gguf_embedding_stats(path: Path) -> tuple[int, float, str]:
    """(n_embd, RMS of the token-embedding table, architecture) read from a GGUF decoder."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(path)
    field = reader.get_field("general.architecture")
    architecture = field.contents() if field is not None else "unknown"
    for tensor in reader.tensors:
        if tensor.name == "token_embd.weight":
            rows = dequantize(tensor.data[:4096], tensor.tensor_type)
            return int(rows.shape[-1]), float(np.sqrt(np.mean(np.square(rows, dtype=np.float64)))), architecture
    raise SystemExit(f"{path}: no token_embd.weight tensor")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="ONNX file to write")
    parser.add_argument("--n-embd", type=int, help="decoder embedding width (or use --match-gguf)")
    parser.add_argument("--match-gguf", type=Path, help="take the width and row scale from this decoder")
    parser.add_argument("--row-rms", type=float, default=None, help="RMS of each output row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--patch", type=int, default=32)
    args = parser.parse_args(argv)

    n_embd, row_rms = args.n_embd, args.row_rms
    if args.match_gguf:
        gguf_width, table_rms, architecture = gguf_embedding_stats(args.match_gguf)
        n_embd = n_embd or gguf_width
        # Gemma scales token embeddings by sqrt(n_embd) inside the graph, but not raw embedding inputs; Llama-style
        # decoders (SmolLM2) use the table as it is.
        scale = np.sqrt(gguf_width) if architecture.startswith("gemma") else 1.0
        row_rms = row_rms if row_rms is not None else table_rms * scale
    if not n_embd:
        parser.error("give --n-embd or --match-gguf")
    model = build_tower(
        n_embd=n_embd, seed=args.seed, image_size=args.image_size, patch=args.patch, row_rms=row_rms or 1.0
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    onnx.save(model, tmp)
    tmp.replace(args.out)
    grid = args.image_size // args.patch
    print(f"wrote {args.out}: {grid * grid} image tokens × {n_embd}, row RMS {row_rms or 1.0:.3f}, seed {args.seed}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
