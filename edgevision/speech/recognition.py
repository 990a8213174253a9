"""Speech recognition with Whisper through faster-whisper (CTranslate2), from a local model directory only.

Whisper's encoder is trained on 30-s windows and faster-whisper always pads a recording to one, so a 2-s
question costs as much as 30 s of speech (tiny.en: about 0.55 CPU-seconds). With `window="fit"` the encoder
sees a shorter window (CTranslate2 takes any length up to 30 s): the recording plus FIT_MARGIN_S of quiet,
at least MIN_WINDOW_S, in whole seconds; the transcript is decoded greedily (or with the beam) from it, so
a short question costs about a third (0.16 CPU-seconds). Much shorter windows make Whisper repeat the
question until its token limit (6 s windows on 8 of 12 spoken questions), so a fitted decode that runs into
its token limit (TOKENS_PER_S of audio), says a sentence or its beginning again, or that faster-whisper would find doubtful
(average log probability under -1) is done again over the full window.

A 10-s window still hears a few questions differently from the 30-s one ("Where's" for "Where is", "colors"
for "colour is"), and it is sure of itself when it does: neither the average log probability nor the least
likely token tells those decodes apart. What does is a close call between two words: so a fitted decode in
which, at some step, the chosen token led another word's token by under WORD_MARGIN (in log probability) is
done again over the full window too (measured in docs/latency.md: on 56 spoken questions this sent 17 to the
full window and left the words of all 56 as the full window hears them). `window="full"` runs
faster-whisper's own `transcribe`, its 30-s window and temperature fallback.
"""

from __future__ import annotations

import importlib.util
import logging
import re
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
WINDOWS = ("fit", "full")
MIN_WINDOW_S = 10.0  # shortest fitted window
FIT_MARGIN_S = 2.0  # quiet after the recording in a fitted window
TOKENS_PER_S = 10  # a fitted decode's token limit, per second of audio (speech is 3-6 tokens a second), plus 10
LOGPROB_THRESHOLD = -1.0  # faster-whisper's log_prob_threshold
WORD_MARGIN = 1.25  # a fitted decode whose choice between two words was closer than this is done again in full
_FRAMES_PER_S = 100  # log-mel frames per second of 16 kHz audio
_FULL_FRAMES = 3000


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
    window_s: float = 30.0  # the encoder window it was heard in; 30 s is Whisper's full one


class Recognizer(Protocol):
    """Speech to text. An engine implements this, declares its `Settings` dataclass on the class (its fields are
    the constructor's keyword arguments) and is registered in `edgevision.speech.engines.RECOGNIZERS`."""

    def transcribe(self, audio: Audio) -> Transcript:
        """What was said in `audio` (any sample rate)."""

    def close(self) -> None: ...


def _repeats(text: str) -> bool:
    """Whether the transcript says a sentence again, whole or its beginning ("Can you read the sign for me?
    Can you read the sign"): Whisper looping in a short window."""
    sentences = [re.sub(r"[^a-z0-9 ]", "", s.lower()).split() for s in re.split(r"[.!?]+", text)]
    sentences = [s for s in sentences if s]
    return any(
        later[: len(earlier)] == earlier or earlier[: len(later)] == later
        for i, earlier in enumerate(sentences)
        for later in sentences[i + 1 :]
    )


