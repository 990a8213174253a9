"""Predicted routing: the next layers' router choices computed from the current layer's hidden state.

Gemma 4's router reads the residual stream after attention: ``logits = W_l @ (rms_norm(x_l) / sqrt(n_embd) *
s_l)`` (``ffn_gate_inp.weight`` ``W_l`` is ``[n_expert, n_embd]``, ``ffn_gate_inp.scale`` ``s_l`` is
``[n_embd]``). The residual stream changes little from one layer to the next, so layer ``l + j``'s router
applied to layer ``l``'s normalised state is a good guess of where the token goes ``j`` layers later, early
enough to read those experts from storage while layers ``l .. l + j - 1`` compute. The routers are small
(Gemma 4 26B-A4B: 128 x 2816 per layer, 1.4 MB in f32, 43 MB for all 30 layers) and are read from the GGUF.

`PredictingObserver` is a `RouterObserver` that asks llama.cpp for each MoE layer's router logits node
(``ffn_moe_logits-<l>``) instead of the gate weights: from the logits it derives the selected experts and
their renormalised gate weights (softmax gating, as Gemma 4: the top-k of the logits), and from the node's
input (the router's scaled input, intact when the node is computed) the state to predict from. So one graph
split per observed layer gives the current choice and the predicted choices of the layers ahead.

With ``sample_every=n`` only one decode in n is observed (the others run as one graph, without splits):
cheaper, for statistics that do not need every token.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgevision.errors import ModelError
from edgevision.moe.router import (
    _NAME,
    _PREFIX,
    _U64,
    RouterObserver,
    captured_array,
    read_moe_shape,
    strided_array,
    write_node,
)

logger = logging.getLogger(__name__)

__all__ = ["LOGITS", "PredictingObserver", "RoutePredictor", "topk_gates"]

LOGITS = "ffn_moe_logits-"

HiddenListener = Callable[[int, np.ndarray], None]
"""``listener(layer, router_input (T, n_embd) float32)``: the layer's router input (scaled), valid during the
call only."""


def topk_gates(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids (T, k) int32, weights (T, k) float32): the top-k experts of each row and their softmax weights
    renormalised over the selected ones (what Gemma 4 multiplies each expert's output by)."""
    if logits.shape[0] == 1:  # one decoded token: the common case, in few numpy calls
        row = logits[0]
        ids = np.argsort(row)[: -k - 1 : -1].astype(np.int32)
        picked = row[ids]
        weights = np.exp(picked - picked[0])
        weights /= weights.sum()
        return ids[None], weights.astype(np.float32)[None]
    ids = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    picked = np.take_along_axis(logits, ids, axis=1)
    order = np.argsort(-picked, axis=1, kind="stable")
    ids = np.take_along_axis(ids, order, axis=1).astype(np.int32)
    picked = np.take_along_axis(picked, order, axis=1)
    weights = np.exp(picked - picked[:, :1])
    weights /= weights.sum(axis=1, keepdims=True)
    return ids, weights.astype(np.float32)


