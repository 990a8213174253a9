"""The OCR networks on ONNX Runtime: the CPU path everywhere, and its CUDA provider where present."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np

from edgevision.errors import MissingDependencyError, ModelError
from edgevision.ocr.models import STAGES, model_files

logger = logging.getLogger(__name__)


class OrtOcr:
    """One ONNX Runtime session per OCR network."""

    def __init__(self, directory: str | Path, *, threads: int = 0, providers: list[str] | None = None) -> None:
        if importlib.util.find_spec("onnxruntime") is None:
            raise MissingDependencyError("onnxruntime is not installed: pip install onnxruntime")
        import onnxruntime as ort

        files = model_files(directory)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self._sessions = {}
        for stage in STAGES:
            try:
                session = ort.InferenceSession(str(files[stage]), options, providers=providers)
            except Exception as exc:  # onnxruntime raises its own untyped errors for corrupt files
                raise ModelError(f"cannot load OCR model {files[stage]}: {exc}".splitlines()[0]) from exc
            self._sessions[stage] = (session, session.get_inputs()[0].name, session.get_outputs()[0].name)
        logger.debug("OCR models %s on %s", Path(directory), providers)

    def run(self, stage: str, batch: np.ndarray) -> np.ndarray:
        session, name, output = self._sessions[stage]
        (out,) = session.run([output], {name: np.ascontiguousarray(batch, dtype=np.float32)})
        return out

    def close(self) -> None:
        self._sessions = {}

    def __enter__(self) -> OrtOcr:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
