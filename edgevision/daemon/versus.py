"""`edgevision bench e2e --peer`: the daemon against the pipeline a user would script, in one run.

The peer (`peer.py`) runs in its own process; `PeerProcess` starts it, waits until it has loaded and asks it
questions. `ProcessSampler` follows the memory and CPU time of each side's processes — the daemon's side is
this process and its children (the Piper voice) except the peer, the peer's side is its process and its
children — so the peak memory of a side counts every process it runs, sampled every 50 ms, and so do its CPU time
and its run-queue-free time (the wall time less the waits for a CPU that other programs held).
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgevision.config import Config
from edgevision.errors import ConfigError, EdgevisionError
from edgevision.telemetry.memory import descendants

logger = logging.getLogger(__name__)

_READY_TIMEOUT_S = 600.0
_PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


@dataclass(frozen=True)
class PeerModels:
    """The files the peer uses that edgevision does not: the vision tower as an mmproj GGUF. Its ONNX export
    (tools/export_tower.py mmproj) is what the daemon runs in the same benchmark."""

    mmproj: Path
    tower: Path


def attend_as_mtmd(assistant: Any) -> None:
    """Let the image rows attend to each other as llama.cpp's mtmd has them attend for the peer's mmproj: a
    LLaVA-style (mlp) projector's image is decoded causally, whatever the decoder (edgevision's Gemma 3
    layout decodes it non-causally, as mtmd does for Gemma 3's own projector). Both sides then decode the
    same prompt, greedily, and give the same answer."""
    import dataclasses

    assistant.chat_format = dataclasses.replace(assistant.chat_format, image_causal=True)


def peer_command(config: Config, mmproj: Path) -> list[str]:
    """The peer's command line, with edgevision's settings: same models, threads, answer length and prompt."""
    from edgevision.decoder.llama import _available_cores

    threads = config.decoder.n_threads or _available_cores()
    if (config.speech.recognizer.kind, config.speech.synthesizer.kind) != ("whisper", "piper"):
        raise ConfigError(
            "bench e2e --peer scripts faster-whisper and Piper as a user would: set speech.recognizer to kind "
            "whisper and speech.synthesizer to kind piper"
        )
    whisper, voice = config.speech.recognizer.options, config.speech.synthesizer.options
    return [
        sys.executable,
        "-m",
        "edgevision.daemon.peer",
        "--whisper",
        str(whisper.model),
        "--language",
        whisper.language or "en",
        "--beam-size",
        str(whisper.beam_size),
        "--whisper-threads",
        str(whisper.threads),
        "--decoder",
        str(config.decoder.model),
        "--mmproj",
        str(mmproj),
        "--threads",
        str(threads),
        "--n-ctx",
        str(config.decoder.n_ctx),
        "--max-tokens",
        str(config.decoder.max_answer_tokens),
        "--system",
        config.decoder.system_prompt,
        "--voice",
        str(voice.voice),
        "--length-scale",
        str(voice.length_scale),
    ]


class PeerProcess:
    """One running peer; `ask` sends a question and waits for its answer. Close it (or use `with`)."""

    def __init__(self, command: list[str], *, requests: list[dict[str, Any]] | None = None) -> None:
        self.spawned_at = time.monotonic()
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        self.pid = self._process.pid
        self._stderr: list[str] = []
        threading.Thread(target=self._drain, name=f"peer-stderr-{self.pid}", daemon=True).start()
        for request in requests or []:  # a cold start: the question is waiting before anything has loaded
            self._write(request)
        self.ready = self._read()
        if self.ready.get("event") != "ready":
            raise EdgevisionError(f"bench e2e: the peer did not start: {self.ready}")

    def ask(self, audio: Path, image: Path, release: float) -> dict[str, Any]:
        self._write({"audio": str(audio), "image": str(image), "release": release})
        return self.answer()

    def answer(self) -> dict[str, Any]:
        return self._read()

    def close(self) -> None:
        if self._process.poll() is None:
            try:
                self._process.stdin.write("\n")
                self._process.stdin.close()
                self._process.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self._process.kill()
                self._process.wait()

    def __enter__(self) -> PeerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, message: dict[str, Any]) -> None:
        assert self._process.stdin is not None
        self._process.stdin.write(json.dumps(message) + "\n")
        self._process.stdin.flush()

    def _read(self) -> dict[str, Any]:
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            self._process.wait(10)
            tail = " | ".join(self._stderr[-3:]) or "no message"
            raise EdgevisionError(f"bench e2e: the peer stopped (exit code {self._process.returncode}): {tail}")
        return json.loads(line)

    def _drain(self) -> None:
        assert self._process.stderr is not None
        for line in self._process.stderr:
            self._stderr = [*self._stderr[-20:], line.rstrip()]
            logger.debug("peer: %s", line.rstrip())


def peer_record(reply: dict[str, Any], *, pressed: float, scene: str, expected: str | None) -> dict[str, Any]:
    """The peer's answer as a record shaped like the daemon's (the fields `E2EReport` reads)."""
    release, moments = reply["release"], reply["moments"]

    def since(name: str, start: float) -> float | None:
        return round(moments[name] - start, 4) if name in moments else None

    durations = {
        "recording": round(release - pressed, 4),
        "recognition": since("heard", release),
        "recognition_after_release": since("heard", release),
        "release_to_first_token": since("first_token", release),
        "release_to_first_audio": since("first_audio", release),
        "release_to_answer_end": since("answered", release),
        "total": since("answered", pressed),
    }
    return {
        "mode": "peer",
        "scene": scene,
        "question": reply["question"],
        "expected": expected,
        "answer": reply["answer"] or None,
        "error": None if reply["answer"] else "the peer gave no answer",
        "durations_s": {k: v for k, v in durations.items() if v is not None},
        "moments": {"press": pressed, "release": release, **moments},
    }


@dataclass
class _Series:
    times: list[float] = field(default_factory=list)
    rss_kb: list[int] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)  # CPU time of all threads so far
    free_s: list[float] = field(default_factory=list)  # run-queue-free time so far (see ProcessSampler)
    last: dict[int, tuple[int, int]] = field(default_factory=dict)  # thread → (run ns, run-queue wait ns)


class ProcessSampler:
    """Samples, every `interval` seconds, the summed RSS of each named side's processes and, from every
    thread's /proc schedstat, their CPU time and run-queue-free time.

    Run-queue-free time estimates the wall time the side would have taken had it never waited for a CPU
    that other programs held: over each sampling step it is the step less the longest run-queue wait of any
    of its threads, but at least the longest time one of them ran (a 50-ms step in which a thread ran 10 ms
    and waited 30 counts 20 ms: its run and the 10 ms it slept). On an idle machine it equals the wall
    time. It is an estimate: waits of two threads in one step are taken to overlap, and a thread that spins
    while waiting for another counts as running. The sampler's own thread is left out.

    `sides` maps a name to a function returning that side's PIDs at the moment (processes come and go)."""

    def __init__(self, sides: dict[str, Callable[[], list[int]]], *, interval: float = 0.05) -> None:
        self.sides = sides
        self.interval = interval
        self.series = {name: _Series() for name in sides}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="process-sampler", daemon=True)
        self._own_thread = -1

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def peak_rss_mb(self, side: str, start: float, end: float) -> float | None:
        s = self.series[side]
        lo, hi = bisect.bisect_left(s.times, start), bisect.bisect_right(s.times, end)
        return max(s.rss_kb[lo:hi]) / 1024 if hi > lo else None

    def cpu_between(self, side: str, start: float, end: float) -> float | None:
        """CPU seconds the side's threads used between two moments (interpolated between samples)."""
        return self._between(side, "cpu_s", start, end)

    def free_between(self, side: str, start: float, end: float) -> float | None:
        """Run-queue-free seconds of the side between two moments."""
        return self._between(side, "free_s", start, end)

    def _between(self, side: str, name: str, start: float, end: float) -> float | None:
        s = self.series[side]
        if len(s.times) < 2 or start < s.times[0] or end > s.times[-1]:
            return None
        values = getattr(s, name)
        return _at(s.times, values, end) - _at(s.times, values, start)

    def _run(self) -> None:
        self._own_thread = threading.get_native_id()
        while not self._stop.is_set():
            now = time.monotonic()
            for name, pids in self.sides.items():
                self._sample(self.series[name], now, pids())
            self._stop.wait(self.interval)

    def _sample(self, s: _Series, now: float, pids: list[int]) -> None:
        rss = 0
        threads: dict[int, tuple[int, int]] = {}
        for pid in pids:
            rss += _rss_kb(pid)
            threads.update(_schedstats(pid))
        threads.pop(self._own_thread, None)
        if not s.times:
            s.times.append(now)
            s.rss_kb.append(rss)
            s.cpu_s.append(0.0)
            s.free_s.append(0.0)
            s.last = threads
            return
        step = now - s.times[-1]
        ran, waited = [0], [0]
        for tid, (run, wait) in threads.items():
            run0, wait0 = s.last.get(tid, (0, 0))  # a thread new in this step: all its time is in the step
            ran.append(run - run0)
            waited.append(wait - wait0)
        s.times.append(now)
        s.rss_kb.append(rss)
        s.cpu_s.append(s.cpu_s[-1] + sum(ran) / 1e9)
        free = min(step, max(step - max(waited) / 1e9, max(ran) / 1e9))
        s.free_s.append(s.free_s[-1] + max(0.0, free))
        s.last = threads


