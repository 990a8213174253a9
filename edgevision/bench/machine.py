"""What the machine is (board, CPU, JetPack, TensorRT, power mode, clocks) and what else was running on it.

Read on the machine that runs the suites: on a Jetson the device tree names the board, /etc/nv_tegra_release
the L4T release, `nvpmodel -q` the power mode and `jetson_clocks --show` the clocks; elsewhere those fields are
None and the CPU model names the hardware.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from edgevision.bench.results import quantity

logger = logging.getLogger(__name__)


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace").replace("\x00", "").strip() or None
    except OSError:
        return None


def _run(argv: list[str], timeout: float = 10) -> str | None:
    """A tool's output, or None where the tool is absent or fails."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        logger.debug("%s: %s", argv[0], error)
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _cpu_model() -> str:
    text = _read("/proc/cpuinfo") or ""
    for key in ("model name", "Hardware", "Processor"):
        match = re.search(rf"^{key}\s*:\s*(.+)$", text, re.MULTILINE)
        if match:
            return match.group(1).strip()
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def power_mode() -> dict[str, Any] | None:
    """`nvpmodel -q`: {"mode": "15W", "id": 0, "text": ...}, or None off a Jetson."""
    text = _run(["nvpmodel", "-q"])
    if text is None:
        return None
    name = re.search(r"NV Power Mode:\s*(\S+)", text)
    number = re.search(r"^\s*(\d+)\s*$", text, re.MULTILINE)
    return {
        "mode": name.group(1) if name else text.splitlines()[0],
        "id": int(number.group(1)) if number else None,
        "text": text,
    }


def machine_facts() -> dict[str, Any]:
    """The facts that make two runs comparable, and the versions that explain a difference."""
    mem = re.search(r"^MemTotal:\s+(\d+) kB", _read("/proc/meminfo") or "", re.MULTILINE)
    l4t = _read("/etc/nv_tegra_release")
    board = _read("/proc/device-tree/model")
    tensorrt = _version("tensorrt") or (
        _run(["dpkg-query", "-W", "-f=${Version}", "libnvinfer10"])
        or _run(["dpkg-query", "-W", "-f=${Version}", "libnvinfer8"])
    )
    return {
        "hostname": platform.node(),
        "board": board,  # e.g. "NVIDIA Jetson Orin NX Engineering Reference Developer Kit"; None off a Jetson
        "product": _read("/sys/class/dmi/id/product_name"),
        "arch": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_total": quantity(int(mem.group(1)) / 1024 if mem else None, "MiB"),
        "kernel": platform.release(),
        "os": (_read("/etc/os-release") or "").partition("PRETTY_NAME=")[2].split("\n")[0].strip('"') or None,
        "l4t_release": l4t.splitlines()[0] if l4t else None,
        "jetpack": _run(["dpkg-query", "-W", "-f=${Version}", "nvidia-jetpack"]),
        "tensorrt": tensorrt,
        "cuda": _read("/usr/local/cuda/version.txt") or _run(["nvcc", "--version"]),
        "power_mode": power_mode(),
        "clocks": _run(["jetson_clocks", "--show"]),
        "python": platform.python_version(),
        "packages": {
            name: _version(name)
            for name in ("llama_cpp_python", "onnxruntime", "onnxruntime-gpu", "faster-whisper", "piper-tts", "numpy")
        },
    }


# --- what else was running -----------------------------------------------------------------------------------


def _cpu_ticks() -> dict[int, tuple[str, int]]:
    ticks = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        ticks[int(stat.parent.name)] = (name, int(fields[11]) + int(fields[12]))  # utime + stime
    return ticks


def _command_line(pid: int, width: int = 60) -> str | None:
    """The process's command line, program without its folder ("python -m pytest ..." says more than "python")."""
    try:
        argv = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return None
    if not argv:
        return None
    text = " ".join([Path(argv[0]).name, *argv[1:]])
    return text if len(text) <= width else text[: width - 1] + "…"


def load_snapshot(window: float = 0.5, top: int = 5) -> dict[str, Any]:
    """Load average and the processes that used the most CPU over `window` seconds (this one excluded)."""
    loadavg = (_read("/proc/loadavg") or "0 0 0").split()
    before = _cpu_ticks()
    start = time.monotonic()
    time.sleep(window)
    after = _cpu_ticks()
    seconds = time.monotonic() - start
    hz = os.sysconf("SC_CLK_TCK")
    busy = []
    for pid, (name, ticks) in after.items():
        if pid == os.getpid() or pid not in before:
            continue
        share = (ticks - before[pid][1]) / hz / seconds * 100
        if share > 0:
            busy.append({"pid": pid, "command": name, "cpu_percent": round(share, 1)})
    busy.sort(key=lambda p: -p["cpu_percent"])
    for process in busy[:top]:
        process["command"] = _command_line(process["pid"]) or process["command"]
    return {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "loadavg_1m": float(loadavg[0]),
        "loadavg_5m": float(loadavg[1]),
        "loadavg_15m": float(loadavg[2]),
        "cpu_count": os.cpu_count(),
        "top_processes": busy[:top],
        "units": {"loadavg": "runnable tasks", "cpu_percent": "% of one core"},
    }
