"""A USB button or a keyboard key as the push-to-talk button, through Linux input events (python-evdev).

evdev is imported here only. A device that is unplugged is looked for again with backoff; while it is gone
no events come (and a button held when it vanished is reported released).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from edgevision.devices.button import CLOSED, ButtonEvent, debounced
from edgevision.errors import DeviceError, MissingDependencyError
from edgevision.schema import setting

logger = logging.getLogger(__name__)


def import_evdev() -> Any:
    if importlib.util.find_spec("evdev") is None:
        raise MissingDependencyError("python-evdev is not installed: `pip install evdev` (Linux only)")
    import evdev

    return evdev


class EvdevButton:
    """The key `key` ("KEY_SPACE", or a number) of the input device `device` (a /dev/input path or a name).

    With no device, the first device that has the key is used. `grab` takes the device for this process
    alone, so a keyboard key used as the button does not also type.
    """

    @dataclass(frozen=True)
    class Settings:
        """a USB button or keyboard key (Linux input events)"""

        device: str = setting("", "The input device's path or part of its name; empty takes the first with the key.")
        key: str = setting("KEY_SPACE", "The key code the button sends (`evtest` shows it).")

    def __init__(
        self,
        device: str = "",
        *,
        key: str | int = "KEY_SPACE",
        debounce: float = 0.02,
        grab: bool = False,
        backoff: float = 0.5,
        max_backoff: float = 5.0,
    ) -> None:
        self._evdev = import_evdev()
        self.device, self.debounce, self.grab = device, debounce, grab
        self.backoff, self.max_backoff = backoff, max_backoff
        self.code = self._key_code(key)
        self._raw: asyncio.Queue[object] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        self._input: Any = None
        self._find()  # fail at start-up on a wrong name, not at the first press

    def _key_code(self, key: str | int) -> int:
        if isinstance(key, int) or str(key).isdigit():
            return int(key)
        code = self._evdev.ecodes.ecodes.get(str(key).upper())
        if code is None:
            raise DeviceError(
                f"evdev button: unknown key {key!r} — use a name like KEY_SPACE or BTN_0 "
                "(`evtest` shows what a button sends)"
            )
        return code

    def _find(self) -> Any:
        evdev = self._evdev
        paths = [self.device] if self.device.startswith("/dev/") else evdev.list_devices()
        for path in paths:
            try:
                candidate = evdev.InputDevice(path)
            except OSError:
                continue
            named = not self.device or self.device.startswith("/dev/") or self.device.lower() in candidate.name.lower()
            keys = candidate.capabilities().get(evdev.ecodes.EV_KEY, [])
            if named and self.code in keys:
                return candidate
            candidate.close()
        raise DeviceError(
            f"evdev button: no input device {self.device or '(any)'} with key code {self.code} — "
            "check `ls /dev/input/by-id`, and that this user is in the 'input' group"
        )

    async def events(self) -> AsyncIterator[ButtonEvent]:
        if self._reader is None:
            self._reader = asyncio.create_task(self._read())
        async for event in debounced(self._raw, self.debounce):
            yield event

    async def _read(self) -> None:
        delay = self.backoff
        while True:
            try:
                self._input = self._find()
            except DeviceError as error:
                logger.debug("%s; retrying in %.1f s", error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff)
                continue
            delay = self.backoff
            logger.info("button: %s (%s), key %d", self._input.path, self._input.name, self.code)
            if self.grab:
                self._input.grab()
            try:
                async for event in self._input.async_read_loop():
                    if event.type == self._evdev.ecodes.EV_KEY and event.code == self.code and event.value in (0, 1):
                        self._raw.put_nowait((event.value == 1, time.monotonic()))
            except OSError as error:
                logger.warning("button %s lost (%s); looking for it again", self._input.path, error)
                self._raw.put_nowait((False, time.monotonic()))
            finally:
                self._input.close()
                self._input = None

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                pass
            self._reader = None
        self._raw.put_nowait(CLOSED)
