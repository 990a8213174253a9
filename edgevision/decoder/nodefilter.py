"""The eval callback's node filter in C (``nodefilter.c``): only the nodes an observer wants reach Python.

llama.cpp asks its eval callback about every node of every graph: about 600 per decoded token of the MoE
benchmark model, each a crossing into the interpreter that takes the GIL. An observer only wants a few of them
(the router's nodes, ``ffn_moe_…``): it says which by the prefix of their names (its ``node_prefix``), and
`NodeFilter` answers for every other node in C. A callback whose ``wants_every_prefixed_node`` is true is not
asked at all: the filter says yes for it, and passes on only the computed nodes.

The shared library is built from ``nodefilter.c`` where it is first used (`edgevision.native_build`: the
system's C compiler, ``make venv`` does it ahead of time). Without a compiler the decoder falls back
to the Python callback for every node (logged once): slower, the same results.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import subprocess
from pathlib import Path
from typing import Any

from edgevision import native_build

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("nodefilter.c")
PREFIX_MAX = 63


class _Filter(ctypes.Structure):
    _fields_ = [
        ("name_offset", ctypes.c_size_t),
        ("prefix_len", ctypes.c_size_t),
        ("prefix", ctypes.c_char * (PREFIX_MAX + 1)),
        ("answer_ask", ctypes.c_int),
        ("next", ctypes.c_void_p),
        ("next_data", ctypes.c_void_p),
        ("asked", ctypes.c_ulonglong),
        ("passed", ctypes.c_ulonglong),
    ]


def build(folder: Path | None = None) -> Path:
    """Compile ``nodefilter.c`` into `folder` (default: next to it, else the user's cache); the library's path.

    Raises OSError or subprocess.CalledProcessError when there is no compiler or the folder is not writable.
    """
    return native_build.build(SOURCE, folder)


@functools.cache
def library() -> Any | None:
    """The loaded filter library (built on first use if needed), or None where it cannot be built."""
    try:
        path = native_build.find_or_build(SOURCE)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        logger.warning(
            "the C node filter could not be built (%s); every graph node crosses into Python: slower", detail
        )
        return None
    lib = ctypes.CDLL(str(path))
    lib.edgevision_node_filter.restype = ctypes.c_bool
    lib.edgevision_node_filter.argtypes = [ctypes.c_void_p, ctypes.c_bool, ctypes.c_void_p]
    return lib


class NodeFilter:
    """llama.cpp's ``cb_eval`` and ``cb_eval_user_data`` for a Python eval callback (a ctypes function
    pointer), passing it only the nodes whose names start with `prefix`; None where the C library is missing.

    Keep the object alive as long as llama.cpp may call it.
    """

    def __init__(self, lib: Any, name_offset: int, next_callback: Any) -> None:
        self._lib = lib
        self._next = next_callback  # the ctypes function pointer must outlive the filter
        self._state = _Filter(name_offset=name_offset, next=ctypes.cast(next_callback, ctypes.c_void_p).value)
        self.function = ctypes.cast(lib.edgevision_node_filter, ctypes.c_void_p).value
        self.user_data = ctypes.addressof(self._state)
        self.prefix = b""

    @classmethod
    def create(cls, name_offset: int, next_callback: Any) -> NodeFilter | None:
        lib = library()
        return None if lib is None else cls(lib, name_offset, next_callback)

    def set_prefix(self, prefix: bytes, every: bool = False) -> None:
        """Pass on only nodes whose name starts with `prefix` (b"": every node). `every`: the callback wants
        every such node, so the filter says so itself when llama.cpp asks, and passes on only the computed nodes."""
        self._state.answer_ask = int(every)
        if prefix == self.prefix:
            return
        if len(prefix) > PREFIX_MAX:
            raise ValueError(f"a node prefix has at most {PREFIX_MAX} bytes")
        self._state.prefix = prefix
        self._state.prefix_len = len(prefix)
        self.prefix = prefix

    @property
    def counts(self) -> tuple[int, int]:
        """(nodes asked about, calls passed on to Python) so far."""
        return int(self._state.asked), int(self._state.passed)
