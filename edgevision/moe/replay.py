"""``edgevision bench policy``: record real routing, replay it through the replacement policies.

The routing of a model on a set of questions (every ``llama_decode`` call: prompt prefills and single-token
decode steps) is recorded with a `PredictingObserver`: for each step and MoE layer, the experts selected (the
union over the step's rows) and the experts predicted for it from the previous MoE layer's router input. The
calibration questions give the prior (each expert's share of its layer's selections); the held-out questions'
trace is then replayed through the expert LRU, the router-aware `ScoredCache` (prior + decayed counts, with
and without predicted-routing hints) and Belady's optimum, at the same expert capacity. Hit rate and bytes
read per step say what each piece of the policy buys before any of it touches a disk; the on-disk comparison
is ``edgevision bench moe``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgevision.moe.cache import BeladyCache, LruCache, ScoredCache, SimResult, simulate

MIB = 2**20


@dataclass
class RoutingTrace:
    layers: tuple[int, ...]  # MoE layers, in order
    n_expert: int
    steps: list[list[list[int]]]  # [step][i] selected ids of layers[i]
    predicted: list[list[list[int]]]  # [step][i] ids predicted for layers[i] from the layer before (i > 0)
    rows: list[int]  # [step] rows (tokens) in the step: 1 for a decode step

    def shares(self) -> np.ndarray:
        """(n_layer_total, n_expert) share of each layer's selections (rows of non-MoE layers 0)."""
        out = np.zeros((max(self.layers) + 1, self.n_expert))
        for step in self.steps:
            for i, ids in enumerate(step):
                out[self.layers[i], ids] += 1
        total = out.sum(axis=1, keepdims=True)
        return np.divide(out, total, out=np.zeros_like(out), where=total > 0)


def record_trace(
    model: str | os.PathLike[str], questions: Sequence[str], *, tokens: int = 16, n_threads: int = 1, seed: int = 0
) -> RoutingTrace:
    """Decode each question for `tokens` steps, sampling at temperature 1 (as `edgevision bench moe`'s
    reference continuation: greedy decoding of a synthetic model repeats itself and flatters every cache),
    and record its routing."""
    from edgevision.decoder.llama import LlamaDecoder
    from edgevision.decoder.prompt import GEMMA4, build_turn, run_prompt
    from edgevision.moe.calibrate import SYSTEM_PROMPT
    from edgevision.moe.predict import PredictingObserver, RoutePredictor

    observer = PredictingObserver.for_model(model)
    predictor = RoutePredictor.from_gguf(model)
    layers = predictor.moe_layers
    position = {layer: i for i, layer in enumerate(layers)}
    steps: list[list[list[int]]] = []
    predicted: list[list[list[int]]] = []
    rows: list[int] = []
    current: dict[str, list[list[int]]] = {}

    def on_ids(layer: int, ids: np.ndarray, _weights: np.ndarray) -> None:
        if layer == layers[0]:
            current["ids"] = [[] for _ in layers]
            current["pred"] = [[] for _ in layers]
            steps.append(current["ids"])
            predicted.append(current["pred"])
            rows.append(int(ids.shape[0]))
        current["ids"][position[layer]] = sorted(set(ids.ravel().tolist()))

    def on_hidden(layer: int, hidden: np.ndarray) -> None:
        nxt = predictor.ahead(layer, 1)
        if nxt and hidden.shape[0] == 1:  # single-token steps only, as the policy does
            guess = predictor.predict(layer, hidden, nxt[0])
            current["pred"][position[nxt[0]]] = sorted(set(guess.ravel().tolist()))

    observer.listeners.append(on_ids)
    observer.hidden_listeners.append(on_hidden)
    with LlamaDecoder(model, n_ctx=512, n_threads=n_threads, cb_eval=observer) as decoder:
        for i, question in enumerate(questions):
            decoder.reset()
            run_prompt(decoder, build_turn(question, system=SYSTEM_PROMPT, fmt=GEMMA4).segments)
            rng = np.random.default_rng([seed, i])
            for _ in range(tokens):
                z = decoder.logits().astype(np.float64)
                p = np.exp(z - z.max())
                decoder.prefill_tokens([int(rng.choice(p.size, p=p / p.sum()))])
    return RoutingTrace(tuple(layers), observer.n_expert, steps, predicted, rows)


