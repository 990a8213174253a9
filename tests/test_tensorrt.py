"""TensorRT on a board (a Jetson, or any CUDA machine with TensorRT and pycuda): plans built by the same code
as `make engines`, run against ONNX Runtime on the same image, and refused when stale.

Run there with `pytest -m board` (tools/board_test.sh does it over SSH). Elsewhere every test here is
skipped with the reason.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import sys
from pathlib import Path

import onnx
import pytest

from edgevision.errors import ModelError
from edgevision.vision import engines
from edgevision.vision.encoder import encode_image, open_encoder
from edgevision.vision.onnxruntime import OrtEncoder
from edgevision.vision.preprocess import load_image

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "assets" / "photo.jpg"


def _why_not_here() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT's Python bindings are not installed (JetPack's python3-libnvinfer)"
    if importlib.util.find_spec("pycuda") is None:
        return "pycuda is not installed (pip install -e '.[jetson]')"
    try:
        import pycuda.driver as cuda
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return f"TensorRT or pycuda is installed but cannot load its libraries ({exc})"
    try:
        cuda.init()
        if cuda.Device.count() == 0:
            return "no CUDA GPU"
    except cuda.Error as exc:
        return f"CUDA is not usable here ({exc})"
    return None


WHY_NOT = _why_not_here()
pytestmark = [pytest.mark.board, pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))]


def _build_engines(*args: str) -> None:
    """tools/build_engines.py, the script `make engines` runs, in this process."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import build_engines
    finally:
        sys.path.remove(str(ROOT / "tools"))
    assert build_engines.main(list(args)) == 0


@pytest.fixture(scope="module")
def built(make_tower, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An engines/ folder with a synthetic tower and its FP16 plan, built as `make engines` builds it."""
    folder = tmp_path_factory.mktemp("engines")
    tower = tmp_path_factory.mktemp("towers") / "tower.onnx"
    onnx.save(make_tower.build_tower(n_embd=640, seed=5), tower)
    _build_engines("--engines", str(folder), "--tower", str(tower))
    return folder / "tower.plan"


@pytest.fixture
def copy_of(built: Path, tmp_path: Path) -> Path:
    """A private copy of the engines folder (the ONNX as a file, not a link) to spoil."""
    folder = tmp_path / "engines"
    shutil.copytree(built.parent, folder, symlinks=False)
    return folder / built.name


def test_fp16_plan_matches_onnxruntime_on_the_photo(built: Path) -> None:
    image = load_image(PHOTO)
    with OrtEncoder(built.with_name("tower.onnx"), providers=["CPUExecutionProvider"]) as reference:
        expected = encode_image(reference, image)
    encoder = open_encoder("tensorrt", built)
    try:
        got = encode_image(encoder, image)
    finally:
        encoder.close()
    assert got.shape == expected.shape
    cosines = engines.row_cosines(got, expected)
    print(f"\nTensorRT FP16 vs ONNX Runtime FP32: min cosine {cosines.min():.5f} over {len(cosines)} tokens")
    assert cosines.min() >= 0.999


def test_manifest_records_this_board(built: Path) -> None:
    from edgevision.vision.tensorrt import running_platform

    manifest = engines.read_manifest(built)
    assert manifest.platform == running_platform()
    assert manifest.precision == "fp16" and "FP16" in manifest.build_flags
    assert manifest.onnx_sha256 == engines.sha256_file(built.with_name("tower.onnx"))
    assert manifest.spec == engines.onnx_tower_spec(built.with_name("tower.onnx"))
    assert manifest.inputs[0].shape == (1, 3, manifest.spec.image_size, manifest.spec.image_size)


def test_encoder_is_warm_before_it_reports_ready(built: Path) -> None:
    from edgevision.vision.tensorrt import WARMUP_RUNS, TensorRTEncoder

    image = load_image(PHOTO)
    with TensorRTEncoder(built.with_name("tower.onnx")) as encoder:  # the ONNX finds the plan beside it
        assert encoder.warmup_runs == WARMUP_RUNS >= 1
        first, second = encode_image(encoder, image), encode_image(encoder, image)
    assert (first == second).all()
    with pytest.raises(ModelError, match="closed"):
        encode_image(encoder, image)


def test_a_plan_whose_onnx_changed_is_refused(copy_of: Path, make_tower) -> None:
    from edgevision.vision.tensorrt import TensorRTEncoder

    onnx.save(make_tower.build_tower(n_embd=640, seed=6), copy_of.with_name("tower.onnx"))
    with pytest.raises(ModelError, match="has changed since.*make engines"):
        TensorRTEncoder(copy_of)


@pytest.mark.parametrize(
    "field, value", [("gpu_name", "Xavier"), ("compute_capability", "7.2"), ("tensorrt_version", "8.6.2")]
)
def test_a_plan_for_another_gpu_or_tensorrt_is_refused(copy_of: Path, field: str, value: str) -> None:
    from edgevision.vision.tensorrt import TensorRTEncoder

    manifest = engines.read_manifest(copy_of)
    if getattr(manifest.platform, field) == value:
        value += "-other"
    foreign = dataclasses.replace(manifest, platform=dataclasses.replace(manifest.platform, **{field: value}))
    engines.write_manifest(copy_of, foreign)
    with pytest.raises(ModelError, match="refusing TensorRT plan.*make engines"):
        TensorRTEncoder(copy_of)


def test_an_up_to_date_plan_is_kept(built: Path) -> None:
    before = built.stat().st_mtime_ns
    _build_engines("--engines", str(built.parent))
    assert built.stat().st_mtime_ns == before


def test_int8_plan_from_qdq_onnx_stays_close_to_fp32(built: Path, tmp_path: Path) -> None:
    from PIL import Image

    calibration = tmp_path / "calibration"
    calibration.mkdir()
    photo = Image.open(PHOTO).convert("RGB")
    for i, box in enumerate([(0, 0, 400, 400), (240, 80, 640, 480), (160, 120, 480, 360), (100, 0, 540, 300)]):
        photo.crop(box).save(calibration / f"crop{i}.jpg")
    folder = tmp_path / "engines"
    shutil.copytree(built.parent, folder, symlinks=False)
    _build_engines("--engines", str(folder), "--precision", "int8", "--calibration", str(calibration))
    plan = folder / "tower.int8.plan"
    assert engines.read_manifest(plan).precision == "int8"

    image = load_image(PHOTO)
    with OrtEncoder(folder / "tower.onnx", providers=["CPUExecutionProvider"]) as reference:
        expected = encode_image(reference, image)
    encoder = open_encoder("tensorrt", plan)
    try:
        cosines = engines.row_cosines(encode_image(encoder, image), expected)
    finally:
        encoder.close()
    print(f"\nTensorRT INT8 (Q/DQ) vs ONNX Runtime FP32: min cosine {cosines.min():.5f}")
    assert cosines.min() >= 0.99
