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
from edgevision.decoder.native import llama_cpp_library

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("nodefilter.c")
PREFIX_MAX = 63


HEAD = 80  # struct ggml_tensor's leading fields the filter copies: type (+ padding), buffer, ne[4], nb[4]
RING = 1 << 20  # bytes of captured node data at first; doubled when a decode's nodes did not fit
CAPTURES = 256  # nodes captured per decode at first; doubled likewise


class _Capture(ctypes.Structure):
    _fields_ = [
        ("offset", ctypes.c_size_t),
        ("size", ctypes.c_size_t),
        ("head", ctypes.c_int64 * (HEAD // 8)),
        ("name", ctypes.c_char * 64),
    ]


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
        ("ring", ctypes.c_void_p),
        ("ring_size", ctypes.c_size_t),
        ("used", ctypes.c_size_t),
        ("captures", ctypes.c_void_p),
        ("max_captures", ctypes.c_size_t),
        ("count", ctypes.c_size_t),
        ("overflowed", ctypes.c_ulonglong),
        ("nbytes", ctypes.c_void_p),
        ("get", ctypes.c_void_p),
        ("every", ctypes.c_ulonglong),
        ("graphs", ctypes.c_ulonglong),
        ("first", ctypes.c_char * 64),
        ("active", ctypes.c_int),
    ]


class Captured:
    """A node the filter copied during a decode: its name, leading fields (``head``: type, buffer, ne[4],
    nb[4], as ``strided_array`` reads them from a live tensor) and data (valid until the next decode)."""

    __slots__ = ("data", "head", "name")

    def __init__(self, name: bytes, head: list[int], data: memoryview) -> None:
        self.name, self.head, self.data = name, head, data


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
        self._ring: Any = None  # captured nodes' data (`set_capture`)
        self._captures: Any = None
        self._ring_size, self._max_captures = RING, CAPTURES
        ggml = llama_cpp_library().llama_cpp._lib  # ggml's symbols are reached through libllama
        self._state.nbytes = ctypes.cast(ggml.ggml_nbytes, ctypes.c_void_p).value
        self._state.get = ctypes.cast(ggml.ggml_backend_tensor_get, ctypes.c_void_p).value

    @classmethod
    def create(cls, name_offset: int, next_callback: Any) -> NodeFilter | None:
        lib = library()
        return None if lib is None else cls(lib, name_offset, next_callback)

    def set_prefix(self, prefix: bytes, every: bool = False, sampling: tuple[int, bytes, int] | None = None) -> None:
        """Pass on only nodes whose name starts with `prefix` (b"": every node). `every`: the callback wants
        every such node, so the filter says so itself when llama.cpp asks, and passes on only the computed nodes;
        with `sampling` ``(n, first, graphs)`` only those of one graph in n, a graph starting at the node named
        `first`, counting on from the `graphs` the callback has counted itself."""
        counted_in_python = not self._state.answer_ask  # the callback answered, and counted, the last graphs
        self._state.answer_ask = int(every)
        n, first, graphs = sampling or (1, b"", 0)
        if counted_in_python or n != self._state.every or first != self._state.first:
            self._state.every, self._state.first, self._state.graphs, self._state.active = n, first, graphs, 0
        if prefix == self.prefix:
            return
        if len(prefix) > PREFIX_MAX:
            raise ValueError(f"a node prefix has at most {PREFIX_MAX} bytes")
        self._state.prefix = prefix
        self._state.prefix_len = len(prefix)
        self.prefix = prefix

    def set_capture(self, on: bool) -> None:
        """Copy the computed nodes with the prefix in C, for `take` after the decode, instead of passing them on
        (`nodefilter.c`); a node that does not fit still goes to the callback, and the room grows for the next."""
        if not on:
            self._state.ring = None
            return
        if self._state.ring:
            return
        if self._ring is None or self._state.overflowed:
            grow = 1 if self._ring is None else 2
            self._ring_size, self._max_captures = grow * self._ring_size, grow * self._max_captures
            self._ring = (ctypes.c_ubyte * self._ring_size)()
            self._captures = (_Capture * self._max_captures)()
            self._state.overflowed = 0
        self._state.ring_size = self._ring_size
        self._state.captures = ctypes.addressof(self._captures)
        self._state.max_captures = self._max_captures
        self._state.used = self._state.count = 0
        self._state.ring = ctypes.addressof(self._ring)

    def take(self) -> list[Captured]:
        """The nodes captured since the last call, in graph order; their data stays valid until the next decode.
        If some did not fit (they went to the callback), the room doubles from the next `set_capture` on."""
        out = []
        if self._state.ring and self._ring is not None and self._captures is not None:
            ring = memoryview(self._ring)
            for capture in self._captures[: self._state.count]:
                out.append(
                    Captured(capture.name, capture.head[:], ring[capture.offset : capture.offset + capture.size])
                )
        self._state.used = self._state.count = 0
        if self._state.overflowed:
            self._state.ring = None  # reallocated, larger, by the next set_capture
        return out

    @property
    def counts(self) -> tuple[int, int]:
        """(nodes asked about, calls passed on to Python) so far."""
        return int(self._state.asked), int(self._state.passed)
