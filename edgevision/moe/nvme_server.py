"""The emulated NVMe's request loop in C (``nvme_server.c``): its threads answer the FUSE requests without the GIL.

The Python server in `edgevision.moe.nvme` spends 80-110 us of CPU per 128 KiB READ and its own round trip
is about as long as the 80 us latency it emulates; the C server's threads take a request from /dev/fuse,
sleep until its due time and reply with one ``writev`` from the model's mapping, in a few microseconds of CPU.
`EmulatedNvme` mounts the file system and answers INIT, then hands the descriptor to `NativeServer`.

The library is built from ``nvme_server.c`` where it is first used (`edgevision.native_build`: the system's C
compiler, ``make venv`` does it ahead of time). Without a compiler `EmulatedNvme` falls back to its Python
server (logged).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import mmap
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from edgevision import native_build

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("nvme_server.c")
FLAGS = ("-pthread",)


def build(folder: Path | None = None) -> Path:
    """Compile ``nvme_server.c`` into `folder` (default: next to it, else the user's cache); the library's path.

    Raises OSError or subprocess.CalledProcessError when there is no compiler or the folder is not writable.
    """
    return native_build.build(SOURCE, folder, FLAGS)


@functools.cache
def library() -> Any | None:
    """The loaded server library (built on first use if needed), or None where it cannot be built."""
    try:
        path = native_build.find_or_build(SOURCE, FLAGS)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        logger.warning("the emulated NVMe's C server could not be built (%s); the Python server answers", detail)
        return None
    lib = ctypes.CDLL(str(path), use_errno=True)
    lib.edgevision_nvme_start.restype = ctypes.c_void_p
    lib.edgevision_nvme_start.argtypes = [
        ctypes.c_int,  # the /dev/fuse descriptor
        ctypes.c_void_p,  # the model's mapping
        ctypes.c_uint64,  # its size
        ctypes.c_char_p,  # the file's name
        ctypes.c_int64,  # latency, ns
        ctypes.c_double,  # ns per byte (0: unthrottled)
        ctypes.c_int,  # threads
        ctypes.c_void_p,  # the 8-byte counter of bytes served
    ]
    lib.edgevision_nvme_set_model.restype = None
    lib.edgevision_nvme_set_model.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int64]
    lib.edgevision_nvme_stats.restype = ctypes.c_uint64
    lib.edgevision_nvme_stats.argtypes = [ctypes.c_void_p] + [ctypes.c_void_p] * 3
    lib.edgevision_nvme_stop.restype = ctypes.c_int
    lib.edgevision_nvme_stop.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


class NativeServer:
    """The C server's threads on a FUSE connection whose INIT has been answered. `stop` once the connection has
    ended (unmount, abort); until it returns True the mappings it was given must stay open."""

    def __init__(self, lib: Any, fd: int, data: mmap.mmap, name: bytes, counter: mmap.mmap, threads: int) -> None:
        self._lib = lib
        # the addresses of the mappings; these views hold them open until `stop` has joined the threads
        self._data = np.frombuffer(data, np.uint8)
        self._counter = np.frombuffer(counter, np.uint64, count=1)
        self._server = lib.edgevision_nvme_start(
            fd, self._data.ctypes.data, len(data), name, 0, 0.0, threads, self._counter.ctypes.data
        )
        if not self._server:
            err = ctypes.get_errno()
            raise OSError(err, f"starting the emulated NVMe's C server: {os.strerror(err)}")
        self._final = (0, 0, 0, 0)  # the statistics once stopped

    @classmethod
    def create(cls, fd: int, data: mmap.mmap, name: bytes, counter: mmap.mmap, threads: int) -> NativeServer | None:
        lib = library()
        return None if lib is None else cls(lib, fd, data, name, counter, threads)

    def set_model(self, latency: float, bandwidth: float | None, lead: float) -> None:
        """Answer each READ at ``max(arrival + latency, free) + size / bandwidth`` (seconds, bytes/s), writing the
        reply `lead` seconds before (the server's own round trip)."""
        ns_per_byte = 1e9 / bandwidth if bandwidth else 0.0
        self._lib.edgevision_nvme_set_model(self._server, round(latency * 1e9), ns_per_byte, round(lead * 1e9))

    @property
    def requests(self) -> int:
        """READs answered so far."""
        return self._stats()[0]

    def _stats(self) -> tuple[int, int, int, int]:
        if not self._server:
            return self._final
        write_errors, write_errno, read_errno = ctypes.c_uint64(), ctypes.c_int(), ctypes.c_int()
        refs = (ctypes.byref(write_errors), ctypes.byref(write_errno), ctypes.byref(read_errno))
        requests = self._lib.edgevision_nvme_stats(self._server, *refs)
        return int(requests), write_errors.value, write_errno.value, read_errno.value

    def stop(self, timeout: float = 5.0) -> bool:
        """Join the threads (the connection must have ended) and free the server; False if some still run."""
        if not self._server:
            return True
        stats = self._stats()
        _, write_errors, write_errno, read_errno = stats
        if write_errors:
            logger.warning(
                "emulated NVMe: %d replies on /dev/fuse failed (last: %s)", write_errors, os.strerror(write_errno)
            )
        if read_errno and read_errno != errno.ENODEV:
            logger.warning("emulated NVMe: reading /dev/fuse failed: %s", os.strerror(read_errno))
        running = self._lib.edgevision_nvme_stop(self._server, round(timeout * 1000))
        if running:
            logger.warning("emulated NVMe: %d server threads did not stop", running)
            return False
        self._server, self._final = None, stats
        del self._data, self._counter
        return True
