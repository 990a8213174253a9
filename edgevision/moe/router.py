"""Router observation: which experts a MoE decoder's router picks, read live from llama.cpp's graph.

`RouterObserver` is an eval callback (``LlamaDecoder(cb_eval=observer)``). For every MoE layer llama.cpp's
``build_moe_ffn`` names two small nodes that together say where each token went:

- ``ffn_moe_topk-<il>``: I32, ggml ``ne = [n_expert_used, T]``, the selected expert ids. It is a *view*
  into the ``[n_expert, T]`` argsort result (``nb = [4, 4 * n_expert]``), so it is read with its strides.
- ``ffn_moe_weights_norm-<il>``: F32 ``[n_expert_used, T]``, the gate weight of each selected expert after
  the softmax over all experts and renormalisation over the selected ones (what multiplies the expert's
  output in Gemma 4; for a model that does not renormalise, pass ``gates="ffn_moe_weights-"``).

The observer asks llama.cpp for the gate node only, and finds the topk node among its inputs (still intact
then, since the expert matmuls after it read it), so each MoE layer costs one graph split and two reads of a
few hundred bytes per token: cheap enough to leave on (``edgevision bench router`` measures it). Per phase
(image rows, prompt text, generated tokens: set `RouterObserver.phase` before each prefill or generate),
layer and expert it accumulates how often the expert was selected (`counts`) and the gate weight it
received (`mass`); `profile` freezes them into a `RouterProfile`. `listeners` get every layer's ids and
weights as they come, for online adaptation.

The callback runs on the decoding thread; `profile` and `reset` may be called from another thread.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgevision.errors import ModelError
from edgevision.moe.profile import PHASES, RouterProfile

logger = logging.getLogger(__name__)

__all__ = ["PHASES", "RouterObserver", "observe_turn", "read_moe_shape", "strided_array"]

Listener = Callable[[int, np.ndarray, np.ndarray], None]
"""``listener(layer, expert_ids (T, k) int32, weights (T, k) float32)``, called once per MoE layer and decode.
The arrays are valid during the call only (the observer reuses them): copy what you keep."""

TOPK = "ffn_moe_topk-"
GATES = "ffn_moe_weights_norm-"

_GGML_I32, _GGML_F32 = 26, 0


class _Ggml:
    """The few ggml entry points the observer needs, bound once per process."""

    def __init__(self) -> None:
        from edgevision.decoder.native import llama_cpp_library, name_offset

        lib = llama_cpp_library().llama_cpp._lib
        self.name_offset = name_offset()
        self.nbytes = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_void_p)(("ggml_nbytes", lib))
        self.get = lib.ggml_backend_tensor_get
        size_t, pointer = ctypes.c_size_t, ctypes.c_void_p
        self.set = ctypes.CFUNCTYPE(None, pointer, pointer, size_t, size_t)(("ggml_backend_tensor_set", lib))
        self.buffer_name = ctypes.CFUNCTYPE(ctypes.c_char_p, ctypes.c_void_p)(("ggml_backend_buffer_name", lib))


_ggml: _Ggml | None = None
_ggml_lock = threading.Lock()


def _lib() -> _Ggml:
    global _ggml
    with _ggml_lock:
        if _ggml is None:
            _ggml = _Ggml()
        return _ggml


_DTYPES = {_GGML_F32: np.dtype(np.float32), 1: np.dtype(np.float16), _GGML_I32: np.dtype(np.int32)}
# A node's name is read straight from struct ggml_tensor: first its leading 8 bytes as one integer (most nodes
# are not MoE nodes and stop there), then the whole name. Both cost a fraction of ctypes.string_at.
_PREFIX_BYTES = b"ffn_moe_"
_PREFIX = int.from_bytes(_PREFIX_BYTES, "little")
_U64 = ctypes.c_uint64.from_address
_HEAD = (ctypes.c_int64 * 10).from_address  # struct ggml_tensor's leading fields: type, buffer, ne[4], nb[4]
_NAME = (ctypes.c_char * 64).from_address


def strided_array(tensor: int, buffers: dict | None = None, key: object = None) -> np.ndarray:
    """A computed graph node (contiguous, or a view with strided rows) as a ``(rows, ne[0])`` array, where
    rows is ``ne[1] * ne[2] * ne[3]``.

    ggml's ``nbytes`` of a view spans from its first to its last element, so one backend read fetches the
    span and the rows are picked out with the view's row stride. Without `buffers` the result is a new
    array; with them it is a view of ``buffers[key]``, reused (and overwritten) by the next read of that key,
    which saves an allocation on every MoE layer of every decode.
    """
    lib = _ggml or _lib()
    head = _HEAD(tensor)[:]  # type (+ padding), buffer, ne[4], nb[4]
    dtype, rows, row, ne0, nbytes = _node_layout(head)
    size = row * rows
    if buffers is None:
        flat = np.empty(size, dtype=dtype)
        address = flat.ctypes.data
    else:
        entry = buffers.get(key)
        if entry is None or entry[0].size < size or entry[0].dtype != dtype:
            array = np.empty(max(size, 2 * entry[0].size if entry else size), dtype=dtype)
            entry = buffers[key] = (array, array.ctypes.data)
        flat, address = entry[0][:size], entry[1]
    lib.get(tensor, address, 0, nbytes)
    return flat.reshape(rows, row)[:, :ne0]


def captured_array(head: Sequence[int], data: memoryview) -> np.ndarray:
    """A node the C filter copied during the decode (`edgevision.decoder.nodefilter.Captured`: its leading
    fields and its ``nbytes`` of data), as `strided_array` reads a live one (a view of `data`)."""
    dtype, rows, row, ne0, nbytes = _node_layout(head)
    if len(data) != nbytes:
        raise ValueError(f"captured node holds {len(data)} bytes, its layout says {nbytes}")
    flat = np.frombuffer(data, dtype=dtype)
    if flat.size < row * rows:  # a view's last row ends at its last element, not at its row stride
        flat = np.concatenate([flat, np.zeros(row * rows - flat.size, dtype=dtype)])
    return flat.reshape(rows, row)[:, :ne0]


def _node_layout(head: Sequence[int]) -> tuple[np.dtype, int, int, int, int]:
    """(dtype, rows, elements per row stride, ne0, ggml_nbytes) of a node from its leading fields."""
    dtype = _DTYPES.get(head[0] & 0xFFFFFFFF)
    if dtype is None:
        raise ValueError(f"graph node of ggml type {head[0] & 0xFFFFFFFF} is not f32/f16/i32")
    item = dtype.itemsize
    ne0, ne1, ne2, ne3, nb0, nb1, nb2, nb3 = head[2:]
    rows = ne1 * ne2 * ne3
    row = nb1 // item if rows > 1 else ne0
    if (
        nb0 != item
        or row < ne0
        or (rows > 1 and nb1 % item)
        or (ne2 > 1 and nb2 != nb1 * ne1)
        or (ne3 > 1 and nb3 != nb2 * ne2)
    ):
        raise ValueError("graph node's layout is not rows of contiguous elements")
    nbytes = item + (ne0 - 1) * nb0 + (ne1 - 1) * nb1 + (ne2 - 1) * nb2 + (ne3 - 1) * nb3  # ggml_nbytes
    return dtype, rows, row, ne0, nbytes


def write_node(tensor: int, values: np.ndarray) -> None:
    """Overwrite a computed contiguous graph node with `values` (its shape, its dtype), before the nodes after it
    read it: on llama.cpp's eval call for that node, whatever backend holds it."""
    lib = _ggml or _lib()
    data = np.ascontiguousarray(values)
    if lib.nbytes(tensor) != data.nbytes:
        raise ValueError(f"graph node holds {lib.nbytes(tensor)} bytes, not {data.nbytes}")
    lib.set(tensor, data.ctypes.data, 0, data.nbytes)


