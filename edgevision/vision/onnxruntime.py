"""Vision tower on ONNX Runtime: the CPU path everywhere, and its CUDA provider where present."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np

from edgevision.errors import MissingDependencyError, ModelError
from edgevision.vision.preprocess import METADATA_KEY, TowerSpec

logger = logging.getLogger(__name__)


class OrtEncoder:
    """One ONNX Runtime session over one tower file."""

    def __init__(self, tower: str | Path, *, threads: int = 0, providers: list[str] | None = None) -> None:
        if importlib.util.find_spec("onnxruntime") is None:
            raise MissingDependencyError("onnxruntime is not installed: pip install onnxruntime")
        import onnxruntime as ort

        self.path = Path(tower)
        if not self.path.is_file():
            raise ModelError(f"vision tower not found: {self.path} — run 'make models'")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self._session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors for corrupt files
            raise ModelError(f"cannot load vision tower {self.path}: {exc}".splitlines()[0]) from exc
        meta = self._session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in meta:
            raise ModelError(
                f"{self.path} has no '{METADATA_KEY}' metadata: export it with the tools in tools/"
            )
        self.spec = TowerSpec.from_json(meta[METADATA_KEY], source=str(self.path))
        self._input = self._session.get_inputs()[0].name
        self._output = self._session.get_outputs()[0].name
        logger.debug("vision tower %s on %s: %s", self.path.name, self._session.get_providers(), self.spec)

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        (out,) = self._session.run([self._output], {self._input: pixels.astype(np.float32, copy=False)})
        return np.ascontiguousarray(out.reshape(-1, self.spec.n_embd), dtype=np.float32)

    def close(self) -> None:
        self._session = None

    def __enter__(self) -> OrtEncoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
