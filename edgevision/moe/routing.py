"""``edgevision bench routing``: how a MoE model routes, in the figures published for real models.

The questions of a calibration folder's ``prompts.txt`` (the calibration set) and ``heldout.txt`` (the
held-out set) go through the model as text, each answer generated greedily for a few tokens, while a
`RouterObserver` records every layer's choice for the generated tokens (the decode steps ``edgevision bench
moe`` times; the prompts share one long system prompt, which would make any two sets look alike). Per set it
reports:

- static skew: the share of each layer's gate mass its hottest quarter of experts carries;
- temporal locality: per-layer LRU hit rates over the generated tokens with room for 12.5 %, 18.75 % and
  25 % of the layer's experts, and Belady's (optimal) hit rate at 25 % beside them;
- transfer: how much of the held-out set's gate mass the calibration set's hottest quarter carries, beside
  the held-out set's own hottest quarter and a uniform quarter (0.25);
- image-like rows (for models made with topics: rows carrying the image channel, as `tools/make_synthetic.py`
  writes them): their hottest quarter and how many of their hottest quarter are also the text's.

The published figures the synthetic presets aim at are in `PUBLISHED` (from llama.cpp PR 27861's traces).
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgevision.moe.policy import RoutingTrace, simulate

PUBLISHED = (
    "published (llama.cpp PR 27861): hottest quarter of experts 0.41-0.67 of gate mass (OLMoE-1B-7B), "
    "~0.71 (DeepSeek-V4-Flash); per-layer LRU hit rate with 12.5% of experts ~0.67 and 25% ~0.81 (a 512-expert "
    "Qwen), 18.75% ~0.63 (Gemma 4 26B-A4B); a hot list learned on half a workload covers little of the other half"
)
LRU_ROOM = (0.125, 0.1875, 0.25)
IMAGE_ROWS = 64
# as tools/make_synthetic.py writes a model's reserved channels (its BIAS_CHANNEL_VALUE)
_RESERVED_VALUE = 4.0


@dataclass(frozen=True)
class SetRouting:
    """One question set's routing."""

    mass: np.ndarray  # (n_layer, n_expert) gate mass over the generated tokens
    generated: RoutingTrace  # the generated tokens' choices, in order

    def hottest_quarter(self) -> np.ndarray:
        """Per MoE layer, the share of gate mass its hottest quarter of experts carries."""
        return hottest_share(self.mass, 0.25)

    def lru(self, room: float, kind: str = "lru") -> np.ndarray:
        """Per MoE layer, the hit rate of a per-layer cache with room for `room` of the layer's experts."""
        n_expert = self.mass.shape[1]
        capacity = max(1, round(room * n_expert))
        return np.array([simulate(self.generated, capacity, kind, layer=layer).rate for layer in self.layers])

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(int(i) for i in np.flatnonzero(self.mass.sum(axis=1)))


def hottest_share(mass: np.ndarray, fraction: float) -> np.ndarray:
    rows = mass[mass.sum(axis=1) > 0]
    top = max(1, round(fraction * mass.shape[1]))
    ordered = np.sort(rows, axis=1)[:, ::-1]
    return ordered[:, :top].sum(axis=1) / rows.sum(axis=1)


def covered_by(plan_mass: np.ndarray, mass: np.ndarray, fraction: float = 0.25) -> np.ndarray:
    """Per layer, the share of `mass` carried by the hottest `fraction` of experts of `plan_mass`."""
    keep = mask_hottest(plan_mass, fraction)
    rows = mass.sum(axis=1) > 0
    return (np.where(keep, mass, 0).sum(axis=1) / np.maximum(mass.sum(axis=1), 1e-30))[rows]


def mask_hottest(mass: np.ndarray, fraction: float) -> np.ndarray:
    top = max(1, round(fraction * mass.shape[1]))
    order = np.argsort(-mass, axis=1, kind="stable")[:, :top]
    keep = np.zeros(mass.shape, dtype=bool)
    np.put_along_axis(keep, order, True, axis=1)
    return keep