def read_moe_shape(gguf_path: str | os.PathLike[str]) -> tuple[str, int, int, int]:
    """(architecture, n_layer, n_expert, n_expert_used) from a GGUF file's metadata."""
    import gguf

    path = Path(gguf_path)
    if not path.is_file():
        raise ModelError(
            f"decoder model {path} does not exist; check the path (run 'make models' for the synthetic one)"
        )
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise ModelError(f"{path} is not a readable GGUF file ({exc}); download or convert it again") from exc

    def value(key: str) -> Any:
        field = reader.get_field(key)
        return None if field is None else field.contents()

    arch = value("general.architecture")
    shape = [value(f"{arch}.{key}") for key in ("block_count", "expert_count", "expert_used_count")]
    if arch is None or any(v is None for v in shape) or not shape[1]:
        raise ModelError(
            f"{path} is not a mixture-of-experts model ({arch or 'no architecture'} without "
            f"{arch}.expert_count); router observation needs a MoE decoder such as Gemma 4 26B-A4B"
        )
    return str(arch), int(shape[0]), int(shape[1]), int(shape[2])


class RouterObserver:
    """Counts the experts each MoE layer's router selects, per phase; an eval callback for `LlamaDecoder`."""

    def __init__(self, n_layer: int, n_expert: int, n_expert_used: int, *, gates: str = GATES) -> None:
        if n_layer < 1 or not 0 < n_expert_used <= n_expert:
            raise ValueError(f"bad MoE shape: {n_layer} layers, {n_expert} experts, top {n_expert_used}")
        self.n_layer, self.n_expert, self.n_expert_used = n_layer, n_expert, n_expert_used
        self.listeners: list[Listener] = []
        self._lock = threading.Lock()
        self._phase = 0
        self._name_offset = _lib().name_offset
        # struct ggml_tensor: ... src[GGML_MAX_SRC = 10], view_src, view_offs, data, name[64] ...
        self._src_offset = self._name_offset - 8 * 10 - 24
        self._gate_names = {f"{gates}{il}".encode(): il for il in range(n_layer)}
        self._topk_names = {f"{TOPK}{il}".encode(): il for il in range(n_layer)}
        self._topk_by_layer = list(self._topk_names)
        self._wanted = dict(self._gate_names)  # names of the nodes the callback asks to see
        self._pending: dict[int, np.ndarray] = {}  # layer -> ids waiting for their weights
        self._buffers: dict = {}  # (layer, slot) -> a reused read buffer and its address
        # expert weight tensor name -> (llama.cpp buffer name, data address), read from the first graph's
        # expert matmuls (see `placement`)
        self.placement: dict[str, tuple[str, int]] = {}
        self._probing = True
        self._probe_layer = -1
        self.reset()

    @classmethod
    def for_model(cls, gguf_path: str | os.PathLike[str]) -> RouterObserver:
        """An observer sized from the model's metadata (``<arch>.block_count``, ``expert_count``, ...)."""
        _, n_layer, n_expert, n_used = read_moe_shape(gguf_path)
        return cls(n_layer, n_expert, n_used)

    # -- phase ------------------------------------------------------------------------------------

    @property
    def phase(self) -> str:
        """Where the next decoded rows belong: ``"image"``, ``"prompt"`` or ``"generated"``."""
        return PHASES[self._phase]

    @phase.setter
    def phase(self, value: str) -> None:
        try:
            self._phase = PHASES.index(value)
        except ValueError:
            raise ValueError(f"phase must be one of {PHASES}, got {value!r}") from None

    # -- statistics -------------------------------------------------------------------------------

    @property
    def tokens(self) -> np.ndarray:
        """(len(PHASES),) rows observed per phase (the most any layer saw)."""
        return self.layer_tokens.max(axis=1)

    def reset(self) -> None:
        """Forget everything observed."""
        with self._lock:
            shape = (len(PHASES), self.n_layer, self.n_expert)
            self.counts = np.zeros(shape, dtype=np.int64)
            self.mass = np.zeros(shape, dtype=np.float64)
            self.layer_tokens = np.zeros((len(PHASES), self.n_layer), dtype=np.int64)
            self._pending.clear()

    def profile(self, model: str) -> RouterProfile:
        """A frozen copy of the statistics so far."""
        with self._lock:
            return RouterProfile(
                model=model,
                n_layer=self.n_layer,
                n_expert=self.n_expert,
                n_expert_used=self.n_expert_used,
                counts=self.counts.copy(),
                mass=self.mass.copy(),
                tokens=self.tokens.copy(),
            )

    # -- the callback -----------------------------------------------------------------------------

    def __call__(self, tensor: int, ask: bool, _u64: Any = _U64, _prefix: int = _PREFIX) -> bool:
        # called for every graph node (thousands per token): the common case is kept to a few bytecodes
        address = tensor + self._name_offset
        if _u64(address).value != _prefix:
            return False
        name = _NAME(address).value
        if ask:
            if self._probing:
                self._probe(name, tensor)
            return name in self._wanted
        layer = self._gate_names.get(name)
        if layer is not None:
            ids = self._pending.pop(layer, None)
            if ids is None:
                ids = self._walk_to_topk(tensor, layer)
            if ids is not None:
                self._accumulate(layer, ids, strided_array(tensor, self._buffers, (layer, 1)).reshape(ids.shape))
        elif name in self._topk_names:  # asked for only when the graph walk below failed
            self._pending[self._topk_names[name]] = self._read_ids(tensor, self._topk_names[name])
        else:
            self._other_node(name, tensor)
        return True

    @property
    def node_prefix(self) -> bytes:
        """What `LlamaDecoder` passes on to this callback: only nodes whose names start with it (every MoE node:
        the probe of the first graph, the gates, the topk fallback and a subclass's nodes all are)."""
        return _PREFIX_BYTES

    def probe_placement(self) -> None:
        """Record `placement` again from the next graph."""
        self.placement.clear()
        self._probing, self._probe_layer = True, -1

    def _probe(self, name: bytes, tensor: int) -> None:
        """While the first graph is built: where the expert matmuls' weights are (their buffer, their data)."""
        _, _, tail = name.rpartition(b"-")
        if not tail.isdigit():  # a view or reshape llama.cpp named after its source
            return
        layer = int(tail)
        if layer < self._probe_layer:  # the next graph has started: the first one has been seen whole
            self._probing = False
            return
        self._probe_layer = layer
        weight = tensor
        for _ in range(2):  # the expert matmul's weight, or (ffn_moe_down_scaled) its unnamed matmul's weight
            weight = ctypes.c_void_p.from_address(weight + self._src_offset).value or 0
            if not weight:
                return
            weight_name = _NAME(weight + self._name_offset).value
            if weight_name.endswith(b"_exps.weight"):
                break
        else:
            return
        buffer = ctypes.c_void_p.from_address(weight + 8).value
        data = ctypes.c_void_p.from_address(weight + self._name_offset - 8).value or 0
        kind = (_lib().buffer_name(buffer) or b"?").decode() if buffer else "none"
        self.placement[weight_name.decode()] = (kind, data)

    def _other_node(self, name: bytes, tensor: int) -> None:
        """A node a subclass added to ``_wanted``."""

    def _walk_to_topk(self, gates: int, layer: int) -> np.ndarray | None:
        """The selected ids, found from the gate node: ``div(reshape(get_rows(probs, topk)), sum)``.

        The topk node is still intact when the gates are computed (the expert matmuls after them read it),
        so reading it from here saves a second graph split per layer. If llama.cpp's graph ever differs,
        the observer asks for the topk nodes too from the next graph on.
        """
        node = gates
        for index in (0, 0, 1):  # div.src[0] = reshape, its src[0] = get_rows, its src[1] = topk
            node = ctypes.c_void_p.from_address(node + self._src_offset + 8 * index).value or 0
            if not node:
                break
        if node and _NAME(node + self._name_offset).value == self._topk_by_layer[layer]:
            return self._read_ids(node, layer)
        logger.warning(
            "layer %d: the gate node's inputs are not %s%d as expected; asking for the topk nodes from the "
            "next decode on (this decode's layer is not counted)",
            layer,
            TOPK,
            layer,
        )
        self._wanted.update(self._topk_names)
        return None

    def _read_ids(self, tensor: int, layer: int) -> np.ndarray:
        ids = strided_array(tensor, self._buffers, (layer, 0))
        if ids.shape[1] != self.n_expert_used:
            raise ModelError(
                f"layer {layer} selects {ids.shape[1]} experts per token, the observer expects "
                f"{self.n_expert_used}; make it with RouterObserver.for_model(the decoder's GGUF)"
            )
        return ids

    def _accumulate(self, layer: int, ids: np.ndarray, weights: np.ndarray) -> None:
        flat = ids.ravel()
        try:
            counts = np.bincount(flat, minlength=self.n_expert)
            mass = np.bincount(flat, weights=weights.ravel(), minlength=self.n_expert)
        except ValueError:  # a negative id
            counts = mass = np.zeros(0)
        if counts.size != self.n_expert:
            raise ModelError(f"layer {layer} selected expert ids outside 0..{self.n_expert - 1}")
        with self._lock:
            p = self._phase
            self.counts[p, layer] += counts
            self.mass[p, layer] += mass
            self.layer_tokens[p, layer] += ids.shape[0]
        for listener in self.listeners:
            listener(layer, ids, weights)


