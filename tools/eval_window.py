"""Whisper's fitted encoder window against its full 30-s one: the words heard and the CPU time per question.

The questions are the bundled recording (assets/question.wav, its words in question.txt) and spoken
questions synthesised by Piper, each said `--takes` times (Piper varies each take). Every window hears the
same audio; with `--clips DIR` the takes are written there the first time and read back on later runs, so
runs compare on the same takes. A transcript counts as right when its words, lower-cased and without
punctuation, are the spoken ones. CPU time is this process's (`time.process_time`), which other load on the
machine barely changes. "in full" counts the fitted decodes that were done again over the 30-s window.

    python tools/eval_window.py --config config/edgevision.yaml --clips /tmp/takes --min-window 10 12 --margin 0 1.25
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
from edgevision.speech.audio import read_wav, write_wav
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
    parser.add_argument("--clips", type=Path, help="directory for the synthesised takes, reused when present")
    parser.add_argument("--min-window", type=float, nargs="+", default=[recognition.MIN_WINDOW_S])
    parser.add_argument("--margin", type=float, nargs="+", default=[recognition.WORD_MARGIN])
    args = parser.parse_args()
    config = load_config(find_config(args.config))
    clips = [("What is on the table in front of me?", read_wav(ROOT / "assets" / "question.wav"))]
    whisper, voice = config.speech.recognizer.options, config.speech.synthesizer.options  # kinds whisper, piper
    questions = (QUESTIONS + MORE_QUESTIONS) * args.takes
    files = [args.clips / f"take{i:03d}.wav" for i in range(len(questions))] if args.clips else []
    if files and all(f.is_file() for f in files):
        clips += [(q, read_wav(f)) for q, f in zip(questions, files, strict=True)]
    else:
        with PiperSynthesizer(voice.voice, length_scale=voice.length_scale) as piper:
            clips += [(q, piper.synthesize(q)) for q in questions]
        if args.clips:
            args.clips.mkdir(parents=True, exist_ok=True)
            for f, (_, clip) in zip(files, clips[1:], strict=True):
                write_wav(f, clip)
    options = {"language": whisper.language, "beam_size": whisper.beam_size, "threads": whisper.threads}
    print(
        f"{len(clips)} spoken questions ({min(c.duration for _, c in clips):.1f}–"
        f"{max(c.duration for _, c in clips):.1f} s), Whisper {Path(whisper.model).name}"
    )
    print(
        f"{'window':<30} {'heard as spoken':>16} {'same as full':>13} {'in full':>8} "
        f"{'CPU s (median)':>15} {'mean':>6} {'max':>6}"
    )
    full_heard: list[str] = []
    runs = [("full (30 s)", None, 0.0)]
    runs += [(f"fit, at least {w:g} s, margin {m:g}", w, m) for w in args.min_window for m in args.margin]
    for name, window, margin in runs:
        with WhisperRecognizer(whisper.model, window="full" if window is None else "fit", **options) as recognizer:
            if window is not None:
                recognition.MIN_WINDOW_S, recognition.WORD_MARGIN = window, margin
            recognizer.transcribe(clips[0][1])  # warm
            heard, cpu, in_full = [], [], 0
            for _, clip in clips:
                started = time.process_time()
                transcript = recognizer.transcribe(clip)
                cpu.append(time.process_time() - started)
                heard.append(transcript.text)
                in_full += window is not None and transcript.window_s == 30.0
        if window is None:
            full_heard = heard
        right = sum(words(h) == words(q) for h, (q, _) in zip(heard, clips, strict=True))
        same = sum(words(h) == words(f) for h, f in zip(heard, full_heard, strict=True))
        print(
            f"{name:<30} {f'{right}/{len(clips)}':>16} {f'{same}/{len(clips)}':>13} {in_full:>8} "
            f"{statistics.median(cpu):>15.3f} {statistics.mean(cpu):>6.3f} {max(cpu):>6.2f}"
        )
        for h, f, (q, _) in zip(heard, full_heard, clips, strict=True):
            if words(h) != words(q) or words(h) != words(f):
                print(f"    said {q!r}, heard {h!r}" + ("" if words(h) == words(f) else f" (full: {f!r})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
