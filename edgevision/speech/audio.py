"""Mono audio as float32 samples: reading and writing PCM WAV files, resampling.

Only the standard library's `wave` and numpy are used, so this module imports on any machine.
"""

from __future__ import annotations

import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgevision.errors import InputError

WHISPER_SAMPLE_RATE = 16_000

_CONVERT_HINT = "convert it with e.g. `ffmpeg -i INPUT -ac 1 -ar 16000 -c:a pcm_s16le OUTPUT.wav`"


@dataclass(frozen=True, eq=False)
class Audio:
    """Mono audio: float32 samples in [-1, 1] at `sample_rate` Hz."""

    samples: np.ndarray
    sample_rate: int

    def __post_init__(self) -> None:
        samples = np.asarray(self.samples, dtype=np.float32)
        if samples.ndim != 1:
            raise ValueError(f"Audio samples must be one-dimensional (mono), got shape {samples.shape}")
        if self.sample_rate <= 0:
            raise ValueError(f"Audio sample rate must be positive, got {self.sample_rate}")
        object.__setattr__(self, "samples", samples)

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return len(self.samples) / self.sample_rate

    @classmethod
    def from_int16(cls, data: bytes, sample_rate: int) -> Audio:
        """Audio from raw little-endian 16-bit mono PCM."""
        samples = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
        return cls(samples, sample_rate)

    def to_int16(self) -> np.ndarray:
        """Samples as 16-bit integers, clipped to the representable range."""
        return np.round(np.clip(self.samples, -1.0, 1.0) * 32767.0).astype("<i2")


def read_wav(path: str | Path) -> Audio:
    """Read a PCM WAV file (8, 16, 24 or 32-bit integer samples) as mono float32; channels are averaged."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"Audio file not found: {path}. Check the path and that the recording was saved.")
    if not path.is_file():
        raise InputError(f"Audio path is not a file: {path}.")
    try:
        with wave.open(str(path), "rb") as wav:
            channels = wav.getnchannels()
            sample_width = wav.getsampwidth()
            sample_rate = wav.getframerate()
            data = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as error:
        raise InputError(f"{path} is not a PCM WAV file ({error}); {_CONVERT_HINT}.") from error

    frame_size = channels * sample_width
    data = data[: len(data) - len(data) % frame_size]  # a truncated file may end in half a frame
    if not data:
        raise InputError(f"{path} holds no audio (0 samples); record again, holding the button while speaking.")
    samples = _decode_pcm(data, sample_width).reshape(-1, channels).mean(axis=1, dtype=np.float32)
    return Audio(samples, sample_rate)


def write_wav(path: str | Path, audio: Audio) -> None:
    """Write `audio` as a 16-bit mono PCM WAV file."""
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(audio.sample_rate)
        wav.writeframes(audio.to_int16().tobytes())


def resample(audio: Audio, sample_rate: int) -> Audio:
    """Band-limited resampling by the discrete Fourier transform (numpy only).

    Frequencies above the lower of the two Nyquist limits are removed, so down-sampling does not alias.
    The transform treats the clip as periodic; for speech, which starts and ends near silence, the
    wrap-around at the edges is inaudible.
    """
    if sample_rate == audio.sample_rate:
        return audio
    n_in = len(audio.samples)
    n_out = round(n_in * sample_rate / audio.sample_rate)
    if n_in == 0 or n_out == 0:
        return Audio(np.zeros(0, dtype=np.float32), sample_rate)
    spectrum = np.fft.rfft(audio.samples.astype(np.float64))
    kept = min(len(spectrum), n_out // 2 + 1)
    out_spectrum = np.zeros(n_out // 2 + 1, dtype=np.complex128)
    out_spectrum[:kept] = spectrum[:kept]
    samples = np.fft.irfft(out_spectrum, n_out) * (n_out / n_in)
    return Audio(samples.astype(np.float32), sample_rate)


def _decode_pcm(data: bytes, sample_width: int) -> np.ndarray:
    """Interleaved PCM bytes as float32 in [-1, 1]."""
    match sample_width:
        case 1:  # WAV stores 8-bit samples unsigned
            return (np.frombuffer(data, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
        case 2:
            return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
        case 3:
            triplets = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
            values = triplets[:, 0] | (triplets[:, 1] << 8) | (triplets[:, 2] << 16)
            values = np.where(values >= 1 << 23, values - (1 << 24), values)
            return values.astype(np.float32) / float(1 << 23)
        case 4:
            return (np.frombuffer(data, dtype="<i4").astype(np.float64) / float(1 << 31)).astype(np.float32)
        case _:
            raise InputError(f"Unsupported WAV sample width of {sample_width} bytes; {_CONVERT_HINT}.")