class _Phased:
    """A decoder whose prefills set the observer's phase: token ids are prompt text, rows are an image."""

    def __init__(self, decoder: Any, observer: RouterObserver) -> None:
        self._decoder, self._observer = decoder, observer

    @property
    def n_past(self) -> int:
        return self._decoder.n_past

    def tokenize(self, text: str, **options: bool) -> list[int]:
        return self._decoder.tokenize(text, **options)

    def prefill_tokens(self, tokens: Sequence[int]) -> None:
        self._observer.phase = "prompt"
        self._decoder.prefill_tokens(tokens)

    def prefill_embeddings(self, embeddings: np.ndarray, *, causal: bool = True) -> None:
        self._observer.phase = "image"
        self._decoder.prefill_embeddings(embeddings, causal=causal)


def observe_turn(
    decoder: Any,
    observer: RouterObserver,
    segments: Sequence[Any],
    image_embeddings: np.ndarray | None = None,
) -> int:
    """`run_prompt` with the observer's phase following the segments (text: ``"prompt"``, image rows:
    ``"image"``); returns the decoder's ``n_past``. Set ``observer.phase = "generated"`` before generating."""
    from edgevision.decoder.prompt import run_prompt

    return run_prompt(_Phased(decoder, observer), segments, image_embeddings)
