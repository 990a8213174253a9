"""WAV files as microphone and speaker: for tests, scripted runs and benchmarks on machines without sound.

The microphone plays WAV files in as the captured sound, one per start/stop, releasing each clip as real
time passes since start() (as if it were being spoken into it); the speaker writes what it
plays into numbered WAV files, taking as long as the audio lasts (so barge-in can interrupt it, and the
file holds only what was heard) or instantly.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import wave
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgevision.errors import DeviceError
from edgevision.schema import setting
from edgevision.speech.audio import WHISPER_SAMPLE_RATE, Audio, read_wav, resample

logger = logging.getLogger(__name__)


class WavMicrophone:
    """Each start()/stop() captures the next queued clip (a WAV file or an Audio), resampled to 16 kHz.

    `source` is a WAV file or a folder of them (played in name order); `push()` queues more. With `loop`
    the clips repeat. `captured()` gives the part of the clip "spoken" so far: as much as real time since
    start() covers. stop() hands in the whole clip however briefly the button was held, or with `realtime`
    only the part spoken while it was held, like a real microphone.
    """

    @dataclass(frozen=True)
    class Settings:
        """WAV files played in as the questions, one per press (tests, scripts)"""

        source: str = setting("", "A WAV file or a folder of them, played in name order.")
        loop: bool = setting(True, "Start again from the first clip after the last.")

    def __init__(
        self,
        source: str | Path | None = None,
        *,
        files: Iterable[str | Path] = (),
        loop: bool = False,
        max_seconds: float = 30.0,
        realtime: bool = False,
    ) -> None:
        self.loop, self.max_seconds, self.realtime = loop, max_seconds, realtime
        self._clips: collections.deque[Audio | Path] = collections.deque()
        if source:
            path = Path(source).expanduser()
            if path.is_dir():
                self._clips.extend(sorted(path.glob("*.wav")))
            elif path.is_file():
                self._clips.append(path)
            else:
                raise DeviceError(
                    f"WAV microphone: {path} is neither a WAV file nor a folder — check devices.microphone.source"
                )
        for file in files:
            self._clips.append(Path(file))
        self._current: Audio | None = None
        self._started_at = 0.0

    def push(self, clip: Audio | str | Path) -> None:
        """Queue a clip to be 'spoken' at a later start()."""
        self._clips.append(clip if isinstance(clip, Audio) else Path(clip))

    @property
    def next_duration(self) -> float | None:
        """Seconds of the clip the next start() captures (how long a script should hold the button)."""
        if not self._clips:
            return None
        return self._audio(self._clips[0]).duration

    def start(self) -> None:
        if not self._clips:
            raise DeviceError("WAV microphone: no more clips to play in — push() one or give a folder of WAV files")
        clip = self._clips.popleft()
        if self.loop:
            self._clips.append(clip)
        self._current = self._audio(clip)
        self._started_at = time.monotonic()

    def stop(self) -> Audio:
        if self._current is None:
            raise DeviceError("WAV microphone: stop() without start()")
        audio, self._current = self._current, None
        return self._cut(audio, realtime=self.realtime)

    def captured(self) -> Audio:
        audio = self._current
        if audio is None:
            return Audio(np.zeros(0, dtype=np.float32), WHISPER_SAMPLE_RATE)
        return self._cut(audio, realtime=True)

    def _cut(self, audio: Audio, *, realtime: bool) -> Audio:
        seconds = self.max_seconds
        if realtime:
            seconds = min(seconds, time.monotonic() - self._started_at)
        keep = int(seconds * audio.sample_rate)
        return Audio(audio.samples[:keep], audio.sample_rate)

    def close(self) -> None:
        self._clips.clear()

    @staticmethod
    def _audio(clip: Audio | Path) -> Audio:
        try:
            audio = clip if isinstance(clip, Audio) else read_wav(clip)
        except Exception as error:  # InputError and its kin: the clip is the device here
            raise DeviceError(f"WAV microphone: {error}") from error
        return resample(audio, WHISPER_SAMPLE_RATE)


class WavSpeaker:
    """Writes each played Audio to `folder/speech-NNNN.wav`, in order, on its own thread."""

    @dataclass(frozen=True)
    class Settings:
        """what is played is written into numbered WAV files"""

        folder: str = setting("", "The folder to write the WAV files into.")
        realtime: bool = setting(True, "Take as long as the audio lasts (false: write at once).")

    _STEP = 0.02  # seconds written at a time in real time: how late stop() can be

    def __init__(self, folder: str | Path | None = None, *, realtime: bool = True, prefix: str = "speech") -> None:
        if not folder:
            raise DeviceError("WAV speaker: no folder given — set devices.speaker.folder to a folder to write into")
        self.folder = Path(folder).expanduser()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise DeviceError(f"WAV speaker: cannot create {self.folder}: {error.strerror}") from error
        self.realtime, self.prefix = realtime, prefix
        self.played: list[Path] = []  # files written, in order (the last may be cut short by stop())
        self.played_seconds = 0.0
        self._queue: collections.deque[Audio] = collections.deque()
        self._cond = threading.Condition()
        self._abort = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._closed = False
        self._busy = False  # writing a clip now
        self._count = 0
        self._thread = threading.Thread(target=self._run, name="speaker-wav", daemon=True)
        self._thread.start()

    def play(self, audio: Audio) -> None:
        with self._cond:
            if self._closed:
                raise DeviceError("WAV speaker is closed")
            self._queue.append(audio)
            self._idle.clear()
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._queue.clear()
            if self._busy:
                self._abort.set()
            else:
                self._idle.set()
        if not self._idle.wait(1.0):
            logger.warning("WAV speaker: did not stop within 1 s")

    def wait(self, timeout: float | None = None) -> bool:
        return self._idle.wait(timeout)

    @property
    def playing(self) -> bool:
        return not self._idle.is_set()

    def close(self) -> None:
        self.stop()
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=5.0)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed)
                if not self._queue:
                    return
                audio = self._queue.popleft()
                self._abort.clear()
                self._busy = True
            try:
                self._write(audio)
            except OSError as error:
                logger.error("WAV speaker: cannot write into %s: %s", self.folder, error)
            with self._cond:
                self._busy = False
                if not self._queue:
                    self._idle.set()

    def _write(self, audio: Audio) -> None:
        self._count += 1
        path = self.folder / f"{self.prefix}-{self._count:04d}.wav"
        samples = audio.to_int16()
        rate = audio.sample_rate
        step = max(1, int(self._STEP * rate))
        with wave.open(str(path), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(rate)
            if not self.realtime:
                out.writeframes(samples.tobytes())
                written = len(samples)
            else:
                start, written = time.monotonic(), 0
                while written < len(samples) and not self._abort.is_set():
                    chunk = samples[written : written + step]
                    out.writeframes(np.ascontiguousarray(chunk).tobytes())
                    written += len(chunk)
                    self._abort.wait(max(0.0, start + written / rate - time.monotonic()))
        self.played.append(path)
        self.played_seconds += written / rate
        logger.debug("WAV speaker: wrote %s (%.2f s of %.2f s)", path.name, written / rate, audio.duration)
