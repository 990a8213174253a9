"""One press and what it led to (`Interaction`) → one JSON-ready record for the per-interaction log
(telemetry/log.py writes it); the recording and the frame kept beside it where configured.

Durations are in seconds. The headline of the overlapped pipeline is `release_to_first_audio`: how long the
user waits, after letting go of the button, before the answer starts to play.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import enum
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgevision.assistant import Answer, Scene
from edgevision.daemon.state import Mode, PressKind
from edgevision.devices.camera import Frame
from edgevision.errors import InputError
from edgevision.speech.audio import Audio, write_wav
from edgevision.stages import MODEL_STAGES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EarlyTranscript:
    """What recognition made of the recording's first `n_samples` (16 kHz) while the button was held."""

    n_samples: int
    question: str | None  # None: no speech was recognised
    error: str | None
    seconds: float  # how long recognition took


@dataclass(eq=False)
class Interaction:
    """One press and everything it led to; the loop owns it, the worker fills in its results."""

    id: int
    kind: PressKind
    mode: Mode
    pressed_at: float  # time.monotonic()
    wall_at: float  # time.time() at the press
    barge_in: bool = False
    frame: Frame | None = None
    capture_s: float | None = None
    scene: Scene | None = None  # the follow-up's scene, or the one `look` produced
    look: concurrent.futures.Future | None = None
    looked_at: float | None = None
    released_at: float | None = None
    capped: bool = False
    heard_at: float | None = None
    recognition_s: float | None = None
    # overlapped mode: recognition while the button is held (the worker writes `early`, the loop the rest)
    early: EarlyTranscript | None = None  # the latest early transcript
    early_job: concurrent.futures.Future | None = None  # the one being made
    early_samples: int = 0  # how much of the recording the latest one submitted covers
    early_count: int = 0  # how many were made
    early_used: bool | None = None  # whether the question is the early transcript (None: not tried)
    transcribed_at: float | None = None  # when the question was known
    question: str | None = None
    answer_started_at: float | None = None
    first_audio_at: float | None = None
    answered_at: float | None = None
    speech_done_at: float | None = None
    answer: Answer | None = None
    error: str | None = None
    said: str | None = None  # a phrase spoken instead of an answer
    interrupted: str | None = None  # "barge_in" or "shutdown"
    job: concurrent.futures.Future | None = None
    meters: dict[str, Any] = field(default_factory=dict)
    audio: Audio | None = None  # the recording, kept only if configured

    @property
    def cancelled(self) -> bool:
        return self.interrupted is not None


def interaction_record(ix: Interaction, readings: dict[str, Any]) -> dict[str, Any]:
    answer = ix.answer
    stages: dict[str, float] = {}
    if ix.scene is not None and ix.kind.value == "new":
        stages.update(ix.scene.timings)  # encoded and prefilled for this press (not a follow-up's old scene)
    if answer is not None:
        stages.update(answer.timings)  # a scene that had left the cache is prefilled again: counted here
    first_token_at = None
    if answer is not None and ix.answer_started_at is not None and "first_token" in answer.timings:
        first_token_at = ix.answer_started_at + answer.timings["first_token"]
    end = ix.speech_done_at or ix.answered_at
    durations = {
        "capture": ix.capture_s,
        "recording": _since(ix.pressed_at, ix.released_at),
        "recognition": ix.recognition_s,
        # how long the user waited for the transcript after letting go (0 when an early one was ready)
        "recognition_after_release": max(0.0, _since(ix.released_at, ix.transcribed_at))
        if ix.released_at is not None and ix.transcribed_at is not None
        else None,
        **{stage: stages.get(stage) for stage in MODEL_STAGES},
        "decode_tokens_per_s": stages.get("decode_tokens_per_s"),
        "answer_total": stages.get("total"),
        # overlapped mode: how long encoding the image ran on after release (0 when wholly hidden)
        "look_after_release": max(0.0, _since(ix.released_at, ix.looked_at))
        if ix.mode == Mode.OVERLAPPED and ix.looked_at is not None and ix.released_at is not None
        else None,
        "release_to_first_token": _since(ix.released_at, first_token_at),
        "release_to_first_audio": _since(ix.released_at, ix.first_audio_at),
        "release_to_answer_end": _since(ix.released_at, ix.answered_at),
        "speaking": _since(ix.first_audio_at, ix.speech_done_at),
        "answer_speech": answer.speech.duration if answer is not None and answer.speech is not None else None,
        "total": _since(ix.pressed_at, end),
    }
    record: dict[str, Any] = {
        "time": _iso(ix.wall_at),
        "interaction": ix.id,
        "mode": ix.mode,
        "kind": ix.kind.value,
        "follow_up": ix.kind.value == "follow_up",
        "barge_in": ix.barge_in,
        "interrupted": ix.interrupted,
        "recording_capped": ix.capped,
        "early_transcript": ix.early_used,  # overlapped mode: the question was recognised before release
        "early_transcripts_made": ix.early_count,
        "reused_image": bool(answer and answer.reused_image),
        "question": ix.question,
        "answer": answer.text if answer is not None else None,
        "n_tokens": answer.n_tokens if answer is not None else 0,
        # how it was answered (read, answer, describe), and the topics the decoder was kept from
        "answer_mode": answer.mode if answer is not None else None,
        "guarded_topics": list(answer.topics) if answer is not None else [],
        "withheld_sentences": answer.withheld if answer is not None else 0,
        "said": ix.said,
        "error": ix.error,
        "frame": None
        if ix.frame is None
        else {"index": ix.frame.index, "age_s": _round(ix.pressed_at - ix.frame.timestamp)},
        "timestamps": {
            name: _iso(ix.wall_at + (t - ix.pressed_at))
            for name, t in (
                ("press", ix.pressed_at),
                ("release", ix.released_at),
                ("heard", ix.heard_at),
                ("first_audio", ix.first_audio_at),
                ("answered", ix.answered_at),
                ("speech_done", ix.speech_done_at),
            )
            if t is not None
        },
        "durations_s": {k: _round(v) for k, v in durations.items() if v is not None},
    }
    for name, reading in readings.items():
        record[name] = plain(reading)
    return record


def plain(value: Any) -> Any:
    """A reading (dataclass, enum, nested; its own `to_record()` where it has one) as JSON-ready values."""
    if hasattr(value, "to_record"):
        return plain(value.to_record())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, float):
        return _round(value)
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def _since(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else end - start


def _round(value: float) -> float:
    return round(float(value), 4)


def _iso(wall: float) -> str:
    return datetime.datetime.fromtimestamp(wall, datetime.timezone.utc).isoformat(timespec="milliseconds")


def keep_captures(ix: Interaction, folder: Path, *, audio: bool, image: bool) -> dict[str, str]:
    """Store the recording and the frame in `folder` (only where configured); their paths, for the record."""
    kept: dict[str, str] = {}
    stem = folder / f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime(ix.wall_at))}-{ix.id:05d}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if audio and ix.audio is not None:
            write_wav(stem.with_suffix(".wav"), ix.audio)
            kept["audio_file"] = str(stem.with_suffix(".wav"))
        if image and ix.frame is not None:
            ix.frame.image.save(stem.with_suffix(".jpg"), quality=90)
            kept["image_file"] = str(stem.with_suffix(".jpg"))
    except (OSError, InputError) as error:  # write_wav reports a full disk as InputError, leaving no partial file
        logger.error("cannot keep the capture in %s: %s", folder, error)
    return kept
