"""The ask pipeline: spoken question + image → transcript → image tokens → answer → speech.

`Assistant` owns one loaded instance of each stage and keeps the decoder's context between
questions. It measures every stage; the measurements come back with the answer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np

from edgevision.config import Config
from edgevision.decoder.llama import LlamaDecoder
from edgevision.decoder.prompt import FORMATS, ChatFormat, build_turn, image_causal_for, run_prompt
from edgevision.errors import InputError, ModelError
from edgevision.speech.audio import Audio
from edgevision.speech.recognition import WhisperRecognizer
from edgevision.speech.synthesis import PiperSynthesizer, split_sentences
from edgevision.vision.encoder import VisionEncoder, encode_image, open_encoder

logger = logging.getLogger(__name__)

# Speak the answer's first clause on its own once it has this many words (the rest sentence by sentence).
FIRST_CLAUSE_WORDS = 4


@dataclass(frozen=True)
class Answer:
    question: str
    text: str
    speech: Audio | None
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per stage, in pipeline order."""
    n_tokens: int = 0
    reused_image: bool = False
    """True when a follow-up reused the scene's cached image prefix."""
    interrupted: bool = False
    """True when `should_stop` cut the answer short (a barge-in, a shutdown)."""


@dataclass(eq=False)
class Scene:
    """One looked-at image: its embeddings, and how many decoder positions its prompt prefix fills."""

    embeddings: np.ndarray | None
    n_prefix: int = 0
    timings: dict[str, float] = field(default_factory=dict)


