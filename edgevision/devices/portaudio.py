"""Microphone and speaker through sounddevice (PortAudio), at the device's native sample rate.

sounddevice is imported here only. Streams run only while recording or playing, so an idle device costs
nothing. Audio callbacks run on PortAudio's thread and only copy samples; everything else (opening,
restarting after a fault, logging) happens on ordinary threads.
"""

from __future__ import annotations

import collections
import importlib.util
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgevision.errors import DeviceError, MissingDependencyError
from edgevision.schema import setting
from edgevision.speech.audio import WHISPER_SAMPLE_RATE, Audio, resample

logger = logging.getLogger(__name__)

_RETRY_DELAYS = (0.0, 0.2, 0.5)  # a device that is gone for longer than this is a lasting fault


def import_sounddevice() -> Any:
    """sounddevice, or MissingDependencyError saying how to get it and PortAudio."""
    if importlib.util.find_spec("sounddevice") is None:
        raise MissingDependencyError("sounddevice is not installed: `pip install sounddevice` (and apt libportaudio2)")
    try:
        import sounddevice
    except OSError as error:  # the Python package is there, the PortAudio library is not
        raise MissingDependencyError(f"PortAudio is missing ({error}): `apt install libportaudio2`") from error
    return sounddevice


def _device_info(sd: Any, device: str | int | None, kind: str) -> tuple[str | int | None, dict[str, Any]]:
    if isinstance(device, str):
        device = device.strip()
        device = int(device) if device.isdigit() else (device or None)
    try:
        info = sd.query_devices(device, kind)
    except (ValueError, sd.PortAudioError) as error:
        names = [d["name"] for d in sd.query_devices() if d[f"max_{kind}_channels"] > 0]
        raise DeviceError(
            f"no {kind} sound device {device if device is not None else '(default)'}: {error} — "
            f"{kind} devices here: {', '.join(names) or 'none'} (`arecord -l` / `aplay -l`; is the user in 'audio'?)"
        ) from None
    return device, info


class SounddeviceMicrophone:
    """Records from a PortAudio input device between start() and stop(); hands back 16 kHz mono."""

    @dataclass(frozen=True)
    class Settings:
        """a real microphone (PortAudio)"""

        device: str = setting("", "The input device's name or index; empty for the default.")

    def __init__(self, device: str | int | None = None, *, max_seconds: float = 30.0, blocksize: int = 0) -> None:
        self._sd = import_sounddevice()
        self.device, info = _device_info(self._sd, device, "input")
        self.name = str(info["name"])
        self.sample_rate = int(info["default_samplerate"])
        self.channels = 1 if info["max_input_channels"] >= 1 else 0
        if not self.channels:
            raise DeviceError(f"sound device {self.name} has no input channels — choose a microphone")
        self.max_samples = int(max_seconds * self.sample_rate)
        self.blocksize = blocksize
        self._stream: Any = None
        self._lock = threading.Lock()
        self._chunks: list[np.ndarray] = []
        self._count = 0
        self._recording = False
        self.overflows = 0

    @property
    def captured_seconds(self) -> float:
        """Seconds captured since start() (counted in samples: a device without a clock still counts right)."""
        return self._count / self.sample_rate

    def start(self) -> None:
        with self._lock:
            self._chunks, self._count, self.overflows = [], 0, 0
            self._recording = True
        last: Exception | None = None
        for delay in _RETRY_DELAYS:
            time.sleep(delay)
            try:
                if self._stream is None:
                    self._stream = self._open()
                self._stream.start()
                return
            except self._sd.PortAudioError as error:
                last = error
                logger.warning("microphone %s: cannot start (%s); retrying", self.name, error)
                self._close_stream()
        self._recording = False
        raise DeviceError(f"microphone {self.name} cannot record: {last} — check it is plugged in (`arecord -l`)")

    def stop(self) -> Audio:
        if self._stream is not None:
            try:
                self._stream.stop()  # waits for the callback to finish
            except self._sd.PortAudioError as error:  # unplugged mid-question: keep what was heard, reopen next time
                logger.warning("microphone %s: %s; it is reopened at the next press", self.name, error)
                self._close_stream()
        with self._lock:
            self._recording = False
            chunks, self._chunks = self._chunks, []
        if self.overflows:
            logger.warning("microphone %s: %d input overflows (samples lost)", self.name, self.overflows)
        samples = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
        return resample(Audio(samples, self.sample_rate), WHISPER_SAMPLE_RATE)

    def captured(self) -> Audio:
        with self._lock:
            chunks = list(self._chunks) if self._recording else []
        samples = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
        return resample(Audio(samples, self.sample_rate), WHISPER_SAMPLE_RATE)

    def close(self) -> None:
        self._close_stream()

    def _open(self) -> Any:
        return self._sd.InputStream(
            # 16-bit integers: every value is a valid sample whatever the driver hands over (float32 can be NaN)
            samplerate=self.sample_rate,
            channels=self.channels,
            dtype="int16",
            device=self.device,
            blocksize=self.blocksize,
            callback=self._callback,
        )

    def _close_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.abort(ignore_errors=True)
            stream.close(ignore_errors=True)

    def _callback(self, indata: np.ndarray, frames: int, _time: Any, status: Any) -> None:
        if status.input_overflow:
            self.overflows += 1
        with self._lock:
            if not self._recording:
                return
            take = min(frames, self.max_samples - self._count)
            if take > 0:
                self._chunks.append(indata[:take].mean(axis=1, dtype=np.float32) / 32768.0)
                self._count += take


