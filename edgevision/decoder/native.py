"""llama-cpp-python, loaded once: its logs routed into `logging`, and ggml graph nodes read as numpy arrays.

Everything here touches the native library directly; `LlamaDecoder` (llama.py) and the MoE router observer
build on it. The ggml tensor layout read by `tensor_array` is ``struct ggml_tensor``'s leading fields.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import logging
import re
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from edgevision.errors import MissingDependencyError

logger = logging.getLogger(__name__)

# enum ggml_log_level (ggml.h): NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the previous
# message at its level). llama-cpp-python's own _logger.py maps an older order (INFO 1, WARN 2, ERROR 3) and so
# reports warnings as errors. llama.cpp's INFO is load-time detail (hundreds of lines per model): DEBUG here.
_LOG_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
_LOG_CONT = 5


class NativeLog:
    """A process-wide native log callback (llama.cpp/ggml's, mtmd's), forwarding whole lines to `logger`.

    The callback is global in the native library, so one instance lives for the process. While
    `capture` is active, error lines are collected instead of logged as errors (they are logged at debug
    level), so a failed load says why in its own one-line error and nothing else is printed before it.
    """

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._lock = threading.Lock()
        self._buffer = ""
        self._level = logging.DEBUG
        self._captures: list[tuple[int, list[str]]] = []
        self.c_callback: Any = None  # the ctypes object; must stay alive as long as the library

    def __call__(self, level: int, text: bytes | None, _user_data: object) -> None:
        message = (text or b"").decode("utf-8", errors="replace")
        with self._lock:
            if level != _LOG_CONT:
                self._level = _LOG_LEVELS.get(level, logging.DEBUG)
            self._buffer += message
            if "\n" not in self._buffer:
                return  # progress dots and other partial lines wait for their end
            *lines, self._buffer = self._buffer.split("\n")
            lines = [line.rstrip() for line in lines if line.strip()]
            level_now = self._level
            reported = False  # taken by a capture of errors, whose caller puts them in its one-line error
            for lowest, capture in self._captures:
                if self._level >= lowest:
                    capture.extend(lines)
                    reported = reported or lowest >= logging.ERROR
            if reported:
                # the code that captures them says why in its one-line error: here they are detail (--debug)
                level_now = logging.DEBUG
        for line in lines:
            self._logger.log(level_now, "%s", line)

    @contextmanager
    def capture(self, level: int = logging.ERROR) -> Iterator[list[str]]:
        """Collects the lines logged at `level` or above while active (every thread's: the log is global)."""
        entry: tuple[int, list[str]] = (level, [])
        with self._lock:
            self._captures.append(entry)
        try:
            yield entry[1]
        finally:
            with self._lock:  # by identity: two captures of the same lines compare equal
                self._captures = [other for other in self._captures if other is not entry]


_native_log = NativeLog(logging.getLogger(__name__))


@functools.cache
def llama_cpp_library() -> Any:
    """Import llama_cpp once, route its logs into `logging` and initialise its back-ends."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise MissingDependencyError(
            "llama-cpp-python is not installed; the decoder needs it: "
            "pip install llama-cpp-python==0.3.36 (on a Jetson build it with CMAKE_ARGS=-DGGML_CUDA=on)"
        )
    import llama_cpp

    _native_log.c_callback = llama_cpp.llama_log_callback(_native_log)
    llama_cpp.llama_log_set(_native_log.c_callback, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    lib = llama_cpp.llama_cpp._lib  # libllama; dlsym also finds the ggml functions it links
    for fn, argtypes, restype in (
        ("ggml_get_name", [ctypes.c_void_p], ctypes.c_char_p),
        ("ggml_nbytes", [ctypes.c_void_p], ctypes.c_size_t),
        ("ggml_is_contiguous", [ctypes.c_void_p], ctypes.c_bool),
        ("ggml_backend_tensor_get", [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t], None),
    ):
        getattr(lib, fn).argtypes = argtypes
        getattr(lib, fn).restype = restype
    return llama_cpp


@functools.cache
def name_offset() -> int:
    """Where a node's name lies in ``struct ggml_tensor``: ``ggml_get_name`` returns ``tensor->name``, so its
    offset is read once, on a scratch buffer, and names are then read without a ctypes call."""
    lib = llama_cpp_library().llama_cpp._lib
    get_name = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)(("ggml_get_name", lib))
    probe = (ctypes.c_byte * 512)()
    return int(get_name(ctypes.addressof(probe))) - ctypes.addressof(probe)


class _TensorHead(ctypes.Structure):
    """The leading fields of ``struct ggml_tensor`` (ggml.h), which have kept this layout since 2023."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
    ]


_GGML_DTYPES = {0: np.float32, 1: np.float16, 26: np.int32}  # GGML_TYPE_F32, F16, I32