def _at(times: list[float], values: list[float], t: float) -> float:
    i = max(1, min(len(times) - 1, bisect.bisect_left(times, t)))
    t0, t1 = times[i - 1], times[i]
    v0, v1 = values[i - 1], values[i]
    return v0 + (v1 - v0) * ((t - t0) / (t1 - t0) if t1 > t0 else 1.0)


def _rss_kb(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat[stat.rindex(")") + 2 :].split()[21]) * _PAGE_KB  # field 24, rss in pages


def _schedstats(pid: int) -> dict[int, tuple[int, int]]:
    """{thread id: (ns on a CPU, ns waiting in a run queue)} for every thread of one process."""
    found = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            run, wait, _ = (task / "schedstat").read_text().split()
        except (OSError, ValueError):
            continue
        found[int(task.name)] = (int(run), int(wait))
    return found


def tree(pid: int, *, without: Callable[[], set[int]] = set) -> list[int]:
    """`pid` and its descendants, leaving out the processes in `without()` and theirs."""
    excluded = set()
    for root in without():
        excluded |= {root, *descendants(pid=root)}
    return [p for p in [pid, *descendants(pid=pid)] if p not in excluded]


def cold_main(argv: list[str] | None = None) -> int:
    """A cold edgevision: a new process loads the models as `edgevision ask` does and answers one spoken
    question (16 kHz samples in a .npy), writing the answer and the `time.monotonic()` of its moments."""
    import argparse
    import dataclasses

    started = time.monotonic()
    parser = argparse.ArgumentParser(prog="python -m edgevision.daemon.versus")
    for name in ("--config", "--decoder", "--tower", "--audio", "--image", "--out"):
        parser.add_argument(name, required=True)
    args = parser.parse_args(argv)
    import numpy as np

    from edgevision.assistant import Assistant
    from edgevision.config import load_config
    from edgevision.speech.audio import WHISPER_SAMPLE_RATE, Audio
    from edgevision.vision.preprocess import load_image

    config = load_config(Path(args.config))
    config = dataclasses.replace(
        config,
        vision=dataclasses.replace(config.vision, tower=Path(args.tower)),
        decoder=dataclasses.replace(config.decoder, model=Path(args.decoder)),  # `bench e2e --decoder`
    )
    moments: dict[str, float] = {}
    with Assistant.from_config(config) as assistant:
        attend_as_mtmd(assistant)
        loaded = time.monotonic()
        answer = assistant.ask(
            load_image(args.image),
            audio=Audio(np.load(args.audio), WHISPER_SAMPLE_RATE),
            on_speech=lambda _chunk: moments.setdefault("first_audio", time.monotonic()),
        )
    Path(args.out).write_text(
        json.dumps(
            {
                "started": started,
                "loaded": loaded,
                "question": answer.question,
                "answer": answer.text,
                "moments": moments,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(cold_main())
