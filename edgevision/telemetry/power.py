"""Power and energy: the board's power monitors read directly, and an energy meter for one answer.

Readers, chosen by `telemetry.power_reader` (or found by `detect_power_reader`):
- "ina3221": the Jetson Orin's INA3221 rail monitors through hwmon in sysfs (no tool, no root needed);
- "tegrastats": the lines NVIDIA's tegrastats prints (VDD_IN 4827mW/4827mW ...);
- "rapl": Intel RAPL energy counters under /sys/class/powercap (wrap-around handled);
- "none": no monitor; measurements say "unavailable" explicitly.
jetson-stats (jtop) is not used: it is AGPL, and the sysfs files are all it reads.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from edgevision.errors import DeviceError
from edgevision.plugins import load_class

logger = logging.getLogger(__name__)

TOTAL = "total"
_BOARD_INPUT = ("VDD_IN", "POM_5V_IN")  # the rail that is the whole board's input, where there is one


@dataclass(frozen=True)
class PowerSample:
    """Power at time `t` (time.monotonic()), in watts per rail, plus "total"."""

    t: float
    watts: dict[str, float]


class PowerReader(Protocol):
    """A power monitor."""

    name: str

    def read(self) -> PowerSample | None:
        """The power now, or None if there is no reading (yet)."""

    def close(self) -> None: ...


def _with_total(rails: dict[str, float]) -> dict[str, float]:
    board = next((rails[r] for r in _BOARD_INPUT if r in rails), None)
    return {**rails, TOTAL: board if board is not None else sum(rails.values())}


# --- INA3221 through hwmon ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rail:
    name: str
    volts_file: Path  # in<N>_input, millivolts
    amps_file: Path  # curr<N>_input, milliamps


class Ina3221Reader:
    """The INA3221 rails of a Jetson Orin (VDD_IN, VDD_CPU_GPU_CV, VDD_SOC on an Orin NX) through hwmon."""

    name = "ina3221"
    PATTERN = "sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*/in*_label"

    def __init__(self, root: str | os.PathLike[str] = "/") -> None:
        self.rails = self.find(Path(root))
        if not self.rails:
            raise DeviceError(
                f"no INA3221 rails under {Path(root) / self.PATTERN} — not a Jetson, or the "
                "ina3221 driver is not loaded; set telemetry.power_reader to auto or none"
            )

    @classmethod
    def find(cls, root: Path) -> list[_Rail]:
        rails = []
        for label in sorted(root.glob(cls.PATTERN)):
            channel = label.name.removeprefix("in").removesuffix("_label")
            volts, amps = label.with_name(f"in{channel}_input"), label.with_name(f"curr{channel}_input")
            if not (volts.exists() and amps.exists()):  # e.g. in7_label "sum of shunt voltages"
                continue
            enable = label.with_name(f"in{channel}_enable")
            if enable.exists() and enable.read_text().strip() == "0":
                continue
            rails.append(_Rail(label.read_text().strip(), volts, amps))
        return rails

    def read(self) -> PowerSample | None:
        t = time.monotonic()
        watts = {}
        for rail in self.rails:
            try:
                watts[rail.name] = int(rail.volts_file.read_text()) * int(rail.amps_file.read_text()) / 1e6
            except (OSError, ValueError) as error:
                logger.debug("ina3221: cannot read %s: %s", rail.name, error)
        return PowerSample(t, _with_total(watts)) if watts else None

    def close(self) -> None:
        pass


# --- tegrastats ---------------------------------------------------------------------------------------------

_MW = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)mW/(\d+)mW")  # JetPack 5/6: VDD_IN 4827mW/4827mW
_LEGACY = re.compile(r"\b((?:POM|VDD)_[A-Z0-9_]+) (\d+)/(\d+)\b")  # JetPack 4: POM_5V_IN 2578/2578


def parse_tegrastats(line: str) -> dict[str, float]:
    """The rails' instantaneous power in watts from one tegrastats line (plus "total"); {} if it has none."""
    rails = {name: int(now) / 1000 for name, now, _avg in _MW.findall(line)}
    if not rails:
        rails = {name: int(now) / 1000 for name, now, _avg in _LEGACY.findall(line)}
    return _with_total(rails) if rails else {}


