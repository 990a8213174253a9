"""The microphone and speaker interfaces, and the back-ends chosen by `devices.microphone` / `devices.speaker`.

A microphone records between `start()` (button pressed) and `stop()` (released) and hands back 16 kHz mono
audio for Whisper; `captured()` reads what it has so far without stopping (recognition while the button
is held). A speaker plays queued audio in order on its own; `stop()` silences it at once and drops
the queue (barge-in: the user pressed while it spoke).
"""

from __future__ import annotations

from typing import Protocol

from edgevision.speech.audio import Audio


class Microphone(Protocol):
    """Push-to-talk capture."""

    def start(self) -> None:
        """Begin capturing (the button was pressed)."""

    def stop(self) -> Audio:
        """End capturing (the button was released): everything since `start()`, as 16 kHz mono."""

    def captured(self) -> Audio:
        """What has been captured since `start()` so far, as 16 kHz mono, without stopping; empty audio when
        not recording. Only sound that has already been heard: it grows as real time passes."""

    def close(self) -> None: ...


class Speaker(Protocol):
    """Plays audio in the order it was queued, without blocking the caller."""

    def play(self, audio: Audio) -> None:
        """Queue `audio`; returns at once."""

    def stop(self) -> None:
        """Stop now and drop everything queued."""

    def wait(self, timeout: float | None = None) -> bool:
        """Block until everything queued has played; False if `timeout` passed first."""

    @property
    def playing(self) -> bool:
        """Whether anything is playing or queued."""

    def close(self) -> None: ...
