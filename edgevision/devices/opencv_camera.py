"""OpenCV cameras: a V4L2/USB device or a GStreamer pipeline (CSI), and a video file played at its frame rate.

cv2 is imported here only, when one of these kinds is chosen. The pip wheels (opencv-python-headless) have
no GStreamer; JetPack's OpenCV (the python3-opencv that comes with the board image) has it, which a CSI
camera (nvarguscamerasrc) needs.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgevision.devices.camera import CaptureLoop
from edgevision.errors import DeviceError, MissingDependencyError
from edgevision.schema import setting

logger = logging.getLogger(__name__)


def import_cv2() -> Any:
    """cv2, or MissingDependencyError saying how to get it."""
    if importlib.util.find_spec("cv2") is None:
        raise MissingDependencyError(
            "OpenCV (cv2) is not installed: `pip install opencv-python-headless`, or on a Jetson use JetPack's "
            "python3-opencv (it has GStreamer, needed for CSI cameras)"
        )
    import cv2

    return cv2


def has_gstreamer(cv2: Any) -> bool:
    """Whether this OpenCV build can open GStreamer pipelines."""
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GStreamer:"):
            return "YES" in line.split(":", 1)[1]
    return False


def csi_pipeline(sensor_id: int = 0, width: int = 1280, height: int = 720, fps: int = 30) -> str:
    """The GStreamer pipeline for a Jetson CSI camera (nvarguscamerasrc), ending in BGR frames for OpenCV."""
    return (
        f"nvarguscamerasrc sensor-id={sensor_id} ! video/x-raw(memory:NVMM), width={width}, height={height}, "
        f"framerate={fps}/1 ! nvvidconv ! video/x-raw, format=BGRx ! videoconvert ! video/x-raw, format=BGR ! "
        "appsink drop=true max-buffers=1 sync=false"
    )


class _Grabbed:
    """A frame the driver holds, grabbed but not yet decoded."""


class _DeferredDecoding(CaptureLoop):
    """OpenCV cameras grab every frame (so the driver always holds the newest) but decode only at a press.

    For a V4L2 camera `grab()` dequeues a frame without decoding it (for a USB camera's MJPG, decoding is
    most of the cost) and `retrieve()` decodes the last grabbed one; for a video file `grab()` decodes
    already and `retrieve()` only converts (no saving there, but the same code path). Both go through one lock, as VideoCapture is not thread-safe.
    """

    _capture: Any

    def _init_capture_lock(self) -> None:
        self._capture_lock = threading.Lock()

    def _grab_deferred(self) -> Any:
        with self._capture_lock:
            ok = self._capture.grab()
        return _Grabbed() if ok else None

    def _decode(self, raw: Any) -> Any:
        if not isinstance(raw, _Grabbed):
            return raw
        with self._capture_lock:
            capture = self._capture
            ok, frame = capture.retrieve() if capture is not None else (False, None)
        if not ok or frame is None:
            raise DeviceError(f"camera {self.name}: the frame could not be decoded; try again")
        return frame


class OpenCvCamera(_DeferredDecoding):
    """A live camera through cv2.VideoCapture: "0" (index), "/dev/video0" (V4L2) or a GStreamer pipeline."""

    @dataclass(frozen=True)
    class Settings:
        """a live camera (USB/V4L2, or CSI through GStreamer)"""

        source: str = setting("0", "A camera index (0), a device (/dev/video0) or a GStreamer pipeline.")
        width: int = setting(1280, "Requested frame width; 0 keeps the driver's.", min=0, max=8192)
        height: int = setting(720, "Requested frame height; 0 keeps the driver's.", min=0, max=8192)

    def __init__(self, source: str, *, width: int = 0, height: int = 0, fps: int = 0, **loop: Any) -> None:
        self._cv2 = import_cv2()
        self.source = source.strip()
        if not self.source:
            raise DeviceError("camera: no source given — set devices.camera.source (e.g. 0 or /dev/video0)")
        self._gstreamer = "!" in self.source
        if self._gstreamer and not has_gstreamer(self._cv2):
            raise DeviceError(
                "camera: the source is a GStreamer pipeline but this OpenCV build has no GStreamer "
                f"(cv2 {self._cv2.__version__}; pip wheels never have it) — on a Jetson use JetPack's python3-opencv "
                "in a venv made with --system-site-packages, or use a USB camera (devices.camera.source: 0)"
            )
        self.width, self.height, self.fps = width, height, fps
        self._capture: Any = None
        self._init_capture_lock()
        name = "gstreamer" if self._gstreamer else self.source
        super().__init__(name, **loop)

    def _open(self) -> None:
        cv2 = self._cv2
        if self._gstreamer:
            capture = cv2.VideoCapture(self.source, cv2.CAP_GSTREAMER)
        elif self.source.isdigit():
            capture = cv2.VideoCapture(int(self.source), cv2.CAP_V4L2)
        else:
            if not Path(self.source).exists():
                raise DeviceError(
                    f"camera {self.name}: {self.source} does not exist — is the camera plugged in? "
                    "(`ls /dev/video*` lists the cameras)"
                )
            capture = cv2.VideoCapture(self.source, cv2.CAP_V4L2)
        if not capture.isOpened():
            capture.release()
            raise DeviceError(
                f"camera {self.name}: cannot open {self.source} — check that it is plugged in, that this user is "
                "in the 'video' group and that no other program holds it"
            )
        for prop, value in (
            (cv2.CAP_PROP_FRAME_WIDTH, self.width),
            (cv2.CAP_PROP_FRAME_HEIGHT, self.height),
            (cv2.CAP_PROP_FPS, self.fps),
        ):
            if value:
                capture.set(prop, value)
        if not self._gstreamer:
            capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # keep the driver from queueing old frames
        self._capture = capture

    def _grab(self) -> Any:
        return self._grab_deferred()  # blocks until the next frame: the device paces the loop

    def _release(self) -> None:
        with self._capture_lock:
            if self._capture is not None:
                self._capture.release()
                self._capture = None


class VideoFileCamera(_DeferredDecoding):
    """A video file as a camera, played at its own frame rate and looping at the end.

    A file that is removed makes the camera "gone" (latest() raises DeviceError); it works again when the
    file is back.
    """

    @dataclass(frozen=True)
    class Settings:
        """a video file, played at its frame rate and looping"""

        source: str = setting("", "The video file's path.")

    def __init__(self, source: str, *, fps: float = 0.0, **loop: Any) -> None:
        self._cv2 = import_cv2()
        self.path = Path(source).expanduser()
        self.fps_override = fps
        self._capture: Any = None
        self._init_capture_lock()
        self._period = 1 / 30
        self._next_at = 0.0
        self._frames_since_open = 0
        super().__init__(self.path.name, **loop)

    def _open(self) -> None:
        if not self.path.is_file():
            raise DeviceError(f"camera {self.name}: video file not found: {self.path} — check devices.camera.source")
        capture = self._cv2.VideoCapture(str(self.path))
        if not capture.isOpened():
            capture.release()
            raise DeviceError(
                f"camera {self.name}: OpenCV cannot read {self.path} — use a common format (MP4/H.264, AVI/MJPG)"
            )
        fps = self.fps_override or capture.get(self._cv2.CAP_PROP_FPS) or 30.0
        self._period = 1.0 / fps if fps > 0 else 1 / 30
        self._capture = capture
        self._frames_since_open = 0
        self._next_at = time.monotonic()

    def _grab(self) -> Any:
        if not self.path.is_file():  # an open file can still be read after it is removed: treat it as gone
            return None
        grabbed = self._grab_deferred()
        if grabbed is None:
            if self._frames_since_open == 0:
                return None  # opens but holds no frames: a fault, retried with backoff
            with self._capture_lock:
                self._capture.set(self._cv2.CAP_PROP_POS_FRAMES, 0)  # the end: loop
            grabbed = self._grab_deferred()
            if grabbed is None:
                return None
        self._frames_since_open += 1
        return grabbed

    def _pace(self) -> float:
        self._next_at += self._period
        now = time.monotonic()
        if self._next_at < now - self._period:  # fell behind (slow machine): do not try to catch up
            self._next_at = now
        return self._next_at - now

    def _release(self) -> None:
        with self._capture_lock:
            if self._capture is not None:
                self._capture.release()
                self._capture = None
