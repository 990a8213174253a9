"""Speech: audio helpers, sentence splitting, and the real Whisper and Piper models talking to each other."""

from __future__ import annotations

import os
import re
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgevision.errors import EdgevisionError, InputError, ModelError
from edgevision.speech.audio import Audio, read_wav, resample, write_wav
from edgevision.speech.recognition import WhisperRecognizer
from edgevision.speech.synthesis import PiperSynthesizer, split_sentences

QUESTION = "What is on the table in front of me?"


@pytest.fixture(scope="module")
def recognizer(whisper_dir: Path) -> Iterator[WhisperRecognizer]:
    with WhisperRecognizer(whisper_dir) as recognizer:
        yield recognizer


@pytest.fixture(scope="module")
def synthesizer(piper_voice: Path) -> Iterator[PiperSynthesizer]:
    with PiperSynthesizer(piper_voice) as synthesizer:
        yield synthesizer


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]", " ", text.lower()).split()


def rms(audio: Audio) -> float:
    return float(np.sqrt(np.mean(np.square(audio.samples, dtype=np.float64))))


# Tier 1: pure logic.


def test_split_sentences_yields_each_sentence_when_it_ends() -> None:
    assert list(split_sentences(["The cup", " is red.", " It is", " on the table."])) == [
        "The cup is red.",
        "It is on the table.",
    ]


def test_split_sentences_yields_before_the_stream_ends() -> None:
    pieces = iter(["The cup", " is red.", " It", " is on", " the table."])
    sentences = split_sentences(pieces)
    assert next(sentences) == "The cup is red."
    assert list(pieces) == [" is on", " the table."]  # the first sentence came out while text was still arriving


def test_split_sentences_keeps_decimals_abbreviations_and_list_markers() -> None:
    pieces = ["Dr. Smith poured 3", ".5 cups", ". Really?! Yes\n1. Apples\n2. Pears"]
    assert list(split_sentences(pieces)) == ["Dr. Smith poured 3.5 cups.", "Really?!", "Yes 1. Apples 2. Pears"]


def test_an_answer_written_one_word_per_line_is_not_spoken_as_one_word_sentences() -> None:
    # A small model sometimes answers one word per line; each line break used to end a "sentence", so the
    # first audio was one word long (a fast first audio that says nothing).
    tokens = [word + "\n" for word in ["A", "red", "ball", "on", "the", "table"]] + ["with a cup.\nIt\nis\nbig."]
    pieces = list(split_sentences(tokens, first_clause_words=4))
    assert pieces == ["A red ball on the table with a cup.", "It is big."]
    first = next(split_sentences(iter(tokens), first_clause_words=4))
    assert len(first.split()) >= 4


def test_a_line_of_a_few_words_still_ends_a_piece_at_its_line_break() -> None:
    text = "There is a red ball on the table\nand a cup\nnext to it.\n\n- a green door on the left\n- two"
    assert list(split_sentences([text])) == [
        "There is a red ball on the table",
        "and a cup next to it.",
        "- a green door on the left",
        "- two",
    ]


def test_wav_round_trip_and_resampling_keep_the_sound(tmp_path: Path) -> None:
    times = np.arange(22_050) / 22_050
    tone = Audio((0.5 * np.sin(2 * np.pi * 440 * times)).astype(np.float32), 22_050)
    write_wav(tmp_path / "tone.wav", tone)
    read_back = read_wav(tmp_path / "tone.wav")
    assert read_back.sample_rate == 22_050
    assert np.max(np.abs(read_back.samples - tone.samples)) < 1e-3

    at_16k = resample(read_back, 16_000)
    assert at_16k.sample_rate == 16_000 and len(at_16k.samples) == 16_000
    assert at_16k.duration == pytest.approx(1.0)
    assert rms(at_16k) == pytest.approx(0.5 / np.sqrt(2), rel=0.01)


def test_reading_a_stereo_24_bit_wav_gives_mono(tmp_path: Path) -> None:
    left = np.array([0, 1 << 22, -(1 << 22)], dtype=np.int32)  # 0, +0.5, -0.5 on the left; silence on the right
    frames = np.stack([left, np.zeros_like(left)], axis=1).reshape(-1)
    data = b"".join(int(value).to_bytes(3, "little", signed=True) for value in frames)
    with wave.open(str(tmp_path / "stereo.wav"), "wb") as wav:
        wav.setnchannels(2)
        wav.setsampwidth(3)
        wav.setframerate(8_000)
        wav.writeframes(data)
    np.testing.assert_allclose(read_wav(tmp_path / "stereo.wav").samples, [0.0, 0.25, -0.25])


