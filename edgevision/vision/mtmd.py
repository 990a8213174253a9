"""llama.cpp's own multimodal path (libmtmd, shipped with llama-cpp-python): the reference our towers match.

`MtmdReference` owns one mtmd context loaded from an mmproj GGUF next to a `LlamaDecoder` (mtmd needs the
decoder's model for its width and vocabulary). It encodes an image with llama.cpp's vision graph
(`encode`) and can prefill a whole multimodal prompt into the decoder through mtmd's own path
(`mtmd_tokenize` + `mtmd_helper_eval_chunks`, `prefill`), so the fidelity tests and ``edgevision bench
vision`` can compare our ONNX towers and prompt assembly with it. It is a reference and a benchmark
baseline, not the product path.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import logging
import os
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgevision.decoder.native import NativeLog
from edgevision.errors import EdgevisionError, InputError, MissingDependencyError, ModelError

if TYPE_CHECKING:
    from edgevision.decoder.llama import LlamaDecoder

logger = logging.getLogger(__name__)
native_logger = logging.getLogger(__name__ + ".native")

_CHUNK_TEXT, _CHUNK_IMAGE = 0, 1


# mtmd logs every encode at INFO, which NativeLog sends to DEBUG.
_log = NativeLog(native_logger)


@functools.cache
def _mtmd() -> Any:
    """Import llama_cpp.mtmd_cpp once and route its logs into `logging`."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise MissingDependencyError("llama-cpp-python is not installed: pip install llama-cpp-python==0.3.36")
    try:
        from llama_cpp import mtmd_cpp
    except (ImportError, OSError) as exc:  # the package was built without libmtmd
        raise MissingDependencyError(
            f"llama-cpp-python has no usable libmtmd ({exc}); reinstall llama-cpp-python==0.3.36 from source"
        ) from exc
    import llama_cpp

    _log.c_callback = llama_cpp.llama_log_callback(_log)
    mtmd_cpp.mtmd_log_set(_log.c_callback, ctypes.c_void_p(0))
    mtmd_cpp.mtmd_helper_log_set(_log.c_callback, ctypes.c_void_p(0))
    return mtmd_cpp


@dataclass(frozen=True)
class Chunk:
    """One piece of a prompt as mtmd tokenized it: text token ids, or an image of `n_tokens` rows."""

    kind: str  # "text" | "image"
    tokens: tuple[int, ...] = ()
    n_tokens: int = 0