def route_questions(
    model: str | os.PathLike[str],
    questions: tuple[str, ...],
    *,
    tokens: int = 16,
    n_threads: int = 0,
    image_rows: int = 0,
) -> tuple[SetRouting, np.ndarray | None]:
    """Each question as text, `tokens` generated greedily; then (optionally) `image_rows` image-like rows.
    Returns the set's routing and the image rows' gate mass (None without image rows or image channel)."""
    from edgevision.decoder.llama import LlamaDecoder
    from edgevision.decoder.prompt import GEMMA4, build_turn
    from edgevision.moe.calibrate import SYSTEM_PROMPT
    from edgevision.moe.router import RouterObserver, observe_turn

    observer = RouterObserver.for_model(model)
    events: list[tuple[int, tuple[int, ...]]] = []
    mass = np.zeros((observer.n_layer, observer.n_expert))
    image_mass = None
    phase = {"now": "prompt"}

    def listen(layer: int, ids: np.ndarray, weights: np.ndarray) -> None:
        if phase["now"] == "image":
            np.add.at(image_mass, (layer, ids.ravel()), weights.ravel())
            return
        if phase["now"] == "generated":
            np.add.at(mass, (layer, ids.ravel()), weights.ravel())
            events.append((layer, tuple(int(e) for e in np.unique(ids))))

    observer.listeners.append(listen)
    with ExitStack() as stack:
        decoder = stack.enter_context(
            LlamaDecoder(model, n_ctx=1024, n_batch=512, n_threads=n_threads, cb_eval=observer)
        )
        for question in questions:
            decoder.reset()
            phase["now"] = "prompt"
            observe_turn(decoder, observer, build_turn(question, system=SYSTEM_PROMPT, fmt=GEMMA4).segments)
            phase["now"] = observer.phase = "generated"
            sample_continuation(decoder, tokens, seed=len(events))
        channel = _image_channel(model)
        if image_rows and channel is not None:
            image_mass = np.zeros_like(mass)
            decoder.reset()
            phase["now"] = observer.phase = "image"
            decoder.prefill_embeddings(_image_rows(decoder.n_embd, channel, image_rows))
    return SetRouting(mass, RoutingTrace(tuple(events))), image_mass


def sample_continuation(decoder: object, tokens: int, *, seed: int, temperature: float = 1.0) -> list[int]:
    """Decode `tokens` tokens sampled at `temperature` (seeded), as a user's answers are sampled; returns them.
    The synthetic models' greedy continuations fall into one-token loops that would fake temporal locality."""
    rng = np.random.default_rng(seed)
    out = []
    for step in range(tokens):
        logits = decoder.logits().astype(np.float64) / temperature  # type: ignore[attr-defined]
        p = np.exp(logits - logits.max())
        token = int(rng.choice(p.size, p=p / p.sum()))
        out.append(token)
        if step < tokens - 1:
            decoder.prefill_tokens([token])  # type: ignore[attr-defined]
    return out


def _image_channel(model: str | os.PathLike[str]) -> int | None:
    import gguf

    field = gguf.GGUFReader(model).get_field("edgevision.synthetic.image_channel")
    return None if field is None else int(field.contents())


def _image_rows(n_embd: int, channel: int, n: int) -> np.ndarray:
    rows = np.random.default_rng(0x1A6E).standard_normal((n, n_embd)).astype(np.float32)
    rows[:, : channel + 1] = 0.0
    rows[:, 0] = rows[:, channel] = _RESERVED_VALUE
    return rows


@dataclass(frozen=True)
class RoutingReport:
    calibration: SetRouting
    heldout: SetRouting
    image_mass: np.ndarray | None

    def lines(self, name: str) -> list[str]:
        out = [f"edgevision bench routing: {name}", PUBLISHED, ""]
        for label, routing in (("calibration", self.calibration), ("held-out", self.heldout)):
            top = routing.hottest_quarter()
            lru = "  ".join(f"LRU {100 * room:g}%: {_span(routing.lru(room))}" for room in LRU_ROOM)
            out.append(
                f"{label:<12} hottest quarter {_span(top)}  {lru}  Belady 25%: {_span(routing.lru(0.25, 'belady'))}"
            )
        transfer = covered_by(self.calibration.mass, self.heldout.mass)
        own = self.heldout.hottest_quarter()
        out.append(
            f"transfer: the calibration set's hottest quarter carries {_span(transfer)} of the held-out gate mass "
            f"(the held-out set's own hottest quarter {_span(own)}, a uniform quarter 0.25)"
        )
        if self.image_mass is not None:
            text_hot = mask_hottest(self.calibration.mass + self.heldout.mass, 0.25)
            image_hot = mask_hottest(self.image_mass, 0.25)
            rows = self.image_mass.sum(axis=1) > 0
            shared = (text_hot & image_hot)[rows].sum(axis=1) / image_hot[rows].sum(axis=1)
            out.append(
                f"image-like rows ({IMAGE_ROWS}): hottest quarter {_span(hottest_share(self.image_mass, 0.25))}; "
                f"{_span(shared)} of their hottest quarter is also the text's"
            )
        out.append("(figures: mean over MoE layers, min-max in brackets; LRU/Belady over the generated tokens)")
        return out


def _span(values: np.ndarray) -> str:
    return f"{values.mean():.2f} [{values.min():.2f}-{values.max():.2f}]"


def routing_report(
    model: str | os.PathLike[str],
    calibration: str | os.PathLike[str] = "calibration",
    *,
    tokens: int = 16,
    n_threads: int = 0,
) -> RoutingReport:
    from edgevision.moe.calibrate import read_questions

    folder = Path(calibration)
    cal, image_mass = route_questions(
        model, read_questions(folder / "prompts.txt"), tokens=tokens, n_threads=n_threads, image_rows=IMAGE_ROWS
    )
    held, _ = route_questions(model, read_questions(folder / "heldout.txt"), tokens=tokens, n_threads=n_threads)
    return RoutingReport(cal, held, image_mass)