def test_unreadable_audio_raises_input_error_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"not found: .*missing\.wav"):
        read_wav(tmp_path / "missing.wav")

    (tmp_path / "notes.wav").write_text("this is text, not audio\n")
    with pytest.raises(InputError, match=r"notes\.wav is not a PCM WAV file.*ffmpeg"):
        read_wav(tmp_path / "notes.wav")

    (tmp_path / "zero_bytes.wav").write_bytes(b"")
    with pytest.raises(InputError, match=r"zero_bytes\.wav is not a PCM WAV file"):
        read_wav(tmp_path / "zero_bytes.wav")

    write_wav(tmp_path / "empty.wav", Audio(np.zeros(0, dtype=np.float32), 16_000))
    with pytest.raises(InputError, match=r"empty\.wav holds no audio"):
        read_wav(tmp_path / "empty.wav")


def test_missing_or_incomplete_models_raise_model_error(tmp_path: Path, whisper_dir: Path) -> None:
    with pytest.raises(ModelError, match="Whisper model directory not found"):
        WhisperRecognizer(tmp_path / "no-such-whisper")

    incomplete = tmp_path / "whisper-without-tokenizer"
    incomplete.mkdir()
    for name in ("model.bin", "config.json"):
        os.symlink(whisper_dir / name, incomplete / name)
    with pytest.raises(ModelError, match="lacks tokenizer.json"):  # rather than fetching one from the Hub
        WhisperRecognizer(incomplete)

    with pytest.raises(ModelError, match="Piper voice not found"):
        PiperSynthesizer(tmp_path / "no-such-voice.onnx")

    (tmp_path / "voice.onnx").write_bytes(b"")
    with pytest.raises(ModelError, match=r"voice config not found: .*voice\.onnx\.json"):
        PiperSynthesizer(tmp_path / "voice.onnx")


# Tier 3: the real models.


def test_corrupt_models_raise_model_error(tmp_path: Path, whisper_dir: Path, piper_voice: Path) -> None:
    corrupt_whisper = tmp_path / "whisper"
    corrupt_whisper.mkdir()
    for name in ("config.json", "tokenizer.json"):
        os.symlink(whisper_dir / name, corrupt_whisper / name)
    (corrupt_whisper / "model.bin").write_bytes((whisper_dir / "model.bin").read_bytes()[:4096])
    with pytest.raises(ModelError, match="Cannot load the Whisper model"):
        WhisperRecognizer(corrupt_whisper)

    (tmp_path / "voice.onnx").write_bytes(b"not an onnx model")
    os.symlink(piper_voice.with_name(piper_voice.name + ".json"), tmp_path / "voice.onnx.json")
    with pytest.raises(ModelError, match=r"Piper stopped .*Protobuf"):
        PiperSynthesizer(tmp_path / "voice.onnx")


def test_spoken_question_is_transcribed(synthesizer: PiperSynthesizer, recognizer: WhisperRecognizer) -> None:
    transcript = recognizer.transcribe(synthesizer.synthesize(QUESTION))
    assert {"table", "front"} <= set(words(transcript.text)), transcript
    assert transcript.language == "en"
    assert not transcript.no_speech


def test_the_fitted_window_hears_the_recorded_question_as_the_full_window_does(
    whisper_dir: Path, recognizer: WhisperRecognizer
) -> None:
    recorded = read_wav(Path(__file__).resolve().parents[1] / "assets" / "question.wav")
    assert recognizer.window == "fit"  # the default
    with WhisperRecognizer(whisper_dir, window="full") as full:
        assert (
            words(recognizer.transcribe(recorded).text)
            == words(full.transcribe(recorded).text)
            == ["what", "is", "on", "the", "table", "in", "front", "of", "me"]
        )


