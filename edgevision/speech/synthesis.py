"""Speech synthesis with Piper, run as a separate long-lived process.

piper-tts is GPL-3.0, so this package never imports it: it runs `python -m piper` and talks to it through
pipes. Loading the voice costs about a second, so one process serves every utterance of a synthesizer.

The protocol: one utterance per line on Piper's stdin; with `--output-dir` Piper writes each line's audio to
its own WAV file and, once the file is closed, logs `Wrote <path>` on stderr. That log line is the only
end-of-utterance signal the CLI gives (`--output-raw` writes nothing between utterances), so a reader thread
watches stderr for it and forwards every other line to Python logging.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import logging
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Protocol

import numpy as np

from edgevision.errors import EdgevisionError, MissingDependencyError, ModelError
from edgevision.schema import setting
from edgevision.speech.audio import Audio, read_wav

logger = logging.getLogger(__name__)

_WROTE = re.compile(r"^INFO:[^:]*:Wrote (?P<path>.+\.wav)$")
_LOG_LINE = re.compile(r"^(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL):[^:]*:(?P<message>.*)$")
_EXIT_TIMEOUT_S = 1.0  # for Piper to exit by itself once its input ends (it takes ~0.1 s when idle)
_KILL_TIMEOUT_S = 3.0

# A sentence ends at . ! ? (with closing quotes or brackets) followed by whitespace, or at a line break.
_SENTENCE_END = re.compile(r"""[.!?]+["'”’)\]]*(?=\s)|\n""")
_ABBREVIATIONS = frozenset({"mr.", "mrs.", "ms.", "dr.", "prof.", "vs.", "e.g.", "i.e."})
_LIST_MARKER = re.compile(r"\d+\.")
# A clause ends at , ; or : followed by whitespace (so "3,000" and "10:30" do not end one).
_CLAUSE_END = re.compile(r"[,;:]+(?=\s)")
# A line break ends a piece only after a line of this many words; shorter lines run on into the next, so an
# answer written one word per line is not spoken (and timed) as a string of one-word "sentences".
LINE_WORDS = 4


def split_sentences(text_chunks: Iterable[str], *, first_clause_words: int = 0) -> Iterator[str]:
    """Join streamed text pieces and yield each sentence as soon as it is complete.

    A sentence is complete when its final punctuation is followed by whitespace (so "3." waits for the
    next piece, which may be "5"), or at a line break after a line of LINE_WORDS words or more (a shorter
    line runs on into the next); the remaining text is yielded at the end. Abbreviations such as "Dr." and
    numbered-list markers such as "2." do not end a sentence. Whitespace inside a piece (line breaks
    included) comes out as single spaces.

    With `first_clause_words`, the first piece yielded may be a clause: once the first sentence has that many
    words, a comma, semicolon or colon (followed by whitespace) ends it, so speech can start sooner —
    "There is a red ball," then "and a cup beside it." — with the pause the comma asks for anyway.
    """
    buffer = ""
    first = bool(first_clause_words)  # still looking for the first piece's clause end
    for chunk in text_chunks:
        buffer += chunk
        start = 0
        for match in _SENTENCE_END.finditer(buffer):
            raw = buffer[start : match.end()]
            sentence = " ".join(raw.split())
            if _ends_early(raw) or (match.group() == "\n" and _short_line(raw)):
                continue
            if sentence:
                yield sentence
                first = False
            start = match.end()
        buffer = buffer[start:]
        if first:
            for match in _CLAUSE_END.finditer(buffer):
                clause = " ".join(buffer[: match.end()].split())
                if len(clause.split()) >= first_clause_words:
                    yield clause
                    first = False
                    buffer = buffer[match.end() :]
                    break
    tail = " ".join(buffer.split())
    if tail:
        yield tail


def _short_line(text: str) -> bool:
    """Whether the line that `text` (ending in a line break) ends has fewer than LINE_WORDS words."""
    return len(text[:-1].rsplit("\n", 1)[-1].split()) < LINE_WORDS


