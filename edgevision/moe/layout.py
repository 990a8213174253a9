"""Where each expert's weights lie in a GGUF file.

A MoE layer stores its experts fused: ``blk.N.ffn_gate_up_exps.weight`` has ggml shape
``[n_embd, 2 * n_ff_exp, n_expert]`` (``ffn_down_exps``, ``ffn_gate_exps``/``ffn_up_exps`` in other
architectures likewise, and Gemma 4's ``ffn_down_exps.scale`` is ``[n_expert]``). The expert is the outermost
dimension, and quantized types pack blocks along the innermost one, so expert ``e``'s bytes are one contiguous
run: ``[offset + e * stride, offset + (e + 1) * stride)`` with ``stride = nbytes / n_expert``. Those runs are
what `edgevision.moe.pinning` locks in RAM and what the residency planner counts.

The router (``ffn_gate_inp``) also has one row per expert but is read for every token, so it counts as a
non-expert (always resident) tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from edgevision.errors import ModelError

_EXPERT_TENSOR = re.compile(r"^blk\.(\d+)\.(\w+_exps)\.(\w+)$")


@dataclass(frozen=True)
class ExpertTensor:
    """One fused per-expert tensor of a MoE layer."""

    name: str  # e.g. "blk.3.ffn_gate_up_exps.weight"
    layer: int
    offset: int  # absolute file offset of the tensor's data
    nbytes: int
    n_expert: int

    @property
    def stride(self) -> int:
        """Bytes per expert."""
        return self.nbytes // self.n_expert

    def expert_range(self, expert: int) -> tuple[int, int]:
        """Absolute ``(start, end)`` file offsets of `expert`'s bytes in this tensor."""
        if not 0 <= expert < self.n_expert:
            raise IndexError(f"expert {expert} out of range 0..{self.n_expert - 1} in {self.name}")
        start = self.offset + expert * self.stride
        return start, start + self.stride


@dataclass(frozen=True)
class ExpertLayout:
    """Every MoE layer's expert tensors in one GGUF file, and what the rest of the weights take."""

    path: Path
    file_size: int
    n_layer: int  # decoder layers (block_count); MoE layers are a subset
    n_expert: int
    n_expert_used: int
    tensors: tuple[ExpertTensor, ...]
    other_bytes: int  # all non-expert tensor data: always resident
    other_ranges: tuple[tuple[int, int], ...] = ()  # their file ranges, adjacent ones merged

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(sorted({t.layer for t in self.tensors}))

    def layer_tensors(self, layer: int) -> tuple[ExpertTensor, ...]:
        return tuple(t for t in self.tensors if t.layer == layer)

    def expert_ranges(self, layer: int, expert: int) -> tuple[tuple[int, int], ...]:
        """The file ranges holding one expert of one layer (one per fused tensor)."""
        ranges = tuple(t.expert_range(expert) for t in self.layer_tensors(layer))
        if not ranges:
            raise IndexError(f"layer {layer} has no expert tensors in {self.path.name}")
        return ranges

    def expert_bytes(self, layer: int) -> int:
        """Bytes of one expert of `layer`, all its fused tensors together."""
        return sum(t.stride for t in self.layer_tensors(layer))

    @property
    def expert_total(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def layer_bytes(self, layer: int) -> int:
        """Bytes of all of `layer`'s expert tensors (what a GPU placement of the layer takes)."""
        return sum(t.nbytes for t in self.layer_tensors(layer))


def read_layout(path: str | Path) -> ExpertLayout:
    """Read the expert tensors' placement from a GGUF file's header (no tensor data is read).

    Raises:
        ModelError: the file is not a readable GGUF, has no expert count, or no per-expert tensors.
    """
    import gguf  # the gguf package ships with llama.cpp's Python tooling; a dependency of edgevision

    path = Path(path)
    try:
        reader = gguf.GGUFReader(path, "r")
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read GGUF file {path}: {exc}") from exc
    arch = _field(reader, "general.architecture")
    n_expert = _field(reader, f"{arch}.expert_count")
    if not n_expert:
        raise ModelError(f"{path} ({arch}) has no {arch}.expert_count: it is not a mixture-of-experts model")
    n_used = _field(reader, f"{arch}.expert_used_count") or 0
    n_layer = _field(reader, f"{arch}.block_count") or 0
    experts: list[ExpertTensor] = []
    other = 0
    other_ranges: list[tuple[int, int]] = []
    for tensor in reader.tensors:
        match = _EXPERT_TENSOR.match(tensor.name)
        outer = int(tensor.shape[-1]) if len(tensor.shape) else 0  # gguf lists dims innermost first
        if match is None or outer != n_expert:
            other += int(tensor.n_bytes)
            other_ranges.append((int(tensor.data_offset), int(tensor.data_offset) + int(tensor.n_bytes)))
            continue
        if tensor.n_bytes % n_expert:
            raise ModelError(f"{path}: {tensor.name} has {tensor.n_bytes} bytes, not a multiple of {n_expert}")
        experts.append(
            ExpertTensor(
                name=tensor.name,
                layer=int(match.group(1)),
                offset=int(tensor.data_offset),
                nbytes=int(tensor.n_bytes),
                n_expert=int(n_expert),
            )
        )
    if not experts:
        raise ModelError(f"{path} declares {n_expert} experts but has no per-expert (*_exps) tensors")
    experts.sort(key=lambda t: (t.layer, t.offset))
    return ExpertLayout(
        path=path,
        file_size=path.stat().st_size,
        n_layer=int(n_layer),
        n_expert=int(n_expert),
        n_expert_used=int(n_used),
        tensors=tuple(experts),
        other_bytes=other,
        other_ranges=_merge(other_ranges),
    )


def _merge(ranges: list[tuple[int, int]], gap: int = 31) -> tuple[tuple[int, int], ...]:
    """Sorted ranges with those at most `gap` bytes apart joined: GGUF pads tensors to 32 bytes, so only
    padding is bridged, never a tensor (an expert tensor between two others is at least 32 bytes)."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start - merged[-1][1] <= gap:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return tuple(merged)


def _field(reader: object, key: str) -> int | str | None:
    field = reader.get_field(key)  # type: ignore[attr-defined]
    if field is None:
        return None
    value = field.contents()
    return value if isinstance(value, str) else int(value)