def test_the_fitted_window_hears_the_benchmark_questions_as_the_full_window_does(
    piper_voice: Path, whisper_dir: Path, recognizer: WhisperRecognizer
) -> None:
    from edgevision.daemon.bench import QUESTIONS

    # Piper without its noise says each question the same way every time, so the audio is fixed.
    with PiperSynthesizer(piper_voice, noise_scale=0.0, noise_w_scale=0.0) as piper:
        spoken = [piper.synthesize(question) for question in QUESTIONS]
    with WhisperRecognizer(whisper_dir, window="full") as full:
        heard = [recognizer.transcribe(audio) for audio in spoken]
        for question, audio, transcript in zip(QUESTIONS, spoken, heard, strict=True):
            assert words(transcript.text) == words(full.transcribe(audio).text), question
    # "colour is" against "colors" is a close call in the 10-s window: that question is heard in the full one
    assert [transcript.window_s for transcript in heard] == [10.0, 30.0, 10.0]


def test_a_fitted_decode_that_repeats_the_question_is_done_again_over_the_full_window() -> None:
    from edgevision.speech.recognition import _repeats

    assert _repeats("Can you read the sign for me? Can you read the sign")  # measured at 10 s
    assert _repeats("Where is the door? Where is the door?")
    assert not _repeats("What is it? What is that?")
    assert not _repeats("Where is the door?")


def test_a_fitted_decode_that_runs_into_its_token_limit_is_done_again_over_the_full_window(
    recognizer: WhisperRecognizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgevision.speech import recognition

    recorded = read_wav(Path(__file__).resolve().parents[1] / "assets" / "question.wav")
    monkeypatch.setattr(recognition, "TOKENS_PER_S", -3)  # a limit of a few tokens: the question cannot end in it
    assert recognizer._transcribe_fitted(resample(recorded, 16_000).samples) is None
    assert words(recognizer.transcribe(recorded).text)[-4:] == ["table", "in", "front", "of", "me"][-4:]


def test_silence_is_no_speech(recognizer: WhisperRecognizer) -> None:
    transcript = recognizer.transcribe(Audio(np.zeros(32_000, dtype=np.float32), 16_000))
    assert transcript.no_speech
    assert transcript.duration_s == pytest.approx(2.0)


def test_synthesized_speech_is_audible_and_of_plausible_length(synthesizer: PiperSynthesizer) -> None:
    audio = synthesizer.synthesize(QUESTION)
    assert audio.sample_rate == synthesizer.sample_rate == 22_050
    assert rms(audio) > 0.02
    assert 0.04 * len(QUESTION) < audio.duration < 0.2 * len(QUESTION)


def test_text_without_words_gives_no_audio_and_keeps_piper_alive(synthesizer: PiperSynthesizer) -> None:
    assert len(synthesizer.synthesize(" ... \n").samples) == 0
    assert synthesizer.synthesize("Line one.\nLine two.").duration > 1.0  # line breaks do not split the request


def test_streamed_sentences_are_spoken_in_order_as_they_arrive(
    synthesizer: PiperSynthesizer, recognizer: WhisperRecognizer
) -> None:
    events: list[str] = []

    def sentences() -> Iterator[str]:
        for sentence in ("The cup is red.", "It is on the table."):
            events.append(f"asked for {sentence!r}")
            yield sentence

    chunks = []
    for audio in synthesizer.stream(sentences()):
        events.append(f"audio {len(chunks)}")
        chunks.append(audio)

    assert events == ["asked for 'The cup is red.'", "audio 0", "asked for 'It is on the table.'", "audio 1"]
    assert "cup" in words(recognizer.transcribe(chunks[0]).text)
    assert "table" in words(recognizer.transcribe(chunks[1]).text)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:  # the process has just exited
        return b""


@pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/task").is_dir(), reason="needs Linux /proc to list child processes")
def test_close_ends_the_piper_process(piper_voice: Path) -> None:
    def piper_children() -> set[int]:
        children: set[int] = set()
        for task in Path(f"/proc/{os.getpid()}/task").iterdir():
            children.update(int(pid) for pid in (task / "children").read_text().split())
        return {pid for pid in children if b"piper" in _read_bytes(Path(f"/proc/{pid}/cmdline"))}

    before = piper_children()
    with PiperSynthesizer(piper_voice) as synthesizer:
        assert len(piper_children() - before) == 1
    assert piper_children() - before == set()
    with pytest.raises(EdgevisionError, match="closed"):
        synthesizer.synthesize("Hello.")
