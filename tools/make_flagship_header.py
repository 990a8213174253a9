"""Write a header-only copy of Gemma 4 26B-A4B's GGUF, for `edgevision plan` without the 14 GB of weights.

The header carries the published shapes (Hugging Face ``google/gemma-4-26b-a4b-it`` config.json, text part):
30 layers of hidden size 2816, every layer with a dense shared MLP of 2112 beside a router over 128 experts of
width 704 (top 8), 16 query heads; sliding-window layers (5 of every 6, window 1024) have 8 KV heads of 256,
full-attention layers 2 KV heads of 512 whose values are their keys (``attention_k_eq_v``: no ``attn_v``);
a 262,144-token vocabulary whose embedding is also the output projection (tied). That is 25.2 B weights,
3.8 B of them used per token.

Tensor types follow a Q4_K_M-like recipe, as llama.cpp's quantizer would choose them: matrices at 4.5 bits per
weight (Q4_K where the row length is a multiple of 256, else Q4_0, e.g. the experts' down projection with rows of
704), the tied embedding at Q6_K (llama.cpp gives the output projection 6 bits), routers and norms F32.

No tensor data is written: the file is made sparse (``truncate`` to the full size), so its size and every
tensor's offset are those of the real file and the gguf reader accepts it, but it takes only its header's few
kilobytes on disk. Reading a tensor's data gives zeros; llama.cpp would load garbage, so it is for planning.

    python tools/make_flagship_header.py --out models/gemma-4-26b-a4b-header.gguf
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

ARCH = "gemma4"


@dataclass(frozen=True)
class Gemma4Shape:
    """The published text-model shape of Gemma 4 26B-A4B."""

    n_layer: int = 30
    n_embd: int = 2816
    n_ff: int = 2112  # the dense shared MLP beside the experts
    n_ff_exp: int = 704
    n_expert: int = 128
    n_expert_used: int = 8
    n_head: int = 16
    n_head_kv_swa: int = 8
    n_head_kv_full: int = 2
    head_dim_swa: int = 256
    head_dim_full: int = 512
    full_every: int = 6  # layers 5, 11, ... use full attention
    sliding_window: int = 1024
    n_vocab: int = 262_144
    context_length: int = 262_144

    def is_swa(self, layer: int) -> bool:
        return (layer + 1) % self.full_every != 0


def matrix_type(row: int) -> Q:
    """4.5 bits per weight: Q4_K when the row length allows its 256-weight blocks, else Q4_0 (32)."""
    return Q.Q4_K if row % 256 == 0 else Q.Q4_0


def tensors(shape: Gemma4Shape) -> Iterator[tuple[str, tuple[int, ...], Q]]:
    """(GGUF name, shape in numpy order (outermost first), type) of every tensor, in file order."""
    n = shape.n_embd
    yield "token_embd.weight", (shape.n_vocab, n), Q.Q6_K
    yield "rope_freqs.weight", (shape.head_dim_full // 2,), Q.F32
    for il in range(shape.n_layer):
        p = f"blk.{il}"
        swa = shape.is_swa(il)
        hd = shape.head_dim_swa if swa else shape.head_dim_full
        q_dim = shape.n_head * hd
        kv_dim = (shape.n_head_kv_swa if swa else shape.n_head_kv_full) * hd
        yield f"{p}.attn_norm.weight", (n,), Q.F32
        yield f"{p}.attn_q.weight", (q_dim, n), matrix_type(n)
        yield f"{p}.attn_k.weight", (kv_dim, n), matrix_type(n)
        if swa:  # full-attention layers use their keys as values (attention_k_eq_v)
            yield f"{p}.attn_v.weight", (kv_dim, n), matrix_type(n)
        yield f"{p}.attn_q_norm.weight", (hd,), Q.F32
        yield f"{p}.attn_k_norm.weight", (hd,), Q.F32
        yield f"{p}.attn_output.weight", (n, q_dim), matrix_type(q_dim)
        yield f"{p}.post_attention_norm.weight", (n,), Q.F32
        yield f"{p}.ffn_norm.weight", (n,), Q.F32
        yield f"{p}.ffn_gate.weight", (shape.n_ff, n), matrix_type(n)
        yield f"{p}.ffn_up.weight", (shape.n_ff, n), matrix_type(n)
        yield f"{p}.ffn_down.weight", (n, shape.n_ff), matrix_type(shape.n_ff)
        yield f"{p}.post_ffw_norm_1.weight", (n,), Q.F32
        yield f"{p}.ffn_gate_inp.weight", (shape.n_expert, n), Q.F32  # llama.cpp never quantizes routers
        yield f"{p}.ffn_gate_inp.scale", (n,), Q.F32
        yield f"{p}.pre_ffw_norm_2.weight", (n,), Q.F32
        yield f"{p}.ffn_gate_up_exps.weight", (shape.n_expert, 2 * shape.n_ff_exp, n), matrix_type(n)
        yield f"{p}.ffn_down_exps.weight", (shape.n_expert, n, shape.n_ff_exp), matrix_type(shape.n_ff_exp)
        yield f"{p}.ffn_down_exps.scale", (shape.n_expert,), Q.F32
        yield f"{p}.post_ffw_norm_2.weight", (n,), Q.F32
        yield f"{p}.post_ffw_norm.weight", (n,), Q.F32
        yield f"{p}.layer_output_scale.weight", (1,), Q.F32
    yield "output_norm.weight", (n,), Q.F32


def nbytes(shape: tuple[int, ...], qtype: Q) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    count = int(np.prod(shape))
    if shape[-1] % block:
        raise ValueError(f"rows of {shape[-1]} do not divide into {qtype.name} blocks of {block}")
    return count // block * size


def write_header(path: str | os.PathLike[str], shape: Gemma4Shape | None = None) -> Path:
    """Write the header-only GGUF (sparse, at the real file's size) and return its path."""
    shape = shape or Gemma4Shape()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, ARCH)
    data = 0
    try:
        writer.add_name("Gemma 4 26B-A4B (header only: shapes and types, no weights)")
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
        writer.add_context_length(shape.context_length)
        writer.add_embedding_length(shape.n_embd)
        writer.add_block_count(shape.n_layer)
        writer.add_feed_forward_length(shape.n_ff)
        writer.add_expert_feed_forward_length(shape.n_ff_exp)
        writer.add_expert_count(shape.n_expert)
        writer.add_expert_used_count(shape.n_expert_used)
        writer.add_head_count(shape.n_head)
        writer.add_head_count_kv(
            [shape.n_head_kv_swa if shape.is_swa(il) else shape.n_head_kv_full for il in range(shape.n_layer)]
        )
        writer.add_key_length(shape.head_dim_full)
        writer.add_value_length(shape.head_dim_full)
        writer.add_key_length_swa(shape.head_dim_swa)
        writer.add_value_length_swa(shape.head_dim_swa)
        writer.add_sliding_window(shape.sliding_window)
        writer.add_sliding_window_pattern([shape.is_swa(il) for il in range(shape.n_layer)])
        writer.add_vocab_size(shape.n_vocab)
        for name, dims, qtype in tensors(shape):
            size = nbytes(dims, qtype)
            writer.add_tensor_info(name, dims, np.dtype(np.float32), size, raw_dtype=qtype)
            data += gguf.GGUFWriter.ggml_pad(size, writer.data_alignment)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        assert writer.fout is not None
        (out,) = writer.fout
        writer.write_padding(out, out.tell())
        start = out.tell()
    finally:
        writer.close()
    os.truncate(path, start + data)  # a hole where the weights would be
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make_flagship_header.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the .gguf file to write")
    args = parser.parse_args(argv)
    path = write_header(args.out)
    used = os.stat(path).st_blocks * 512
    print(f"{path}\t{path.stat().st_size} bytes ({used} on disk)\tGemma 4 26B-A4B shapes, Q4_K_M-like types")
    return 0


if __name__ == "__main__":
    sys.exit(main())
