"""The few libc calls that manage a mapping's pages (mlock, munlock, madvise, mincore), bound once with ctypes."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap

PAGE = mmap.PAGESIZE


@functools.cache
def libc() -> ctypes.CDLL:
    """libc with mlock/munlock/madvise/mincore typed (errno kept: read it with ctypes.get_errno())."""
    lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    for name in ("mlock", "munlock", "madvise"):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t] + ([ctypes.c_int] if name == "madvise" else [])
        fn.restype = ctypes.c_int
    lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    lib.mincore.restype = ctypes.c_int
    return lib
