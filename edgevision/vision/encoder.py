"""The vision tower interface, and the back-ends chosen by `vision.backend`."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from edgevision.plugins import load_class
from edgevision.vision.preprocess import TowerSpec, preprocess


class VisionEncoder(Protocol):
    """Turns one preprocessed image into image-token embeddings at the decoder's width."""

    spec: TowerSpec

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """(1, 3, S, S) float32 → (n_tokens, n_embd) float32."""

    def close(self) -> None: ...


# Back-end name → "module:class"; modules are imported only when chosen, so a machine without
# TensorRT never imports it.
BACKENDS = {
    "onnxruntime": "edgevision.vision.onnxruntime:OrtEncoder",
    "tensorrt": "edgevision.vision.tensorrt:TensorRTEncoder",
}


def open_encoder(backend: str, tower: Path, *, threads: int = 0) -> VisionEncoder:
    """Open the configured back-end on a tower file."""
    return load_class(BACKENDS, "vision.backend", backend)(tower, threads=threads)


def encode_image(encoder: VisionEncoder, image) -> np.ndarray:
    """PIL RGB image → (n_tokens, n_embd) float32 embeddings."""
    return encoder.encode_pixels(preprocess(image, encoder.spec))
