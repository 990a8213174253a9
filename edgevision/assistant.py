"""The ask pipeline: spoken question + image → transcript → image tokens → answer → speech.

`Assistant` owns one loaded instance of each stage and keeps the decoder's context between
questions. It measures every stage; the measurements come back with the answer.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field

import numpy as np

from edgevision.answers.modes import choose_mode
from edgevision.answers.safety import (
    NO_TEXT,
    compose_guarded,
    compose_read,
    read_aloud,
    sensitive_topics,
    unsupported_numbers,
)
from edgevision.config import Config
from edgevision.decoder.llama import LlamaDecoder
from edgevision.decoder.prompt import (
    FORMATS,
    ChatFormat,
    build_turn,
    format_for_model,
    image_causal_for,
    run_prompt,
)
from edgevision.errors import InputError, ModelError
from edgevision.moe.placement import DecoderPlacement
from edgevision.ocr.reader import Reading, TextReader
from edgevision.speech.audio import Audio
from edgevision.speech.engines import open_recognizer, open_synthesizer
from edgevision.speech.recognition import Recognizer
from edgevision.speech.synthesis import Synthesizer, split_sentences
from edgevision.vision.encoder import VisionEncoder, encode_image, open_encoder

logger = logging.getLogger(__name__)

# Speak the answer's first clause on its own once it has this many words (the rest sentence by sentence).
FIRST_CLAUSE_WORDS = 4
# A question longer than this is not a question (Whisper's 120 s of speech is about 2,000 characters).
MAX_QUESTION_CHARS = 2000
NO_QUESTION = "I didn't catch a question"


def check_question(question: str) -> str:
    """The question stripped, or InputError: empty or blank, not text (bytes that are not UTF-8), or too long."""
    try:
        question.encode("utf-8")
    except UnicodeEncodeError:  # bytes that were not UTF-8, kept by Python as lone surrogates
        raise InputError(
            "the question is not UTF-8 text (its bytes cannot be decoded); type it again in a UTF-8 terminal"
        ) from None
    if not question.strip():
        raise InputError(f"{NO_QUESTION}: the question is empty; ask it in words")
    if len(question) > MAX_QUESTION_CHARS:
        raise InputError(
            f"the question is {len(question)} characters long; ask it in at most {MAX_QUESTION_CHARS} characters"
        )
    return question.strip()


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
    mode: str = "describe"
    """How it was answered: read (the recognised text, verbatim), answer (the decoder, with the recognised
    text in its prompt) or describe (the decoder, from the image alone)."""
    topics: tuple[str, ...] = ()
    """Sensitive topics (medicine, allergen, money, date) that kept the decoder from answering."""
    withheld: int = 0
    """Generated sentences not spoken because they named a number the recognised text does not hold."""


@dataclass(eq=False)
class Scene:
    """One looked-at image: its embeddings, and how many decoder positions its prompt prefix fills."""

    embeddings: np.ndarray | None
    n_prefix: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    reading: Reading | None = None
    """The text read in the image (None: OCR is off, or no image)."""


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
        recognizer: Recognizer,
        encoder: VisionEncoder,
        decoder: LlamaDecoder,
        synthesizer: Synthesizer | None,
        system_prompt: str,
        max_answer_tokens: int,
        temperature: float = 0.0,
        chat_format: str = "auto",
        reader: TextReader | None = None,
        answer_mode: str = "auto",
        no_text: str = NO_TEXT,
    ) -> None:
        self.recognizer = recognizer
        self.encoder = encoder
        self.decoder = decoder
        self.synthesizer = synthesizer
        self.system_prompt = system_prompt
        self.max_answer_tokens = max_answer_tokens
        self.temperature = temperature
        self.chat_format = chat_format_of(decoder, chat_format)
        self.reader = reader
        self.answer_mode = answer_mode
        self.no_text = no_text
        self._cached: Scene | None = None  # the scene whose prefix the decoder's cache holds
        self._stack = ExitStack()
        # OCR runs in its own thread, beside the vision tower and the prefill of the image
        self._ocr_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="edgevision-ocr")
        self.load_timings: dict[str, float] = {}
        self.placement: DecoderPlacement | None = None  # a MoE decoder's residency plan, pins and adaptation

    @classmethod
    def from_config(cls, config: Config, *, speak: bool = True) -> Assistant:
        """Load every stage named by the config; on failure, what was loaded is closed again."""
        from edgevision.registry import verify_registered

        recognizer_paths = {f"speech.recognizer.{k}": v for k, v in config.speech.recognizer.paths().items()}
        voice_paths = {f"speech.synthesizer.{k}": v for k, v in config.speech.synthesizer.paths().items()}
        verify_registered(
            {
                **recognizer_paths,
                "vision.tower": config.vision.tower,
                "decoder.model": config.decoder.model,
                **(voice_paths if speak else {}),
            }
        )
        clock = _Clock()
        with ExitStack() as stack:
            recognizer = open_recognizer(config.speech.recognizer)
            stack.callback(recognizer.close)
            clock.lap("recognizer")
            encoder = open_encoder(config.vision.backend, config.vision.tower, threads=config.vision.threads)
            stack.callback(encoder.close)
            clock.lap("vision")
            # a MoE decoder's placement is planned and pinned before the model loads, after the stages above
            # (their memory is what an `auto` budget leaves them)
            placement = DecoderPlacement.open(
                config.decoder.model, config.decoder.placement, n_ctx=config.decoder.n_ctx
            )
            if placement is not None:
                stack.callback(placement.close)
            with placement.loading() if placement is not None else nullcontext():
                decoder = stack.enter_context(
                    LlamaDecoder(
                        config.decoder.model,
                        n_ctx=config.decoder.n_ctx,
                        n_threads=config.decoder.n_threads,
                        seed=config.decoder.seed,
                        extra_buffer_types=config.decoder.extra_buffer_types,
                        **(placement.decoder_options() if placement is not None else {}),
                    )
                )
            if placement is not None:
                placement.start(decoder)
            check_pairing(encoder, decoder, config.vision.tower)
            clock.lap("decoder")
            reader = None
            if config.ocr.enabled:
                reader = open_reader(config)
                stack.callback(reader.close)
                clock.lap("ocr")
            synthesizer = None
            if speak:
                synthesizer = open_synthesizer(config.speech.synthesizer)
                stack.callback(synthesizer.close)
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
                reader=reader,
                answer_mode=config.answers.mode,
                no_text=config.answers.no_text,
            )
            assistant.placement = placement
            assistant._stack = stack.pop_all()
            assistant.load_timings = clock.timings
            return assistant

    def close(self) -> None:
        self._ocr_pool.shutdown(wait=True)
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
        reading = None
        if self.reader is not None and image is not None:
            reading = self._ocr_pool.submit(self.reader.read, image)
        embeddings = None
        if image is not None:
            embeddings = self.encode(image)
            clock.lap("vision_encode")
        scene = Scene(embeddings, timings=clock.timings)
        self._prefill_prefix(scene, clock)
        if reading is not None:
            scene.reading = reading.result()
            clock.lap("ocr_wait")  # how much longer the text took than the image
            scene.timings["ocr"] = scene.reading.timings.get("ocr", 0.0)
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

    def _prefill_question(self, question: str, scene: Scene, clock: _Clock, *, with_text: bool = False) -> bool:
        reused = self._restore(scene, clock)
        n_image = 0 if scene.embeddings is None else len(scene.embeddings)
        if with_text and scene.reading:
            question = with_reading(question, scene.reading)
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
        question = check_question(question)
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
        question = check_question(question)
        clock = clock or _Clock()
        mode = choose_mode(question, override=self.answer_mode, has_text=bool(scene.reading))
        topics = sensitive_topics(question, scene.reading, mode)
        reply = None
        if mode == "read":
            reply = compose_read(scene.reading, no_text=self.no_text, topics=topics)
        elif topics:
            reply = compose_guarded(topics, scene.reading, no_text=self.no_text)
        elif mode == "answer" and not scene.reading:
            reply = compose_read(None, no_text=self.no_text)
        if reply is not None:  # said without the decoder
            return self._say(question, reply.text, mode, reply.topics, on_text, on_speech, should_stop, clock)
        reused = self._prefill_question(question, scene, clock, with_text=mode == "answer")
        interrupted = False

        def stopped() -> bool:
            nonlocal interrupted
            interrupted = interrupted or (should_stop is not None and should_stop())
            return interrupted

        pieces: list[str] = []
        decode_seconds = 0.0
        guarded = mode == "answer"  # its sentences are checked before they are shown or spoken

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
                if on_text and not guarded:
                    on_text(piece)
                yield piece

        said: list[str] = []
        withheld = 0

        def checked(sentences: Iterable[str]) -> Iterator[str]:
            """In answer mode, no sentence naming a number the recognised text does not hold."""
            nonlocal withheld
            for sentence in sentences:
                if guarded and unsupported_numbers(sentence, scene.reading):
                    logger.info("withheld a sentence with numbers not in the text: %r", sentence)
                    withheld += 1
                    continue
                if guarded and on_text:
                    on_text(("" if not said else " ") + sentence)
                said.append(sentence)
                yield sentence
            if guarded and withheld and not said:  # nothing honest left to say: read the text instead
                sentence = read_aloud(scene.reading.lines if scene.reading else ())
                if on_text:
                    on_text(sentence)
                said.append(sentence)
                yield sentence

        sentences = checked(split_sentences(tokens(), first_clause_words=FIRST_CLAUSE_WORDS))
        spoken = self._speak(sentences, stopped, on_speech, clock)
        text = " ".join(said).strip() if guarded else "".join(pieces).strip()
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
            mode=mode,
            withheld=withheld,
        )

    def _speak(
        self,
        sentences: Iterable[str],
        stopped: Callable[[], bool],
        on_speech: Callable[[Audio], None] | None,
        clock: _Clock,
    ) -> list[Audio]:
        """Speak sentences as they come (without a synthesizer: only run through them)."""
        spoken: list[Audio] = []
        if self.synthesizer is None:
            for _ in sentences:
                if stopped():
                    break
            return spoken
        for chunk in self.synthesizer.stream(s for s in sentences if s.strip() and not stopped()):
            if stopped():
                break
            if not spoken:
                clock.since_start("first_audio")
            spoken.append(chunk)
            if on_speech:
                on_speech(chunk)
        return spoken

    def _say(
        self,
        question: str,
        text: str,
        mode: str,
        topics: tuple[str, ...],
        on_text: Callable[[str], None] | None,
        on_speech: Callable[[Audio], None] | None,
        should_stop: Callable[[], bool] | None,
        clock: _Clock,
    ) -> Answer:
        """A reply composed without the decoder (read mode, a guarded topic, no text): shown and spoken."""
        if on_text:
            on_text(text)

        def stopped() -> bool:
            return should_stop is not None and should_stop()

        spoken = self._speak(split_sentences([text], first_clause_words=FIRST_CLAUSE_WORDS), stopped, on_speech, clock)
        clock.since_start("total")
        return Answer(
            question=question,
            text=text,
            speech=_join(spoken),
            timings=clock.timings,
            interrupted=stopped(),
            mode=mode,
            topics=topics,
        )


def with_reading(question: str, reading: Reading) -> str:
    """The question as the decoder sees it in answer mode: the recognised lines first, then the question."""
    lines = "\n".join(f"- {line.text}" + (" (unsure)" if line.uncertain else "") for line in reading.lines)
    return f"Text read in the image, line by line:\n{lines}\n\nUsing only this text, answer: {question}"


def open_reader(config: Config) -> TextReader:
    """The OCR pipeline on the configured back-end and models."""
    from edgevision.ocr.backends import open_backend
    from edgevision.ocr.models import DICT_FILE

    backend = open_backend(config.ocr.backend, config.ocr.models, threads=config.ocr.threads)
    try:
        return TextReader(
            backend,
            config.ocr.models / DICT_FILE,
            max_side=config.ocr.max_side,
            drop_below=config.ocr.drop_below,
            uncertain_below=config.ocr.uncertain_below,
        )
    except BaseException:
        backend.close()
        raise


def chat_format_of(decoder: LlamaDecoder, name: str = "auto") -> ChatFormat:
    """The chat layout for the decoder: `name`, or with "auto" the one of its GGUF architecture."""
    if name == "auto":
        architecture = decoder.meta("general.architecture") or "unknown"
        fmt = format_for_model(architecture, decoder.meta("tokenizer.chat_template") or "")
        if fmt is None:
            raise ModelError(
                f"decoder {decoder.path.name} is a {architecture!r} model, whose prompt layout edgevision cannot "
                f"tell; set decoder.chat_format to one of {', '.join(sorted(FORMATS))}"
            )
        return image_causal_for(fmt, decoder.n_embd)
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
