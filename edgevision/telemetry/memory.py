"""Memory over one answer: the process's peak RSS (and its children's: Piper), system RAM, and on a Jetson the
GPU (NvMap) memory.

On a Jetson the CPU and GPU share one RAM; what the GPU holds (CUDA buffers, TensorRT engines, llama.cpp's
offloaded layers) is allocated through NvMap and shows in `/sys/kernel/debug/nvmap/iovmm/clients` (root
only) or as NvMapMemUsed in /proc/meminfo (L4T kernels). Elsewhere GPU memory is "unavailable".
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_KB = re.compile(r"^(\w+):\s+(\d+)\s*kB", re.MULTILINE)
_NVMAP_CLIENTS = "sys/kernel/debug/nvmap/iovmm/clients"
_HWM_RESET_SLACK_KB = 16 * 1024  # RSS may grow between the reset and the read; a kept old mark is far above


def meminfo(root: Path = Path("/")) -> dict[str, int]:
    """/proc/meminfo as {field: kB}."""
    try:
        text = (root / "proc/meminfo").read_text()
    except OSError:
        return {}
    return {key: int(value) for key, value in _KB.findall(text)}


def process_status(root: Path = Path("/"), pid: int | str = "self") -> dict[str, int]:
    """The kB fields of /proc/PID/status (VmRSS, VmHWM, ...)."""
    try:
        text = (root / f"proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {key: int(value) for key, value in _KB.findall(text)}


def nvmap_clients(root: Path = Path("/")) -> dict[str, int] | None:
    """NvMap memory in kB per PID (as a string) plus "total", or None where the file cannot be read.

    The file looks like:
        CLIENT                        PROCESS      PID        SIZE
        user                         python3     1234     812340K
        total                                             905216K
    """
    try:
        text = (root / _NVMAP_CLIENTS).read_text()
    except OSError:
        return None
    sizes: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split()
        if not fields or not fields[-1].endswith("K") or not fields[-1][:-1].isdigit():
            continue
        kb = int(fields[-1][:-1])
        if fields[0] == "total":
            sizes["total"] = kb
        elif len(fields) >= 4 and fields[-2].isdigit():
            sizes[fields[-2]] = sizes.get(fields[-2], 0) + kb
    return sizes


def descendants(root: Path = Path("/"), pid: int | str = "self") -> list[int]:
    """The PIDs of a process's children, grandchildren, ... (Piper runs as one), from /proc/PID/task/*/children."""
    found: list[int] = []
    queue = [str(pid)]
    while queue:
        parent = queue.pop()
        for tasks in (root / f"proc/{parent}/task").glob("*/children"):
            try:
                children = [int(c) for c in tasks.read_text().split()]
            except (OSError, ValueError):
                continue
            for child in children:
                if child not in found:
                    found.append(child)
                    queue.append(str(child))
    return found


@dataclass(frozen=True)
class MemoryReport:
    """Memory over one measured span, in MiB; GPU fields are None where unavailable (`gpu_source` says)."""

    rss_mb: float
    peak_rss_mb: float
    peak_rss_source: str  # "VmHWM" (the kernel's high-water mark, reset at start) or "sampled"
    system_total_mb: float
    system_used_mb: float
    system_available_mb: float
    peak_system_used_mb: float
    gpu_source: str  # "nvmap-clients", "NvMapMemUsed" or "unavailable"
    children_rss_mb: float = 0.0  # child processes (the Piper voice), not in the process's own RSS
    peak_children_rss_mb: float = 0.0
    gpu_process_mb: float | None = None
    gpu_total_mb: float | None = None
    peak_gpu_total_mb: float | None = None

    def to_record(self) -> dict[str, Any]:
        """The fields for the per-interaction log."""
        return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


