"""The push-to-talk button: its events, the debouncer every back-end shares, and the back-ends.

A back-end only turns its hardware into raw (pressed, time) edges on an asyncio queue; `debounced()` turns
those into clean `Pressed`/`Released` events: the first edge is reported at once (no added latency), edges
within `debounce` seconds after it are chatter, and the state the contacts settle in is reported when the
window ends — so a short tap is never lost and a bouncing contact never reports twice.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Pressed:
    """The button went down at `t` (time.monotonic())."""

    t: float


@dataclass(frozen=True)
class Released:
    """The button came up at `t` (time.monotonic())."""

    t: float


ButtonEvent = Pressed | Released


class Button(Protocol):
    """A push-to-talk button."""

    def events(self) -> AsyncIterator[ButtonEvent]:
        """Debounced presses and releases, in order, until `close()`."""

    async def close(self) -> None: ...


class Debouncer:
    """Pure debouncing logic: raw edges in, clean events out (no clock of its own, so it is testable)."""

    def __init__(self, window: float) -> None:
        self.window = window
        self.reported = False  # the state last reported
        self.raw = False  # the state the contacts are in now
        self.last_report = -math.inf

    def feed(self, pressed: bool, t: float) -> ButtonEvent | None:
        """A raw edge at `t`: the event to report now, if any."""
        self.raw = pressed
        if pressed != self.reported and t - self.last_report >= self.window:
            return self._report(pressed, t)
        return None

    def deadline(self) -> float | None:
        """When `settle()` must be called: the window's end, if the contacts differ from what was reported."""
        return self.last_report + self.window if self.raw != self.reported else None

    def settle(self, t: float) -> ButtonEvent | None:
        """At the window's end: report the state the contacts settled in, if it differs."""
        if self.raw != self.reported and t >= self.last_report + self.window:
            return self._report(self.raw, t)
        return None

    def _report(self, pressed: bool, t: float) -> ButtonEvent:
        self.reported, self.last_report = pressed, t
        return Pressed(t) if pressed else Released(t)


_CLOSED = object()


async def debounced(raw: asyncio.Queue[Any], window: float) -> AsyncIterator[ButtonEvent]:
    """Read raw `(pressed, t)` edges from `raw` (until the `CLOSED` sentinel) and yield debounced events."""
    debouncer = Debouncer(window)
    while True:
        deadline = debouncer.deadline()
        try:
            if deadline is None:
                item = await raw.get()
            else:
                item = await asyncio.wait_for(raw.get(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            event = debouncer.settle(max(time.monotonic(), deadline or 0.0))
            if event is not None:
                yield event
            continue
        if item is _CLOSED:
            return
        pressed, t = item
        event = debouncer.feed(pressed, t)
        if event is not None:
            yield event


CLOSED = _CLOSED  # put on a raw queue to end `debounced()`