class TegrastatsReader:
    """Runs tegrastats and keeps its newest line's power readings."""

    name = "tegrastats"

    def __init__(self, command: str | os.PathLike[str] = "tegrastats", *, interval_ms: int = 100) -> None:
        found = shutil.which(str(command))
        if found is None:
            raise DeviceError(
                f"tegrastats not found ({command}) — it comes with JetPack (nvidia-l4t-tools); "
                "set telemetry.power_reader to ina3221, auto or none"
            )
        self._latest: PowerSample | None = None
        self._lock = threading.Lock()
        try:
            self._process = subprocess.Popen(
                [found, "--interval", str(interval_ms)],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                bufsize=1,
            )
        except OSError as error:
            raise DeviceError(f"cannot run {found}: {error.strerror}") from error
        self._thread = threading.Thread(target=self._follow, name="tegrastats", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            watts = parse_tegrastats(line)
            if watts:
                with self._lock:
                    self._latest = PowerSample(time.monotonic(), watts)
        if self._process.poll() not in (None, 0, -15):
            logger.warning("tegrastats exited with status %s", self._process.returncode)

    def read(self) -> PowerSample | None:
        with self._lock:
            return self._latest

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._thread.join(timeout=2)


# --- Intel RAPL ---------------------------------------------------------------------------------------------


@dataclass
class _Zone:
    name: str
    energy_file: Path
    wrap: int  # max_energy_range_uj + 1
    last: int = -1
    top: bool = True  # a package or psys, not a sub-domain (core, uncore) counted inside one


class RaplReader:
    """Intel RAPL energy counters as power: the change in energy_uj between two reads, wrap-around handled."""

    name = "rapl"

    def __init__(self, root: str | os.PathLike[str] = "/", *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        base = Path(root) / "sys/class/powercap"
        self.zones: list[_Zone] = []
        names: dict[str, str] = {}  # "intel-rapl:0" → "package-0"
        for zone in sorted(base.glob("intel-rapl:*")):
            energy = zone / "energy_uj"
            try:
                name = (zone / "name").read_text().strip()
                wrap = int((zone / "max_energy_range_uj").read_text()) + 1
                energy.read_text()
            except (OSError, ValueError):
                continue  # unreadable (energy_uj is root-only on newer kernels)
            parent = zone.name.rsplit(":", 1)[0]
            top = parent == "intel-rapl"
            if not top:  # a sub-domain (core, uncore, dram) is named after its package: "package-0/core"
                name = f"{names.get(parent, parent)}/{name}"
            names[zone.name] = name
            self.zones.append(_Zone(name, energy, wrap, top=top))
        if not self.zones:
            raise DeviceError(
                f"no readable RAPL counters under {base} — not an Intel CPU, or energy_uj is "
                "readable only by root; set telemetry.power_reader to none"
            )
        self._last_t: float | None = None

    def read(self) -> PowerSample | None:
        t = self._clock()
        values = {}
        for zone in self.zones:
            try:
                values[zone.name] = int(zone.energy_file.read_text())
            except (OSError, ValueError):
                return None
        last_t, self._last_t = self._last_t, t
        watts: dict[str, float] = {}
        for zone in self.zones:
            now, before = values[zone.name], zone.last
            zone.last = now
            if last_t is None or before < 0 or t <= last_t:
                continue
            delta = now - before if now >= before else now + zone.wrap - before
            watts[zone.name] = delta / 1e6 / (t - last_t)
        if not watts:
            return None
        # psys is the whole platform; else the packages plus DRAM (a sub-domain outside the package's count)
        counted = [z.name for z in self.zones if z.top or z.name.endswith("/dram")]
        total = watts["psys"] if "psys" in watts else sum(watts[n] for n in counted if n in watts)
        return PowerSample(t, {**watts, TOTAL: total})

    def close(self) -> None:
        pass


# --- none, choosing one -------------------------------------------------------------------------------------


class NoPowerReader:
    """No power monitor here: every measurement says so."""

    name = "none"

    def __init__(self, reason: str = "no power monitor configured") -> None:
        self.reason = reason

    def read(self) -> PowerSample | None:
        return None

    def close(self) -> None:
        pass


# Reader name → "module:class" (`edgevision.plugins`); "auto" picks the first of these that is present.
POWER_READERS: dict[str, str] = {
    "ina3221": f"{__name__}:Ina3221Reader",
    "tegrastats": f"{__name__}:TegrastatsReader",
    "rapl": f"{__name__}:RaplReader",
    "none": f"{__name__}:NoPowerReader",
}


def open_power_reader(name: str, *, root: str | os.PathLike[str] = "/", **options: Any) -> PowerReader:
    """The reader called `name` ("auto" picks the best available); DeviceError if that one is not here."""
    if name == "auto":
        return detect_power_reader(root)
    reader = load_class(POWER_READERS, "telemetry.power_reader", name)
    return reader(root) if name in ("ina3221", "rapl") else reader(**options)


def detect_power_reader(root: str | os.PathLike[str] = "/") -> PowerReader:
    """The best reader available: INA3221 sysfs, then tegrastats, then RAPL, else "none" saying why."""
    tried = []
    for name in ("ina3221", "tegrastats", "rapl"):
        if name == "tegrastats" and (Path(root) != Path("/") or shutil.which("tegrastats") is None):
            tried.append("tegrastats: not found")
            continue
        try:
            reader = open_power_reader(name, root=root)
        except DeviceError as error:
            tried.append(f"{name}: {str(error).split(' — ')[0]}")
            continue
        logger.info("power: reading %s", name)
        return reader
    reason = "unavailable (" + "; ".join(tried) + ")"
    logger.info("power: %s", reason)
    return NoPowerReader(reason)


# --- energy for one answer ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Energy:
    """Energy over one measured span; `available` False (with `reason`) where there is no power monitor."""

    source: str
    available: bool
    seconds: float
    joules: float | None = None
    mean_watts: float | None = None
    peak_watts: float | None = None
    rails: dict[str, float] = field(default_factory=dict)  # mean watts per rail
    samples: int = 0
    reason: str = ""

    def to_record(self) -> dict[str, Any]:
        """The fields for the per-interaction log."""
        if not self.available:
            return {"source": self.source, "available": False, "reason": self.reason}
        return {
            "source": self.source,
            "available": True,
            "seconds": round(self.seconds, 4),
            "joules": round(self.joules or 0.0, 4),
            "mean_watts": round(self.mean_watts or 0.0, 4),
            "peak_watts": round(self.peak_watts or 0.0, 4),
            "samples": self.samples,
            "rails_mean_watts": {k: round(v, 4) for k, v in self.rails.items()},
        }


class EnergyMeter:
    """Samples a power reader on a background thread between start() and stop(); stop() integrates."""

    def __init__(self, reader: PowerReader, *, interval: float = 0.1) -> None:
        self.reader, self.interval = reader, interval
        self._samples: list[PowerSample] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("EnergyMeter.start() while running")
        self._samples, self._started = [], time.monotonic()
        self._stop.clear()
        self._sample()  # a rate reader (RAPL) needs a first read to measure from
        self._thread = threading.Thread(target=self._run, name="energy-meter", daemon=True)
        self._thread.start()

    def stop(self) -> Energy:
        if self._thread is None:
            raise RuntimeError("EnergyMeter.stop() without start()")
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._sample()
        return integrate(self._samples, self._started, time.monotonic(), self.reader)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        try:
            sample = self.reader.read()
        except OSError as error:
            logger.debug("power: %s read failed: %s", self.reader.name, error)
            return
        if sample is not None and TOTAL in sample.watts:
            self._samples.append(sample)


def integrate(samples: list[PowerSample], start: float, end: float, reader: PowerReader) -> Energy:
    """Energy from `start` to `end`: the samples' total power, held from each sample to the next."""
    seconds = max(0.0, end - start)
    if not samples:
        reason = getattr(reader, "reason", f"{reader.name} gave no reading")
        return Energy(reader.name, False, seconds, reason=reason)
    ordered = sorted(samples, key=lambda s: s.t)
    joules = 0.0
    for i, sample in enumerate(ordered):  # each reading holds from its time (or start) until the next one
        begin = start if i == 0 else sample.t
        finish = ordered[i + 1].t if i + 1 < len(ordered) else end
        joules += sample.watts[TOTAL] * max(0.0, finish - begin)
    totals = [s.watts[TOTAL] for s in ordered]
    mean = joules / seconds if seconds > 0 else sum(totals) / len(totals)
    rails: dict[str, float] = {}
    for sample in ordered:
        for rail, watts in sample.watts.items():
            if rail != TOTAL:
                rails[rail] = rails.get(rail, 0.0) + watts / len(ordered)
    peak = max(totals)
    if math.isnan(joules):
        return Energy(reader.name, False, seconds, reason="readings were not numbers")
    return Energy(reader.name, True, seconds, joules, mean, peak, rails, len(ordered))
