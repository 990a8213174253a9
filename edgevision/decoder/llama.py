"""One GGUF decoder: a llama.cpp model and context driven through llama-cpp-python's low-level API.

`LlamaDecoder` owns the model, one context (one sequence, id 0) and two batches, and frees them in
`close()` (or at the end of a ``with`` block). It prefills token ids or raw embedding rows (the vision
tower's output), rolls the KV cache back to a prefix, and streams generated text.

Injected embeddings and their scale
-----------------------------------
llama.cpp's ``build_inp_embd`` selects between two inputs: ``get_rows(tok_embd, tokens)`` for a token batch
and the caller's ``llama_batch.embd`` rows for an embedding batch. Gemma 3 and Gemma 4 then apply
``inpL = ggml_scale(inpL, ubatch.token ? sqrtf(n_embd) : 1.0f)`` (``src/models/gemma3.cpp``,
``src/models/gemma4.cpp``): the ``sqrt(n_embd)`` normalizer is applied to token inputs only. Rows passed to
`LlamaDecoder.prefill_embeddings` therefore enter the first layer as they are and must already be at the
post-scaling level: a real token's row is ``token_embd[id] * sqrt(n_embd)``. This is what Gemma's multimodal
projector produces (its RMS-normed output is not rescaled), so a vision tower's rows go in unscaled, but a
caller that builds rows from the token embedding table must multiply by ``sqrt(n_embd)`` itself.

Gemma 4 variants with per-layer embeddings (E2B/E4B) also feed every layer a per-token table; for an
embedding batch llama.cpp uses the padding token's (id 0) entry instead, so there an embedding row of a
real token does not reproduce that token exactly. The MoE and Gemma 3 models have no such table.
"""

from __future__ import annotations

import codecs
import ctypes
import functools
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgevision.decoder.gguf import check_gguf
from edgevision.decoder.native import (
    extra_buffer_types_work,
    llama_cpp_library,
    name_offset,
    native_log_capture,
    weight_buffers,
)
from edgevision.decoder.nodefilter import NodeFilter
from edgevision.errors import EdgevisionError, InputError, ModelError

if TYPE_CHECKING:
    from typing_extensions import Self

logger = logging.getLogger(__name__)

EvalCallback = Callable[[int, bool], bool]
"""``cb_eval(tensor_ptr, ask) -> bool``: see `LlamaDecoder`."""

_SEQ = 0  # the one sequence this decoder uses

# llama_decode return codes (llama.h)
_DECODE_NO_SLOT = 1
_DECODE_ABORTED = 2


@dataclass(frozen=True)
class SpecialTokens:
    """The vocabulary's special token ids; None where the model has none."""

    bos: int | None
    eos: int | None
    eot: int | None
    nl: int | None
    pad: int | None