class RoutePredictor:
    """Every MoE layer's router, read from the GGUF, applied to another layer's router input.

    Args:
        routers: per layer, ``(W (n_expert, n_embd) float32, scale (n_embd,) float32)``; None for a dense layer.
    """

    def __init__(self, routers: Sequence[tuple[np.ndarray, np.ndarray] | None], n_expert_used: int) -> None:
        self.routers = list(routers)
        self.n_layer = len(self.routers)
        self.n_expert_used = n_expert_used
        self.moe_layers = tuple(i for i, r in enumerate(self.routers) if r is not None)
        self._fused: dict[tuple[int, int], np.ndarray] = {}
        self._ahead: dict[tuple[int, int], list[int]] = {}

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str]) -> RoutePredictor:
        """Read ``blk.<l>.ffn_gate_inp.weight`` and ``.scale`` of every layer (dequantized to float32)."""
        import gguf

        _, n_layer, n_expert, n_used = read_moe_shape(path)
        reader = gguf.GGUFReader(Path(path))
        tensors = {t.name: t for t in reader.tensors}
        routers: list[tuple[np.ndarray, np.ndarray] | None] = []
        for layer in range(n_layer):
            weight = tensors.get(f"blk.{layer}.ffn_gate_inp.weight")
            if weight is None:
                routers.append(None)
                continue
            w = gguf.quants.dequantize(weight.data, weight.tensor_type).reshape(n_expert, -1).astype(np.float32)
            scale = tensors.get(f"blk.{layer}.ffn_gate_inp.scale")
            s = np.ones(w.shape[1], np.float32) if scale is None else np.asarray(scale.data, np.float32).ravel()
            routers.append((w, s))
        if not any(routers):
            raise ModelError(f"{Path(path).name} has no router weights (ffn_gate_inp); it is not a MoE model")
        return cls(routers, n_used)

    def ahead(self, layer: int, depth: int) -> list[int]:
        """The next `depth` MoE layers after `layer` (asked on every layer of every token: kept)."""
        key = (layer, depth)
        found = self._ahead.get(key)
        if found is None:
            found = self._ahead[key] = [other for other in self.moe_layers if other > layer][:depth]
        return found

    def predict_ids(self, source: int, router_input: np.ndarray, target: int) -> np.ndarray:
        """One row's predicted expert ids of layer `target`, in no particular order (`predict` without the
        gates: what the decoding thread needs to read experts ahead)."""
        row = self.logits(source, router_input, target)[0]
        return np.argpartition(row, -self.n_expert_used)[-self.n_expert_used :]

    def _matrix(self, source: int, target: int) -> np.ndarray:
        """(n_embd, n_expert): target's router for source's scaled router input (source's scale undone)."""
        key = (source, target)
        matrix = self._fused.get(key)
        if matrix is None:
            w_t, s_t = self.routers[target]  # type: ignore[misc]
            _, s_s = self.routers[source]  # type: ignore[misc]
            ratio = np.divide(s_t, s_s, out=np.zeros_like(s_t), where=s_s != 0)
            matrix = self._fused[key] = np.ascontiguousarray((w_t * ratio).T)
        return matrix

    def logits(self, source: int, router_input: np.ndarray, target: int) -> np.ndarray:
        """(T, n_expert): layer `target`'s router logits computed from layer `source`'s router input
        (``rms_norm(x) / sqrt(n_embd) * s_source``, the input of llama.cpp's ``ffn_moe_logits-<source>``)."""
        return np.asarray(router_input, np.float32) @ self._matrix(source, target)

    def predict(self, source: int, router_input: np.ndarray, target: int, k: int | None = None) -> np.ndarray:
        """(T, k) predicted expert ids of layer `target` (k defaults to the experts used per token)."""
        return topk_gates(self.logits(source, router_input, target), k or self.n_expert_used)[0]


