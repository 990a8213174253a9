"""Speech recognition with Whisper through faster-whisper (CTranslate2), from a local model directory only."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol

from edgevision.errors import EdgevisionError, MissingDependencyError, ModelError
from edgevision.schema import setting
from edgevision.speech.audio import WHISPER_SAMPLE_RATE, Audio, resample

logger = logging.getLogger(__name__)

# Without tokenizer.json faster-whisper fetches a tokenizer from the Hugging Face Hub, so it is required here.
_REQUIRED_FILES = ("model.bin", "config.json", "tokenizer.json")


@dataclass(frozen=True)
class Transcript:
    """What was heard.

    `no_speech_probability` is Whisper's lowest per-segment estimate that the audio holds no speech
    (1.0 when it found no segment); `no_speech` is true when there is no text or that estimate is high.
    """

    text: str
    language: str
    duration_s: float
    no_speech_probability: float
    no_speech: bool


class Recognizer(Protocol):
    """Speech to text. An engine implements this, declares its `Settings` dataclass on the class (its fields are
    the constructor's keyword arguments) and is registered in `edgevision.speech.engines.RECOGNIZERS`."""

    def transcribe(self, audio: Audio) -> Transcript:
        """What was said in `audio` (any sample rate)."""

    def close(self) -> None: ...


class WhisperRecognizer:
    """A faster-whisper model loaded from a CTranslate2 directory; close it (or use `with`) to free it."""

    @dataclass(frozen=True)
    class Settings:
        """Whisper through faster-whisper (CTranslate2), from a local model directory"""

        model: Path = setting(
            "../models/whisper-tiny.en", "Whisper model directory (CTranslate2 format).", path="dir"
        )
        language: str = setting("en", "Language the user speaks, as a Whisper language code.")
        beam_size: int = setting(1, "Beam size; 1 is greedy decoding, the fastest.", min=1, max=10)
        threads: int = setting(0, "CPU threads; 0 picks automatically.", min=0, max=64)

    def __init__(
        self,
        model: str | Path,
        *,
        language: str | None = "en",
        beam_size: int = 1,
        compute_type: str = "int8",
        threads: int = 0,
        device: str = "cpu",
        no_speech_threshold: float = 0.6,
    ) -> None:
        if importlib.util.find_spec("faster_whisper") is None:
            raise MissingDependencyError(
                "Speech recognition needs the faster-whisper package; install it with `pip install faster-whisper`."
            )
        model_dir = Path(model)
        if not model_dir.is_dir():
            raise ModelError(
                f"Whisper model directory not found: {model_dir}. Point the speech recognition setting at a "
                "CTranslate2 Whisper model directory (model.bin, config.json, tokenizer.json)."
            )
        missing = [name for name in _REQUIRED_FILES if not (model_dir / name).is_file()]
        if missing:
            raise ModelError(
                f"Whisper model directory {model_dir} lacks {', '.join(missing)}; copy the complete CTranslate2 "
                "model (e.g. from `ct2-transformers-converter --copy_files tokenizer.json`)."
            )

        from faster_whisper import WhisperModel

        try:
            self._model: WhisperModel | None = WhisperModel(
                str(model_dir),
                device=device,
                compute_type=compute_type,
                cpu_threads=threads,
                local_files_only=True,
            )
        except (RuntimeError, ValueError, OSError) as error:
            raise ModelError(
                f"Cannot load the Whisper model in {model_dir}: {error}. The files may be corrupt or "
                f"converted for another CTranslate2 version; convert the model again."
            ) from error
        self.model_dir = model_dir
        self._language = language
        self._beam_size = beam_size
        self._no_speech_threshold = no_speech_threshold
        logger.debug("Loaded Whisper model %s (device=%s, compute_type=%s)", model_dir, device, compute_type)

    def transcribe(self, audio: Audio) -> Transcript:
        """Transcribe a whole utterance; the audio is resampled to 16 kHz first."""
        if self._model is None:
            raise EdgevisionError("The speech recognizer is closed.")
        if len(audio.samples) == 0:
            return Transcript("", self._language or "", 0.0, no_speech_probability=1.0, no_speech=True)
        samples = resample(audio, WHISPER_SAMPLE_RATE).samples
        segments, info = self._model.transcribe(
            samples,
            language=self._language,
            beam_size=self._beam_size,
            condition_on_previous_text=False,
            without_timestamps=True,
        )
        segments = list(segments)  # decoding happens while the generator is consumed
        text = " ".join(segment.text.strip() for segment in segments).strip()
        no_speech_probability = min((segment.no_speech_prob for segment in segments), default=1.0)
        return Transcript(
            text=text,
            language=info.language,
            duration_s=info.duration,
            no_speech_probability=no_speech_probability,
            no_speech=not text or no_speech_probability > self._no_speech_threshold,
        )

    def close(self) -> None:
        """Free the model; further `transcribe` calls raise."""
        if self._model is not None:
            self._model.model.unload_model()
            self._model = None

    def __enter__(self) -> WhisperRecognizer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
