"""llama.cpp's tensor buffer-type overrides, bound properly.

``llama_model_params.tensor_buft_overrides`` is a NULL-terminated array of
``struct llama_model_tensor_buft_override { const char * pattern; ggml_backend_buffer_type_t buft; }``
(llama.h): every weight whose name matches a pattern (``std::regex_search``) is placed in that buffer type
instead of where the layer would go. It is how MoE offloading keeps some layers' expert tensors in system
RAM while the rest of the model sits on the GPU (llama.cpp's ``--override-tensor``). llama-cpp-python 0.3.36
declares the field as a bare ``c_void_p``; `TensorOverrides` builds the array with ctypes, keeps it and its
pattern strings alive for as long as the model that was loaded with it, and resolves buffer types by device
or buffer-type name through ggml's device registry (``ggml_backend_dev_count/get/name/buffer_type`` from
libggml and libggml-base, ``ggml_backend_cpu_buffer_type``), all of which the shipped libraries export.

`edgevision.decoder.llama.LlamaDecoder` takes the pairs as ``tensor_overrides=[(pattern, name), ...]``.
"""

from __future__ import annotations

import ctypes
import functools
import re
from collections.abc import Sequence
from typing import Any

from edgevision.errors import ConfigError, EdgevisionError


class TensorBuftOverride(ctypes.Structure):
    """``struct llama_model_tensor_buft_override`` (llama.h)."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


DEVICE_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}  # enum ggml_backend_dev_type


@functools.cache
def _lib() -> Any:
    from edgevision.decoder.native import llama_cpp_library

    lib = llama_cpp_library().llama_cpp._lib  # dlsym through libllama also finds libggml and libggml-base
    for name, argtypes, restype in (
        ("ggml_backend_dev_count", [], ctypes.c_size_t),
        ("ggml_backend_dev_get", [ctypes.c_size_t], ctypes.c_void_p),
        ("ggml_backend_dev_name", [ctypes.c_void_p], ctypes.c_char_p),
        ("ggml_backend_dev_type", [ctypes.c_void_p], ctypes.c_int),
        ("ggml_backend_dev_buffer_type", [ctypes.c_void_p], ctypes.c_void_p),
        ("ggml_backend_dev_host_buffer_type", [ctypes.c_void_p], ctypes.c_void_p),
        ("ggml_backend_cpu_buffer_type", [], ctypes.c_void_p),
        ("ggml_backend_buft_name", [ctypes.c_void_p], ctypes.c_char_p),
    ):
        try:
            fn = getattr(lib, name)
        except AttributeError as exc:
            raise EdgevisionError(
                f"the installed llama.cpp does not export {name}; tensor placement needs llama-cpp-python 0.3.36"
            ) from exc
        fn.argtypes = argtypes
        fn.restype = restype
    return lib


def buffer_types() -> dict[str, int]:
    """Buffer types this llama.cpp build can place weights in, by name: each device's name (``"CPU"``,
    ``"CUDA0"``) and its buffer type's name (``"CUDA0"``, ``"CUDA_Host"`` for pinned host memory), mapped to
    the ``ggml_backend_buffer_type_t``. ``"CPU"`` is always present."""
    lib = _lib()
    found: dict[str, int] = {}
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        if not dev:
            continue
        buft = lib.ggml_backend_dev_buffer_type(dev)
        if buft:
            found.setdefault(lib.ggml_backend_dev_name(dev).decode(), buft)
            found.setdefault(lib.ggml_backend_buft_name(buft).decode(), buft)
        host = lib.ggml_backend_dev_host_buffer_type(dev)
        if host:
            found.setdefault(lib.ggml_backend_buft_name(host).decode(), host)
    cpu = lib.ggml_backend_cpu_buffer_type()
    if not cpu:
        raise EdgevisionError("ggml_backend_cpu_buffer_type returned NULL; the llama.cpp build is broken")
    found["CPU"] = cpu
    return found


def devices() -> list[tuple[str, str]]:
    """``(name, type)`` of each ggml device, e.g. ``[("CPU", "cpu")]`` here, ``[("CUDA0", "gpu"), ...]``."""
    lib = _lib()
    out = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        out.append((lib.ggml_backend_dev_name(dev).decode(), DEVICE_TYPES.get(lib.ggml_backend_dev_type(dev), "?")))
    return out


def has_gpu() -> bool:
    return any(kind in ("gpu", "igpu") for _name, kind in devices())


class TensorOverrides:
    """A NULL-terminated ``llama_model_tensor_buft_override`` array built from ``(regex, buffer type name)``
    pairs. Keep the object alive as long as the model loaded with it (`LlamaDecoder` does).

    Raises:
        ConfigError: a pattern is not a valid regular expression or a buffer type does not exist here.
    """

    def __init__(self, pairs: Sequence[tuple[str, str]]) -> None:
        available = buffer_types()
        self.pairs = [(str(pattern), str(name)) for pattern, name in pairs]
        self._patterns = []  # the bytes objects the array points into
        self._array = (TensorBuftOverride * (len(self.pairs) + 1))()
        for i, (pattern, name) in enumerate(self.pairs):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"tensor override pattern {pattern!r} is not a regular expression: {exc}") from exc
            if name not in available:
                raise ConfigError(
                    f"tensor override {pattern!r} names buffer type {name!r}, but this llama.cpp build has only "
                    f"{', '.join(sorted(available))}; on a CPU-only build use CPU (CUDA needs a CUDA build)"
                )
            encoded = pattern.encode()
            self._patterns.append(encoded)
            self._array[i].pattern = encoded
            self._array[i].buft = available[name]
        # the last element stays zeroed: pattern NULL ends the list

    @property
    def address(self) -> int:
        """The array's address, for ``llama_model_params.tensor_buft_overrides``."""
        return ctypes.addressof(self._array)

    def __len__(self) -> int:
        return len(self.pairs)
