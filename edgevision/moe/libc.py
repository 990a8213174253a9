"""The few libc calls that manage a mapping's pages (mlock, munlock, madvise, mincore), bound once with ctypes."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
from typing import Any

PAGE = mmap.PAGESIZE


def _typed(lib: Any) -> Any:
    for name in ("mlock", "munlock", "madvise"):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t] + ([ctypes.c_int] if name == "madvise" else [])
        fn.restype = ctypes.c_int
    lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    lib.mincore.restype = ctypes.c_int
    return lib


@functools.cache
def libc() -> ctypes.CDLL:
    """libc with mlock/munlock/madvise/mincore typed (errno kept: read it with ctypes.get_errno())."""
    return _typed(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True))


@functools.cache
def mincore_holding_gil() -> Any:
    """``mincore`` called without releasing the GIL (a ``PyDLL`` function). It takes microseconds; a CDLL call
    releases the GIL and must take it back afterwards, and on the decoding thread, with the policy's threads
    running Python, taking it back can cost up to the interpreter's switch interval each time."""
    return _typed(ctypes.PyDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)).mincore
