"""A still image as a camera: the file is re-read when it changes, and a removed file makes the camera gone."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from edgevision.devices.camera import CaptureLoop
from edgevision.errors import DeviceError
from edgevision.schema import setting

logger = logging.getLogger(__name__)


class StillImageCamera(CaptureLoop):
    """Delivers the same image `rate` times a second; replacing the file changes what it sees."""

    @dataclass(frozen=True)
    class Settings:
        """a still photo, re-read when it changes"""

        source: str = setting("", "The photo's path (JPEG or PNG).")

    def __init__(self, source: str, *, rate: float = 10.0, **loop: Any) -> None:
        self.path = Path(source).expanduser()
        self.rate = rate
        self._image: Image.Image | None = None
        self._stamp: tuple[int, int] | None = None
        super().__init__(self.path.name, **loop)

    def _open(self) -> None:
        self._load()

    def _load(self) -> None:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            raise DeviceError(
                f"camera {self.name}: image file not found: {self.path} — check devices.camera.source"
            ) from None
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp and self._image is not None:
            return
        try:
            with Image.open(self.path) as image:
                self._image = image.convert("RGB")
        except (UnidentifiedImageError, OSError) as error:
            raise DeviceError(f"camera {self.name}: cannot read {self.path} as an image: {error}") from error
        self._stamp = stamp
        logger.debug("camera %s: loaded %s (%dx%d)", self.name, self.path, *self._image.size)

    def _grab(self) -> Any:
        try:
            self._load()
        except DeviceError as error:
            logger.debug("%s", error)
            return None
        return self._image

    def _pace(self) -> float:
        return 1.0 / self.rate if self.rate > 0 else 0.1

    def _release(self) -> None:
        self._image, self._stamp = None, None