class SounddeviceSpeaker:
    """Plays queued audio through a PortAudio output device; the stream runs only while there is audio."""

    @dataclass(frozen=True)
    class Settings:
        """a real speaker (PortAudio)"""

        device: str = setting("", "The output device's name or index; empty for the default.")

    def __init__(self, device: str | int | None = None, *, blocksize: int = 0, latency: str | float = "low") -> None:
        self._sd = import_sounddevice()
        self.device, info = _device_info(self._sd, device, "output")
        self.name = str(info["name"])
        self.sample_rate = int(info["default_samplerate"])
        if info["max_output_channels"] < 1:
            raise DeviceError(f"sound device {self.name} has no output channels — choose a speaker")
        self.blocksize, self.latency = blocksize, latency
        self._lock = threading.Lock()
        self._queue: collections.deque[np.ndarray] = collections.deque()
        self._offset = 0  # samples of the queue's first chunk already played
        self._idle = threading.Event()
        self._idle.set()
        self._wake = threading.Event()
        self._closed = False
        self._stopping = False  # the callback ended the stream; it may still read as active for a moment
        self.played_samples = 0
        self.underflows = 0
        self._stream: Any = None
        self._control = threading.Lock()  # start/stop/abort of the stream, from one thread at a time
        self._thread = threading.Thread(target=self._run, name=f"speaker-{self.name}", daemon=True)
        self._thread.start()

    def play(self, audio: Audio) -> None:
        if self._closed:
            raise DeviceError(f"speaker {self.name} is closed")
        samples = resample(audio, self.sample_rate).samples
        if not len(samples):
            return
        with self._lock:
            self._queue.append(samples)
            self._idle.clear()
        self._wake.set()

    def stop(self) -> None:
        with self._lock:
            self._queue.clear()
            self._offset = 0
        with self._control:
            if self._stream is not None:
                self._stream.abort()  # drops what PortAudio buffered: silent at once
        with self._lock:
            if not self._queue:
                self._idle.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._idle.wait(timeout)

    @property
    def playing(self) -> bool:
        return not self._idle.is_set()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.stop()
        self._wake.set()
        self._thread.join(timeout=5.0)
        with self._control:
            if self._stream is not None:
                self._stream.close()
                self._stream = None

    # --- PortAudio's thread -------------------------------------------------------------------------------

    def _callback(self, outdata: np.ndarray, frames: int, _time: Any, status: Any) -> None:
        if status.output_underflow:
            self.underflows += 1
        filled = 0
        with self._lock:
            while filled < frames and self._queue:
                chunk = self._queue[0]
                take = min(frames - filled, len(chunk) - self._offset)
                outdata[filled : filled + take, 0] = chunk[self._offset : self._offset + take]
                filled += take
                self._offset += take
                if self._offset >= len(chunk):
                    self._queue.popleft()
                    self._offset = 0
            self.played_samples += filled
            outdata[filled:] = 0
            if outdata.shape[1] > 1:
                outdata[:, 1:] = outdata[:, :1]
            if filled == 0:  # a whole block of silence: what was queued has been heard
                self._stopping = True
                raise self._sd.CallbackStop

    def _finished(self) -> None:
        with self._lock:
            if not self._queue:
                self._idle.set()
        self._wake.set()

    # --- the control thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        recheck: float | None = None
        while True:
            self._wake.wait(recheck)
            self._wake.clear()
            recheck = None
            if self._closed:
                return
            with self._lock:
                pending = bool(self._queue)
            if not pending:
                continue
            try:
                with self._control:
                    if self._stream is None:
                        self._stream = self._sd.OutputStream(
                            samplerate=self.sample_rate,
                            channels=1,
                            dtype="float32",
                            device=self.device,
                            blocksize=self.blocksize,
                            latency=self.latency,
                            callback=self._callback,
                            finished_callback=self._finished,
                        )
                    if not self._stream.active:
                        self._stream.stop()
                        self._stopping = False
                        self._stream.start()
                    elif self._stopping:  # queued while the stream was winding down: start it once it has
                        recheck = 0.01
                failures = 0
            except self._sd.PortAudioError as error:
                failures += 1
                with self._control:
                    if self._stream is not None:
                        self._stream.close(ignore_errors=True)
                        self._stream = None
                if failures > len(_RETRY_DELAYS):
                    with self._lock:
                        dropped = sum(len(c) for c in self._queue) / self.sample_rate
                        self._queue.clear()
                        self._offset = 0
                        self._idle.set()
                    logger.error("speaker %s unavailable (%s); dropped %.1f s of speech", self.name, error, dropped)
                    failures = 0
                    continue
                delay = _RETRY_DELAYS[failures - 1] or 0.1
                logger.warning("speaker %s: cannot play (%s); retrying in %.1f s", self.name, error, delay)
                time.sleep(delay)
                self._wake.set()
            if self.underflows:
                logger.warning("speaker %s: %d output underflows", self.name, self.underflows)
                self.underflows = 0