def _ends_early(text: str) -> bool:
    """Whether a full stop that looks final belongs to an abbreviation ("Dr.") or a list marker ("2." at the
    start of a line)."""
    text = text.strip()
    if not text.endswith("."):
        return False
    last_word = text.rsplit(None, 1)[-1].lstrip("(\"'“‘").lower()
    return last_word in _ABBREVIATIONS or _LIST_MARKER.fullmatch(text.rsplit("\n", 1)[-1].strip()) is not None


class Synthesizer(Protocol):
    """Text to speech. An engine implements this, declares its `Settings` dataclass on the class (its fields are
    the constructor's keyword arguments) and is registered in `edgevision.speech.engines.SYNTHESIZERS`."""

    sample_rate: int  # of the audio it makes (earcons are made at this rate, to queue with speech)

    def synthesize(self, text: str) -> Audio:
        """`text` spoken; empty audio for text without words."""

    def stream(self, sentences: Iterable[str]) -> Iterator[Audio]:
        """Each sentence spoken, in order, as soon as it is ready."""

    def close(self) -> None: ...


class PiperSynthesizer:
    """A Piper voice in a child process; close it (or use `with`) to stop the process."""

    @dataclass(frozen=True)
    class Settings:
        """a Piper voice (.onnx with its .onnx.json), run as a separate process"""

        voice: Path = setting(
            "../models/piper/en_US-joe-medium.onnx",
            "Piper voice model (.onnx, with its .onnx.json beside it).",
            path="file",
        )
        length_scale: float = setting(1.0, "Speaking rate: below 1 speaks faster, above 1 slower.", min=0.5, max=2.0)

    def __init__(
        self,
        voice: str | Path,
        *,
        length_scale: float = 1.0,
        noise_scale: float | None = None,
        noise_w_scale: float | None = None,
        speaker_id: int | None = None,
        sentence_silence_s: float = 0.0,
        timeout_s: float = 60.0,
    ) -> None:
        if importlib.util.find_spec("piper") is None:
            raise MissingDependencyError(
                "Speech synthesis needs Piper; install it with `pip install piper-tts` (it runs as a separate process)."
            )
        voice_file = Path(voice).expanduser().resolve()
        config_path = voice_file.with_name(voice_file.name + ".json")
        if not voice_file.is_file():
            raise ModelError(
                f"Piper voice not found: {voice_file}. Point the speech synthesis setting at a voice's .onnx file."
            )
        if not config_path.is_file():
            raise ModelError(
                f"Piper voice config not found: {config_path}. Put the voice's .onnx.json beside its .onnx file."
            )
        try:
            self.sample_rate = int(json.loads(config_path.read_text(encoding="utf-8"))["audio"]["sample_rate"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ModelError(
                f"Piper voice config {config_path} is unreadable or lacks audio.sample_rate ({error}); "
                "download the voice's .onnx.json again."
            ) from error

        self.voice_file = voice_file
        self._timeout_s = timeout_s
        self._output_dir = Path(tempfile.mkdtemp(prefix="edgevision-piper-"))
        self._command = [sys.executable, "-m", "piper", "--model", str(voice_file), "--config", str(config_path)]
        self._command += ["--output-dir", str(self._output_dir), "--length-scale", str(length_scale)]
        self._command += ["--sentence-silence", str(sentence_silence_s)]
        optional = {"--noise-scale": noise_scale, "--noise-w-scale": noise_w_scale, "--speaker": speaker_id}
        for flag, value in optional.items():
            if value is not None:
                self._command += [flag, str(value)]

        self._lock = threading.Lock()
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._finished: queue.Queue[str | None] = queue.Queue()
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=1)
        self._closed = False
        try:
            self.synthesize("Ready.")  # starts the process, waits for the voice to load, checks the protocol
        except BaseException:
            self.close()
            raise

    def synthesize(self, text: str) -> Audio:
        """Speak `text` (any length; line breaks are treated as spaces). Text without letters or digits
        gives empty audio."""
        line = " ".join(text.split())
        if not any(character.isalnum() for character in line):
            # Piper produces no audio for such text and its --output-dir mode then fails, so skip it.
            return Audio(np.zeros(0, dtype=np.float32), self.sample_rate)
        with self._lock:
            if self._closed:
                raise EdgevisionError("The speech synthesizer is closed.")
            if self._process is None or self._process.poll() is not None:
                self._start()
            process = self._process
            assert process is not None and process.stdin is not None
            try:
                process.stdin.write(line + "\n")
                process.stdin.flush()
            except BrokenPipeError:
                pass  # Piper has exited; the reader's end-of-stream marker below reports why
            try:
                wav_path = self._finished.get(timeout=self._timeout_s)
            except queue.Empty:
                self._stop()
                raise EdgevisionError(
                    f"Piper did not finish speaking within {self._timeout_s:.0f} s; it was stopped and will be "
                    "restarted for the next sentence."
                ) from None
            if wav_path is None:  # end of Piper's stderr: it has exited, or `close` stopped it
                self._stop()
                if self._closed:
                    raise EdgevisionError("The speech synthesizer was closed while speaking.")
                last_message = self._stderr_tail[-1] if self._stderr_tail else "no message"
                raise ModelError(
                    f"Piper stopped (exit code {process.wait()}) while speaking {line[:60]!r}: {last_message} "
                    f"(full output in the log). Check the voice file {self.voice_file}."
                )
            try:
                return read_wav(wav_path)
            finally:
                Path(wav_path).unlink(missing_ok=True)

    def stream(self, sentences: Iterable[str]) -> Iterator[Audio]:
        """Speak sentences one by one as they arrive (e.g. from `split_sentences`), yielding each one's audio
        before the next sentence is taken; sentences that give no audio are skipped."""
        for sentence in sentences:
            audio = self.synthesize(sentence)
            if len(audio.samples):
                yield audio

    def close(self) -> None:
        """Stop the Piper process and remove its files. Piper gets a second to exit by itself, then is terminated;
        a `synthesize` running in another thread raises."""
        self._closed = True
        self._stop()
        shutil.rmtree(self._output_dir, ignore_errors=True)

    def __enter__(self) -> PiperSynthesizer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _start(self) -> None:
        self._stop()
        logger.debug("Starting Piper: %s", " ".join(self._command))
        environment = dict(os.environ, PYTHONIOENCODING="utf-8", PYTHONUNBUFFERED="1", ORT_DISABLE_TELEMETRY="1")
        self._process = subprocess.Popen(
            self._command,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            env=environment,
        )
        self._finished = queue.Queue()  # a fresh queue, so no marker from an earlier process is left in it
        self._stderr_tail.clear()
        assert self._process.stderr is not None
        self._reader = threading.Thread(
            target=_read_stderr,
            args=(self._process.stderr, self._finished, self._stderr_tail),
            name=f"piper-stderr-{self._process.pid}",
            daemon=True,
        )
        self._reader.start()

    def _stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        assert process.stdin is not None
        try:
            process.stdin.close()  # end of input: Piper finishes the current line and exits
        except BrokenPipeError:
            pass  # it has already exited
        try:
            process.wait(timeout=_EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:  # it is in the middle of a long utterance, or hung
            logger.debug("Piper (pid %d) still busy after its input ended; terminating it", process.pid)
            process.terminate()
            try:
                process.wait(timeout=_KILL_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                logger.warning("Piper (pid %d) ignored SIGTERM for %.0f s; killing it", process.pid, _KILL_TIMEOUT_S)
                process.kill()
                process.wait()
        if self._reader is not None:
            self._reader.join()
            self._reader = None
        logger.debug("Piper (pid %d) exited with code %d", process.pid, process.returncode)


def _read_stderr(stderr: IO[str], finished: queue.Queue[str | None], tail: collections.deque[str]) -> None:
    """Put each finished utterance's WAV path on `finished` and log everything else; None marks the end."""
    try:
        for raw_line in stderr:
            line = raw_line.rstrip()
            if not line:
                continue
            if wrote := _WROTE.match(line):
                finished.put(wrote["path"])
                continue
            tail.append(line)
            if log_line := _LOG_LINE.match(line):
                logger.log(logging.getLevelName(log_line["level"]), "piper: %s", log_line["message"])
            else:  # tracebacks and onnxruntime's own messages
                logger.warning("piper: %s", line)
    finally:
        stderr.close()
        finished.put(None)
