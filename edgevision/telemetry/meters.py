"""Starting and stopping an answer's meters (memory, energy) so that a failing one never stops the answer."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

from edgevision.errors import EdgevisionError

logger = logging.getLogger(__name__)


def start_meters(factories: Mapping[str, Callable[[], Any]]) -> dict[str, Any]:
    """Each meter made and started, by name; one that fails is kept as its error (logged), the rest run."""
    meters: dict[str, Any] = {}
    for name, new_meter in factories.items():
        try:
            meter = new_meter()
            meter.start()
        except (OSError, EdgevisionError) as error:
            logger.warning("%s meter failed to start: %s", name, error)
            meters[name] = error
        else:
            meters[name] = meter
    return meters


def stop_meters(meters: MutableMapping[str, Any]) -> dict[str, Any]:
    """Each meter's readings by name, or ``{"available": False, "reason": ...}`` where it failed; `meters` is
    emptied (a meter is stopped once)."""
    readings: dict[str, Any] = {}
    for name, meter in meters.items():
        if isinstance(meter, Exception):
            readings[name] = {"available": False, "reason": str(meter)}
            continue
        try:
            readings[name] = meter.stop()
        except (OSError, EdgevisionError, RuntimeError) as error:
            readings[name] = {"available": False, "reason": str(error)}
    meters.clear()
    return readings
