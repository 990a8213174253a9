"""Whisper's fitted encoder window against its full 30-s one: the words heard and the CPU time per question.

The questions are the bundled recording (assets/question.wav, its words in question.txt) and spoken
questions synthesised by Piper, each said `--takes` times (Piper varies each take). A transcript counts as
right when its words, lower-cased and without punctuation, are the spoken ones. CPU time is this process's
(`time.process_time`), which other load on the machine barely changes.

    python tools/eval_window.py --config config/edgevision.yaml --min-window 8 10 12
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgevision.config import find_config, load_config
from edgevision.daemon.bench import QUESTIONS
from edgevision.speech import recognition
from edgevision.speech.audio import read_wav
from edgevision.speech.recognition import WhisperRecognizer
from edgevision.speech.synthesis import PiperSynthesizer

MORE_QUESTIONS = (
    "Can you read the sign for me?",
    "How many people are in the room?",
    "Where is the door?",
    "Is the light on or off?",
    "What is written on the label of this bottle in my hand?",
    "Tell me what colour my shirt is.",
    "Is the cooker switched on?",
    "Which way is the exit from this room, and is anything in my path?",
)


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9 ]", "", text.lower().replace("colour", "color")).split()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config")
    parser.add_argument("--takes", type=int, default=3)
    parser.add_argument("--min-window", type=float, nargs="+", default=[recognition.MIN_WINDOW_S])
    args = parser.parse_args()
    config = load_config(find_config(args.config))
    clips = [("What is on the table in front of me?", read_wav(ROOT / "assets" / "question.wav"))]
    whisper, voice = config.speech.recognizer.options, config.speech.synthesizer.options  # kinds whisper, piper
    with PiperSynthesizer(voice.voice, length_scale=voice.length_scale) as piper:
        clips += [(q, piper.synthesize(q)) for q in (QUESTIONS + MORE_QUESTIONS) * args.takes]
    options = {"language": whisper.language, "beam_size": whisper.beam_size, "threads": whisper.threads}
    print(
        f"{len(clips)} spoken questions ({min(c.duration for _, c in clips):.1f}–"
        f"{max(c.duration for _, c in clips):.1f} s), Whisper {Path(whisper.model).name}"
    )
    print(f"{'window':<22} {'heard as spoken':>16} {'same as full':>13} {'CPU s (median)':>15} {'max':>6}")
    full_heard: list[str] = []
    for name, window in [("full (30 s)", None)] + [(f"fit, at least {w:g} s", w) for w in args.min_window]:
        with WhisperRecognizer(whisper.model, window="full" if window is None else "fit", **options) as recognizer:
            if window is not None:
                recognition.MIN_WINDOW_S = window
            recognizer.transcribe(clips[0][1])  # warm
            heard, cpu = [], []
            for _, clip in clips:
                started = time.process_time()
                heard.append(recognizer.transcribe(clip).text)
                cpu.append(time.process_time() - started)
        if window is None:
            full_heard = heard
        right = sum(words(h) == words(q) for h, (q, _) in zip(heard, clips, strict=True))
        same = sum(words(h) == words(f) for h, f in zip(heard, full_heard, strict=True))
        print(
            f"{name:<22} {f'{right}/{len(clips)}':>16} {f'{same}/{len(clips)}':>13} "
            f"{statistics.median(cpu):>15.3f} {max(cpu):>6.2f}"
        )
        for h, (q, _) in zip(heard, clips, strict=True):
            if words(h) != words(q):
                print(f"    said {q!r}, heard {h!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
