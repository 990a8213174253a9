"""The OCR stage on the real PP-OCRv5 models (ONNX Runtime): what it reads, in what order, and what it refuses
to invent. The TensorRT back-end's test is marked `board`."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFont

from edgevision.answers.safety import compose_read
from edgevision.errors import ConfigError, ModelError
from edgevision.ocr.backends import open_backend
from edgevision.ocr.reader import TextReader

ROOT = Path(__file__).resolve().parent.parent
CALIBRATION = ROOT / "calibration" / "images"
READING_SET = ROOT / "eval" / "reading"
FONTS = Path("/usr/share/fonts/truetype/dejavu")


@pytest.fixture(scope="module")
def reader(ocr_models: Path):
    backend = open_backend("onnxruntime", ocr_models)
    yield TextReader(backend, ocr_models / "dict.txt")
    backend.close()


def lines_of(reader: TextReader, image: Image.Image) -> list[str]:
    return [line.text for line in reader.read(image).lines]


def test_the_calibration_label_and_screen_are_read_exactly_in_order(reader: TextReader) -> None:
    with Image.open(CALIBRATION / "03-label.png") as label, Image.open(CALIBRATION / "05-screen.png") as screen:
        assert lines_of(reader, label) == ["WATER", "500 ml", "still"]
        assert lines_of(reader, screen) == ["09:10", "Monday"]


@pytest.mark.parametrize("name", ["01-table.png", "02-street.png", "04-room.png"])
def test_nothing_is_invented_on_images_without_text(reader: TextReader, name: str) -> None:
    with Image.open(CALIBRATION / name) as image:
        reading = reader.read(image)
    assert not reading and reading.text == ""
    assert compose_read(reading).text.startswith("I can't find any text")


def test_the_rendered_text_free_scenes_read_as_empty(reader: TextReader) -> None:
    for item in json.loads((READING_SET / "labels.json").read_text(encoding="utf-8")):
        if not item["lines"]:
            with Image.open(READING_SET / item["image"]) as image:
                assert lines_of(reader, image) == [], item["image"]


@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_a_turned_label_is_read_in_its_own_order(reader: TextReader, degrees: int) -> None:
    with Image.open(CALIBRATION / "03-label.png") as label:
        turned = label.rotate(degrees, expand=True)
    reading = reader.read(turned)
    assert [line.text for line in reading.lines] == ["WATER", "500 ml", "still"]
    assert reading.rotation == (360 - degrees) % 360  # turned back the other way
    # each line's box is in the turned frame's pixels
    for line in reading.lines:
        assert all(0 <= x <= turned.width and 0 <= y <= turned.height for x, y in line.box)


def test_a_one_pixel_image_has_no_text(reader: TextReader) -> None:
    reading = reader.read(Image.new("RGB", (1, 1), (255, 255, 255)))
    assert not reading


def test_a_huge_frame_is_scaled_down_and_still_read(reader: TextReader) -> None:
    frame = Image.new("RGB", (6000, 4000), (90, 90, 100))
    with Image.open(CALIBRATION / "03-label.png") as label:
        frame.paste(label.resize((1120, 840)), (2400, 1600))
    assert lines_of(reader, frame) == ["WATER", "500 ml", "still"]


def test_grey_and_transparent_images_are_read_too(reader: TextReader) -> None:
    with Image.open(CALIBRATION / "03-label.png") as label:
        assert lines_of(reader, label.convert("L")) == ["WATER", "500 ml", "still"]
        assert lines_of(reader, label.convert("RGBA")) == ["WATER", "500 ml", "still"]


def _render(lines: list[str], font: str = "DejaVuSans-Bold.ttf") -> Image.Image:
    face = ImageFont.truetype(str(FONTS / font), 40)
    image = Image.new("RGB", (520, 100 + 80 * len(lines)), (240, 240, 235))
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((40, 40 + 80 * i), line, font=face, fill=(0, 0, 0))
    return image


@pytest.mark.parametrize("lines", [["שלום עולם", "חלב"], ["ქართული", "ენა"]], ids=["hebrew", "georgian"])
def test_text_in_a_script_the_recogniser_does_not_know_is_never_read_out_as_sure(
    reader: TextReader, lines: list[str]
) -> None:
    reading = reader.read(_render(lines))
    # PP-OCRv5 reads these scripts as look-alike Latin letters (שלום → "D7IV"); its confidence is low, so the
    # reply says it may have it wrong, or that there is no text, never "It says: ..." as if sure
    assert all(line.uncertain for line in reading.lines), reading.lines
    reply = compose_read(reading).text
    assert not reply.startswith("It says:"), reply


def test_an_english_label_is_read_sure(reader: TextReader) -> None:
    reading = reader.read(_render(["FRESH MILK", "1 litre"]))
    assert [line.text for line in reading.lines] == ["FRESH MILK", "1 litre"]
    assert not reading.uncertain
    assert compose_read(reading).text == "It says: FRESH MILK. 1 litre."


def test_an_unknown_backend_and_missing_models_are_clear_errors(tmp_path: Path, ocr_models: Path) -> None:
    with pytest.raises(ConfigError, match="ocr.backend"):
        open_backend("openvino", ocr_models)
    (tmp_path / "det.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelError, match="incomplete.*cls.onnx"):
        open_backend("onnxruntime", tmp_path)
    for name in ("cls.onnx", "rec.onnx", "dict.txt"):
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(ModelError, match="cannot load OCR model .*det.onnx"):
        open_backend("onnxruntime", tmp_path)


@pytest.mark.board
@pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("tensorrt", "pycuda")),
    reason="needs TensorRT and pycuda (a Jetson board or a CUDA machine)",
)
def test_the_tensorrt_backend_reads_the_label_like_onnxruntime(ocr_models: Path, tmp_path: Path) -> None:
    from edgevision.ocr.tensorrt import build_plans

    plans = build_plans(ocr_models, tmp_path / "ppocrv5")
    backend = open_backend("tensorrt", plans)
    try:
        with Image.open(CALIBRATION / "03-label.png") as label:
            assert lines_of(TextReader(backend, plans / "dict.txt"), label) == ["WATER", "500 ml", "still"]
    finally:
        backend.close()