def tensor_name(tensor: int) -> str:
    """The name of a ggml graph node (the pointer a ``cb_eval`` callback receives), e.g. ``"attn_norm-3"``."""
    name = llama_cpp_library().llama_cpp._lib.ggml_get_name(tensor)
    return (name or b"").decode("utf-8", errors="replace")


def tensor_array(tensor: int) -> np.ndarray:
    """A copy of a computed graph node's data (inside ``cb_eval`` with ``ask=False``), in numpy order: a
    ggml tensor of ``ne = [640, 5, 1, 1]`` becomes shape ``(5, 640)`` (leading axes of length 1 are dropped).
    F32, F16 and I32 nodes only."""
    lib = llama_cpp_library().llama_cpp._lib
    head = _TensorHead.from_address(tensor)
    dtype = _GGML_DTYPES.get(head.type)
    if dtype is None or not lib.ggml_is_contiguous(tensor):
        raise ValueError(f"graph node {tensor_name(tensor)!r} is not a contiguous f32/f16/i32 tensor")
    shape = tuple(int(n) for n in reversed(head.ne))
    out = np.empty(shape, dtype=dtype)
    if out.nbytes != lib.ggml_nbytes(tensor):
        raise ValueError(f"graph node {tensor_name(tensor)!r} has an unexpected size; ggml's layout changed")
    lib.ggml_backend_tensor_get(tensor, out.ctypes.data, 0, out.nbytes)
    while out.ndim > 1 and out.shape[0] == 1:
        out = out[0]
    return out


def native_log_capture(level: int = logging.ERROR):
    """While active, collects llama.cpp's lines at `level` or above (errors by default, so a failed load can
    say why); see `NativeLog.capture`."""
    return _native_log.capture(level)


_BUFFER_LINE = re.compile(r"\b([A-Za-z0-9_]+) model buffer size\s*=\s*([0-9.]+) MiB")


def weight_buffers(load_log: Iterable[str]) -> dict[str, float]:
    """The buffer types llama.cpp put a model's weights in, in MiB each, from the lines it logs while loading
    (``load_tensors: CPU_REPACK model buffer size = 10.5 MiB``). ``CPU_Mapped`` is the file mapping; an extra
    buffer type (``CPU_REPACK``, ``AMX``) is a copy llama.cpp made of the weights in its own memory."""
    buffers: dict[str, float] = {}
    for line in load_log:
        for name, mib in _BUFFER_LINE.findall(line):
            buffers[name] = buffers.get(name, 0.0) + float(mib)
    return buffers


@contextmanager
def high_level_without_extra_buffer_types() -> Iterator[None]:
    """Models that llama-cpp-python's high-level ``Llama`` loads inside this block use no extra buffer types.

    ``Llama`` has no argument for ``use_extra_bufts`` and takes ``llama_model_default_params()`` as they come;
    on hosts with AMX that default (on) crashes in llama.cpp's AMX buffer type. This swaps the defaults
    function for the duration of the block (not thread-safe: load models from one thread while inside it).
    """
    ll = llama_cpp_library()
    module = ll.llama_cpp
    original = module.llama_model_default_params

    def defaults() -> Any:
        params = original()
        params.use_extra_bufts = False
        return params

    module.llama_model_default_params = defaults
    try:
        yield
    finally:
        module.llama_model_default_params = original


_PROBE_CHILD = "EDGEVISION_EXTRA_BUFFER_TYPES_PROBE"


def _advertises_amx() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return any(line.startswith("flags") and " amx_tile" in line for line in f)
    except OSError:
        return False


@functools.cache
def extra_buffer_types_work(model: str) -> bool:
    """Whether llama.cpp decodes `model` with its CPU extra buffer types on without crashing on this host.

    On x86 hosts that advertise AMX, llama.cpp's AMX buffer type dies of an illegal instruction on some
    machines (virtual ones among them) although the AMX tile instructions themselves run, so no CPU flag
    says it. Where AMX is advertised, a child process loads `model` with them on and decodes a token: a crash
    there costs that child only. Elsewhere (Arm boards, x86 without AMX) nothing is run and the answer is yes.
    """
    import os
    import subprocess
    import sys

    if os.environ.get(_PROBE_CHILD) or not _advertises_amx():
        return True
    code = (
        "import sys\n"
        "from edgevision.decoder.llama import LlamaDecoder\n"
        "with LlamaDecoder(sys.argv[1], n_ctx=64, n_batch=16, n_threads=1, extra_buffer_types=True) as d:\n"
        "    d.prefill_tokens(d.tokenize('Hello there.'))\n"
        "    d.logits()\n"
    )
    env = dict(os.environ, **{_PROBE_CHILD: "1"})
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, model], env=env, capture_output=True, timeout=300, check=False
        )
    except subprocess.TimeoutExpired:
        return False
    if proc.returncode != 0:
        logger.debug("extra buffer types probe: exit %d: %s", proc.returncode, proc.stderr[-500:])
    return proc.returncode == 0
