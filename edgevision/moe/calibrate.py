"""Run a calibration set (questions, optionally about images) through a decoder while a router observer
watches: the input to `edgevision calibrate` (a router profile) and `edgevision prune` (expert saliency).

A calibration folder holds ``prompts.txt`` (one question per line, ``#`` comments) and ``images/`` (PNG or
JPEG). With a vision tower each question is asked about the next image in turn (image rows, then the
question); without one the questions are asked as text. Each answer is generated greedily for a few tokens,
so all three phases (image, prompt, generated) are seen.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgevision.errors import InputError
from edgevision.moe.router import RouterObserver, observe_turn

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SYSTEM_PROMPT = "You help a blind person by describing what the camera sees. Answer briefly."

Progress = Callable[[int, int, str], None]
"""``progress(done, total, question)``."""


@dataclass(frozen=True)
class CalibrationSet:
    questions: tuple[str, ...]
    images: tuple[Path, ...]

    def items(self) -> Iterator[tuple[str, Path | None]]:
        """(question, image or None) pairs: the images are used in turn."""
        for i, question in enumerate(self.questions):
            yield question, (self.images[i % len(self.images)] if self.images else None)


def read_questions(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """Non-empty, non-comment lines of a prompts file."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError(f"prompts file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read prompts file {path} ({exc})") from exc
    questions = tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    if not questions:
        raise InputError(f"prompts file {path} has no questions (one per line; '#' starts a comment)")
    return questions


def load_calibration(folder: str | os.PathLike[str], prompts: str = "prompts.txt") -> CalibrationSet:
    """The questions in ``folder/prompts`` and the images in ``folder/images``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"calibration folder {folder} does not exist; see calibration/README.md")
    images_dir = folder / "images"
    images = (
        sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if images_dir.is_dir() else []
    )
    return CalibrationSet(read_questions(folder / prompts), tuple(images))


class ImageSource:
    """Image embeddings for a calibration run: a vision tower, with each image encoded once."""

    def __init__(self, tower: str | os.PathLike[str], n_embd: int) -> None:
        from edgevision.vision.encoder import open_encoder

        self._encoder = open_encoder("onnxruntime", Path(tower))
        self.n_tokens = self._encoder.spec.n_tokens
        if self._encoder.spec.n_embd != n_embd:
            self._encoder.close()
            raise InputError(
                f"vision tower {tower} makes rows of width {self._encoder.spec.n_embd}, the decoder takes "
                f"{n_embd}; pass the tower made for this decoder"
            )
        self._cache: dict[Path, np.ndarray] = {}

    def embeddings(self, image: Path) -> np.ndarray:
        from edgevision.vision.encoder import encode_image
        from edgevision.vision.preprocess import load_image

        if image not in self._cache:
            self._cache[image] = encode_image(self._encoder, load_image(image))
        return self._cache[image]

    def close(self) -> None:
        self._encoder.close()


def run_calibration(
    decoder_path: str | os.PathLike[str],
    calibration: CalibrationSet,
    observer: RouterObserver,
    *,
    tower: str | os.PathLike[str] | None = None,
    max_tokens: int = 16,
    n_ctx: int = 1024,
    n_threads: int = 0,
    progress: Progress | None = None,
) -> int:
    """Ask every calibration question through the decoder with `observer` as its eval callback; returns
    the number of questions asked. The decoder is reset between questions."""
    from edgevision.decoder.llama import LlamaDecoder
    from edgevision.decoder.prompt import GEMMA4, build_turn

    with ExitStack() as stack:
        decoder = stack.enter_context(
            LlamaDecoder(decoder_path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=n_threads, cb_eval=observer)
        )
        images = None
        if tower is not None and calibration.images:
            images = ImageSource(tower, decoder.n_embd)
            stack.callback(images.close)
        items = list(calibration.items())
        for done, (question, image) in enumerate(items):
            if progress is not None:
                progress(done, len(items), question)
            decoder.reset()
            if images is not None and image is not None:
                rows = images.embeddings(image)
                turn = build_turn(question, image_tokens=len(rows), system=SYSTEM_PROMPT, fmt=GEMMA4)
            else:
                rows = None
                turn = build_turn(question, system=SYSTEM_PROMPT, fmt=GEMMA4)
            observe_turn(decoder, observer, turn.segments, rows)
            observer.phase = "generated"
            answer = "".join(decoder.generate(max_tokens))
            logger.debug("calibration %d/%d: %r -> %r", done + 1, len(items), question, answer)
        if progress is not None:
            progress(len(items), len(items), "")
        return len(items)
