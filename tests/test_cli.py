"""The real `edgevision` entry point, run as a subprocess: what a user sees on success and on bad input."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import wave
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "assets" / "photo.jpg"
SPOKEN = ROOT / "assets" / "question.wav"


def edgevision(*args: str | Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "EDGEVISION_CONFIG"}
    return subprocess.run(
        [sys.executable, "-m", "edgevision", *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("edgevision: error: ")
    return lines[0]


def _config_with(demo_config: Path, tmp_path: Path, key: str, value: str | Path) -> Path:
    """A copy of the demo config with one `key: value` line replaced."""
    lines = demo_config.read_text(encoding="utf-8").splitlines()
    (i,) = [n for n, line in enumerate(lines) if line.strip().startswith(f"{key}:")]
    lines[i] = f"  {key}: {value}"
    path = tmp_path / "config.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_ask_answers_the_bundled_spoken_question_aloud(demo_config: Path, tmp_path: Path) -> None:
    out = tmp_path / "answer.wav"
    result = edgevision("ask", "--config", demo_config, "--image", PHOTO, "--audio", SPOKEN, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "question: What is on the table in front of me?" in result.stdout
    answer = result.stdout.split("answer:", 1)[1].split("\n", 1)[0].strip()
    assert answer
    with wave.open(str(out)) as wav:
        assert wav.getnchannels() == 1 and wav.getnframes() / wav.getframerate() > 0.3
    for stage in ("recognition", "vision_encode", "image_prefill", "text_prefill", "to first token", "to first audio"):
        assert stage in result.stdout, stage


def test_check_config_accepts_the_demo_config(demo_config: Path) -> None:
    result = edgevision("check-config", demo_config)
    assert result.returncode == 0 and "ok" in result.stdout


def test_a_missing_model_file_is_named(demo_config: Path, tmp_path: Path) -> None:
    config = _config_with(demo_config, tmp_path, "model", tmp_path / "nowhere.gguf")
    result = edgevision("ask", "--config", config, "--image", PHOTO, "--question", "What is this?")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "nowhere.gguf" in result.stderr and "decoder.model" in result.stderr


def test_a_corrupt_model_file_is_a_one_line_error(demo_config: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + os.urandom(4096))
    config = _config_with(demo_config, tmp_path, "model", corrupt)
    line = _one_line_error(edgevision("ask", "--config", config, "--image", PHOTO, "--question", "What is this?"))
    assert "corrupt.gguf" in line


def test_an_unreadable_image_is_a_one_line_error(demo_config: Path, tmp_path: Path) -> None:
    not_a_photo = tmp_path / "photo.jpg"
    not_a_photo.write_text("this is not a picture", encoding="utf-8")
    line = _one_line_error(edgevision("ask", "--config", demo_config, "--image", not_a_photo, "--question", "Hi?"))
    assert "photo.jpg" in line and "image" in line


def test_a_wav_that_is_not_audio_is_a_one_line_error(demo_config: Path, tmp_path: Path) -> None:
    noise = tmp_path / "question.wav"
    noise.write_bytes(os.urandom(2048))
    line = _one_line_error(edgevision("ask", "--config", demo_config, "--image", PHOTO, "--audio", noise))
    assert "question.wav" in line


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("n_ctx", "lots", "decoder.n_ctx"),
        ("max_answer_tokens", "0", "decoder.max_answer_tokens"),
        ("n_ctx", "2048\n  colour: red", "decoder.colour"),
    ],
)
def test_a_bad_config_names_the_file_line_and_key(demo_config, tmp_path, key, value, expected) -> None:
    config = _config_with(demo_config, tmp_path, key, value)
    for command in (("check-config", config), ("ask", "--config", config, "--image", PHOTO, "--question", "Hi?")):
        result = edgevision(*command)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        # "FILE:LINE: KEY: problem — fix"
        assert re.search(rf"config\.yaml:\d+: \S*{expected}: .+ — .+", result.stderr), result.stderr


def test_ask_takes_the_photo_from_the_configured_camera(demo_config: Path, tmp_path: Path) -> None:
    config = tmp_path / "camera.yaml"
    camera = f"devices:\n  camera: {{kind: image, source: {PHOTO}}}\n"
    config.write_text(demo_config.read_text(encoding="utf-8") + camera, encoding="utf-8")
    result = edgevision("ask", "--config", config, "--camera", "--question", "What is on the table?")
    assert result.returncode == 0, result.stderr
    assert "vision_encode" in result.stdout and "answer:" in result.stdout


def test_a_camera_that_is_not_there_is_a_one_line_error(demo_config: Path, tmp_path: Path) -> None:
    config = tmp_path / "camera.yaml"
    camera = f"devices:\n  camera: {{kind: image, source: {tmp_path / 'unplugged.jpg'}}}\n"
    config.write_text(demo_config.read_text(encoding="utf-8") + camera, encoding="utf-8")
    line = _one_line_error(edgevision("ask", "--config", config, "--camera", "--question", "What is this?"))
    assert "unplugged.jpg" in line
