"""The stages of one answer, in pipeline order: one list for the assistant's clocks, the `ask` table, the
interaction record and the benchmarks, so a new stage is named once."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str  # the key in `Answer.timings` and in the interaction record
    label: str  # how `edgevision ask` prints it
    model: bool = True  # measured by the assistant's models (recorded with the stage durations)


STAGES: tuple[Stage, ...] = (
    Stage("recognition", "recognition", model=False),
    Stage("vision_encode", "vision_encode"),
    Stage("image_prefill", "image_prefill"),
    Stage("prefix_prefill", "prefix_prefill"),  # a follow-up's prompt prefix without a new image
    Stage("ocr", "ocr"),  # reading the text, in its own thread beside the two above
    Stage("ocr_wait", "ocr after vision"),  # how much longer the text took than the image
    Stage("text_prefill", "text_prefill"),
    Stage("first_token", "to first token"),
    Stage("first_audio", "to first audio"),
    Stage("total", "total", model=False),
)

MODEL_STAGES: tuple[str, ...] = tuple(stage.name for stage in STAGES if stage.model)
