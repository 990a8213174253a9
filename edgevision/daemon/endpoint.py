"""Where a spoken question ends, from the recording's energy: recognition while the button is still held.

In overlapped mode the daemon transcribes the recording so far whenever the user pauses (`ends_in_pause`);
on release that early transcript is the answer's question if everything recorded after it is quiet
(`is_quiet`) — the recording is then the transcribed audio plus silence, which Whisper hears as the same
words (it pads every input with silence to 30 s anyway). Otherwise the whole recording is transcribed again.

Pure numpy on 16 kHz mono samples; no model, no device.
"""

from __future__ import annotations

import numpy as np

FRAME_S = 0.02  # energy is measured over 20 ms frames (320 samples at 16 kHz)
# A frame is quiet below SILENCE_FLOOR RMS (about -50 dBFS: under any speech a microphone at arm's length
# picks up, above the hiss of a quiet room) or, for a loud talker or a noisy room, below QUIET_RATIO of the
# loudest frame so far (-34 dB: softer than the faint ends of words like "of" or "this", which still count
# as speech).
SILENCE_FLOOR = 0.003
QUIET_RATIO = 0.02
# A pause worth transcribing at: this long quiet after speech. Shorter than the silence people leave before
# letting go of the button, longer than most gaps between words (a gap that triggers costs one wasted
# recognition while the button is held, never a wrong transcript).
PAUSE_S = 0.1


def frame_rms(samples: np.ndarray, sample_rate: int = 16_000) -> np.ndarray:
    """RMS of each FRAME_S frame; a last partial frame counts as a frame."""
    size = max(1, round(FRAME_S * sample_rate))
    n = -(-len(samples) // size)
    padded = np.zeros(n * size, dtype=np.float64)
    padded[: len(samples)] = samples
    rms = np.sqrt((padded.reshape(n, size) ** 2).mean(axis=1))
    if len(samples) % size:  # the last frame's mean over its own samples, not the zero padding
        tail = samples[(n - 1) * size :].astype(np.float64)
        rms[-1] = np.sqrt((tail**2).mean())
    return rms


def quiet_level(loudest: float) -> float:
    """The RMS below which a frame is quiet, given the loudest frame of the recording."""
    return max(SILENCE_FLOOR, QUIET_RATIO * loudest)


def ends_in_pause(samples: np.ndarray, since: int, sample_rate: int = 16_000) -> bool:
    """Whether the recording has speech after sample `since` (what the last early transcript covered) and
    now ends in at least PAUSE_S of quiet: the moment to transcribe what was said so far."""
    if len(samples) - since < PAUSE_S * sample_rate:
        return False
    rms = frame_rms(samples, sample_rate)
    level = quiet_level(float(rms.max(initial=0.0)))
    size = max(1, round(FRAME_S * sample_rate))
    n_pause = max(1, round(PAUSE_S / FRAME_S))
    if len(rms) < n_pause or (rms[-n_pause:] >= level).any():
        return False
    return bool((rms[since // size : len(rms) - n_pause] >= level).any())


def only_quiet_after(samples: np.ndarray, n_heard: int, sample_rate: int = 16_000) -> bool:
    """Whether everything in the recording after its first `n_heard` samples is quiet (by the recording's own
    loudest frame): then a transcript of those samples is the transcript of the recording."""
    loudest = float(frame_rms(samples, sample_rate).max(initial=0.0))
    return is_quiet(samples[n_heard:], loudest, sample_rate)


def is_quiet(samples: np.ndarray, loudest: float, sample_rate: int = 16_000) -> bool:
    """Whether every frame of `samples` (the end of a recording whose loudest frame has RMS `loudest`) is
    quiet; empty audio is quiet."""
    if not len(samples):
        return True
    return bool((frame_rms(samples, sample_rate) < quiet_level(loudest)).all())
