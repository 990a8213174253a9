"""TensorRT plans and their manifests, the guard that refuses a stale plan, and INT8 Q/DQ quantization.

Each plan `engines/NAME.plan` has a manifest `engines/NAME.manifest.json` beside it, written by
`make engines` (tools/build_engines.py): the TensorRT version, GPU and compute capability it was built for,
the sha256 of the ONNX tower it was built from, the precision, the I/O tensors, the builder flags, the
tower's preprocessing (TowerSpec) and when it was built. A TensorRT plan only runs on the GPU model and
TensorRT version it was built with, and silently answers for the old tower if the ONNX has been
re-exported since; `check_manifest` refuses both, with a message that says to run `make engines`. The ONNX's
sha256 comes from the digest cache (`edgevision.digests`), so a load re-hashes it only after it changed.

Nothing here imports TensorRT: the manifest and the guard are plain logic (tested on any machine), and
the Q/DQ quantization runs on ONNX Runtime on the CPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgevision.digests import sha256_of
from edgevision.errors import InputError, ModelError
from edgevision.vision.preprocess import METADATA_KEY, TowerSpec, load_image, preprocess

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = 1
PRECISIONS = ("fp16", "int8")
REBUILD = "run 'make engines' on this machine to rebuild it"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class TensorInfo:
    """One input or output of a plan."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy name: "float32", "float16"


