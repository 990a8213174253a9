"""The camera interface, the back-ends chosen by `devices.camera`, and the capture loop they share.

A camera captures on its own thread and keeps only the newest frame, so `latest()` — called when the
button is pressed — returns what the user is pointing at now, not a queued frame from seconds ago. A camera
that stops delivering (unplugged, a file removed) is retried with backoff: `latest()` raises `DeviceError`
while it is gone and works again once it is back.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from PIL import Image

from edgevision.errors import DeviceError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Frame:
    """One camera frame: an RGB image, when it was captured (`time.monotonic()`) and its number."""

    image: Image.Image
    timestamp: float
    index: int


class Camera(Protocol):
    """A source of frames; `latest()` is the newest one."""

    def start(self) -> None:
        """Open the source and begin capturing; raises DeviceError if it cannot be opened."""

    def latest(self) -> Frame:
        """The newest frame; raises DeviceError if there is none (not started, camera gone)."""

    def close(self) -> None: ...


def take_frame(camera: Camera, *, timeout: float = 5.0) -> Frame:
    """Start `camera` and return its first frame, waiting up to `timeout` seconds for one to arrive."""
    camera.start()
    deadline = time.monotonic() + timeout
    while True:
        try:
            return camera.latest()
        except DeviceError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


class CaptureLoop:
    """The capture thread shared by the camera back-ends: it keeps the newest frame and retries a lost source.

    A back-end implements `_open()` (raise DeviceError if the source is not there), `_grab()` (the next
    frame as an RGB PIL image or a BGR numpy array, or None when the source failed), `_release()`, and may
    override `_pace()` (seconds to wait before the next grab) and `_decode()` (turn what `_grab()` kept into
    the image, when asked). Frames are decoded and converted to RGB PIL images only when `latest()` asks,
    so a 30 fps camera costs no decoding between presses.
    """

    def __init__(
        self,
        name: str,
        *,
        stale_after: float = 2.0,
        backoff: float = 0.25,
        max_backoff: float = 5.0,
        first_frame_timeout: float = 5.0,
    ) -> None:
        self.name = name
        self.stale_after = stale_after
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.first_frame_timeout = first_frame_timeout
        self._lock = threading.Lock()
        self._new_frame = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._raw: Any = None  # newest frame as the back-end gave it
        self._raw_time = 0.0
        self._index = -1
        self._converted: Frame | None = None
        self._problem: str | None = "not started"
        self._open_now = False

    # --- for back-ends ------------------------------------------------------------------------------------

    def _open(self) -> None:
        raise NotImplementedError

    def _grab(self) -> Any:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    def _pace(self) -> float:
        return 0.0

    def _decode(self, raw: Any) -> Any:
        """The image for what `_grab()` kept; a back-end that defers decoding until a press overrides it."""
        return raw

    # --- the Camera interface -----------------------------------------------------------------------------

    def start(self) -> None:
        """Open the source (DeviceError if it is not there), start the thread and wait for the first frame."""
        if self._thread is not None:
            return
        self._open()
        self._open_now = True
        self._stop.clear()
        with self._lock:
            self._problem = None
        self._thread = threading.Thread(target=self._run, name=f"camera-{self.name}", daemon=True)
        self._thread.start()
        with self._new_frame:
            self._new_frame.wait_for(
                lambda: self._raw is not None or self._problem is not None, timeout=self.first_frame_timeout
            )
            if self._raw is None:
                problem = self._problem or f"no frame within {self.first_frame_timeout:g} s"
        if self._raw is None:
            self.close()
            raise DeviceError(f"camera {self.name}: {problem}")
        logger.info("camera %s started", self.name)

    def latest(self) -> Frame:
        with self._lock:
            if self._problem is not None:
                raise DeviceError(f"camera {self.name}: {self._problem}")
            if self._raw is None:
                raise DeviceError(f"camera {self.name}: no frame yet")
            age = time.monotonic() - self._raw_time
            if self.stale_after > 0 and age > self.stale_after:
                raise DeviceError(
                    f"camera {self.name}: no new frame for {age:.1f} s — check the cable and that no other "
                    "program holds the camera"
                )
            if self._converted is None or self._converted.index != self._index:
                self._converted = Frame(_to_rgb(self._decode(self._raw)), self._raw_time, self._index)
            return self._converted

    def close(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=5.0)
            if thread.is_alive():
                logger.warning("camera %s: capture thread did not stop within 5 s", self.name)
        if self._open_now:
            self._open_now = False
            self._release()
        with self._lock:
            self._problem = "closed"

    def __enter__(self) -> CaptureLoop:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        delay = self.backoff
        failed_grabs = 0
        while not self._stop.is_set():
            if not self._open_now:
                try:
                    self._open()
                except DeviceError as error:
                    self._set_problem(str(error).removeprefix(f"camera {self.name}: "))
                    logger.debug("camera %s: reopen failed, retrying in %.2f s: %s", self.name, delay, error)
                    self._stop.wait(delay)
                    delay = min(delay * 2, self.max_backoff)
                    continue
                self._open_now = True
            raw = self._grab()
            if raw is None:
                self._open_now = False
                self._release()
                self._set_problem("the camera stopped delivering frames (unplugged or removed?); retrying")
                if failed_grabs == 0:
                    logger.warning("camera %s: lost; retrying with backoff", self.name)
                failed_grabs += 1
                if failed_grabs > 1:  # reopening at once tells why (file not found, ...); then back off
                    self._stop.wait(delay)
                    delay = min(delay * 2, self.max_backoff)
                continue
            failed_grabs = 0
            now = time.monotonic()
            with self._new_frame:
                if self._problem is not None:
                    logger.info("camera %s: frames again", self.name)
                self._raw, self._raw_time, self._index, self._problem = raw, now, self._index + 1, None
                self._new_frame.notify_all()
            delay = self.backoff
            pause = self._pace()
            if pause > 0:
                self._stop.wait(pause)

    def _set_problem(self, problem: str) -> None:
        with self._new_frame:
            self._problem = problem
            self._new_frame.notify_all()


def _to_rgb(raw: Any) -> Image.Image:
    """A PIL image as RGB, or a BGR/grey numpy array (OpenCV's layout) as an RGB PIL image."""
    if isinstance(raw, Image.Image):
        return raw if raw.mode == "RGB" else raw.convert("RGB")
    if raw.ndim == 2:
        return Image.fromarray(raw).convert("RGB")
    if raw.shape[2] == 4:
        raw = raw[:, :, :3]
    return Image.fromarray(raw[:, :, ::-1].copy())
