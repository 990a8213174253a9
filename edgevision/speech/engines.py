"""Which speech engines exist: recognizers (speech → text) and synthesizers (text → speech), by config kind.

Each registry maps `speech.recognizer.kind` / `speech.synthesizer.kind` to ``"module:class"``; the class
implements `Recognizer` or `Synthesizer` and declares its `Settings`. A new engine is one module and one line
here (see docs/extending.md).
"""

from __future__ import annotations

from typing import Any

from edgevision.plugins import open_chosen
from edgevision.speech.recognition import Recognizer
from edgevision.speech.synthesis import Synthesizer

RECOGNIZERS: dict[str, str] = {
    "whisper": "edgevision.speech.recognition:WhisperRecognizer",
}

SYNTHESIZERS: dict[str, str] = {
    "piper": "edgevision.speech.synthesis:PiperSynthesizer",
}


def open_recognizer(choice: Any) -> Recognizer:
    """The recognizer the config's `speech.recognizer` names, loaded."""
    return open_chosen(RECOGNIZERS, "speech.recognizer", choice)


def open_synthesizer(choice: Any) -> Synthesizer:
    """The synthesizer the config's `speech.synthesizer` names, loaded (its voice warmed up)."""
    return open_chosen(SYNTHESIZERS, "speech.synthesizer", choice)