@dataclass(frozen=True)
class Platform:
    """What a plan is tied to: the TensorRT version and the GPU (name and compute capability)."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "8.7" for Orin


@dataclass(frozen=True)
class Manifest:
    """What `make engines` records beside each plan."""

    platform: Platform
    onnx: str
    """The ONNX tower the plan was built from, relative to the manifest's folder (or absolute)."""
    onnx_sha256: str
    precision: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    build_flags: tuple[str, ...]
    spec: TowerSpec
    built_at: str
    """UTC, ISO 8601."""
    build_seconds: float = 0.0
    quantized_onnx_sha256: str = ""
    """For an INT8 plan: the Q/DQ ONNX it was built from (made from `onnx` with calibration images)."""
    calibration_images: int = 0
    extra: dict = field(default_factory=dict)
    """Free-form notes (for example the Q/DQ fidelity measured at build time)."""

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ModelError(f"manifest: unknown precision {self.precision!r} (one of {', '.join(PRECISIONS)})")

    def to_json(self) -> str:
        raw = asdict(self)
        raw["spec"] = json.loads(self.spec.to_json())
        return json.dumps({"format": MANIFEST_FORMAT, **raw}, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, *, source: str = "manifest") -> Manifest:
        try:
            raw = json.loads(text)
            if raw.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"format {raw.get('format')!r}, expected {MANIFEST_FORMAT}")

            def tensors(key: str) -> tuple[TensorInfo, ...]:
                return tuple(TensorInfo(t["name"], tuple(int(d) for d in t["shape"]), t["dtype"]) for t in raw[key])

            return cls(
                platform=Platform(**raw["platform"]),
                onnx=str(raw["onnx"]),
                onnx_sha256=str(raw["onnx_sha256"]),
                precision=str(raw["precision"]),
                inputs=tensors("inputs"),
                outputs=tensors("outputs"),
                build_flags=tuple(raw["build_flags"]),
                spec=TowerSpec.from_json(json.dumps(raw["spec"]), source=source),
                built_at=str(raw["built_at"]),
                build_seconds=float(raw.get("build_seconds", 0.0)),
                quantized_onnx_sha256=str(raw.get("quantized_onnx_sha256", "")),
                calibration_images=int(raw.get("calibration_images", 0)),
                extra=dict(raw.get("extra", {})),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{source}: malformed plan manifest ({exc}); {REBUILD}") from exc


def manifest_path(plan: str | Path) -> Path:
    """engines/NAME.plan → engines/NAME.manifest.json"""
    return Path(plan).with_suffix(".manifest.json")


def plan_path(onnx: str | Path, precision: str = "fp16") -> Path:
    """Where `make engines` writes the plan for an ONNX tower: NAME.plan (FP16) or NAME.int8.plan."""
    onnx = Path(onnx)
    return onnx.with_name(onnx.stem + (".plan" if precision == "fp16" else f".{precision}.plan"))


def write_manifest(plan: str | Path, manifest: Manifest) -> Path:
    path = manifest_path(plan)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(manifest.to_json(), encoding="utf-8")
    tmp.replace(path)
    return path


def read_manifest(plan: str | Path) -> Manifest:
    path = manifest_path(plan)
    if not path.is_file():
        raise ModelError(f"TensorRT plan {plan} has no manifest ({path.name}), so it cannot be checked; {REBUILD}")
    return Manifest.from_json(path.read_text(encoding="utf-8"), source=str(path))


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_onnx(plan: str | Path, manifest: Manifest) -> Path:
    """The ONNX file a manifest names, resolved against the manifest's folder."""
    onnx = Path(manifest.onnx)
    return onnx if onnx.is_absolute() else Path(plan).parent / onnx


def check_manifest(plan: str | Path, manifest: Manifest, running: Platform) -> None:
    """Refuse a plan built for another GPU or TensorRT, or from an ONNX tower that has changed since.

    Every mismatch is named in one `ModelError`; the caller never loads the plan after it raises.
    """
    built = manifest.platform
    problems = []
    if built.tensorrt_version != running.tensorrt_version:
        problems.append(f"built with TensorRT {built.tensorrt_version}, this machine has {running.tensorrt_version}")
    if built.gpu_name != running.gpu_name or built.compute_capability != running.compute_capability:
        problems.append(
            f"built for GPU {built.gpu_name!r} (compute capability {built.compute_capability}), "
            f"this machine has {running.gpu_name!r} ({running.compute_capability})"
        )
    onnx = manifest_onnx(plan, manifest)
    if not onnx.is_file():
        problems.append(f"the ONNX tower it was built from, {onnx}, is missing, so the plan cannot be checked")
    else:
        current = sha256_of(onnx)  # cached by stat: an unchanged tower is not read again on every load
        if current != manifest.onnx_sha256:
            problems.append(
                f"its ONNX tower {onnx} has changed since (sha256 {current[:12]}…, built from "
                f"{manifest.onnx_sha256[:12]}…)"
            )
    if problems:
        raise ModelError(f"refusing TensorRT plan {plan}: {'; '.join(problems)} — {REBUILD}")


def resolve_plan(tower: str | Path) -> Path:
    """The plan to load for `vision.tower`: the plan itself, or for an ONNX tower the FP16 plan beside it."""
    tower = Path(tower)
    if tower.suffix == ".plan":
        plan = tower
    elif tower.suffix == ".onnx":
        plan = plan_path(tower)
    else:
        raise ModelError(f"vision.tower {tower}: the tensorrt back-end takes a .plan (or the .onnx it was built from)")
    if not plan.is_file():
        raise ModelError(
            f"no TensorRT plan {plan} for vision tower {tower}: put the ONNX tower in engines/, run 'make engines', "
            "and set vision.tower to engines/NAME.plan"
        )
    return plan


# --- the tower's own preprocessing, from its ONNX file -----------------------------------------------------


def onnx_tower_spec(onnx_path: str | Path) -> TowerSpec:
    """The TowerSpec recorded in an ONNX tower's metadata."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for a file that is not ONNX
        raise ModelError(f"cannot read ONNX tower {onnx_path}: {exc}".splitlines()[0]) from exc
    meta = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in meta:
        raise ModelError(f"{onnx_path} has no '{METADATA_KEY}' metadata: export it with the tools in tools/")
    return TowerSpec.from_json(meta[METADATA_KEY], source=str(onnx_path))


# --- INT8 through explicit quantization (a Q/DQ ONNX) --------------------------------------------------------


def calibration_images(folder: str | Path) -> list[Path]:
    """The JPEG and PNG images under a folder, sorted, so calibration is reproducible."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _calibration_batches(images: Sequence[Path], spec: TowerSpec, input_name: str) -> Iterator[dict[str, np.ndarray]]:
    for path in images:
        yield {input_name: preprocess(load_image(path), spec)}


def quantize_qdq(onnx_in: str | Path, onnx_out: str | Path, images: Sequence[Path]) -> Path:
    """Write a Q/DQ (explicitly quantized, symmetric INT8) copy of an ONNX tower, calibrated on images.

    Only Conv and MatMul inputs are quantized (what TensorRT runs in INT8); weights per output channel.
    Images go through the tower's own TowerSpec preprocessing, as at run time. The result keeps the
    tower's metadata, so it is still a tower every back-end can open.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if not images:
        raise InputError("INT8 calibration needs images: put a few dozen JPEG/PNG photos in calibration/")
    onnx_in, onnx_out = Path(onnx_in), Path(onnx_out)
    spec = onnx_tower_spec(onnx_in)
    model = onnx.load(str(onnx_in))
    input_name = model.graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = _calibration_batches(images, spec, input_name)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    tmp = onnx_out.with_name(onnx_out.name + ".tmp")
    logger.info("calibrating %s on %d images", onnx_in.name, len(images))
    quantize_static(
        model,
        str(tmp),
        Reader(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["Conv", "MatMul"],
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        # TensorRT's INT8 is symmetric (zero point 0) and keeps biases in floating point.
        extra_options={
            "ActivationSymmetric": True,
            "WeightSymmetric": True,
            "QuantizeBias": False,
            "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
        },
    )
    quantized = onnx.load(str(tmp))
    kept = {p.key for p in quantized.metadata_props}
    for prop in model.metadata_props:
        if prop.key not in kept:
            quantized.metadata_props.append(prop)
    onnx.save(quantized, str(tmp))
    tmp.replace(onnx_out)
    return onnx_out


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each image-token row of two (n_tokens, n_embd) embeddings."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)


def qdq_fidelity(onnx_fp32: str | Path, onnx_qdq: str | Path, images: Sequence[Path]) -> float:
    """The lowest per-token cosine between the FP32 tower and its Q/DQ copy over images (ONNX Runtime, CPU)."""
    from edgevision.vision.onnxruntime import OrtEncoder

    worst = 1.0
    with (
        OrtEncoder(onnx_fp32, providers=["CPUExecutionProvider"]) as ref,
        OrtEncoder(onnx_qdq, providers=["CPUExecutionProvider"]) as quant,
    ):
        for path in images:
            pixels = preprocess(load_image(path), ref.spec)
            worst = min(worst, float(row_cosines(ref.encode_pixels(pixels), quant.encode_pixels(pixels)).min()))
    return worst


def quantize_with_report(onnx: Path, images: Sequence[Path], *, say=print) -> tuple[Path, float]:
    """NAME.onnx → NAME.int8.qdq.onnx, and its lowest per-token cosine to FP32 on (up to 8 of) the images."""
    qdq = onnx.with_name(onnx.stem + ".int8.qdq.onnx")
    say(f"quantizing {onnx.name} to INT8 (Q/DQ) on {len(images)} calibration images")
    quantize_qdq(onnx, qdq, images)
    fidelity = qdq_fidelity(onnx, qdq, images[:8])
    say(f"wrote {qdq.name}: lowest per-token cosine to FP32 on {min(8, len(images))} images {fidelity:.4f}")
    return qdq, fidelity


def manifest_summary(plan: str | Path, manifest: Manifest) -> dict:
    """A short, flat view of a manifest for printing."""
    p = manifest.platform
    return {
        "plan": str(plan),
        "precision": manifest.precision,
        "tensorrt": p.tensorrt_version,
        "gpu": f"{p.gpu_name} (sm {p.compute_capability})",
        "onnx": manifest.onnx,
        "built_at": manifest.built_at,
    }
