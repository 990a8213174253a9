"""A small ONNX graph builder for vision towers: basic ops only (opset 17), which every ONNX Runtime and
TensorRT 8.6/10 parser takes, and constants folded in numpy where the input size is fixed."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
INPUT = "pixel_values"
OUTPUT = "image_embeds"


class Graph:
    """Nodes and initializers of one tower; every method returns the name of its output."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._ids = itertools.count()
        self._consts: dict[tuple, str] = {}

    def _name(self, hint: str) -> str:
        return f"{hint}_{next(self._ids)}"

    def const(self, value, hint: str = "c", dtype=np.float32) -> str:
        array = np.ascontiguousarray(np.asarray(value, dtype=dtype))
        key = (array.dtype.str, array.shape, array.tobytes()) if array.size <= 16 else None
        if key is not None and key in self._consts:
            return self._consts[key]
        name = self._name(hint)
        self.inits.append(numpy_helper.from_array(array, name))
        if key is not None:
            self._consts[key] = name
        return name

    def op(self, op_type: str, *inputs: str, hint: str | None = None, **attrs) -> str:
        out = self._name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    # -- arithmetic -------------------------------------------------------------------------------

    def add(self, a: str, b: str) -> str:
        return self.op("Add", a, b)

    def mul(self, a: str, b: str) -> str:
        return self.op("Mul", a, b)

    def scale(self, x: str, factor: float, bias: float = 0.0) -> str:
        y = self.mul(x, self.const(factor))
        return self.add(y, self.const(bias)) if bias else y

    def linear(self, x: str, weight: np.ndarray, bias: np.ndarray | None = None, hint: str = "w") -> str:
        """x @ weight.T (+ bias); `weight` is (out, in) as in PyTorch and GGUF."""
        y = self.op("MatMul", x, self.const(np.asarray(weight, np.float32).T, hint))
        return self.add(y, self.const(bias, hint + "_b")) if bias is not None else y

    def linears(self, x: str, pairs: list[tuple[np.ndarray, np.ndarray | None]], hint: str = "w") -> list[str]:
        """Several linears of the same input as one MatMul and a Split (q, k, v in one GEMM)."""
        weight = np.concatenate([w for w, _ in pairs])
        biases = [b if b is not None else np.zeros(w.shape[0], np.float32) for w, b in pairs]
        has_bias = any(b is not None for _, b in pairs)
        y = self.linear(x, weight, np.concatenate(biases) if has_bias else None, hint)
        sizes = self.const([w.shape[0] for w, _ in pairs], "split", np.int64)
        outs = [self._name("part") for _ in pairs]
        self.nodes.append(helper.make_node("Split", [y, sizes], outs, axis=-1))
        return outs

    def clip(self, x: str, lo: float, hi: float) -> str:
        return self.op("Clip", x, self.const(lo), self.const(hi))

    # -- normalisation and activations ------------------------------------------------------------

    def layer_norm(self, x: str, weight: np.ndarray, bias: np.ndarray | None, eps: float) -> str:
        bias = np.zeros_like(weight) if bias is None else bias
        return self.op("LayerNormalization", x, self.const(weight), self.const(bias), axis=-1, epsilon=eps)

    def rms_norm(self, x: str, eps: float, weight: np.ndarray | None = None, width: int | None = None) -> str:
        """x / sqrt(mean(x²) + eps) over the last axis (ggml_rms_norm), times `weight` if given.

        Written as ONNX Runtime's SimplifiedLayerNormalization pattern (Pow, ReduceMean, Add, Sqrt, Div,
        Mul by a scale), which it fuses into one kernel; a weightless norm of known `width` gets a scale of ones.
        """
        ms = self.op("ReduceMean", self.op("Pow", x, self.const(2.0)), axes=[-1], keepdims=1)
        y = self.op("Div", x, self.op("Sqrt", self.add(ms, self.const(eps))))
        if weight is None and width is not None:
            weight = np.ones(width, np.float32)
        return self.mul(y, self.const(weight, "norm_w")) if weight is not None else y

    def gelu_erf(self, x: str) -> str:
        e = self.op("Erf", self.op("Div", x, self.const(np.sqrt(2.0))))
        return self.mul(self.mul(x, self.add(e, self.const(1.0))), self.const(0.5))

    def gelu_tanh(self, x: str) -> str:
        """x·0.5·(1 + tanh(√(2/π)·(x + 0.044715·x·x·x))), ggml_gelu and PyTorch's approximate='tanh', in the
        node order ONNX Runtime's FastGelu fusion recognises."""
        cube = self.mul(self.mul(x, x), x)
        inner = self.mul(self.add(x, self.mul(cube, self.const(0.044715))), self.const(0.7978845608028654))
        return self.mul(self.mul(x, self.const(0.5)), self.add(self.op("Tanh", inner), self.const(1.0)))

    def gelu_quick(self, x: str) -> str:
        """x·sigmoid(1.702·x): OpenAI CLIP's quick_gelu."""
        return self.mul(x, self.op("Sigmoid", self.mul(x, self.const(1.702))))

    def silu(self, x: str) -> str:
        return self.mul(x, self.op("Sigmoid", x))

    def act(self, x: str, kind: str) -> str:
        return {"gelu_erf": self.gelu_erf, "gelu": self.gelu_tanh, "gelu_quick": self.gelu_quick, "silu": self.silu}[
            kind
        ](x)

    # -- shapes -----------------------------------------------------------------------------------

    def reshape(self, x: str, shape: list[int]) -> str:
        return self.op("Reshape", x, self.const(shape, "shape", np.int64))

    def transpose(self, x: str, perm: list[int]) -> str:
        return self.op("Transpose", x, perm=perm)

    def heads(self, x: str, n_tokens: int, n_head: int, d_head: int) -> str:
        """(B, T, H·D) → (B, H, T, D)."""
        return self.transpose(self.reshape(x, [-1, n_tokens, n_head, d_head]), [0, 2, 1, 3])

    def attention(self, q: str, k: str, v: str, scale: float, n_tokens: int, width: int) -> str:
        """Full (bidirectional) attention over (B, H, T, D) heads → (B, T, H·D)."""
        scores = self.op("MatMul", q, self.transpose(k, [0, 1, 3, 2]))
        if scale != 1.0:
            scores = self.mul(scores, self.const(scale))
        ctx = self.op("MatMul", self.op("Softmax", scores, axis=-1), v)
        return self.reshape(self.transpose(ctx, [0, 2, 1, 3]), [-1, n_tokens, width])

    def patches(self, x: str, weight: np.ndarray, bias: np.ndarray | None, grid_h: int, grid_w: int) -> str:
        """Patch embedding: a stride-`patch` convolution, (B, 3, H, W) → (B, grid_h·grid_w, width)."""
        inputs = [x, self.const(weight, "patch_w")] + ([self.const(bias, "patch_b")] if bias is not None else [])
        patch = int(weight.shape[-1])
        conv = self.op("Conv", *inputs, strides=[patch, patch])
        flat = self.reshape(conv, [-1, int(weight.shape[0]), grid_h * grid_w])
        return self.transpose(flat, [0, 2, 1])

    # -- model ------------------------------------------------------------------------------------

    def model(self, out: str, image_size: int, n_tokens: int, n_embd: int, metadata: dict[str, str]) -> onnx.ModelProto:
        self.nodes.append(helper.make_node("Identity", [out], [OUTPUT]))
        graph = helper.make_graph(
            self.nodes,
            "edgevision_tower",
            [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", 3, image_size, image_size])],
            [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", n_tokens, n_embd])],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgevision")
        model.ir_version = 8
        helper.set_model_props(model, metadata)
        onnx.checker.check_model(model)
        return model


def save(model: onnx.ModelProto, path: Path) -> Path:
    """Write atomically (a half-written tower never replaces a good one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(model, tmp)
    tmp.replace(path)
    return path