def _word(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _closest_call(tokens: list[int], logits: list, tokenizer, suppressed: list[int]) -> float:
    """The smallest lead, in log probability, of a chosen token over the runner-up at the same step where the
    two spell different words. Only text tokens compete: the end of the text against one more word is
    Whisper deciding whether to say the question again, which the repeat check covers; tokens that differ
    only in case, spacing or punctuation, or a runner-up without letters or digits, spell the same words."""
    import numpy as np

    closest = float("inf")
    for token, step in zip(tokens, logits, strict=False):
        scores = np.asarray(step)[: tokenizer.eot].astype(np.float64)
        scores[[t for t in suppressed if 0 <= t < tokenizer.eot]] = -np.inf
        scores[token] = -np.inf
        other = int(np.argmax(scores))
        word = _word(tokenizer.decode([other]))
        if word and word != _word(tokenizer.decode([token])):
            closest = min(closest, float(np.asarray(step)[token]) - float(scores[other]))
    return closest


class WhisperRecognizer:
    """A faster-whisper model loaded from a CTranslate2 directory; close it (or use `with`) to free it."""

    @dataclass(frozen=True)
    class Settings:
        """Whisper through faster-whisper (CTranslate2), from a local model directory"""

        model: Path = setting("../models/whisper-tiny.en", "Whisper model directory (CTranslate2 format).", path="dir")
        language: str = setting("en", "Language the user speaks, as a Whisper language code.")
        beam_size: int = setting(1, "Beam size; 1 is greedy decoding, the fastest.", min=1, max=10)
        threads: int = setting(0, "CPU threads; 0 picks automatically.", min=0, max=64)
        window: str = setting(
            "fit",
            "fit: the encoder sees the recording plus quiet, at least 10 s (a short question costs a third of a "
            "30-s window), and a decode with a close call between two words is done again over 30 s, so the "
            "words are the full window's; full: Whisper's own 30-s window, as faster-whisper runs it.",
            choices=("fit", "full"),
        )

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
        window: str = "fit",
    ) -> None:
        if window not in WINDOWS:
            raise EdgevisionError(f"unknown Whisper window {window!r}; use one of {', '.join(WINDOWS)}")
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
        self.window = window
        self._tokenizer = None
        logger.debug("Loaded Whisper model %s (device=%s, compute_type=%s)", model_dir, device, compute_type)

    def transcribe(self, audio: Audio) -> Transcript:
        """Transcribe a whole utterance; the audio is resampled to 16 kHz first."""
        if self._model is None:
            raise EdgevisionError("The speech recognizer is closed.")
        if len(audio.samples) == 0:
            return Transcript("", self._language or "", 0.0, no_speech_probability=1.0, no_speech=True)
        samples = resample(audio, WHISPER_SAMPLE_RATE).samples
        if self.window == "fit" and len(samples) / WHISPER_SAMPLE_RATE + FIT_MARGIN_S <= _FULL_FRAMES / _FRAMES_PER_S:
            transcript = self._transcribe_fitted(samples)
            if transcript is not None:
                return transcript
            logger.debug("the fitted window's decode was not trusted; transcribing over the full window")
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

    def _transcribe_fitted(self, samples) -> Transcript | None:
        """One greedy (or beam) decode over an encoder window fitted to the recording; None if it ran into
        its token limit (Whisper repeating itself) instead of ending, repeated itself, was doubtful, or made a
        close call between two words."""
        import numpy as np
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        model = self._model
        assert model is not None
        if self._tokenizer is None:
            language = self._language or "en"
            self._tokenizer = Tokenizer(
                model.hf_tokenizer,
                model.model.is_multilingual,
                task="transcribe",
                language=language if model.model.is_multilingual else None,
            )
        tokenizer = self._tokenizer
        features = model.feature_extractor(samples)[:, :-1]  # the last frame is the extractor's padding
        duration = len(samples) / WHISPER_SAMPLE_RATE
        n_frames = max(features.shape[-1] + round(FIT_MARGIN_S * _FRAMES_PER_S), round(MIN_WINDOW_S * _FRAMES_PER_S))
        n_frames = min(_FULL_FRAMES, -(-n_frames // _FRAMES_PER_S) * _FRAMES_PER_S)  # whole seconds
        features = np.pad(features, ((0, 0), (0, n_frames - features.shape[-1])))
        suppressed = get_suppressed_tokens(tokenizer, [-1])
        prompt = model.get_prompt(tokenizer, [], without_timestamps=True)
        limit = min(model.max_length, len(prompt) + 10 + round(TOKENS_PER_S * duration))
        try:
            encoded = model.encode(features)
            result = model.model.generate(
                encoded,
                [prompt],
                beam_size=self._beam_size,
                max_length=limit,
                return_scores=True,
                return_logits_vocab=True,
                return_no_speech_prob=True,
                suppress_blank=True,
                suppress_tokens=suppressed,
            )[0]
        except (RuntimeError, ValueError) as error:
            raise EdgevisionError(f"Whisper could not transcribe the recording: {error}") from error
        tokens = result.sequences_ids[0]
        if len(prompt) + len(tokens) >= limit - 1:  # CTranslate2 stopped it (its last step is the end token)
            return None
        text = tokenizer.decode(tokens).strip()
        # faster-whisper's own test for a doubtful decode (which it retries at a higher temperature)
        avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)
        if avg_logprob < LOGPROB_THRESHOLD or _repeats(text):
            return None
        closest = _closest_call(tokens, result.logits[0], tokenizer, suppressed)
        if closest < WORD_MARGIN:
            logger.debug(
                "the fitted window chose between two words by %.2f; transcribing over the full window", closest
            )
            return None
        no_speech_probability = result.no_speech_prob
        return Transcript(
            text=text,
            language=self._language or "en",
            duration_s=duration,
            no_speech_probability=no_speech_probability,
            no_speech=not text or no_speech_probability > self._no_speech_threshold,
            window_s=n_frames / _FRAMES_PER_S,
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
