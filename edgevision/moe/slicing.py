"""Write a GGUF decoder with fewer experts per layer, copying the kept experts' bytes as they are.

In a GGUF MoE model every per-expert tensor has the expert as its outermost ggml dimension
(``ffn_gate_up_exps`` ``[n_embd, 2 * n_ff_exp, n_expert]``, ``ffn_down_exps`` ``[n_ff_exp, n_embd,
n_expert]``, the router ``ffn_gate_inp`` ``[n_embd, n_expert]``, Gemma 4's per-expert output scale
``ffn_down_exps.scale`` ``[n_expert]``), so each expert is one contiguous byte range of its tensor, and
a quantized tensor's blocks never straddle two experts. Slicing is therefore a copy of byte ranges: no
tensor is dequantized or re-quantized, and a model that keeps every expert is written byte for byte as it
was (the header is re-emitted from the original field bytes, tensors are packed at the file's alignment
as gguf-py and llama.cpp write them).

The metadata changes are ``<arch>.expert_count`` and, when experts are dropped,
``edgevision.prune.kept_experts`` (per layer, the original ids of the kept experts, in their new order) and
``edgevision.prune.source_expert_count``, so a router profile of the original can be mapped onto it.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgevision.errors import InputError, ModelError

KEPT_KEY = "edgevision.prune.kept_experts"
SOURCE_COUNT_KEY = "edgevision.prune.source_expert_count"
# synthetic models (tools/make_synthetic.py) record each layer's preferred experts; kept consistent here
PREFERENCE_KEY = "edgevision.synthetic.expert_preference"

_GGUF_UINT32, _GGUF_INT32, _GGUF_ARRAY = 4, 5, 9


@dataclass(frozen=True)
class ExpertTensor:
    name: str
    layer: int
    n_bytes: int  # of the whole tensor in the source


@dataclass(frozen=True)
class MoeFile:
    """What slicing needs to know about a GGUF MoE decoder."""

    path: Path
    arch: str
    n_layer: int
    n_expert: int
    n_expert_used: int
    size: int
    expert_bytes: int  # bytes of all per-expert tensors together (what slicing scales)

    def pruned_size(self, keep: int) -> int:
        """Approximately the file size when `keep` experts per layer remain (alignment padding aside)."""
        return self.size - self.expert_bytes + self.expert_bytes * keep // self.n_expert


def _reader(path: Path):
    import gguf

    if not path.is_file():
        raise ModelError(
            f"decoder model {path} does not exist; check the path (run 'make models' for the synthetic one)"
        )
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise ModelError(f"{path} is not a readable GGUF file ({exc}); download or convert it again") from exc


def _value(reader, key: str):
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _is_expert_tensor(name: str, n_expert: int, shape: list[int]) -> int | None:
    """The layer of a per-expert tensor (router rows, expert weights, their scales and biases), else None."""
    parts = name.split(".")
    if len(parts) < 3 or parts[0] != "blk" or not parts[1].isdigit():
        return None
    kind = parts[2]
    per_expert = kind.endswith("_exps") or kind in ("ffn_gate_inp", "exp_probs_b")
    if kind == "ffn_gate_inp" and parts[-1] == "scale":
        return None  # Gemma 4's router input scale: one value per channel, not per expert
    if per_expert and shape and shape[-1] == n_expert:
        return int(parts[1])
    if per_expert:
        raise ModelError(f"tensor {name} {shape} does not have the {n_expert} experts as its outermost dimension")
    return None


def inspect_moe(path: str | os.PathLike[str]) -> MoeFile:
    """Read a MoE decoder's shape and how many of its bytes are per-expert tensors."""
    path = Path(path)
    reader = _reader(path)
    arch = _value(reader, "general.architecture")
    n_expert = _value(reader, f"{arch}.expert_count")
    if not n_expert:
        raise ModelError(f"{path} is not a mixture-of-experts model (no {arch}.expert_count); prune needs one")
    expert_bytes = 0
    for tensor in reader.tensors:
        if _is_expert_tensor(tensor.name, n_expert, [int(d) for d in tensor.shape]) is not None:
            expert_bytes += int(tensor.n_bytes)
    return MoeFile(
        path=path,
        arch=str(arch),
        n_layer=int(_value(reader, f"{arch}.block_count")),
        n_expert=int(n_expert),
        n_expert_used=int(_value(reader, f"{arch}.expert_used_count")),
        size=path.stat().st_size,
        expert_bytes=expert_bytes,
    )


