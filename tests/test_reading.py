"""Reading text aloud end to end, on the demo's real models: SmolLM2-135M-Instruct, its synthetic tower,
PP-OCRv5, Whisper and Piper. What a user hears is checked by transcribing it back with Whisper."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from edgevision.answers.safety import NO_TEXT, unsupported_numbers
from edgevision.assistant import Assistant
from edgevision.config import load_config
from edgevision.ocr.reader import Reading, TextLine
from edgevision.speech.audio import read_wav

ROOT = Path(__file__).resolve().parent.parent
LABEL = ROOT / "assets" / "label.jpg"
LABEL_QUESTION = ROOT / "assets" / "question-label.wav"
READING_SET = ROOT / "eval" / "reading"


@pytest.fixture(scope="module")
def assistant(reading_config: Path):
    with Assistant.from_config(load_config(reading_config)) as loaded:
        yield loaded


def image(name: str) -> Image.Image:
    with Image.open(READING_SET / name) as img:
        return img.convert("RGB")


def truth(name: str) -> Reading:
    items = {item["image"]: item for item in json.loads((READING_SET / "labels.json").read_text(encoding="utf-8"))}
    return Reading(tuple(TextLine(line, 1.0, ()) for line in items[name]["lines"]))


def test_the_demo_reads_the_label_it_is_asked_about_and_says_it_aloud(assistant: Assistant, whisper_dir) -> None:
    from edgevision.speech.recognition import WhisperRecognizer

    with Image.open(LABEL) as photo:
        answer = assistant.ask(photo.convert("RGB"), audio=read_wav(LABEL_QUESTION))
    assert answer.question == "What does this label say?"
    assert answer.mode == "read" and answer.n_tokens == 0  # the decoder is not asked to read
    assert answer.text == "It says: GREEN TEA. with lemon. 20 tea bags."
    # a listener with Whisper's full window, its most careful setting: the test is of what was said
    with WhisperRecognizer(whisper_dir, window="full") as listener:
        _assert_heard_the_label(listener.transcribe(answer.speech).text)


def _assert_heard_the_label(heard: str) -> None:
    """The spoken label, as Whisper tiny.en hears it: Piper says it a little differently each time (its noise),
    and in about one take in three tiny.en mishears a word or two ("lemon" as "flummon", "20 tea" as "20t" or
    "quinty tea"). So four of the label's six words must be heard, and "green tea" always."""
    words = set(heard.lower().replace(",", " ").replace(".", " ").split())
    expected = {"green", "tea", "with", "lemon", "bags"} | ({"20"} if "twenty" not in words else {"twenty"})
    assert "green tea" in " ".join(heard.lower().replace(",", " ").split()), heard
    assert len(expected - words) <= 2, heard


def test_a_dosage_question_is_answered_from_the_label_verbatim_never_by_the_model(assistant: Assistant) -> None:
    answer = assistant.ask(image("medicine-clean.jpg"), question="How many tablets should I take?")
    assert answer.topics == ("medicine",) and answer.n_tokens == 0
    assert "Take 1 or 2 every 4 hours" in answer.text and "pharmacist" in answer.text
    assert unsupported_numbers(answer.text, truth("medicine-clean.jpg")) == set()
    assert answer.speech is not None


@pytest.mark.parametrize(
    ("name", "question", "said"),
    [
        ("price-clean.jpg", "How much does this cost?", "£1.20 per kg"),
        ("yoghurt-clean.jpg", "Is this still safe to eat?", "Best before 14/12/2026"),
        ("cereal-clean.jpg", "Does this contain nuts?", "May contain nuts"),
    ],
)
def test_money_dates_and_allergens_are_read_and_not_judged(
    assistant: Assistant, name: str, question: str, said: str
) -> None:
    answer = assistant.ask(image(name), question=question)
    assert said in answer.text and "can't judge" in answer.text
    assert answer.n_tokens == 0 and unsupported_numbers(answer.text, truth(name)) == set()


def test_no_text_in_view_says_so_instead_of_guessing(assistant: Assistant) -> None:
    for question in ("What does this label say?", "What is the price?", "Which bus is this?"):
        answer = assistant.ask(image("no-text-park.jpg"), question=question)
        assert answer.text.startswith(NO_TEXT), (question, answer.text)
        assert not any(ch.isdigit() for ch in answer.text)


def test_answer_mode_gives_the_decoder_the_text_and_speaks_no_number_it_does_not_hold(assistant: Assistant) -> None:
    answer = assistant.ask(image("room-clean.jpg"), question="What room number is this?")
    assert answer.mode == "answer" and answer.n_tokens > 0
    assert answer.text
    assert unsupported_numbers(answer.text, truth("room-clean.jpg")) == set(), answer.text


def test_a_question_about_the_scene_is_still_described_by_the_decoder(assistant: Assistant) -> None:
    answer = assistant.ask(image("no-text-table.jpg"), question="What is in front of me?")
    assert answer.mode == "describe" and answer.n_tokens > 0 and answer.text


def test_ask_on_the_command_line_reads_the_label_aloud(reading_config: Path, tmp_path: Path, whisper_dir) -> None:
    from edgevision.speech.recognition import WhisperRecognizer

    out = tmp_path / "answer.wav"
    env = {k: v for k, v in os.environ.items() if k != "EDGEVISION_CONFIG"}
    result = subprocess.run(
        [sys.executable, "-m", "edgevision", "ask", "--config", str(reading_config), "--image", str(LABEL),
         "--question", "What does this label say?", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "answer:   It says: GREEN TEA. with lemon. 20 tea bags." in result.stdout
    assert "mode:     read" in result.stdout
    # the listener as in the test above: Whisper's full window
    with WhisperRecognizer(whisper_dir, window="full") as listener:
        _assert_heard_the_label(listener.transcribe(read_wav(out)).text)


def test_smollm2_is_prompted_in_its_own_chatml_layout(assistant: Assistant) -> None:
    from edgevision.decoder.prompt import Image as ImageSegment
    from edgevision.decoder.prompt import Text, build_turn

    assert assistant.chat_format.name == "chatml"  # picked from the GGUF's chat template
    turn = build_turn("What is this?", image_tokens=49, system="Be brief.", fmt=assistant.chat_format)
    assert turn.prefix == (
        Text("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"),
        ImageSegment(49, causal=True),
        Text("\n"),
    )
    # the question is text, never control tokens; the layout's markers after it are
    assert turn.question == (Text("What is this?", special=False), Text("<|im_end|>\n<|im_start|>assistant\n"))
    for marker in ("<|im_start|>", "<|im_end|>"):  # special tokens, not text
        assert len(assistant.decoder.tokenize(marker, add_special=False, parse_special=True)) == 1
