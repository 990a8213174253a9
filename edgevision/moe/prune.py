"""Router-weighted expert pruning (REAP) and the quality report that goes with it.

Saliency of expert j in a layer, over the calibration set (REAP, arXiv:2510.13999, eq. 9):

    S_j = mean over the tokens routed to j of  g_j(x) * ||f_j(x)||_2

where g_j is the gate weight the router gave j (``ffn_moe_weights_norm``) and f_j(x) the expert's output
before it is weighted (``ffn_moe_down_scaled``: the down projection after Gemma 4's per-expert scale). Both
are read from llama.cpp's graph while the calibration set runs, so the saliency is of exactly what the
model computes (any quantization included). An expert never selected has saliency 0. Each layer keeps its
highest-scoring experts; ties go to the one with more gate mass, then the lower id.

The default ranking, ``reap-sum``, is that saliency summed instead of averaged over the calibration tokens
(routing frequency x REAP): REAP's mean says how much an expert matters when it runs, not how often it runs,
so on its own it can keep a rarely routed expert over a busy one. The paper's mean (``reap``) and the plain
gate mass (``mass``) stay selectable; see `CRITERIA` and the README for how they compared.

`compare_models` measures what pruning cost on held-out prompts: the two models are fed the same tokens
(the prompt, then the unpruned model's greedy answer) and at every answer position the top-1 next token is
compared and the KL divergence KL(unpruned || pruned) of the next-token distributions computed.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgevision.errors import InputError
from edgevision.moe.router import RouterObserver, strided_array

logger = logging.getLogger(__name__)

# ffn_moe_down is renamed ffn_moe_down_scaled when the model has per-expert output scales (Gemma 4)
_OUTPUT_NODES = ("ffn_moe_down_scaled-", "ffn_moe_down-")
# what ranks the experts unless told otherwise, one of CRITERIA
DEFAULT_CRITERION = "reap-sum"


class SaliencyObserver(RouterObserver):
    """A `RouterObserver` that also reads each selected expert's output and accumulates REAP saliency."""

    def __init__(self, n_layer: int, n_expert: int, n_expert_used: int) -> None:
        self._last: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        super().__init__(n_layer, n_expert, n_expert_used)
        self._outputs = {f"{prefix}{il}".encode(): il for prefix in _OUTPUT_NODES for il in range(n_layer)}
        self._wanted.update(self._outputs)
        self.listeners.append(self._remember)

    def reset(self) -> None:
        super().reset()
        self.reap_sum = np.zeros((self.n_layer, self.n_expert))
        self.routed = np.zeros((self.n_layer, self.n_expert), dtype=np.int64)
        self._last.clear()

    @classmethod
    def for_model(cls, gguf_path: str | os.PathLike[str]) -> SaliencyObserver:
        observer = RouterObserver.for_model(gguf_path)
        return cls(observer.n_layer, observer.n_expert, observer.n_expert_used)

    def _remember(self, layer: int, ids: np.ndarray, weights: np.ndarray) -> None:
        self._last[layer] = (ids, weights)

    def _other_node(self, name: bytes, tensor: int) -> None:
        self._expert_outputs(self._outputs[name], tensor)

    def _expert_outputs(self, layer: int, tensor: int) -> None:
        ids, weights = self._last.pop(layer, (None, None))
        if ids is None:
            return
        outputs = strided_array(tensor, self._buffers, (layer, 2))  # (T * k, n_embd): ggml [n_embd, k, T]
        norms = np.linalg.norm(outputs.astype(np.float64), axis=1).reshape(ids.shape)
        flat = ids.ravel()
        self.reap_sum[layer] += np.bincount(
            flat, weights=(weights.astype(np.float64) * norms).ravel(), minlength=self.n_expert
        )
        self.routed[layer] += np.bincount(flat, minlength=self.n_expert)

    @property
    def saliency(self) -> np.ndarray:
        """(n_layer, n_expert) REAP saliency; 0 for experts never routed to."""
        return np.divide(self.reap_sum, self.routed, out=np.zeros_like(self.reap_sum), where=self.routed > 0)

    def scores(self, criterion: str = DEFAULT_CRITERION) -> np.ndarray:
        """(n_layer, n_expert) what pruning ranks experts by, see `CRITERIA`."""
        match criterion:
            case "reap":
                return self.saliency
            case "reap-sum":
                return self.reap_sum.copy()
            case "mass":
                return self.mass.sum(axis=0)
        raise InputError(f"unknown pruning criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")


CRITERIA = {
    "reap-sum": "REAP saliency summed over tokens: routing frequency x mean gate x output norm (how much it "
    "matters overall)",
    "reap": "REAP as the paper defines it: mean over routed tokens of gate x output norm (how much an expert "
    "matters when it runs)",
    "mass": "total gate weight the router gave it (frequency, weighted by gate)",
}