def compare_policies(
    trace: RoutingTrace, prior: np.ndarray, expert_bytes: Sequence[int], capacity: int, **scored: float
) -> list[SimResult]:
    """Replay `trace` through each policy at `capacity` bytes of experts; hits are counted on the single-token
    decode steps (a prefill's union covers most experts whatever the policy)."""
    layers = trace.layers
    counted = [rows == 1 for rows in trace.rows]
    results = [
        simulate("expert LRU", LruCache(capacity, expert_bytes), trace.steps, layers, expert_bytes, counted=counted)
    ]
    results.append(
        simulate(
            "router-aware, recency only",
            ScoredCache(capacity, expert_bytes, prior, prior_tokens=0.0, **scored),
            trace.steps,
            layers,
            expert_bytes,
            counted=counted,
        )
    )
    results.append(
        simulate(
            "router-aware (prior + recency)",
            ScoredCache(capacity, expert_bytes, prior, **scored),
            trace.steps,
            layers,
            expert_bytes,
            counted=counted,
        )
    )
    results.append(
        simulate(
            "router-aware + predicted routing",
            ScoredCache(capacity, expert_bytes, prior, **scored),
            trace.steps,
            layers,
            expert_bytes,
            predictions=trace.predicted,
            counted=counted,
        )
    )
    belady = BeladyCache(capacity, expert_bytes, trace.steps, layers)
    results.append(simulate("Belady (optimal)", belady, trace.steps, layers, expert_bytes, counted=counted))
    return results


def bench_policy(
    model: str | os.PathLike[str],
    *,
    calibration: str | os.PathLike[str] = "calibration",
    heldout: str = "heldout.txt",
    fractions: Sequence[float] = (0.3, 0.45, 0.6),
    tokens: int = 16,
    n_threads: int = 1,
) -> str:
    """Record the calibration and held-out routing of `model` and print the policies side by side."""
    from edgevision.moe.calibrate import read_questions
    from edgevision.moe.layout import read_layout

    layout = read_layout(model)
    folder = Path(calibration)
    calib = record_trace(model, read_questions(folder / "prompts.txt"), tokens=tokens, n_threads=n_threads)
    held = record_trace(model, read_questions(folder / heldout), tokens=tokens, n_threads=n_threads)
    prior = calib.shares()
    expert_bytes = [layout.expert_bytes(layer) if layer in layout.moe_layers else 0 for layer in range(prior.shape[0])]
    total = sum(layout.expert_bytes(layer) * layout.n_expert for layer in layout.moe_layers)
    recall = predicted_recall(held)
    decode_steps = sum(1 for n in held.rows if n == 1)
    lines = [
        (
            f"edgevision bench policy: {Path(model).name}: {len(layout.moe_layers)} MoE layers x {layout.n_expert} "
            f"experts (top {layout.n_expert_used}), experts {total / MIB:.0f} MiB"
        ),
        (
            f"prior: selections on {folder}/prompts.txt ({len(calib.steps)} steps); replayed: {folder}/{heldout} "
            f"({len(held.steps)} steps, {decode_steps} of them single-token decode steps, {tokens} per question)"
        ),
        (
            f"predicted routing (next MoE layer's router on this layer's input): recall {100 * recall:.1f}% of the "
            f"selected experts (chance {100 * layout.n_expert_used / layout.n_expert:.1f}%)"
        ),
        "",
        f"{'capacity':>9} {'policy':<34} {'hit rate':>8} {'MiB read/token':>14}",
    ]
    for fraction in fractions:
        capacity = int(fraction * total)
        for result in compare_policies(held, prior, expert_bytes, capacity):
            lines.append(
                f"{100 * fraction:>8.0f}% {result.name:<34} {100 * result.hit_rate:>7.1f}% "
                f"{result.bytes_per_token / MIB:>14.2f}"
            )
    lines.append(
        "capacity: share of all experts' bytes the cache may hold. Every step (a prompt prefill or one generated "
        "token) goes through the cache; hits, misses and bytes read are counted over the generated tokens. With "
        "predicted routing an expert read ahead on a prediction counts as a hit when selected, and its bytes as "
        "read whether or not it was."
    )
    return "\n".join(lines)


def predicted_recall(trace: RoutingTrace) -> float:
    """Share of the experts selected in single-token steps that the previous layer's prediction named."""
    hit = total = 0
    for rows, step, guesses in zip(trace.rows, trace.steps, trace.predicted, strict=True):
        if rows != 1:
            continue
        for ids, guess in zip(step[1:], guesses[1:], strict=True):
            hit += len(set(ids) & set(guess))
            total += len(ids)
    return hit / total if total else 0.0
