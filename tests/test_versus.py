"""`edgevision bench e2e --peer`: the scripted peer, the report against it, and memory over a process tree."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgevision.daemon.bench import E2EReport, _same_words
from edgevision.daemon.versus import ProcessSampler, tree

ROOT = Path(__file__).resolve().parents[1]


# Tier 1: pure logic.


def _record(mode: str, first_audio: float, heard: str = "What is in front of me?") -> dict:
    return {
        "mode": mode,
        "answer": "A cup.",
        "question": heard,
        "expected": "What is in front of me?",
        "durations_s": {"release_to_first_audio": first_audio},
        "usage": {"peak_rss_mb": 600.0 if mode == "peer" else 700.0},
    }


def test_the_report_puts_the_daemon_beside_the_peer_and_judges_the_median_ratio() -> None:
    records = [_record("overlapped", t) for t in (0.30, 0.40, 0.90)]
    records += [_record("peer", t) for t in (0.70, 1.00, 1.10)]
    records[-1]["question"] = "What is in front of the sea?"  # the peer misheard one
    table = E2EReport(records, ["photo.jpg"], modes=("overlapped", "peer")).table()
    assert "release → first audio 0.40 s overlapped vs 1.00 s peer = 0.40× (target ≤ 0.5×: met)" in table
    assert "question heard as spoken" in table and "3/3" in table and "2/3" in table
    assert "peak RSS, all processes" in table
    slower = [_record("overlapped", t) for t in (0.6, 0.6, 0.6)] + [_record("peer", 1.0)]
    assert "0.60× (target ≤ 0.5×: NOT met)" in E2EReport(slower, ["x"], modes=("overlapped", "peer")).table()


def test_a_question_is_heard_as_spoken_when_its_words_match_whatever_the_punctuation() -> None:
    assert _same_words("is the light on or off.", "Is the light on or off?")
    assert _same_words("What color is the cup?", "What colour is the cup?")
    assert not _same_words("What colors the thing on the table?", "What colour is the thing on the table?")
    assert not _same_words(None, "Anything?")


# Tier 3: real processes and models.


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc to follow processes")
def test_peak_memory_of_a_side_counts_its_child_processes(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(300 * 2**20); time.sleep(3)"])
    sampler = ProcessSampler(
        {
            "tree": lambda: tree(os.getpid()),
            "alone": lambda: [os.getpid()],
            "without": lambda: tree(os.getpid(), without=lambda: {child.pid}),
        }
    )
    started = time.monotonic()
    sampler.start()
    try:
        child.wait(30)
    finally:
        sampler.stop()
    ended = time.monotonic()
    with_child = sampler.peak_rss_mb("tree", started, ended)
    assert with_child - sampler.peak_rss_mb("alone", started, ended) > 250  # the child's 300 MB
    assert sampler.peak_rss_mb("without", started, ended) < with_child - 250
    assert sampler.cpu_between("tree", started + 0.1, ended - 0.1) >= 0


def test_the_peer_answers_a_recorded_question_with_its_own_models(
    models_dir: Path, whisper_dir: Path, piper_voice: Path, gemma3_gguf: Path, tmp_path: Path
) -> None:
    from edgevision.daemon.versus import PeerProcess
    from edgevision.speech.audio import read_wav, resample

    mmproj = tmp_path / "mmproj.gguf"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "make_mmproj.py"),
            "--type",
            "mlp",
            "--n-embd",
            "640",
            "--out",
            str(mmproj),
        ],
        check=True,
        capture_output=True,
    )
    samples = resample(read_wav(ROOT / "assets" / "question.wav"), 16_000).samples
    np.save(tmp_path / "question.npy", samples.astype(np.float32))
    command = [
        sys.executable,
        "-m",
        "edgevision.daemon.peer",
        "--whisper",
        str(whisper_dir),
        "--decoder",
        str(gemma3_gguf),
        "--mmproj",
        str(mmproj),
        "--threads",
        "2",
        "--voice",
        str(piper_voice),
        "--max-tokens",
        "12",
        "--system",
        "Answer in one short sentence.",
    ]
    with PeerProcess(command) as peer:
        release = time.monotonic()
        reply = peer.ask(tmp_path / "question.npy", ROOT / "assets" / "photo.jpg", release)
    assert _same_words(reply["question"], "What is on the table in front of me?")
    assert reply["answer"] and reply["speech_s"] > 0.2
    moments = reply["moments"]
    assert release < moments["heard"] < moments["first_token"] <= moments["first_audio"] <= moments["answered"]
    assert "piper" not in sys.modules  # Piper (GPL) ran in the peer's process only


def test_bench_e2e_refuses_cold_rounds_without_the_peer_in_one_line() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgevision",
            "bench",
            "e2e",
            "--config",
            str(ROOT / "config" / "edgevision.yaml"),
            "--cold",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "edgevision: error: bench e2e: --cold N needs --peer and N of 0 or more"
