"""Reading llama.cpp mmproj GGUFs: metadata and tensors (dequantized to float32, in PyTorch layout)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgevision.errors import ModelError

_MISSING = object()


class MmprojError(ModelError):
    """An mmproj file this exporter cannot turn into a tower."""


class Mmproj:
    """One mmproj GGUF. `tensor` returns numpy arrays in the order of their GGUF dims reversed, which is
    PyTorch's layout: a linear weight is (out, in), a patch convolution (out, 3, patch, patch)."""

    def __init__(self, path: str | Path) -> None:
        from gguf import GGUFReader

        self.path = Path(path)
        if not self.path.is_file():
            raise MmprojError(f"mmproj file not found: {self.path}")
        try:
            self._reader = GGUFReader(self.path)
        except (ValueError, OSError) as exc:
            raise MmprojError(f"{self.path} is not a readable GGUF file ({exc})") from exc
        self._tensors = {t.name: t for t in self._reader.tensors}
        if not self.kv("clip.has_vision_encoder", False):
            raise MmprojError(f"{self.path} has no vision encoder (clip.has_vision_encoder is not set)")
        self.projector = str(self.kv("clip.projector_type", None) or self.kv("clip.vision.projector_type", ""))

    def kv(self, key: str, default=_MISSING):
        field = self._reader.fields.get(key)
        if field is None:
            if default is _MISSING:
                raise MmprojError(f"{self.path}: metadata key {key} is missing")
            return default
        return field.contents()

    def tensor(self, name: str, required: bool = True) -> np.ndarray | None:
        t = self._tensors.get(name)
        if t is None:
            if required:
                raise MmprojError(f"{self.path}: tensor {name} is missing")
            return None
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        shape = tuple(int(n) for n in reversed(t.shape))
        if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            data = np.asarray(t.data)
        else:
            data = dequantize(t.data, t.tensor_type)
        return np.asarray(data, dtype=np.float32).reshape(shape)

    def names(self) -> list[str]:
        return list(self._tensors)
