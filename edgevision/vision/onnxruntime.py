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

        disable_telemetry(ort)
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
            raise ModelError(f"{self.path} has no '{METADATA_KEY}' metadata: export it with the tools in tools/")
        self.spec = TowerSpec.from_json(meta[METADATA_KEY], source=str(self.path))
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        self._input = inputs[0].name
        self._output = outputs[0].name
        check_declared_shapes(self.path, self.spec, inputs[0].shape, outputs[0].shape)
        logger.debug("vision tower %s on %s: %s", self.path.name, self._session.get_providers(), self.spec)

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        (out,) = self._session.run([self._output], {self._input: pixels.astype(np.float32, copy=False)})
        check_output_shape(self.path, self.spec, out.shape)
        return np.ascontiguousarray(out.reshape(-1, self.spec.n_embd), dtype=np.float32)

    def close(self) -> None:
        self._session = None

    def __enter__(self) -> OrtEncoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def disable_telemetry(ort) -> None:
    """Turn off ONNX Runtime's telemetry events: an offline device records nothing about its host."""
    disable = getattr(ort, "disable_telemetry_events", None)
    if disable is not None:
        disable()


def check_declared_shapes(path: Path, spec: TowerSpec, input_shape, output_shape) -> None:
    """Refuse a tower whose metadata disagrees with the input and output shapes its graph declares (where the
    graph fixes them), before any image is prepared at the metadata's size."""
    fixed_in = [d for d in input_shape[-2:] if isinstance(d, int)]
    if len(input_shape) != 4 or any(d != spec.image_size for d in fixed_in):
        raise ModelError(
            f"vision tower {path}: its metadata says {spec.image_size}x{spec.image_size} images but the model takes "
            f"{list(input_shape)}; the metadata is wrong: re-export the tower with the tools in tools/"
        )
    want = (spec.n_tokens, spec.n_embd)
    got = tuple(output_shape[-2:]) if len(output_shape) >= 2 else ()
    if len(got) == 2 and any(isinstance(g, int) and g != w for g, w in zip(got, want, strict=True)):
        raise ModelError(
            f"vision tower {path}: its metadata says {spec.n_tokens} rows of width {spec.n_embd} but the model "
            f"outputs {list(output_shape)}; the metadata is wrong: re-export the tower with the tools in tools/"
        )


def check_output_shape(path: Path, spec: TowerSpec, shape: tuple[int, ...]) -> None:
    """Refuse an output that is not (1,) n_tokens x n_embd, as the metadata says: a mislabelled width would
    otherwise be reshaped into rows of the wrong width and answered."""
    if len(shape) < 2 or shape[-1] != spec.n_embd or int(np.prod(shape)) != spec.n_tokens * spec.n_embd:
        raise ModelError(
            f"vision tower {path} output shape {list(shape)}, but its metadata says {spec.n_tokens} rows of width "
            f"{spec.n_embd}; the metadata is wrong: re-export the tower with the tools in tools/"
        )