def choose_experts(saliency: np.ndarray, keep: int, mass: np.ndarray | None = None) -> np.ndarray:
    """(n_layer, keep) ids of each layer's most salient experts, ascending. Ties: more mass, then lower id."""
    n_layer, n_expert = saliency.shape
    if not 0 < keep <= n_expert:
        raise InputError(f"cannot keep {keep} of {n_expert} experts per layer")
    mass = np.zeros_like(saliency) if mass is None else mass
    ids = np.arange(n_expert)
    order = [np.lexsort((ids, -mass[il], -saliency[il]))[:keep] for il in range(n_layer)]
    return np.sort(np.stack(order), axis=1)


def keep_for_budget(info, budget: int) -> int:
    """The most experts per layer whose pruned file fits `budget` bytes."""
    for keep in range(info.n_expert, info.n_expert_used - 1, -1):
        if info.pruned_size(keep) <= budget:
            return keep
    raise InputError(
        f"a budget of {budget / 2**20:.1f} MiB is too small for {info.path.name}: keeping the minimum of "
        f"{info.n_expert_used} experts per layer still takes {info.pruned_size(info.n_expert_used) / 2**20:.1f} MiB"
    )


def parse_size(text: str) -> int:
    """'6.5MiB', '800M', '2G', '123456' → bytes (K/M/G are binary, as memory budgets are)."""
    units = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    raw = text.strip().lower().removesuffix("b").removesuffix("i")
    number, unit = (raw[:-1], raw[-1]) if raw and raw[-1] in units else (raw, "")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise InputError(f"cannot read {text!r} as a size; write e.g. 800MiB or 6.5G") from None
    if value <= 0:
        raise InputError(f"a size must be positive, got {text!r}")
    return int(value)


@dataclass(frozen=True)
class Quality:
    """Pruned against unpruned on held-out prompts."""

    positions: int
    agreement: float  # share of positions where both models' most likely next token is the same
    mean_kl: float  # mean KL(unpruned || pruned) of the next-token distributions, in nats
    max_kl: float

    def __str__(self) -> str:
        return (
            f"top-1 next-token agreement {self.agreement:.1%} over {self.positions} positions; "
            f"mean KL {self.mean_kl:.4f} nats (max {self.max_kl:.4f})"
        )


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max()
    return z - math.log(np.exp(z).sum())


def compare_models(
    reference: str | os.PathLike[str],
    candidate: str | os.PathLike[str],
    questions: Iterable[str],
    *,
    max_tokens: int = 24,
    n_threads: int = 0,
    image_rows: Sequence[np.ndarray | None] | None = None,
) -> Quality:
    """Feed both decoders the same tokens (each question's prompt, then the reference's greedy answer) and
    compare their next-token distributions at the last prompt position and every answer position."""
    from edgevision.decoder.llama import LlamaDecoder
    from edgevision.decoder.prompt import GEMMA4, build_turn, run_prompt

    agree, kls = 0, []
    with (
        LlamaDecoder(reference, n_ctx=1024, n_batch=1024, n_threads=n_threads) as ref,
        LlamaDecoder(candidate, n_ctx=1024, n_batch=1024, n_threads=n_threads) as cand,
    ):
        for i, question in enumerate(questions):
            rows = image_rows[i % len(image_rows)] if image_rows else None
            turn = build_turn(question, image_tokens=0 if rows is None else len(rows), fmt=GEMMA4)
            for decoder in (ref, cand):
                decoder.reset()
                run_prompt(decoder, turn.segments, rows)
            for step in range(max_tokens):
                p, q = _log_softmax(ref.logits()), _log_softmax(cand.logits())
                top = int(np.argmax(p))
                agree += top == int(np.argmax(q))
                kls.append(float(np.sum(np.exp(p) * (p - q))))
                if step == max_tokens - 1 or ref.n_past >= ref.n_ctx:
                    break
                ref.prefill_tokens([top])
                cand.prefill_tokens([top])
    if not kls:
        raise InputError("no held-out questions to compare the models on")
    return Quality(len(kls), agree / len(kls), float(np.mean(kls)), float(np.max(kls)))


def saliency_table(saliency: np.ndarray, kept: np.ndarray) -> str:
    """Per layer: kept experts, dropped ones, and the share of the ranking score dropped."""
    lines = [f"{'layer':>5}  {'dropped score':>13}  dropped experts"]
    for il in range(saliency.shape[0]):
        dropped = sorted(set(range(saliency.shape[1])) - set(kept[il].tolist()))
        total = saliency[il].sum()
        share = saliency[il, dropped].sum() / total if total > 0 else 0.0
        shown = " ".join(map(str, dropped[:24])) + (" ..." if len(dropped) > 24 else "")
        lines.append(f"{il:>5}  {share:>13.1%}  {shown or '-'}")
    return "\n".join(lines)


def prune_file(source: Path, out: Path, saliency: np.ndarray, keep: int, mass: np.ndarray | None = None) -> np.ndarray:
    """Write `source` with each layer's `keep` most salient experts to `out`; returns the kept ids."""
    from edgevision.moe.slicing import write_pruned

    kept = choose_experts(saliency, keep, mass)
    write_pruned(source, out, kept)
    return kept
