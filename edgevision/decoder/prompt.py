"""Prompt assembly for one question about one camera frame, as segments the decoder prefills in order.

A turn is a tuple of `Text` and `Image` segments. The template's text is tokenized with special markers
parsed (so ``<start_of_turn>`` becomes its token id), the user's question as plain text; an `Image` stands for ``n_tokens`` rows of the vision tower's
output, injected as embeddings where it sits. The chat layout of a model family is a `ChatFormat`:

    Gemma 3:  <bos><start_of_turn>user\\n{system}\\n\\n{image}{question}<end_of_turn>\\n<start_of_turn>model\\n
    Gemma 4:  <bos><|turn>system\\n{system}<turn|>\\n<|turn>user\\n<|image>{image}<image|>{question}<turn|>\\n
              <|turn>model\\n<|channel>thought\\n<channel|>
    LLaVA:    <s>USER: {system}\\n\\n{image}\\n{question} ASSISTANT:
    ChatML:   <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{image}{question}<|im_end|>\\n
              <|im_start|>assistant\\n

Gemma has no system role, so the system prompt is folded into the first user turn as its chat template does.
The image goes before the question. A `Turn` keeps the reusable prefix (BOS, system prompt, image) apart from
the question, so a follow-up question can roll the decoder back to the prefix and skip the image.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from edgevision.errors import InputError


@dataclass(frozen=True)
class Text:
    """Prompt text. With `special` (the template's own text) markers such as ``<start_of_turn>`` in it are
    parsed into their token ids; without (what the user said or typed) they stay plain text, so a question
    cannot close its turn and write the model's part."""

    text: str
    special: bool = True


@dataclass(frozen=True)
class Image:
    """The place of one image: `n_tokens` embedding rows from the vision tower.

    `causal` False lets the image's rows attend to each other in both directions (Gemma 3 and the larger
    Gemma 4 models are trained that way); they are then decoded in one batch.
    """

    n_tokens: int
    causal: bool = True

    def __post_init__(self) -> None:
        if self.n_tokens < 1:
            raise ValueError(f"an image needs at least one token, got {self.n_tokens}")


Segment = Text | Image


@dataclass(frozen=True)
class ChatFormat:
    """How a model family lays out a chat turn.

    `image_start`/`image_end` are the hook for model-specific markers around an image's soft tokens; they
    are emitted as text (parsed into special tokens) directly before and after the `Image` segment.
    """

    name: str
    bos: str
    turn_start: str
    turn_end: str
    user_role: str = "user"
    model_role: str = "model"
    role_end: str = "\n"  # after the user (and system) role name
    model_role_end: str = "\n"  # after the model's role name
    system_role: str | None = None  # None: the system prompt opens the first user turn
    image_start: str = ""
    image_end: str = ""
    image_causal: bool = True
    answer_prefix: str = ""  # opens the model's answer after its role line (e.g. an empty thought channel)
    architectures: tuple[str, ...] = ()  # GGUF general.architecture values that `chat_format: auto` maps here
    template_marker: str = ""  # text in a GGUF's tokenizer.chat_template that marks this layout (checked first)
    causal_image_widths: tuple[int, ...] = ()  # decoder widths (n_embd) whose images attend causally after all


# Markers around the image follow Gemma 3's processor: "\n\n<start_of_image>" + soft tokens + "<end_of_image>\n\n";
# mtmd decodes Gemma 3 images with non-causal attention.
GEMMA3 = ChatFormat(
    name="gemma3",
    bos="<bos>",
    turn_start="<start_of_turn>",
    turn_end="<end_of_turn>\n",
    image_start="\n\n<start_of_image>",
    image_end="<end_of_image>\n\n",
    image_causal=False,
    architectures=("gemma3",),
)

# Gemma 4: a real system role, <|turn>/<turn|> markers and an empty thought channel when thinking is off
# (models/templates/google-gemma-4-31B-it.jinja). The image is <|image> + soft tokens + <image|> with nothing
# in between, exactly as llama.cpp's mtmd inserts them for projector gemma4v (mtmd.cpp: img_beg/img_end), at
# consecutive positions after the text. mtmd decodes the image non-causally for every Gemma 4 except E2B and
# E4B (n_embd 1536 / 2560, causal: use `image_causal_for`); tests/test_vision_fidelity.py checks the whole
# prompt against mtmd's own path token for token.
GEMMA4 = ChatFormat(
    name="gemma4",
    bos="<bos>",
    turn_start="<|turn>",
    turn_end="<turn|>\n",
    system_role="system",
    image_start="<|image>",
    image_end="<image|>",
    image_causal=False,
    answer_prefix="<|channel>thought\n<channel|>",
    architectures=("gemma4",),
    causal_image_widths=(1536, 2560),  # E2B, E4B
)

# LLaVA-1.5 (vicuna_v1 layout) and the MoE-LLaVA / LLaVA-GM models built on it: the image's rows replace
# the <image> placeholder at the start of the user's message, followed by a newline; no markers around it
# (mtmd adds none for projector mlp) and causal attention. The system prompt opens the user's message.
LLAVA = ChatFormat(
    name="llava",
    bos="<s>",
    turn_start="",
    turn_end=" ",
    user_role="USER:",
    model_role="ASSISTANT:",
    role_end=" ",
    model_role_end="",
    image_end="\n",
    image_causal=True,
)

# ChatML, the layout of instruction-tuned models such as SmolLM2 (its GGUF's tokenizer.chat_template): a real
# system role, no BOS, <|im_start|>/<|im_end|> around each turn. These models have no image markers of their own;
# the image's rows open the user's message and are decoded causally.
CHATML = ChatFormat(
    name="chatml",
    bos="",
    turn_start="<|im_start|>",
    turn_end="<|im_end|>\n",
    model_role="assistant",
    system_role="system",
    image_end="\n",
    image_causal=True,
    template_marker="<|im_start|>",
)

# The chat layouts `decoder.chat_format` can name. A new layout is one ChatFormat and one entry here; with
# `template_marker` or `architectures` set, `chat_format: auto` finds it for a GGUF.
FORMATS = {fmt.name: fmt for fmt in (GEMMA3, GEMMA4, LLAVA, CHATML)}


def format_for_model(architecture: str, chat_template: str = "") -> ChatFormat | None:
    """The registered layout whose marker the GGUF's chat template holds, else the one that claims its
    architecture, if any does."""
    by_template = (f for f in FORMATS.values() if f.template_marker and f.template_marker in chat_template)
    by_architecture = (f for f in FORMATS.values() if architecture in f.architectures)
    return next(by_template, None) or next(by_architecture, None)


def image_causal_for(fmt: ChatFormat, n_embd: int) -> ChatFormat:
    """`fmt` with the image attention mtmd uses for a decoder of width `n_embd` (Gemma 4 E2B/E4B: causal)."""
    if n_embd in fmt.causal_image_widths:
        return dataclasses.replace(fmt, image_causal=True)
    return fmt


@dataclass(frozen=True)
class Turn:
    """One question's prompt: a `prefix` that can be kept in the KV cache across follow-up questions about
    the same frame (BOS, system prompt, image) and the `question` part after it."""

    prefix: tuple[Segment, ...]
    question: tuple[Segment, ...]

    @property
    def segments(self) -> tuple[Segment, ...]:
        return self.prefix + self.question

    @property
    def image_tokens(self) -> int:
        return sum(s.n_tokens for s in self.segments if isinstance(s, Image))


def build_turn(question: str, *, image_tokens: int = 0, system: str = "", fmt: ChatFormat = GEMMA3) -> Turn:
    """The prompt asking `question` about an image of `image_tokens` embedding rows (0: no image)."""
    system, question = system.strip(), question.strip()
    head = fmt.bos
    if system and fmt.system_role is not None:
        head += f"{fmt.turn_start}{fmt.system_role}{fmt.role_end}{system}{fmt.turn_end}"
        system = ""
    head += f"{fmt.turn_start}{fmt.user_role}{fmt.role_end}"
    if system:
        head += f"{system}\n\n"
    prefix: list[Segment] = [Text(head)]
    if image_tokens:
        prefix += [Text(fmt.image_start), Image(image_tokens, causal=fmt.image_causal), Text(fmt.image_end)]
    tail = f"{fmt.turn_end}{fmt.turn_start}{fmt.model_role}{fmt.model_role_end}{fmt.answer_prefix}"
    return Turn(prefix=merge_text(prefix), question=merge_text([Text(question, special=False), Text(tail)]))


def merge_text(segments: Sequence[Segment]) -> tuple[Segment, ...]:
    """Join neighbouring `Text` segments of the same kind (template or user text) and drop empty ones."""
    out: list[Segment] = []
    for seg in segments:
        if isinstance(seg, Text):
            if not seg.text:
                continue
            if out and isinstance(out[-1], Text) and out[-1].special == seg.special:
                out[-1] = Text(out[-1].text + seg.text, special=seg.special)
                continue
        out.append(seg)
    return tuple(out)


class Prefiller(Protocol):
    """What `run_prompt` needs from a decoder (`LlamaDecoder` provides it)."""

    @property
    def n_past(self) -> int: ...

    def tokenize(self, text: str, *, add_special: bool = ..., parse_special: bool = ...) -> list[int]: ...

    def prefill_tokens(self, tokens: Sequence[int]) -> None: ...

    def prefill_embeddings(self, embeddings: np.ndarray, *, causal: bool = ...) -> None: ...


def run_prompt(decoder: Prefiller, segments: Sequence[Segment], image_embeddings: np.ndarray | None = None) -> int:
    """Prefill `segments` in order at the decoder's next positions; returns its `n_past` afterwards.

    `image_embeddings` holds the rows of every `Image` segment, in order (``sum(n_tokens)`` rows). Text is
    tokenized without an implicit BOS (a format writes its BOS itself), with special markers parsed in the
    template's text only (`Text.special`).
    """
    needed = sum(s.n_tokens for s in segments if isinstance(s, Image))
    have = 0 if image_embeddings is None else len(image_embeddings)
    if have != needed:
        raise InputError(
            f"the prompt has room for {needed} image embedding rows but {have} were given; "
            "the vision tower's token count does not match the prompt"
        )
    row = 0
    for seg in segments:
        match seg:
            case Text(text=text, special=special):
                decoder.prefill_tokens(decoder.tokenize(text, add_special=False, parse_special=special))
            case Image(n_tokens=n, causal=causal):
                assert image_embeddings is not None
                decoder.prefill_embeddings(image_embeddings[row : row + n], causal=causal)
                row += n
    return decoder.n_past