class LlamaDecoder:
    """A GGUF decoder with one llama.cpp context and one sequence; use it from one thread at a time.

    Args:
        model_path: the .gguf file.
        n_ctx: context length in tokens (KV cache size).
        n_batch: tokens per llama_decode call; also the physical batch, so an image decoded with
            non-causal attention must fit in it.
        n_threads: CPU threads; 0 uses every core this process may run on.
        seed: seed of the sampler used when generating with a temperature.
        cb_eval: ``callable(tensor_ptr, ask) -> bool`` called for each graph node while decoding (llama.cpp's
            ``cb_eval``). With ``ask=True`` it returns whether it wants to see the node's computed data; the
            node is then passed again with ``ask=False`` once computed (`tensor_name` and `tensor_array`
            read it; the pointer is valid only during the call). With ``ask=False`` the return value is
            ignored: the decoder always lets the graph continue, since False would leave the rest of the
            graph silently uncomputed. A callback with a ``node_prefix`` attribute (bytes, read before each
            decode) is asked only about nodes whose names start with it; the others are answered "no" in C
            (`edgevision.decoder.nodefilter`), which spares a crossing into Python per graph node. One whose
            ``captures`` attribute is true then is not called during the decode at all: the filter copies
            those nodes and its ``captured(nodes)`` is called after the decode. An exception raised by the
            callback is re-raised from the prefill or generate call that triggered it.
        use_mmap, use_mlock: how the weights are loaded.
        swa_full: keep sliding-window layers' KV for every position (llama.cpp's default), so `truncate` can
            always roll back and the result is bit-identical to a fresh prefill. False saves memory, but a
            long turn may then force a full re-prefill, and results depend on how the cache wrapped (up to
            about 2 in the logits of Gemma 3 270M after a truncation), so cache reuse is no longer exact.
        n_gpu_layers: layers to offload; None keeps llama.cpp's default (all, where a GPU back-end exists).
        tensor_overrides: ``(regex, buffer type)`` pairs placing matching weights in that buffer type (llama.cpp's
            ``tensor_buft_overrides``, e.g. ``[("^blk[.](0|1)[.].*_exps", "CPU")]`` keeps two layers' experts
            in system RAM on a CUDA build); see `edgevision.moe.buft`.
        extra_buffer_types: let llama.cpp's CPU back-end copy weights into its extra buffer types (``AMX`` on
            x86 with AMX, ``CPU_REPACK`` for Q4_0 on AVX2 and Arm dot-product CPUs, ...). Off by default: the AMX
            buffer type crashes on some hosts, and repacked weights leave the file mapping, so expert
            residency (pinning, prefetch, the page cache) no longer manages them. Asked for on a host that
            advertises AMX, a child process first checks that they decode without crashing
            (`extra_buffer_types_work`); if they do not, the model loads without them, with a warning.
            `extra_buffer_types` says what was used, `weight_buffers` where the weights went.

    Raises:
        ModelError: the file is missing, not GGUF, corrupt or of an unsupported architecture.
        MissingDependencyError: llama-cpp-python is not installed.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        n_ctx: int = 2048,
        n_batch: int = 512,
        n_threads: int = 0,
        seed: int = 0,
        cb_eval: EvalCallback | None = None,
        use_mmap: bool = True,
        use_mlock: bool = False,
        swa_full: bool = True,
        n_gpu_layers: int | None = None,
        tensor_overrides: Sequence[tuple[str, str]] = (),
        extra_buffer_types: bool = False,
    ) -> None:
        if n_ctx < 1 or n_batch < 1:
            raise ValueError(f"n_ctx and n_batch must be positive, got n_ctx={n_ctx} n_batch={n_batch}")
        self.path = Path(model_path)
        check_gguf(self.path)
        ll = llama_cpp_library()
        self._ll = ll
        self._seed = seed
        self._cb_eval = cb_eval
        self._node_filter: NodeFilter | None = None
        self._cb_error: BaseException | None = None
        self._n_past = 0
        self._has_logits = False
        self._stack = ExitStack()
        self.mapping_base: int | None = None  # where llama.cpp mapped the file (offset 0), if it did
        try:
            self._model = self._load_model(use_mmap, use_mlock, n_gpu_layers, tensor_overrides, extra_buffer_types)
            self._stack.callback(ll.llama_model_free, self._model)
            self._vocab = ll.llama_model_get_vocab(self._model)
            if not self._vocab:
                raise ModelError(f"decoder model {self.path} has no vocabulary; it cannot be used as a decoder")
            self._n_vocab = ll.llama_vocab_n_tokens(self._vocab)
            self._n_embd = ll.llama_model_n_embd_inp(self._model)
            self._n_swa = ll.llama_model_n_swa(self._model)
            self._ctx = self._new_context(n_ctx, n_batch, n_threads, swa_full)
            self._stack.callback(ll.llama_free, self._ctx)
            self._mem = ll.llama_get_memory(self._ctx)
            if not self._mem:
                raise ModelError(f"llama.cpp made no KV cache for {self.path}; it cannot be used as a decoder")
            self._n_ctx = ll.llama_n_ctx(self._ctx)
            self._n_batch = ll.llama_n_batch(self._ctx)
            self._tok_batch, self._tok = self._new_batch(0)
            self._embd_batch: Any = None  # allocated on the first prefill_embeddings
            self._embd: Any = None
        except BaseException:
            self._stack.close()
            raise
        logger.debug(
            "decoder %s: n_ctx=%d n_batch=%d n_embd=%d", self.path.name, self._n_ctx, self._n_batch, self._n_embd
        )

    # -- construction -----------------------------------------------------------------------------

    def _load_model(
        self,
        use_mmap: bool,
        use_mlock: bool,
        n_gpu_layers: int | None,
        tensor_overrides: Sequence[tuple[str, str]],
        extra_buffer_types: bool,
    ) -> int:
        from edgevision.moe.mapping import file_mappings

        ll = self._ll
        params = ll.llama_model_default_params()
        params.load_mode = {
            (True, True): ll.LLAMA_LOAD_MODE_MMAP_MLOCK,
            (False, True): ll.LLAMA_LOAD_MODE_MLOCK,
            (True, False): ll.LLAMA_LOAD_MODE_MMAP,
            (False, False): ll.LLAMA_LOAD_MODE_NONE,
        }[(use_mmap, use_mlock)]
        if extra_buffer_types and not extra_buffer_types_work(str(self.path)):
            logger.warning(
                "llama.cpp's extra buffer types crash on this host (its AMX buffer type: a probe decoding %s with "
                "them died); loading without them",
                self.path.name,
            )
            extra_buffer_types = False
        #: whether llama.cpp's CPU extra buffer types were on for this model (asked for, and safe on this host)
        self.extra_buffer_types = extra_buffer_types
        params.use_extra_bufts = extra_buffer_types
        if n_gpu_layers is not None:
            params.n_gpu_layers = n_gpu_layers
        if tensor_overrides:
            from edgevision.moe.buft import TensorOverrides

            self._overrides = TensorOverrides(tensor_overrides)  # must outlive the model
            params.tensor_buft_overrides = self._overrides.address
        before = set(file_mappings(self.path))
        with native_log_capture() as problems, native_log_capture(logging.DEBUG) as load_log:
            model = ll.llama_model_load_from_file(os.fsencode(self.path), params)
        #: where llama.cpp put the weights, MiB per buffer type (``{"CPU_Mapped": 241.6}``); see `weight_buffers`
        self.weight_buffers = weight_buffers(load_log)
        bases = {vma.base for vma in file_mappings(self.path) if vma not in before}
        self.mapping_base = bases.pop() if len(bases) == 1 else None
        if not model:
            reason = "; ".join(problems[:2]) or "no reason given"
            raise ModelError(
                f"llama.cpp could not load decoder model {self.path} ({reason}); the file may be truncated "
                "or corrupt (download it again) or made for another llama.cpp version or architecture"
            )
        return model

    def _new_context(self, n_ctx: int, n_batch: int, n_threads: int, swa_full: bool) -> int:
        ll = self._ll
        params = ll.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = 1
        threads = n_threads or _available_cores()
        params.n_threads = threads
        params.n_threads_batch = threads
        params.swa_full = swa_full
        if self._cb_eval is not None:
            self._c_cb_eval = ll.ggml_backend_sched_eval_callback(self._eval_trampoline)
            params.cb_eval = self._c_cb_eval
            params.cb_eval_user_data = None
            if getattr(self._cb_eval, "node_prefix", None) is not None:
                # the nodes it does not want are answered in C (see nodefilter.py), not in Python
                self._node_filter = NodeFilter.create(name_offset(), self._c_cb_eval)
                if self._node_filter is not None:
                    self._set_node_prefix()
                    params.cb_eval = ll.ggml_backend_sched_eval_callback(self._node_filter.function)
                    params.cb_eval_user_data = ctypes.c_void_p(self._node_filter.user_data)
        with native_log_capture() as problems:
            ctx = ll.llama_init_from_model(self._model, params)
        if not ctx:
            reason = "; ".join(problems[:2]) or "no reason given"
            raise ModelError(
                f"llama.cpp could not create a context for {self.path} with n_ctx={n_ctx} n_batch={n_batch} "
                f"({reason}); lower n_ctx or n_batch"
            )
        return ctx

    def _new_batch(self, embd: int) -> tuple[Any, dict[str, np.ndarray]]:
        """A llama_batch for n_batch entries of one sequence, with numpy views over its arrays."""
        ll = self._ll
        n = self._n_batch
        batch = ll.llama_batch_init(n, embd, 1)
        data = batch.embd if embd else batch.token
        if not data or not batch.pos or not batch.seq_id or not batch.logits:
            ll.llama_batch_free(batch)
            raise EdgevisionError(f"llama_batch_init({n}, {embd}, 1) could not allocate a batch; out of memory")
        self._stack.callback(ll.llama_batch_free, batch)
        for i in range(n):
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = _SEQ
        views = {
            "pos": np.ctypeslib.as_array(batch.pos, shape=(n,)),
            "logits": np.ctypeslib.as_array(batch.logits, shape=(n,)),
        }
        if embd:
            views["embd"] = np.ctypeslib.as_array(batch.embd, shape=(n, embd))
        else:
            views["token"] = np.ctypeslib.as_array(batch.token, shape=(n,))
        return batch, views

    def _set_node_prefix(self) -> None:
        callback: Any = self._cb_eval
        every = bool(getattr(callback, "wants_every_prefixed_node", False))
        self._node_filter.set_prefix(callback.node_prefix, every, getattr(callback, "filter_sampling", None))  # type: ignore[union-attr]

    def _eval_trampoline(self, tensor: int, ask: bool, _user_data: object) -> bool:
        try:
            want = bool(self._cb_eval(tensor, ask))  # type: ignore[misc]
        except BaseException as exc:  # noqa: BLE001 - cannot cross the C boundary; re-raised after decode
            if self._cb_error is None:
                self._cb_error = exc
            return not ask
        return want if ask else True

    # -- lifetime ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Free the batches, the context and the model (idempotent)."""
        self._stack.close()
        self._ctx = self._model = self._mem = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _live(self) -> None:
        if self._ctx is None:
            raise EdgevisionError(f"decoder {self.path.name} is closed")

    # -- properties -------------------------------------------------------------------------------

    @property
    def n_embd(self) -> int:
        """Width of an input embedding row (llama_model_n_embd_inp; the hidden size for Gemma)."""
        return self._n_embd

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def n_batch(self) -> int:
        return self._n_batch

    @property
    def n_vocab(self) -> int:
        return self._n_vocab

    @property
    def n_past(self) -> int:
        """Positions held in the KV cache (the next input goes at this position)."""
        return self._n_past

    @functools.cached_property
    def special_tokens(self) -> SpecialTokens:
        self._live()
        ll, v = self._ll, self._vocab

        def tok(value: int) -> int | None:
            return value if value >= 0 else None

        return SpecialTokens(
            bos=tok(ll.llama_vocab_bos(v)),
            eos=tok(ll.llama_vocab_eos(v)),
            eot=tok(ll.llama_vocab_eot(v)),
            nl=tok(ll.llama_vocab_nl(v)),
            pad=tok(ll.llama_vocab_pad(v)),
        )

    def is_eog(self, token: int) -> bool:
        """Whether `token` ends generation (eos, eot and the model's other end-of-generation tokens)."""
        return bool(self._ll.llama_vocab_is_eog(self._vocab, token))

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as text (e.g. ``"general.architecture"``), None if absent."""
        self._live()
        buf = ctypes.create_string_buffer(512)
        n = self._ll.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            self._ll.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    # -- text <-> tokens --------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of `text`; `add_special` adds BOS where the model wants it, `parse_special` turns
        markers such as ``<start_of_turn>`` into their token ids instead of plain text."""
        self._live()
        data = text.encode("utf-8")
        capacity = len(data) + 8
        for _ in range(2):
            out = (self._ll.llama_token * capacity)()
            n = self._ll.llama_tokenize(self._vocab, data, len(data), out, capacity, add_special, parse_special)
            if n >= 0:
                return list(out[:n])
            capacity = -n
        raise EdgevisionError(f"llama_tokenize failed for a {len(data)}-byte text")

    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        """The raw bytes of one token (possibly part of a UTF-8 character); control tokens are empty
        unless `special`."""
        buf = ctypes.create_string_buffer(64)
        n = self._ll.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._ll.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            raise EdgevisionError(f"llama_token_to_piece failed for token {token}")
        return buf.raw[:n]

    def pieces(self, tokens: Iterable[int], *, special: bool = False) -> Iterator[str]:
        """Text of a token stream, piece by piece; a UTF-8 character split across tokens comes out whole
        with the token that completes it."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for token in tokens:
            piece = decoder.decode(self.token_bytes(token, special=special))
            if piece:
                yield piece
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        """Text of `tokens`; control tokens (BOS, turn markers) are rendered only if `special`."""
        return "".join(self.pieces(tokens, special=special))

    # -- prefill ----------------------------------------------------------------------------------

    def _check_room(self, n: int) -> None:
        if self._n_past + n > self._n_ctx:
            raise InputError(
                f"the prompt needs {self._n_past + n} positions but the decoder context holds {self._n_ctx}; "
                "shorten the prompt or the image, or raise the decoder's n_ctx"
            )

    def _decode(self, batch: Any, views: dict[str, np.ndarray], n: int) -> None:
        views["pos"][:n] = np.arange(self._n_past, self._n_past + n, dtype=np.int32)
        views["logits"][:n] = 0
        views["logits"][n - 1] = 1
        batch.n_tokens = n
        self._cb_error = None
        capturing = False
        if self._node_filter is not None:  # the observer may want other nodes now (e.g. after its first graph)
            self._set_node_prefix()
            capturing = bool(getattr(self._cb_eval, "captures", False))
            self._node_filter.set_capture(capturing)
        rc = self._ll.llama_decode(self._ctx, batch)
        captured = self._node_filter.take() if capturing else []  # type: ignore[union-attr]
        if self._cb_error is not None:
            error, self._cb_error = self._cb_error, None
            self._resync()
            raise error
        if rc != 0:
            self._resync()
            if rc == _DECODE_NO_SLOT:
                raise InputError(
                    f"no room in the KV cache for {n} more tokens at position {self._n_past}; "
                    "raise the decoder's n_ctx or reset it"
                )
            if rc == _DECODE_ABORTED:
                raise EdgevisionError("llama_decode was aborted")
            raise EdgevisionError(f"llama_decode failed with code {rc} ({n} inputs at position {self._n_past})")
        self._n_past += n
        self._has_logits = True
        if captured:  # the nodes the C filter copied during the decode, for the observer (its ``captures``)
            self._cb_eval.captured(captured)  # type: ignore[union-attr]

    def _resync(self) -> None:
        """After a failed decode, take the cache's own view of how many positions it holds."""
        self.sync_after_native_decode(has_logits=False)

    @property
    def native_handles(self) -> tuple[Any, Any]:
        """The raw ``llama_model*`` and ``llama_context*``, for native companions (llama.cpp's mtmd) that decode
        into this decoder's context; the decoder still owns and frees them. Call `sync_after_native_decode`
        after such a decode."""
        self._live()
        return self._model, self._ctx

    def sync_after_native_decode(self, *, has_logits: bool) -> None:
        """Take the KV cache's own count of the positions it holds, after native code decoded into the context;
        `has_logits` says whether that decode left logits for its last position."""
        self._n_past = self._ll.llama_memory_seq_pos_max(self._mem, _SEQ) + 1
        self._has_logits = has_logits

    def prefill_tokens(self, tokens: Sequence[int]) -> None:
        """Decode `tokens` at the next positions, in n_batch chunks; logits are kept for the last one."""
        self._live()
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            return
        bad = ids[(ids < 0) | (ids >= self._n_vocab)]
        if bad.size:
            raise InputError(f"token id {int(bad[0])} is outside the vocabulary (0..{self._n_vocab - 1})")
        self._check_room(ids.size)
        for start in range(0, ids.size, self._n_batch):
            chunk = ids[start : start + self._n_batch]
            self._tok["token"][: chunk.size] = chunk
            self._decode(self._tok_batch, self._tok, chunk.size)

    def prefill_embeddings(self, embeddings: np.ndarray, *, causal: bool = True) -> None:
        """Decode raw input rows (e.g. image embeddings) at the next positions.

        `embeddings` has shape ``(n, n_embd)`` and is used as float32. Rows bypass the token embedding table
        and Gemma's ``sqrt(n_embd)`` input scaling (see the module docstring), so they must already be at
        the scale of ``token_embd[id] * sqrt(n_embd)``. With ``causal=False`` the rows attend to each other
        in both directions (Gemma 3's image tokens); then all `n` rows must fit in one batch.
        """
        self._live()
        rows = np.asarray(embeddings)
        if rows.ndim != 2 or rows.shape[1] != self._n_embd:
            raise InputError(
                f"image embeddings have shape {rows.shape}, the decoder {self.path.name} takes rows of width "
                f"{self._n_embd}; the vision tower was exported for another decoder"
            )
        if rows.shape[0] == 0:
            return
        if not np.issubdtype(rows.dtype, np.floating) or not np.isfinite(rows).all():
            raise InputError("image embeddings are not finite floating-point numbers; check the vision tower")
        if not causal and rows.shape[0] > self._n_batch:
            raise InputError(
                f"{rows.shape[0]} embedding rows with non-causal attention must be decoded in one batch but "
                f"n_batch is {self._n_batch}; raise the decoder's n_batch"
            )
        self._check_room(rows.shape[0])
        if self._embd_batch is None:
            self._embd_batch, self._embd = self._new_batch(self._n_embd)
        if not causal:
            self._ll.llama_set_causal_attn(self._ctx, False)
        try:
            for start in range(0, rows.shape[0], self._n_batch):
                chunk = rows[start : start + self._n_batch]
                self._embd["embd"][: chunk.shape[0]] = chunk  # casts to float32
                self._decode(self._embd_batch, self._embd, chunk.shape[0])
        finally:
            if not causal:
                self._ll.llama_set_causal_attn(self._ctx, True)

    # -- output -----------------------------------------------------------------------------------

    def logits(self) -> np.ndarray:
        """A copy of the next-token logits after the last decoded position, shape ``(n_vocab,)``."""
        self._live()
        if not self._has_logits:
            raise EdgevisionError("no logits: prefill something after creating, resetting or truncating")
        ptr = self._ll.llama_get_logits_ith(self._ctx, -1)
        if not ptr:
            raise EdgevisionError("llama_get_logits_ith returned no logits")
        return np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)).copy()

    def generate(
        self, max_tokens: int, *, temperature: float = 0.0, stop_on_eog: bool = True, seed: int | None = None
    ) -> Iterator[str]:
        """Stream the continuation of what was prefilled, as decoded text pieces.

        Greedy at ``temperature <= 0``, otherwise sampled with `seed` (default: the decoder's seed; the same
        seed and prompt give the same text). Stops after `max_tokens`, at an end-of-generation token
        (unless ``stop_on_eog=False``) or when the context is full. Each piece is yielded before its token
        is decoded, so the KV cache holds the prompt and every generated token but the last.
        """
        self._live()
        if not self._has_logits:
            raise EdgevisionError("nothing to continue: prefill a prompt before generating")
        tokens = self._sample(max_tokens, temperature, stop_on_eog, self._seed if seed is None else seed)
        try:
            yield from self.pieces(tokens)
        finally:
            tokens.close()  # frees the sampler now, also when the caller stops early

    def _sample(self, max_tokens: int, temperature: float, stop_on_eog: bool, seed: int) -> Iterator[int]:
        ll = self._ll
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        if not chain:
            raise EdgevisionError("llama_sampler_chain_init failed")
        try:
            if temperature > 0:
                ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(temperature))
                ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(seed))
            else:
                ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
            for i in range(max_tokens):
                token = ll.llama_sampler_sample(chain, self._ctx, -1)
                if stop_on_eog and self.is_eog(token):
                    return
                yield token
                if i == max_tokens - 1:
                    return
                if self._n_past >= self._n_ctx:
                    logger.warning("decoder context full (%d positions); the answer is cut short", self._n_ctx)
                    return
                self._tok["token"][0] = token
                self._decode(self._tok_batch, self._tok, 1)
        finally:
            ll.llama_sampler_free(chain)

    # -- cache ------------------------------------------------------------------------------------

    def truncate(self, n_past: int) -> int:
        """Drop every position from `n_past` on, keeping the prefix before it for reuse.

        Returns the number of positions kept: `n_past`, or 0 when the cache no longer holds what the prefix
        needs (a sliding-window cache with ``swa_full=False`` that has overwritten it) and was cleared, in
        which case the caller prefills the prefix again. When positions were dropped, logits are
        unavailable until the next prefill.
        """
        self._live()
        if not 0 <= n_past <= self._n_past:
            raise ValueError(f"cannot truncate to {n_past}: the cache holds positions 0..{self._n_past - 1}")
        if n_past == 0:
            self.reset()
            return 0
        if n_past < self._n_past:
            # a sliding-window cache keeps a contiguous [oldest, n_past) range; the next position needs the
            # window before it. Check before removing: an emptied window would report nothing missing.
            oldest = self._ll.llama_memory_seq_pos_min(self._mem, _SEQ)
            needed = max(0, n_past - self._n_swa + 1) if self._n_swa > 0 else 0
            ok = self._ll.llama_memory_seq_rm(self._mem, _SEQ, n_past, -1)
            if not ok or oldest > needed:
                logger.debug("cache cannot keep %d positions (oldest held: %d); clearing it", n_past, oldest)
                self.reset()
                return 0
            self._n_past = n_past
            self._has_logits = False
        return n_past

    def reset(self) -> None:
        """Empty the KV cache."""
        self._live()
        self._ll.llama_memory_clear(self._mem, True)
        self._n_past = 0
        self._has_logits = False


def _available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def embedding_scale(n_embd: int) -> float:
    """Gemma's token input scale ``sqrt(n_embd)``, in float32 as llama.cpp computes it (``sqrtf``)."""
    return float(np.float32(math.sqrt(n_embd)))
