"""TensorRT plan manifests and the guard that refuses stale plans; INT8 Q/DQ towers; `make engines` without TensorRT.

The guard and the manifest are plain logic and run everywhere. The Q/DQ tower runs in ONNX Runtime on
the CPU. The plans themselves are built and run in tests/test_tensorrt.py, on a board.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from edgevision.errors import ModelError
from edgevision.vision import engines
from edgevision.vision.onnxruntime import OrtEncoder
from edgevision.vision.preprocess import TowerSpec, load_image, preprocess

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "assets" / "photo.jpg"
HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None and importlib.util.find_spec("pycuda") is not None

ORIN = engines.Platform(tensorrt_version="10.3.0", gpu_name="Orin", compute_capability="8.7")


def _manifest(onnx_sha256: str, platform: engines.Platform = ORIN, onnx_name: str = "tower.onnx") -> engines.Manifest:
    return engines.Manifest(
        platform=platform,
        onnx=onnx_name,
        onnx_sha256=onnx_sha256,
        precision="fp16",
        inputs=(engines.TensorInfo("pixel_values", (1, 3, 224, 224), "float32"),),
        outputs=(engines.TensorInfo("image_embeds", (1, 49, 640), "float32"),),
        build_flags=("FP16",),
        spec=TowerSpec(image_size=224, n_tokens=49, n_embd=640),
        built_at="2026-11-23T21:00:00+00:00",
        build_seconds=42.0,
    )


@pytest.fixture
def built(tmp_path: Path) -> Path:
    """An engines/ folder as `make engines` leaves it: tower.onnx, tower.plan and tower.manifest.json."""
    onnx_file = tmp_path / "tower.onnx"
    onnx_file.write_bytes(b"an onnx tower" * 100)
    plan = tmp_path / "tower.plan"
    plan.write_bytes(b"a serialized engine")
    engines.write_manifest(plan, _manifest(engines.sha256_file(onnx_file)))
    return plan


# --- tier 1: the manifest and the guard ---------------------------------------------------------------------


def test_manifest_round_trips_through_json(built: Path) -> None:
    manifest = engines.read_manifest(built)
    assert manifest == _manifest(engines.sha256_file(built.with_name("tower.onnx")))
    assert engines.manifest_path(built).name == "tower.manifest.json"
    assert engines.plan_path(built.with_name("tower.onnx"), "int8").name == "tower.int8.plan"


def test_guard_accepts_a_plan_built_here_from_the_current_onnx(built: Path) -> None:
    engines.check_manifest(built, engines.read_manifest(built), ORIN)


def test_guard_refuses_a_plan_whose_onnx_changed(built: Path) -> None:
    built.with_name("tower.onnx").write_bytes(b"a re-exported tower")
    with pytest.raises(ModelError, match="has changed since.*make engines"):
        engines.check_manifest(built, engines.read_manifest(built), ORIN)


@pytest.mark.parametrize(
    "running, words",
    [
        (engines.Platform("10.3.0", "Xavier", "7.2"), "built for GPU 'Orin'"),
        (engines.Platform("10.3.0", "Orin", "8.6"), "compute capability 8.7"),
        (engines.Platform("8.6.2", "Orin", "8.7"), "built with TensorRT 10.3.0, this machine has 8.6.2"),
    ],
)
def test_guard_refuses_a_plan_built_for_another_gpu_or_tensorrt(built: Path, running, words: str) -> None:
    with pytest.raises(ModelError, match="make engines") as refused:
        engines.check_manifest(built, engines.read_manifest(built), running)
    assert words in str(refused.value)


def test_guard_names_every_mismatch_at_once(built: Path) -> None:
    built.with_name("tower.onnx").write_bytes(b"changed")
    with pytest.raises(ModelError) as refused:
        engines.check_manifest(built, engines.read_manifest(built), engines.Platform("10.7.0", "H100", "9.0"))
    message = str(refused.value)
    assert "TensorRT 10.3.0" in message and "'H100'" in message and "has changed" in message


def test_guard_refuses_when_the_onnx_is_gone(built: Path) -> None:
    built.with_name("tower.onnx").unlink()
    with pytest.raises(ModelError, match="is missing.*make engines"):
        engines.check_manifest(built, engines.read_manifest(built), ORIN)


def test_a_plan_without_a_usable_manifest_is_refused(built: Path) -> None:
    manifest = engines.manifest_path(built)
    manifest.write_text('{"format": 1, "platform": {}}', encoding="utf-8")
    with pytest.raises(ModelError, match="malformed plan manifest.*make engines"):
        engines.read_manifest(built)
    manifest.unlink()
    with pytest.raises(ModelError, match="has no manifest.*make engines"):
        engines.read_manifest(built)


def test_the_tower_setting_finds_the_plan_beside_its_onnx(built: Path, tmp_path: Path) -> None:
    assert engines.resolve_plan(built.with_name("tower.onnx")) == built
    assert engines.resolve_plan(built) == built
    other = tmp_path / "other.onnx"
    other.write_bytes(b"x")
    with pytest.raises(ModelError, match="no TensorRT plan .*other.plan.*make engines"):
        engines.resolve_plan(other)


def test_a_foreign_precision_in_a_manifest_is_refused(built: Path) -> None:
    with pytest.raises(ModelError, match="unknown precision"):
        dataclasses.replace(engines.read_manifest(built), precision="fp8")


# --- tier 3: INT8 through a Q/DQ ONNX, on ONNX Runtime ------------------------------------------------------


def _photo_crops(folder: Path) -> list[Path]:
    """Calibration images cut from the bundled photo (the held-out test image is the whole photo)."""
    from PIL import Image

    folder.mkdir()
    photo = Image.open(PHOTO).convert("RGB")
    boxes = [(0, 0, 400, 400), (240, 80, 640, 480), (160, 120, 480, 360), (100, 0, 540, 300), (60, 200, 460, 480)]
    paths = []
    for i, box in enumerate(boxes):
        paths.append(folder / f"crop{i}.jpg")
        photo.crop(box).save(paths[-1])
    return paths


def test_int8_qdq_tower_runs_in_onnxruntime_close_to_fp32(make_tower, tmp_path: Path) -> None:
    tower = tmp_path / "tower.onnx"
    onnx.save(make_tower.build_tower(n_embd=640, seed=3), tower)
    images = _photo_crops(tmp_path / "calibration")
    qdq = engines.quantize_qdq(tower, tmp_path / "tower.int8.qdq.onnx", engines.calibration_images(tmp_path))

    graph = onnx.load(str(qdq)).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    assert int8_weights, "the MatMul weights are stored as INT8"
    zero_points = [t for t in graph.initializer if "zero_point" in t.name]
    assert all(not onnx.numpy_helper.to_array(z).any() for z in zero_points), "TensorRT needs symmetric INT8"

    with (
        OrtEncoder(tower, providers=["CPUExecutionProvider"]) as fp32,
        OrtEncoder(qdq, providers=["CPUExecutionProvider"]) as int8,
    ):
        assert int8.spec == fp32.spec  # the Q/DQ copy keeps the tower's preprocessing
        pixels = preprocess(load_image(PHOTO), fp32.spec)  # not one of the calibration images
        cosines = engines.row_cosines(fp32.encode_pixels(pixels), int8.encode_pixels(pixels))
    print(
        f"\nINT8 Q/DQ vs FP32 (ONNX Runtime, held-out photo): min cosine {cosines.min():.4f}, "
        f"mean {cosines.mean():.4f} over {len(cosines)} tokens; calibrated on {len(images)} images"
    )
    assert cosines.min() >= 0.99


# --- `make engines` and the CLI on a machine without TensorRT -----------------------------------------------


@pytest.mark.skipif(HAVE_TENSORRT, reason="TensorRT is installed here; tests/test_tensorrt.py builds plans")
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_engines_without_tensorrt_says_so_and_leaves_plans_alone(built: Path, tmp_path: Path) -> None:
    new_tower = tmp_path / "elsewhere" / "new.onnx"
    new_tower.parent.mkdir()
    new_tower.write_bytes(b"another tower")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in built.parent.iterdir() if p.is_file()}
    # -o: never remake the virtual environment from a test, whatever pyproject.toml's date.
    result = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-o",
            ".venv/.installed",
            "engines",
            f"ENGINES={built.parent}",
            f"ENGINE_TOWERS={new_tower}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert "make engines: error: tensorrt and pycuda not installed" in result.stderr
    assert "Nothing in engines/ was changed" in result.stderr
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in built.parent.iterdir() if p.is_file()}
    assert after == before
    assert not (built.parent / "new.onnx").exists()


@pytest.mark.skipif(HAVE_TENSORRT, reason="TensorRT is installed here")
def test_cli_with_tensorrt_backend_but_no_tensorrt_gives_one_line(demo_config: Path, tmp_path: Path) -> None:
    config = tmp_path / "tensorrt.yaml"
    text = demo_config.read_text(encoding="utf-8")
    assert "vision:\n" in text
    config.write_text(text.replace("vision:\n", "vision:\n  backend: tensorrt\n", 1), encoding="utf-8")
    edgevision = Path(sys.executable).with_name("edgevision")
    result = subprocess.run(
        [str(edgevision), "ask", "--config", str(config), "--image", str(PHOTO), "--question", "What is this?"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("edgevision: error:")]
    assert len(errors) == 1, result.stderr
    assert "tensorrt vision back-end needs tensorrt" in errors[0]
    assert "python3-libnvinfer" in errors[0] and "vision.backend: onnxruntime" in errors[0]
    assert "Traceback" not in result.stderr
