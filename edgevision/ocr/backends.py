"""Which OCR back-ends exist (`ocr.backend`), and opening the configured one.

The registry maps the config value to ``"module:class"``; a back-end is imported only when chosen (a machine
without TensorRT never imports it). The back-ends import the model files' helpers from `models`, and this
module sits above them, so nothing imports in a circle.
"""

from __future__ import annotations

from pathlib import Path

from edgevision.ocr.models import OcrBackend
from edgevision.plugins import load_class

BACKENDS: dict[str, str] = {
    "onnxruntime": "edgevision.ocr.onnxruntime:OrtOcr",
    "tensorrt": "edgevision.ocr.tensorrt:TensorRTOcr",
}


def open_backend(backend: str, directory: str | Path, *, threads: int = 0) -> OcrBackend:
    """Open the configured back-end on a model set."""
    return load_class(BACKENDS, "ocr.backend", backend)(directory, threads=threads)
