"""The ask pipeline end to end on the real small models: Whisper tiny.en, a synthetic ONNX vision tower matched
to Gemma 3 270M, llama.cpp and Piper."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from edgevision.assistant import Assistant, Scene, chat_format_of
from edgevision.config import load_config
from edgevision.errors import InputError, ModelError
from edgevision.speech.audio import Audio

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "assets" / "photo.jpg"
QUESTION = "What is on the table in front of me?"


@pytest.fixture(scope="module")
def assistant(demo_config: Path):
    with Assistant.from_config(load_config(demo_config)) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    with Image.open(PHOTO) as img:
        return img.convert("RGB")


def _speech_rms(audio: Audio) -> float:
    return float(np.sqrt(np.mean(np.square(audio.samples))))


def test_spoken_question_about_a_photo_is_answered_aloud(assistant: Assistant, photo: Image.Image) -> None:
    spoken_question = assistant.synthesizer.synthesize(QUESTION)
    heard: list[str] = []
    streamed: list[str] = []
    chunks: list[Audio] = []

    answer = assistant.ask(
        photo, audio=spoken_question, on_question=heard.append, on_text=streamed.append, on_speech=chunks.append
    )

    words = answer.question.lower()
    assert all(word in words for word in ("what", "table", "front")), answer.question
    assert heard == [answer.question]
    assert answer.text and "".join(streamed).strip() == answer.text
    assert answer.n_tokens == len(streamed)
    # the answer was spoken: audible, and about as long as someone would take to say its text
    assert answer.speech is not None and chunks
    assert _speech_rms(answer.speech) > 0.01
    n_words = len(answer.text.split())
    assert 0.1 * n_words <= answer.speech.duration <= 1.5 * n_words + 1.0, (answer.text, answer.speech.duration)
    # every stage was measured, in order of the pipeline
    t = answer.timings
    for stage in ("recognition", "vision_encode", "image_prefill", "text_prefill", "first_token", "first_audio"):
        assert t[stage] > 0, stage
    assert t["first_token"] <= t["first_audio"] <= t["total"]
    assert t["decode_tokens_per_s"] > 0


def test_typed_question_is_answered_without_recognition(assistant: Assistant, photo: Image.Image) -> None:
    answer = assistant.ask(photo, question=QUESTION)
    assert answer.question == QUESTION
    assert answer.text
    assert "recognition" not in answer.timings


def test_the_image_changes_what_the_decoder_would_say_next(assistant: Assistant, photo: Image.Image) -> None:
    other = ImageOps.flip(photo).convert("L").convert("RGB")  # the scene upside down and grey

    def next_token_logits(image: Image.Image, inject: bool) -> np.ndarray:
        embeddings = assistant.encode(image)  # always encoded, injected only when asked
        assistant.prefill(QUESTION, Scene(embeddings if inject else None))
        return assistant.decoder.logits()

    with_photo = next_token_logits(photo, inject=True)
    with_other = next_token_logits(other, inject=True)
    assert np.abs(with_photo - with_other).max() > 0.05
    np.testing.assert_array_equal(next_token_logits(photo, inject=True), with_photo)  # and it is not noise
    # control: when the image is not injected, which image was encoded makes no difference at all
    np.testing.assert_array_equal(next_token_logits(photo, inject=False), next_token_logits(other, inject=False))


def test_a_follow_up_reuses_the_cached_image_and_answers_as_a_fresh_question(
    assistant: Assistant, photo: Image.Image
) -> None:
    follow_up = "What colour is the mug?"
    scene = assistant.look(photo)
    assert scene.timings["vision_encode"] > 0 and scene.timings["image_prefill"] > 0
    first = assistant.answer(QUESTION, scene)
    second = assistant.answer(follow_up, scene)
    assert first.reused_image and second.reused_image
    assert "image_prefill" not in second.timings and "vision_encode" not in second.timings

    fresh = assistant.ask(photo, question=follow_up)  # encodes and prefills everything again
    assert fresh.timings["vision_encode"] > 0 and fresh.timings["image_prefill"] > 0
    assert second.text == fresh.text

    # the cache now holds the fresh question's scene: the old scene is prefilled again, with the same answer
    back = assistant.answer(follow_up, scene)
    assert not back.reused_image and back.timings["image_prefill"] > 0
    assert back.text == fresh.text


def test_silence_is_not_taken_for_a_question(assistant: Assistant, photo: Image.Image) -> None:
    silence = Audio(np.zeros(16_000 * 2, dtype=np.float32), 16_000)
    with pytest.raises(InputError, match="no speech"):
        assistant.ask(photo, audio=silence)


def test_a_tower_made_for_another_decoder_is_refused(demo_config: Path, make_tower, tmp_path: Path) -> None:
    narrow = tmp_path / "narrow.onnx"
    assert make_tower.main(["--out", str(narrow), "--n-embd", "96"]) == 0
    text = demo_config.read_text(encoding="utf-8")
    tower_line = next(line for line in text.splitlines() if "tower:" in line)
    config = tmp_path / "config.yaml"
    config.write_text(text.replace(tower_line, f"  tower: {narrow}"), encoding="utf-8")
    with pytest.raises(ModelError, match="96-wide"):
        Assistant.from_config(load_config(config), speak=False)


class _Decoder:
    """What chat_format_of reads from a decoder: its GGUF architecture, width and file."""

    def __init__(self, architecture: str, n_embd: int = 640) -> None:
        self.architecture, self.n_embd, self.path = architecture, n_embd, Path(f"{architecture}.gguf")

    def meta(self, key: str) -> str | None:
        return self.architecture if key == "general.architecture" else None


def test_the_chat_layout_follows_the_architecture_or_the_config() -> None:
    assert chat_format_of(_Decoder("gemma3")).name == "gemma3"
    assert chat_format_of(_Decoder("gemma4")).image_causal is False
    assert chat_format_of(_Decoder("gemma4", n_embd=1536)).image_causal is True  # Gemma 4 E2B, as mtmd does
    assert chat_format_of(_Decoder("llama"), "llava").name == "llava"
    with pytest.raises(ModelError, match="decoder.chat_format"):
        chat_format_of(_Decoder("llama"))
