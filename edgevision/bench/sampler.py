"""Power and memory sampled on a background thread through one suite: a time series for the report.

Each sample is the wall-clock time (so a daemon's press timestamps line up with it), the board's power (total
and per rail, from the telemetry power reader), this process's RSS with its children's (Piper runs as one),
MemAvailable, and on a Jetson the GPU (NvMap) memory.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from edgevision.telemetry.memory import descendants, meminfo, nvmap_clients, process_status
from edgevision.telemetry.power import TOTAL, PowerReader

logger = logging.getLogger(__name__)

UNITS = {"t_s": "s", "power_w": "W", "rss_mib": "MiB", "mem_available_mib": "MiB", "gpu_mib": "MiB", "rails_w": "W"}


class Sampler:
    """Samples between start() and stop(); stop() returns the series (power None where there is no reading)."""

    def __init__(self, power: PowerReader, *, interval: float = 0.1) -> None:
        self.power, self.interval = power, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rows: list[tuple[float, float | None, dict[str, float], float, float | None, float | None]] = []
        self._started = 0.0

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("Sampler.start() while running")
        self._rows, self._started = [], time.time()
        self._stop.clear()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, Any]:
        if self._thread is None:
            raise RuntimeError("Sampler.stop() without start()")
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._sample()
        rails = sorted({name for row in self._rows for name in row[2]})
        return {
            "start_unix_s": self._started,
            "interval_s": self.interval,
            "power_source": self.power.name,
            "t_s": [round(row[0] - self._started, 3) for row in self._rows],
            "power_w": [None if row[1] is None else round(row[1], 3) for row in self._rows],
            "rails_w": {rail: [row[2].get(rail) for row in self._rows] for rail in rails},
            "rss_mib": [round(row[3], 1) for row in self._rows],
            "mem_available_mib": [None if row[4] is None else round(row[4], 1) for row in self._rows],
            "gpu_mib": [None if row[5] is None else round(row[5], 1) for row in self._rows],
            "units": UNITS,
        }

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        now = time.time()
        try:
            reading = self.power.read()
        except OSError as error:
            logger.debug("power: %s read failed: %s", self.power.name, error)
            reading = None
        watts = dict(reading.watts) if reading is not None else {}
        total = watts.pop(TOTAL, None)
        pid = os.getpid()
        rss = process_status(pid=pid).get("VmRSS", 0)
        rss += sum(process_status(pid=child).get("VmRSS", 0) for child in descendants(pid=pid))
        info = meminfo()
        available = info.get("MemAvailable")
        clients = nvmap_clients()
        gpu = clients.get("total", sum(clients.values())) if clients else info.get("NvMapMemUsed")
        self._rows.append(
            (
                now,
                total,
                {k: round(v, 3) for k, v in watts.items()},
                rss / 1024,
                None if available is None else available / 1024,
                None if gpu is None else gpu / 1024,
            )
        )


def energy_between(series: dict[str, Any], start_unix: float, end_unix: float) -> float | None:
    """Joules between two wall-clock times from a sampled series (each reading held until the next), or None
    where there is no power reading in that span."""
    t0 = series["start_unix_s"]
    points = [(t0 + t, w) for t, w in zip(series["t_s"], series["power_w"], strict=True) if w is not None]
    if not points or end_unix <= start_unix:
        return None
    joules = 0.0
    for i, (t, watts) in enumerate(points):
        nxt = points[i + 1][0] if i + 1 < len(points) else float("inf")
        begin, finish = max(t, start_unix), min(nxt, end_unix)
        if i == 0 and t > start_unix:  # the first reading stands for the time before it too
            begin = start_unix
        if finish > begin:
            joules += watts * (finish - begin)
    return joules


def mean_power(series: dict[str, Any]) -> float | None:
    values = [w for w in series["power_w"] if w is not None]
    return sum(values) / len(values) if values else None