class _Clock:
    """Stage timings relative to one start."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.timings: dict[str, float] = {}
        self._mark = self.start

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = now - self._mark
        self._mark = now

    def since_start(self, stage: str) -> None:
        self.timings[stage] = time.perf_counter() - self.start

    def restart(self) -> None:
        """Measure the next lap from now (the time before still counts for `since_start`)."""
        self._mark = time.perf_counter()


class Assistant:
    """Recognizer, vision encoder, decoder and synthesizer, loaded once and used for many questions."""

    def __init__(
        self,
        *,
        recognizer: WhisperRecognizer,
        encoder: VisionEncoder,
        decoder: LlamaDecoder,
        synthesizer: PiperSynthesizer | None,
        system_prompt: str,
        max_answer_tokens: int,
        temperature: float = 0.0,
        chat_format: str = "auto",
    ) -> None:
        self.recognizer = recognizer
        self.encoder = encoder
        self.decoder = decoder
        self.synthesizer = synthesizer
        self.system_prompt = system_prompt
        self.max_answer_tokens = max_answer_tokens
        self.temperature = temperature
        self.chat_format = chat_format_of(decoder, chat_format)
        self._cached: Scene | None = None  # the scene whose prefix the decoder's cache holds
        self._stack = ExitStack()
        self.load_timings: dict[str, float] = {}

    @classmethod
    def from_config(cls, config: Config, *, speak: bool = True) -> Assistant:
        """Load every stage named by the config; on failure, what was loaded is closed again."""
        clock = _Clock()
        with ExitStack() as stack:
            recognizer = stack.enter_context(
                WhisperRecognizer(
                    config.speech.whisper_model,
                    language=config.speech.language,
                    beam_size=config.speech.beam_size,
                    cpu_threads=config.speech.whisper_threads,
                    window=config.speech.whisper_window,
                )
            )
            clock.lap("recognizer")
            encoder = open_encoder(config.vision.backend, config.vision.tower, threads=config.vision.threads)
            stack.callback(encoder.close)
            clock.lap("vision")
            decoder = stack.enter_context(
                LlamaDecoder(
                    config.decoder.model,
                    n_ctx=config.decoder.n_ctx,
                    n_threads=config.decoder.n_threads,
                    seed=config.decoder.seed,
                )
            )
            check_pairing(encoder, decoder, config.vision.tower)
            clock.lap("decoder")
            synthesizer = None
            if speak:
                synthesizer = stack.enter_context(
                    PiperSynthesizer(config.speech.piper_voice, length_scale=config.speech.length_scale)
                )
                clock.lap("synthesizer")
            assistant = cls(
                recognizer=recognizer,
                encoder=encoder,
                decoder=decoder,
                synthesizer=synthesizer,
                system_prompt=config.decoder.system_prompt,
                max_answer_tokens=config.decoder.max_answer_tokens,
                temperature=config.decoder.temperature,
                chat_format=config.decoder.chat_format,
            )
            assistant._stack = stack.pop_all()
            assistant.load_timings = clock.timings
            return assistant

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Assistant:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def transcribe(self, audio: Audio) -> str:
        transcript = self.recognizer.transcribe(audio)
        if transcript.no_speech or not transcript.text.strip():  # nothing said, or Whisper doubts it was speech
            raise InputError("no speech was recognised in the recording; ask again, closer to the microphone")
        return transcript.text.strip()

    def encode(self, image) -> np.ndarray:
        return encode_image(self.encoder, image)

    def look(self, image) -> Scene:
        """Encode one PIL image (None: no image) and prefill the decoder with the part of the prompt that comes
        before any question: system prompt and image. Questions about the scene then need only their own
        tokens prefilled — this can run while the user is still speaking."""
        clock = _Clock()
        embeddings = None
        if image is not None:
            embeddings = self.encode(image)
            clock.lap("vision_encode")
        scene = Scene(embeddings, timings=clock.timings)
        self._prefill_prefix(scene, clock)
        return scene

    def _prefill_prefix(self, scene: Scene, clock: _Clock) -> None:
        self.decoder.reset()
        self._cached = None
        n_image = 0 if scene.embeddings is None else len(scene.embeddings)
        prefix = build_turn("", image_tokens=n_image, system=self.system_prompt, fmt=self.chat_format).prefix
        scene.n_prefix = run_prompt(self.decoder, prefix, scene.embeddings)
        clock.lap("image_prefill" if n_image else "prefix_prefill")
        self._cached = scene

    def _restore(self, scene: Scene, clock: _Clock) -> bool:
        """Put the decoder back at the end of `scene`'s prefix; True if the cached prefix was reused."""
        if self._cached is scene and self.decoder.truncate(scene.n_prefix) == scene.n_prefix:
            return True
        self._prefill_prefix(scene, clock)
        return False

    def prefill(self, question: str, scene: Scene) -> bool:
        """Make the decoder ready to answer `question` about `scene`; True if the scene's cached prefix was
        reused (a follow-up), False if it had to be prefilled again."""
        return self._prefill_question(question, scene, _Clock())

    def _prefill_question(self, question: str, scene: Scene, clock: _Clock) -> bool:
        reused = self._restore(scene, clock)
        n_image = 0 if scene.embeddings is None else len(scene.embeddings)
        turn = build_turn(question, image_tokens=n_image, system=self.system_prompt, fmt=self.chat_format)
        run_prompt(self.decoder, turn.question)
        clock.lap("text_prefill")
        return reused

    def ask(
        self,
        image,
        *,
        audio: Audio | None = None,
        question: str | None = None,
        on_question: Callable[[str], None] | None = None,
        on_text: Callable[[str], None] | None = None,
        on_speech: Callable[[Audio], None] | None = None,
    ) -> Answer:
        """Answer one spoken (audio) or typed (question) question about one PIL image (None: no image), one
        stage after the other: recognition, vision encoding, prefill, answer.

        on_question receives the question once known; on_text the answer text as it is generated; on_speech
        each spoken sentence as soon as it is synthesised, long before the answer ends.
        """
        if (audio is None) == (question is None):
            raise InputError("give either a spoken question (audio) or a typed one (question), not both")
        clock = _Clock()
        if audio is not None:
            question = self.transcribe(audio)
            clock.lap("recognition")
        if on_question:
            on_question(question)
        scene = self.look(image)
        clock.timings.update(scene.timings)
        clock.restart()
        return self.answer(question, scene, on_text=on_text, on_speech=on_speech, clock=clock)

    def answer(
        self,
        question: str,
        scene: Scene,
        *,
        on_text: Callable[[str], None] | None = None,
        on_speech: Callable[[Audio], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        clock: _Clock | None = None,
    ) -> Answer:
        """Answer `question` about a scene from `look`, speaking it sentence by sentence as it is generated.

        A follow-up about the same scene reuses its cached image prefix: nothing is encoded or prefilled again
        but the question. Timings of `first_token`, `first_audio` and `total` count from the call (or from the
        given clock's start). `should_stop` is asked before each token and each sentence: once it returns True
        nothing more is generated or spoken, and the answer comes back `interrupted`."""
        clock = clock or _Clock()
        reused = self._prefill_question(question, scene, clock)
        interrupted = False

        def stopped() -> bool:
            nonlocal interrupted
            interrupted = interrupted or (should_stop is not None and should_stop())
            return interrupted

        pieces: list[str] = []
        decode_seconds = 0.0

        def tokens() -> Iterator[str]:
            nonlocal decode_seconds
            generator = self.decoder.generate(self.max_answer_tokens, temperature=self.temperature)
            while True:
                if stopped():
                    generator.close()
                    return
                started = time.perf_counter()
                piece = next(generator, None)
                decode_seconds += time.perf_counter() - started
                if piece is None:
                    return
                if not pieces:
                    clock.since_start("first_token")
                pieces.append(piece)
                if on_text:
                    on_text(piece)
                yield piece

        spoken: list[Audio] = []
        if self.synthesizer is None:
            for _ in tokens():
                pass
        else:
            # the first clause of four or more words is spoken on its own, so the first audio comes sooner
            pieces_to_say = split_sentences(tokens(), first_clause_words=FIRST_CLAUSE_WORDS)
            sentences = (s for s in pieces_to_say if s.strip() and not stopped())
            for chunk in self.synthesizer.stream(sentences):
                if stopped():
                    break
                if not spoken:
                    clock.since_start("first_audio")
                spoken.append(chunk)
                if on_speech:
                    on_speech(chunk)
        text = "".join(pieces).strip()
        n_tokens = len(pieces)
        clock.timings["decode_tokens_per_s"] = n_tokens / decode_seconds if decode_seconds and n_tokens else 0.0
        clock.since_start("total")
        if not text:
            logger.warning("the decoder produced no answer text")
        return Answer(
            question=question,
            text=text,
            speech=_join(spoken),
            timings=clock.timings,
            n_tokens=n_tokens,
            reused_image=reused,
            interrupted=interrupted,
        )


def chat_format_of(decoder: LlamaDecoder, name: str = "auto") -> ChatFormat:
    """The chat layout for the decoder: `name`, or with "auto" the one of its GGUF architecture."""
    if name == "auto":
        architecture = decoder.meta("general.architecture") or "unknown"
        if architecture not in ("gemma3", "gemma4"):
            raise ModelError(
                f"decoder {decoder.path.name} is a {architecture!r} model, whose prompt layout edgevision cannot "
                f"tell; set decoder.chat_format to one of {', '.join(sorted(FORMATS))}"
            )
        name = architecture
    return image_causal_for(FORMATS[name], decoder.n_embd)


def check_pairing(encoder: VisionEncoder, decoder: LlamaDecoder, tower_path) -> None:
    """Refuse a vision tower whose embeddings are not as wide as the decoder's token embeddings."""
    if encoder.spec.n_embd != decoder.n_embd:
        raise ModelError(
            f"vision tower {tower_path} makes {encoder.spec.n_embd}-wide embeddings but decoder "
            f"{decoder.path.name} expects {decoder.n_embd}; configure the tower made for this decoder"
        )


def _join(chunks: list[Audio]) -> Audio | None:
    if not chunks:
        return None
    return Audio(np.concatenate([c.samples for c in chunks]), chunks[0].sample_rate)
