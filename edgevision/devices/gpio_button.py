"""A push button on the Jetson's 40-pin header, through libgpiod (python gpiod 2.x) or Jetson.GPIO.

Board-only; the libraries are imported here only. With `chip` set (e.g. "/dev/gpiochip0") libgpiod is used
with `line` as the line offset and the kernel's edge events; otherwise Jetson.GPIO with `pin` as the BOARD
pin number. The button is wired to ground with the pull-up on (`active_low`, the default).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from edgevision.devices.button import CLOSED, ButtonEvent, debounced
from edgevision.errors import DeviceError, MissingDependencyError
from edgevision.schema import setting

logger = logging.getLogger(__name__)


class GpioButton:
    """A GPIO input as the push-to-talk button; edges come from the kernel, not from polling."""

    @dataclass(frozen=True)
    class Settings:
        """a button on the 40-pin header"""

        pin: int = setting(7, "The BOARD pin number (Jetson.GPIO), or the line offset with chip.", min=0, max=1023)
        chip: str = setting("", "A gpiochip (/dev/gpiochip0) to use libgpiod; empty uses Jetson.GPIO.")
        active_low: bool = setting(True, "The button connects the pin to ground (pull-up on).")

    def __init__(
        self,
        *,
        pin: int = 7,
        chip: str = "",
        line: int | None = None,
        active_low: bool = True,
        debounce: float = 0.03,
    ) -> None:
        self.pin, self.chip, self.line, self.active_low, self.debounce = pin, chip, line, active_low, debounce
        self._raw: asyncio.Queue[object] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._request: Any = None
        self._gpio: Any = None
        if chip:
            if importlib.util.find_spec("gpiod") is None:
                raise MissingDependencyError("libgpiod's Python binding is not installed: `pip install gpiod`")
        elif importlib.util.find_spec("Jetson") is None:
            raise MissingDependencyError(
                "Jetson.GPIO is not installed: `pip install Jetson.GPIO` (or `pip install edgevision[jetson]`), "
                "or set devices.button.chip to use libgpiod"
            )

    async def events(self) -> AsyncIterator[ButtonEvent]:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._open_gpiod() if self.chip else self._open_jetson()
        async for event in debounced(self._raw, self.debounce):
            yield event

    def _edge(self, level: int) -> None:  # from any thread
        pressed = (level == 0) if self.active_low else (level == 1)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._raw.put_nowait, (pressed, time.monotonic()))

    def _open_jetson(self) -> None:
        from Jetson import GPIO

        self._gpio = GPIO
        try:
            GPIO.setmode(GPIO.BOARD)
            GPIO.setup(self.pin, GPIO.IN)
            # Jetson.GPIO calls back on its own thread; debouncing is ours, so bouncetime stays off.
            GPIO.add_event_detect(self.pin, GPIO.BOTH, callback=lambda ch: self._edge(GPIO.input(ch)))
        except (RuntimeError, ValueError, OSError) as error:
            raise DeviceError(
                f"GPIO button on BOARD pin {self.pin}: {error} — check the pin number and that "
                "this user is in the 'gpio' group"
            ) from error
        logger.info("button: GPIO BOARD pin %d (Jetson.GPIO)", self.pin)

    def _open_gpiod(self) -> None:
        import gpiod
        from gpiod.line import Bias, Direction, Edge

        offset = self.line if self.line is not None else self.pin
        settings = gpiod.LineSettings(
            direction=Direction.INPUT,
            edge_detection=Edge.BOTH,
            bias=Bias.PULL_UP if self.active_low else Bias.PULL_DOWN,
            debounce_period=timedelta(0),
        )
        try:
            self._request = gpiod.request_lines(self.chip, consumer="edgevision", config={offset: settings})
        except OSError as error:
            raise DeviceError(
                f"GPIO button on {self.chip} line {offset}: {error.strerror} — check the chip and "
                "line (`gpioinfo`) and that this user is in the 'gpio' group"
            ) from error
        assert self._loop is not None
        self._loop.add_reader(self._request.fd, self._read_gpiod)
        logger.info("button: %s line %d (libgpiod)", self.chip, offset)

    def _read_gpiod(self) -> None:
        for event in self._request.read_edge_events():
            self._edge(1 if event.event_type is event.Type.RISING_EDGE else 0)

    async def close(self) -> None:
        if self._request is not None:
            assert self._loop is not None
            self._loop.remove_reader(self._request.fd)
            self._request.release()
            self._request = None
        if self._gpio is not None:
            self._gpio.remove_event_detect(self.pin)
            self._gpio.cleanup(self.pin)
            self._gpio = None
        self._raw.put_nowait(CLOSED)
