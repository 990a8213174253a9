"""Export a vision tower, projector included, to ONNX with its preprocessing recorded in the metadata.

The tower's output has one row per image token at the decoder's embedding width, ready for
`LlamaDecoder.prefill_embeddings`. Everything is read from local files; nothing is downloaded.

    # llama.cpp mmproj GGUF, projector type mlp (LLaVA-1.5, MoE-LLaVA, LLaVA-GM) or gemma4v (Gemma 4)
    python tools/export_tower.py mmproj mmproj-model-f16.gguf --out engines/tower.onnx
    python tools/export_tower.py mmproj mmproj-gemma4.gguf --out engines/tower.onnx --tokens-per-side 16

    # Hugging Face CLIP vision checkpoint directory + LLaVA projector weights (mm_projector.bin as safetensors)
    python tools/export_tower.py hf clip-vit-large-patch14-336/ --projector mm_projector.safetensors --out t.onnx

``--llama-cpp-cls-last`` (mlp only) reproduces the class-token layout of the llama.cpp bundled with
llama-cpp-python 0.3.36 (ggml-org/llama.cpp#25814) instead of CLIP's; use it only to compare with that
llama.cpp.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from exporters import clip, gemma4v, hf
from exporters.graph import save
from exporters.mmproj import Mmproj

from edgevision.errors import EdgevisionError
from edgevision.vision.preprocess import METADATA_KEY, TowerSpec


def export_mmproj(path: Path, out: Path, *, cls_last: bool = False, tokens_per_side: int | None = None) -> TowerSpec:
    """mmproj GGUF (mlp or gemma4v) → ONNX tower at `out`; returns its preprocessing."""
    mm = Mmproj(path)
    if mm.projector == "mlp":
        model = clip.build(clip.from_mmproj(mm, cls_last=cls_last))
    elif mm.projector == "gemma4v":
        model = gemma4v.build(mm, tokens_per_side=tokens_per_side)
    else:
        raise EdgevisionError(f"{path}: projector type {mm.projector!r} is not supported (mlp, gemma4v)")
    save(model, out)
    return _spec(model)


def export_hf(checkpoint: Path, projector: Path, out: Path, *, feature_layer: int = -2) -> TowerSpec:
    """HF CLIP vision checkpoint + LLaVA mm_projector safetensors → ONNX tower at `out`."""
    model = clip.build(hf.load(checkpoint, projector, feature_layer=feature_layer))
    save(model, out)
    return _spec(model)


def _spec(model) -> TowerSpec:
    meta = {p.key: p.value for p in model.metadata_props}
    return TowerSpec.from_json(meta[METADATA_KEY])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="source", required=True)
    p = sub.add_parser("mmproj", help="from a llama.cpp mmproj GGUF (projector type mlp or gemma4v)")
    p.add_argument("mmproj", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokens-per-side", type=int, help="gemma4v: image tokens per side of the fixed grid")
    p.add_argument("--llama-cpp-cls-last", action="store_true", help="mlp: llama-cpp-python 0.3.36's CLS layout")
    p = sub.add_parser("hf", help="from a Hugging Face CLIP vision checkpoint and LLaVA projector weights")
    p.add_argument("checkpoint", type=Path, help="directory with config.json and model.safetensors")
    p.add_argument("--projector", type=Path, required=True, help="mm_projector weights (.safetensors)")
    p.add_argument("--feature-layer", type=int, default=-2, help="hidden state fed to the projector (LLaVA: -2)")
    p.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.source == "mmproj":
            spec = export_mmproj(
                args.mmproj, args.out, cls_last=args.llama_cpp_cls_last, tokens_per_side=args.tokens_per_side
            )
        else:
            spec = export_hf(args.checkpoint, args.projector, args.out, feature_layer=args.feature_layer)
    except (EdgevisionError, OSError) as exc:
        print(f"export_tower: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {spec.image_size}px → {spec.n_tokens} image tokens × {spec.n_embd} ({spec.source})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