class PredictingObserver(RouterObserver):
    """A `RouterObserver` reading each MoE layer's router logits and input (see the module docstring).

    Args:
        layers: the MoE layers to observe (default: all); the others run without a graph split.
        sample_every: observe one decode in this many.

    `hidden_listeners` get ``(layer, router_input)`` after the layer's `listeners`. With `deferred` set
    (``deferred(layer, logits, router_input)``, copies the callee may keep) the decoding thread only reads the
    two nodes and hands them over (after the `listeners`, if any, and without `hidden_listeners`), so a policy
    can do its work on its own thread.

    With ``capture=True`` and nothing that must act inside the graph (no `deferred`, `reroute` or
    `hidden_listeners`; every layer, no sampling), the C node filter copies each layer's logits during the
    decode and the observer reads them all after it (`captured`): the decode then never enters Python, and
    `listeners` are called after it rather than layer by layer (right for statistics, wrong for a policy that
    must read an expert before its matmul, or for a probe of what is in RAM when it is chosen).

    With `reroute` set (``reroute(layer, logits) -> bool``, on single-token decodes only) the callee may change
    a layer's router logits (the ``(1, n_expert)`` array it is given) before llama.cpp's top-k reads them: when
    it returns True they are written back into the graph, so the layer's experts and gates follow the changed
    logits, and everything after (`listeners`, `deferred`) sees them as changed.
    """

    def __init__(
        self,
        n_layer: int,
        n_expert: int,
        n_expert_used: int,
        *,
        layers: Sequence[int] | None = None,
        sample_every: int = 1,
        capture: bool = False,
    ) -> None:
        super().__init__(n_layer, n_expert, n_expert_used)
        self.capture = capture
        if sample_every < 1:
            raise ValueError("sample_every must be 1 or more")
        chosen = range(n_layer) if layers is None else layers
        self._logit_names = {f"{LOGITS}{il}".encode(): il for il in chosen}
        self._wanted = dict(self._logit_names)
        self._first_name = f"{LOGITS}{min(chosen)}".encode()
        self._logits_prefix = LOGITS.encode()
        self.sample_every = sample_every
        self.hidden_listeners: list[HiddenListener] = []
        self.deferred: Callable[[int, np.ndarray, np.ndarray | None], None] | None = None
        self.reroute: Callable[[int, np.ndarray], bool] | None = None
        self.graphs = 0  # graphs seen (decodes, or ubatches of a prefill)
        self._active = True

    @classmethod
    def for_model(cls, gguf_path: str | os.PathLike[str], **options: object) -> PredictingObserver:  # type: ignore[override]
        _, n_layer, n_expert, n_used = read_moe_shape(gguf_path)
        return cls(n_layer, n_expert, n_used, **options)  # type: ignore[arg-type]

    @property
    def node_prefix(self) -> bytes:
        """Every MoE node while the first graph is probed for placement, then only the router logits."""
        return super().node_prefix if self._probing else self._logits_prefix

    @property
    def wants_every_prefixed_node(self) -> bool:
        """Whether every node with `node_prefix` is wanted (every layer; with sampling, every layer of the
        sampled graphs, `filter_sampling`): llama.cpp's question about each is then answered without Python."""
        return not self._probing and len(self._wanted) == self.n_layer

    @property
    def filter_sampling(self) -> tuple[int, bytes, int] | None:
        """For the C node filter: one graph in ``sample_every``, each starting at the first layer's logits,
        counted on from the graphs this observer has counted (while the first graph was probed in Python)."""
        return (self.sample_every, self._first_name, self.graphs) if self.sample_every > 1 else None

    @property
    def captures(self) -> bool:
        """Whether the decoder's C filter should copy the logits nodes for `captured` (see the class docstring)."""
        return (
            self.capture
            and self.wants_every_prefixed_node
            and self.deferred is None
            and self.reroute is None
            and not self.hidden_listeners
        )

    def captured(self, nodes: Sequence[Any]) -> None:
        """After a decode: the nodes the C filter copied during it (`edgevision.decoder.nodefilter.Captured`)."""
        for node in nodes:
            layer = self._logit_names.get(node.name)
            if layer is not None:
                ids, weights = topk_gates(captured_array(node.head, node.data), self.n_expert_used)
                self._accumulate(layer, ids, weights)

    def __call__(self, tensor: int, ask: bool, _u64: Any = _U64, _prefix: int = _PREFIX) -> bool:
        address = tensor + self._name_offset
        if _u64(address).value != _prefix:
            return False
        name = _NAME(address).value
        if ask:
            if self._probing:
                self._probe(name, tensor)
            if name == self._first_name:
                self.graphs += 1
                self._active = self.graphs % self.sample_every == 0
            return self._active and name in self._wanted
        layer = self._logit_names.get(name)
        if layer is not None:
            self._on_logits(layer, tensor)
        return True

    def _router_input(self, tensor: int, layer: int) -> np.ndarray | None:
        # mul_mat(W, input): src[1] is the router's input, intact until the matmul after it has run
        source = ctypes.c_void_p.from_address(tensor + self._src_offset + 8).value
        return strided_array(source, self._buffers, (layer, 3)) if source else None

    def _on_logits(self, layer: int, tensor: int) -> None:
        logits = strided_array(tensor, self._buffers, (layer, 2))
        if self.reroute is not None and logits.shape[0] == 1 and self.reroute(layer, logits):
            write_node(tensor, logits)
        if self.deferred is not None:
            if self.listeners:  # first, so that they see the layer as the policy found it (a benchmark's probe)
                ids, weights = topk_gates(logits, self.n_expert_used)
                self._accumulate(layer, ids, weights)
            hidden = self._router_input(tensor, layer)
            self.deferred(layer, logits.copy(), None if hidden is None else hidden.copy())
            return
        ids, weights = topk_gates(logits, self.n_expert_used)
        self._accumulate(layer, ids, weights)
        if self.hidden_listeners:
            hidden = self._router_input(tensor, layer)
            if hidden is not None:
                for listener in self.hidden_listeners:
                    listener(layer, hidden)