class MemoryMeter:
    """Samples memory on a background thread between start() and stop(); stop() returns the peaks.

    At start() the kernel's RSS high-water mark is reset (writing 5 to /proc/self/clear_refs) so VmHWM is the
    peak of this span, catching spikes between samples; where that is not allowed the sampled peak is used.
    """

    def __init__(self, *, interval: float = 0.1, root: str | os.PathLike[str] = "/", pid: int | None = None) -> None:
        self.interval = interval
        self.root = Path(root)
        self.pid = pid if pid is not None else os.getpid()
        self._proc = "self" if pid is None and self.root == Path("/") else str(self.pid)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._hwm_reset = False
        self._peak_rss = 0
        self._peak_used = 0
        self._peak_gpu: int | None = None
        self._gpu_source = "unavailable"
        self._children = 0  # kB, at the last sample
        self._peak_children = 0

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("MemoryMeter.start() while running")
        self._hwm_reset = self._reset_hwm()
        self._peak_rss, self._peak_used, self._peak_gpu, self._peak_children = 0, 0, None, 0
        self._stop.clear()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="memory-meter", daemon=True)
        self._thread.start()

    def stop(self) -> MemoryReport:
        if self._thread is None:
            raise RuntimeError("MemoryMeter.stop() without start()")
        self._stop.set()
        self._thread.join()
        self._thread = None
        status, info, gpu_process, gpu_total = self._sample()
        rss = status.get("VmRSS", 0)
        peak, source = self._peak_rss, "sampled"
        if self._hwm_reset and "VmHWM" in status:
            peak, source = max(peak, status["VmHWM"]), "VmHWM"
        total = info.get("MemTotal", 0)
        available = info.get("MemAvailable", info.get("MemFree", 0))
        return MemoryReport(
            rss_mb=rss / 1024,
            peak_rss_mb=peak / 1024,
            peak_rss_source=source,
            system_total_mb=total / 1024,
            system_used_mb=(total - available) / 1024,
            system_available_mb=available / 1024,
            peak_system_used_mb=self._peak_used / 1024,
            gpu_source=self._gpu_source,
            children_rss_mb=self._children / 1024,
            peak_children_rss_mb=self._peak_children / 1024,
            gpu_process_mb=None if gpu_process is None else gpu_process / 1024,
            gpu_total_mb=None if gpu_total is None else gpu_total / 1024,
            peak_gpu_total_mb=None if self._peak_gpu is None else self._peak_gpu / 1024,
        )

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> tuple[dict[str, int], dict[str, int], int | None, int | None]:
        status = process_status(self.root, self._proc)
        info = meminfo(self.root)
        self._peak_rss = max(self._peak_rss, status.get("VmRSS", 0))
        self._children = sum(
            process_status(self.root, child).get("VmRSS", 0) for child in descendants(self.root, self._proc)
        )
        self._peak_children = max(self._peak_children, self._children)
        if "MemTotal" in info:
            used = info["MemTotal"] - info.get("MemAvailable", info.get("MemFree", 0))
            self._peak_used = max(self._peak_used, used)
        gpu_process = gpu_total = None
        clients = nvmap_clients(self.root)
        if clients is not None:
            self._gpu_source = "nvmap-clients"
            gpu_process = clients.get(str(self.pid), 0)
            gpu_total = clients.get("total", sum(clients.values()))
        elif "NvMapMemUsed" in info:
            self._gpu_source = "NvMapMemUsed"
            gpu_total = info["NvMapMemUsed"]
        if gpu_total is not None:
            self._peak_gpu = max(self._peak_gpu or 0, gpu_total)
        return status, info, gpu_process, gpu_total

    def _reset_hwm(self) -> bool:
        if self.root != Path("/"):
            return False
        try:
            Path(f"/proc/{self._proc}/clear_refs").write_text("5")
        except OSError as error:
            logger.debug("memory: cannot reset the RSS high-water mark (%s); sampling instead", error)
            return False
        # VmHWM is process-wide: trust it only if the reset took (some kernels and sandboxes accept the write
        # and keep the old mark, which would report an earlier, higher peak as this span's).
        status = process_status(self.root, self._proc)
        hwm, rss = status.get("VmHWM"), status.get("VmRSS")
        if hwm is None or rss is None or hwm - rss > _HWM_RESET_SLACK_KB:
            logger.debug("memory: the RSS high-water mark did not reset (VmHWM %s kB, VmRSS %s kB); sampling", hwm, rss)
            return False
        return True