class MtmdReference:
    """One mtmd context (an mmproj GGUF) paired with `decoder`; close it before the decoder.

    Args:
        mmproj: the llama.cpp mmproj GGUF (vision tower + projector).
        decoder: the text model it feeds; its width must equal the projector's output width.
        n_threads: CPU threads for the vision graph; 0 uses every core this process may run on.
        flash_attn: llama.cpp's flash attention in the vision graph: True, False, or None for llama.cpp's
            own choice (auto). Off by default: it casts K and V to f16, llama.cpp's speed path but not its
            most exact one.
        use_gpu: run the vision graph on a GPU back-end where llama.cpp has one.
    """

    def __init__(
        self,
        mmproj: str | os.PathLike[str],
        decoder: LlamaDecoder,
        *,
        n_threads: int = 0,
        flash_attn: bool | None = False,
        use_gpu: bool = False,
    ) -> None:
        self.path = Path(mmproj)
        if not self.path.is_file():
            raise ModelError(f"mmproj file not found: {self.path}")
        m = _mtmd()
        self._m = m
        self._decoder = decoder
        self._stack = ExitStack()
        params = m.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.print_timings = False
        params.n_threads = n_threads or len(os.sched_getaffinity(0))
        params.flash_attn_type = {None: -1, False: 0, True: 1}[flash_attn]  # LLAMA_FLASH_ATTN_TYPE_*
        params.warmup = False
        ctx = m.mtmd_init_from_file(os.fsencode(self.path), decoder.native_handles[0], params)
        if not ctx:
            raise ModelError(
                f"llama.cpp could not load mmproj {self.path} for decoder {decoder.path.name}: the file may be "
                "corrupt, of a projector type this llama.cpp lacks, or made for a decoder of another width "
                "(see the edgevision.vision.mtmd.native log)"
            )
        self._ctx = ctx
        self._stack.callback(m.mtmd_free, ctx)
        if not m.mtmd_support_vision(ctx):
            self.close()
            raise ModelError(f"{self.path} has no vision encoder")
        self.marker = (m.mtmd_default_marker() or b"<__media__>").decode()
        self.n_embd = decoder.n_embd

    def close(self) -> None:
        self._stack.close()
        self._ctx = None

    def __enter__(self) -> MtmdReference:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _live(self) -> Any:
        if self._ctx is None:
            raise EdgevisionError("the mtmd context is closed")
        return self._ctx

    @property
    def non_causal(self) -> bool:
        """Whether mtmd decodes this projector's image tokens with non-causal attention."""
        return bool(self._m.mtmd_decode_use_non_causal(self._live(), None))

    # -- tokenization -----------------------------------------------------------------------------

    def _bitmap(self, stack: ExitStack, image: Any) -> Any:
        rgb = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
        h, w = rgb.shape[:2]
        bitmap = self._m.mtmd_bitmap_init(w, h, rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        if not bitmap:
            raise InputError(f"mtmd could not take a {w}x{h} image")
        stack.callback(self._m.mtmd_bitmap_free, bitmap)
        return bitmap

    def _tokenize(self, stack: ExitStack, prompt: str, images: Sequence[Any]) -> Any:
        """`prompt` with one `marker` per image → an mtmd chunk list owned by `stack`."""
        m, ctx = self._m, self._live()
        if prompt.count(self.marker) != len(images):
            raise InputError(f"the prompt has {prompt.count(self.marker)} media markers for {len(images)} images")
        chunks = m.mtmd_input_chunks_init()
        if not chunks:
            raise EdgevisionError("mtmd_input_chunks_init failed")
        stack.callback(m.mtmd_input_chunks_free, chunks)
        bitmaps = (m.mtmd_bitmap_p_ctypes * max(1, len(images)))(*[self._bitmap(stack, im) for im in images])
        data = prompt.encode("utf-8")
        text = m.mtmd_input_text(data, len(data), False, True)  # the chat format writes its own <bos>
        rc = m.mtmd_tokenize(ctx, chunks, ctypes.byref(text), bitmaps, len(images))
        if rc != 0:
            raise InputError(f"mtmd_tokenize failed with code {rc} (1: marker/image count, 2: image preprocessing)")
        return chunks

    def _chunks(self, chunks: Any) -> list[tuple[Any, Chunk]]:
        m, out = self._m, []
        for i in range(m.mtmd_input_chunks_size(chunks)):
            chunk = m.mtmd_input_chunks_get(chunks, i)
            kind = m.mtmd_input_chunk_get_type(chunk)
            if kind == _CHUNK_TEXT:
                n = ctypes.c_size_t()
                ptr = m.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                out.append((chunk, Chunk("text", tokens=tuple(ptr[: n.value]))))
            elif kind == _CHUNK_IMAGE:
                out.append((chunk, Chunk("image", n_tokens=int(m.mtmd_input_chunk_get_n_tokens(chunk)))))
            else:
                raise InputError("mtmd returned a non-image media chunk")
        return out

    def layout(self, prompt: str, images: Sequence[Any]) -> list[Chunk]:
        """How mtmd tokenizes `prompt` (image markers included) — to compare with our prompt assembly."""
        with ExitStack() as stack:
            return [c for _, c in self._chunks(self._tokenize(stack, prompt, images))]

    # -- encoding and prefill ---------------------------------------------------------------------

    def encode(self, image: Any) -> np.ndarray:
        """PIL image → (n_tokens, n_embd) float32 embeddings from llama.cpp's vision graph."""
        m, ctx = self._m, self._live()
        with ExitStack() as stack:
            chunks = self._tokenize(stack, self.marker, [image])
            images = [(c, info) for c, info in self._chunks(chunks) if info.kind == "image"]
            if len(images) != 1:
                raise EdgevisionError(f"mtmd made {len(images)} image chunks from one image")
            chunk, info = images[0]
            rc = m.mtmd_encode_chunk(ctx, chunk)
            if rc != 0:
                raise EdgevisionError(f"mtmd_encode_chunk failed with code {rc}")
            ptr = m.mtmd_get_output_embd(ctx)
            if not ptr:
                raise EdgevisionError("mtmd_get_output_embd returned nothing")
            flat = np.ctypeslib.as_array(ptr, shape=(info.n_tokens * self.n_embd,))
            return flat.reshape(info.n_tokens, self.n_embd).copy()

    def prefill(self, prompt: str, images: Sequence[Any]) -> int:
        """Prefill `prompt` (with one `marker` per image) into the decoder through mtmd's own multimodal
        path, at the decoder's next position; returns the decoder's `n_past` afterwards.

        The decoder's logits and `generate` then continue from what mtmd decoded.
        """
        m, ctx, dec = self._m, self._live(), self._decoder
        with ExitStack() as stack:
            chunks = self._tokenize(stack, prompt, images)
            n_pos = int(m.mtmd_helper_get_n_pos(chunks))
            if dec.n_past + n_pos > dec.n_ctx:
                raise InputError(f"the prompt needs {dec.n_past + n_pos} positions, the decoder holds {dec.n_ctx}")
            new_n_past = ctypes.c_int32(dec.n_past)
            _, llama_ctx = dec.native_handles
            rc = m.mtmd_helper_eval_chunks(
                ctx, llama_ctx, chunks, dec.n_past, 0, dec.n_batch, True, ctypes.byref(new_n_past)
            )
            # the decoder's own bookkeeping: its KV cache now holds what mtmd decoded into its context
            dec.sync_after_native_decode(has_logits=rc == 0)
            if rc != 0:
                raise EdgevisionError(f"mtmd_helper_eval_chunks failed with code {rc}")
        if dec.n_past != new_n_past.value:
            raise EdgevisionError(f"mtmd decoded up to position {new_n_past.value}, the cache holds {dec.n_past}")
        return dec.n_past
