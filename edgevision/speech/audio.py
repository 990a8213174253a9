"""Mono audio as float32 samples: reading and writing PCM WAV files, resampling.

Only the standard library's `wave` and numpy are used, so this module imports on any machine.
"""

from __future__ import annotations

import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgevision.errors import InputError
from edgevision.files import atomic_write

WHISPER_SAMPLE_RATE = 16_000

# Limits on what a WAV file may ask of us: a header is a few bytes, but a rate of 1 Hz would need an
# enormous resampling, and a long recording gigabytes of float samples.
MIN_SAMPLE_RATE = 8_000
MAX_SAMPLE_RATE = 192_000
MAX_AUDIO_SECONDS = 120.0  # the daemon's longest question is 120 s too (daemon.max_recording_s)
MAX_CHANNELS = 8

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
        raise InputError(f"Audio path {path} is not a file; give the path of a WAV recording.")
    try:
        with wave.open(str(path), "rb") as wav:
            channels = wav.getnchannels()
            sample_width = wav.getsampwidth()
            sample_rate = wav.getframerate()
            check_format(path, sample_rate, channels, wav.getnframes())
            data = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as error:
        reason = str(error) or "it ends inside its header"
        raise InputError(f"{path} is not a PCM WAV file ({reason}); {_CONVERT_HINT}.") from error
    except OSError as error:
        raise InputError(f"cannot read {path} ({error.strerror}); check the file and its permissions.") from error

    frame_size = channels * sample_width
    data = data[: len(data) - len(data) % frame_size]  # a truncated file may end in half a frame
    if not data:
        raise InputError(f"{path} holds no audio (0 samples); record again, holding the button while speaking.")
    samples = _decode_pcm(data, sample_width).reshape(-1, channels).mean(axis=1, dtype=np.float32)
    return Audio(samples, sample_rate)


def check_format(path: str | Path, sample_rate: int, channels: int, n_frames: int) -> None:
    """Refuse a WAV header whose rate, channels or length is outside what a spoken question can be, before
    any sample is read."""
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise InputError(
            f"{path} has a sample rate of {sample_rate} Hz; edgevision takes {MIN_SAMPLE_RATE} to "
            f"{MAX_SAMPLE_RATE} Hz: {_CONVERT_HINT}."
        )
    if not 1 <= channels <= MAX_CHANNELS:
        raise InputError(f"{path} has {channels} channels (1 to {MAX_CHANNELS} are read); {_CONVERT_HINT}.")
    seconds = n_frames / sample_rate
    if seconds > MAX_AUDIO_SECONDS:
        raise InputError(
            f"{path} is {seconds:.0f} s long; a question may last at most {MAX_AUDIO_SECONDS:.0f} s: "
            "cut it to the question (e.g. `ffmpeg -i INPUT -t 30 OUTPUT.wav`)."
        )


def write_wav(path: str | Path, audio: Audio) -> None:
    """Write `audio` as a 16-bit mono PCM WAV file, atomically: the file appears whole or not at all."""
    with atomic_write(path) as file, wave.open(file, "wb") as wav:
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
    for rate in (audio.sample_rate, sample_rate):
        if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
            raise InputError(
                f"cannot resample audio between {audio.sample_rate} Hz and {sample_rate} Hz: edgevision takes "
                f"{MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz; {_CONVERT_HINT}."
            )
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