def _align(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def _gguf_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _int32_array_field(key: str, values: np.ndarray) -> bytes:
    values = np.asarray(values, dtype="<i4").reshape(-1)
    return _gguf_string(key) + struct.pack("<IIQ", _GGUF_ARRAY, _GGUF_INT32, values.size) + values.tobytes()


def write_pruned(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    keep: Mapping[int, np.ndarray] | np.ndarray,
) -> Path:
    """Write `source` with only the experts in ``keep[layer]`` (original ids; written in ascending order)
    to `out`. Every layer must keep the same number (llama.cpp has one expert count per model), at least
    the model's experts-per-token."""
    source, out = Path(source), Path(out)
    if source.resolve() == out.resolve():
        raise InputError(f"the pruned model would overwrite {source}; choose another output file")
    reader = _reader(source)
    info = inspect_moe(source)
    kept = _check_keep(keep, info)
    n_keep = kept.shape[1]
    dropping = n_keep < info.n_expert
    alignment = int(reader.alignment)

    fields = [f for f in reader.fields.values() if not f.name.startswith("GGUF.")]
    extra = []
    if dropping:
        # a second pruning replaces the earlier record instead of adding duplicate keys
        fields = [f for f in fields if f.name not in (KEPT_KEY, SOURCE_COUNT_KEY)]
        extra = [
            _int32_array_field(KEPT_KEY, kept),
            _gguf_string(SOURCE_COUNT_KEY) + struct.pack("<II", _GGUF_UINT32, info.n_expert),
        ]
    header = bytearray(reader.data[:4].tobytes())  # magic
    version = int(_value(reader, "GGUF.version"))
    header += struct.pack("<IQQ", version, len(reader.tensors), len(fields) + len(extra))
    for field in fields:
        header += _field_bytes(field, info, kept, dropping)
    header += b"".join(extra)

    plan = list(_tensor_plan(reader, info, kept))
    offset = 0
    for name, shape, ggml_type, _, size in plan:
        header += _gguf_string(name) + struct.pack("<I", len(shape))
        header += struct.pack(f"<{len(shape)}Q", *shape) + struct.pack("<IQ", ggml_type, offset)
        offset = _align(offset + size, alignment)
    header += b"\0" * (_align(len(header), alignment) - len(header))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        with tmp.open("wb") as f:
            f.write(header)
            for _, _, _, ranges, size in plan:
                for start, end in ranges:
                    f.write(memoryview(reader.data[start:end]))
                f.write(b"\0" * (_align(size, alignment) - size))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _check_keep(keep: Mapping[int, np.ndarray] | np.ndarray, info: MoeFile) -> np.ndarray:
    rows = [np.asarray(keep[il]).reshape(-1) for il in range(info.n_layer)]
    if len({row.size for row in rows}) != 1:
        raise InputError("every layer must keep the same number of experts (llama.cpp has one expert count)")
    kept = np.sort(np.stack(rows).astype(np.int64), axis=1)
    n_keep = kept.shape[1]
    if n_keep < info.n_expert_used:
        raise InputError(
            f"keeping {n_keep} experts per layer is fewer than the {info.n_expert_used} each token uses; "
            f"keep at least {info.n_expert_used}"
        )
    if (kept < 0).any() or (kept >= info.n_expert).any():
        raise InputError(f"expert ids to keep must be in 0..{info.n_expert - 1}")
    if (np.diff(kept, axis=1) == 0).any():
        raise InputError("an expert is listed twice among those to keep")
    return kept


def _field_bytes(field, info: MoeFile, kept: np.ndarray, dropping: bool) -> bytes:
    """A metadata entry as it was, or with the values that depend on the kept experts."""
    raw = b"".join(part.tobytes() for part in field.parts)
    if not dropping:
        return raw
    if field.name == f"{info.arch}.expert_count":
        return _gguf_string(field.name) + struct.pack("<II", _GGUF_UINT32, kept.shape[1])
    if field.name == PREFERENCE_KEY:
        preference = np.asarray(field.contents(), dtype=np.int64).reshape(info.n_layer, info.n_expert)
        renamed = []
        for il in range(info.n_layer):
            new_id = {int(old): new for new, old in enumerate(kept[il])}
            renamed.append([new_id[int(e)] for e in preference[il] if int(e) in new_id])
        return _int32_array_field(field.name, np.array(renamed))
    return raw


def _tensor_plan(reader, info: MoeFile, kept: np.ndarray) -> Iterator[tuple[str, list[int], int, list, int]]:
    """(name, ggml shape, ggml type, source byte ranges, size) for each tensor, in the source's order."""
    for tensor in reader.tensors:
        shape = [int(d) for d in tensor.shape]
        start, n_bytes = int(tensor.data_offset), int(tensor.n_bytes)
        layer = _is_expert_tensor(tensor.name, info.n_expert, shape)
        if layer is None or kept.shape[1] == info.n_expert:
            yield tensor.name, shape, int(tensor.tensor_type), [(start, start + n_bytes)], n_bytes
            continue
        per = n_bytes // info.n_expert
        ranges = _merge_ranges([(start + int(e) * per, start + (int(e) + 1) * per) for e in kept[layer]])
        yield tensor.name, [*shape[:-1], kept.shape[1]], int(tensor.tensor_type), ranges, per * kept.shape[1]


def _merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in ranges:
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged
