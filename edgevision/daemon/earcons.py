"""Short generated tones that tell a user without a screen what the device is doing.

listening: a rising pair (the button is held, speak now); thinking: one soft low note (the question was
heard); error: a falling pair, played before the short spoken reason. No sound files are needed.
"""

from __future__ import annotations

import numpy as np

from edgevision.speech.audio import Audio

# name → (frequency Hz, duration s) notes, played one after the other
EARCONS: dict[str, tuple[tuple[float, float], ...]] = {
    "listening": ((660.0, 0.07), (990.0, 0.09)),
    "thinking": ((440.0, 0.12),),
    "error": ((520.0, 0.12), (330.0, 0.18)),
}
_LEVEL = 0.3  # peak amplitude: clearly audible, well below the voice
_FADE_S = 0.01  # raised-cosine fade in and out, so no click


def earcon(name: str, sample_rate: int) -> Audio:
    """The named earcon at `sample_rate` (the speaker's, so it queues with speech without resampling)."""
    notes = [_tone(frequency, seconds, sample_rate) for frequency, seconds in EARCONS[name]]
    return Audio(np.concatenate(notes), sample_rate)


def _tone(frequency: float, seconds: float, sample_rate: int) -> np.ndarray:
    n = int(seconds * sample_rate)
    t = np.arange(n, dtype=np.float32) / sample_rate
    tone = _LEVEL * np.sin(2 * np.pi * frequency * t, dtype=np.float32)
    fade = min(int(_FADE_S * sample_rate), n // 2)
    ramp = 0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, fade, dtype=np.float32))
    tone[:fade] *= ramp
    tone[n - fade :] *= ramp[::-1]
    return tone.astype(np.float32)
