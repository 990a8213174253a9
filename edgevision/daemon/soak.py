"""`edgevision bench soak`: many spoken questions through one daemon, watching for leaks.

The daemon is built as `bench e2e` builds it — the config's models, a still-image camera, a WAV microphone
playing the bundled spoken question in, a WAV speaker, the socket button pressed and released through the
control socket — and answers `n` questions in a row. After each answer the process's resident memory
(VmRSS, plus Piper's, which runs as a child), open file descriptors and threads are sampled. The report
compares the first tenth of the answers with the last tenth (medians for memory, maxima for descriptors
and threads): a leak shows as growth, noise from other load does not (these are counts, not timings).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import queue
import shutil
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgevision.config import Config
from edgevision.errors import EdgevisionError

logger = logging.getLogger(__name__)

RSS_GOAL = 0.05  # the last tenth's median RSS at most 5 % above the first tenth's
_TIMEOUT_S = 300.0
_HOLD_S = 0.4  # longer than a tap (daemon.tap_s)


@dataclass
class Sample:
    answer: int
    rss_mb: float  # the daemon's process
    piper_rss_mb: float  # its children (Piper)
    fds: int
    threads: int
    error: str | None

    def to_record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SoakReport:
    samples: list[Sample]
    seconds: float
    tokens: int

    def tenths(self) -> tuple[list[Sample], list[Sample]]:
        k = max(1, len(self.samples) // 10)
        return self.samples[:k], self.samples[-k:]

    def summary(self) -> dict[str, Any]:
        first, last = self.tenths()

        def median(samples: list[Sample], key: str) -> float:
            return statistics.median(getattr(s, key) for s in samples)

        rss = (median(first, "rss_mb"), median(last, "rss_mb"))
        piper = (median(first, "piper_rss_mb"), median(last, "piper_rss_mb"))
        fds = (max(s.fds for s in first), max(s.fds for s in last))
        threads = (max(s.threads for s in first), max(s.threads for s in last))
        growth = (rss[1] - rss[0]) / rss[0]
        return {
            "answers": len(self.samples),
            "errors": sum(s.error is not None for s in self.samples),
            "tenth": len(first),
            "rss_mb": rss,
            "rss_growth": growth,
            "piper_rss_mb": piper,
            "fds": fds,
            "threads": threads,
            "rss_goal_met": growth < RSS_GOAL,
            "no_fd_growth": fds[1] <= fds[0],
            "seconds": self.seconds,
            "answer_tokens": self.tokens,
        }

    def table(self) -> str:
        s = self.summary()
        n = s["tenth"]
        lines = [
            (
                f"edgevision bench soak: {s['answers']} spoken questions through one daemon in {s['seconds']:.0f} s "
                f"(answers of up to {s['answer_tokens']} tokens; {s['errors']} without an answer)"
            ),
            f"{'':<26} {f'first {n}':>12} {f'last {n}':>12} {'change':>10}",
        ]
        for label, key, fmt in (
            ("RSS, median (MB)", "rss_mb", "{:12.1f}"),
            ("Piper RSS, median (MB)", "piper_rss_mb", "{:12.1f}"),
            ("open descriptors, max", "fds", "{:12d}"),
            ("threads, max", "threads", "{:12d}"),
        ):
            a, b = s[key]
            change = f"{(b - a) / a * 100:+9.1f}%" if key.endswith("mb") and a else f"{b - a:+10}"
            lines.append(f"{label:<26} {fmt.format(a)} {fmt.format(b)} {change}")
        lines.append(
            f"RSS growth {s['rss_growth'] * 100:+.1f}% (goal < {RSS_GOAL * 100:.0f}%: "
            f"{'met' if s['rss_goal_met'] else 'NOT met'}); descriptors "
            f"{'did not grow' if s['no_fd_growth'] else 'GREW'}"
        )
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"summary": self.summary(), "samples": [s.to_record() for s in self.samples]}


def run_soak(config: Config, *, n: int = 500, tokens: int = 8, question: Path | None = None) -> SoakReport:
    """Ask `n` questions (the bundled spoken question about the bundled photo) through one daemon."""
    from edgevision.assistant import Assistant
    from edgevision.daemon.bench import default_scenes
    from edgevision.daemon.daemon import Daemon
    from edgevision.daemon.state import State
    from edgevision.devices.backends import open_camera
    from edgevision.devices.socket_button import SocketButton, send_button
    from edgevision.devices.wav_devices import WavMicrophone, WavSpeaker
    from edgevision.telemetry.log import InteractionLog
    from edgevision.telemetry.memory import MemoryMeter

    if n < 10:
        raise EdgevisionError("bench soak: -n must be at least 10 (the first and last tenths are compared)")
    question = question or Path(__file__).resolve().parents[2] / "assets" / "question.wav"
    if not question.is_file():
        raise EdgevisionError(f"bench soak: no spoken question at {question}; pass --question a WAV file")
    work = Path(tempfile.mkdtemp(prefix="ev-soak-"))
    camera_file = work / "camera.png"
    default_scenes()[0][1].save(camera_file)
    records: queue.Queue[dict[str, Any]] = queue.Queue()
    assistant = Assistant.from_config(config)
    assistant.max_answer_tokens = tokens
    microphone, speaker = WavMicrophone(question, loop=True), WavSpeaker(work / "spoken", realtime=False)
    control = SocketButton(work / "button.sock")
    log = InteractionLog(work / "interactions.jsonl")
    interval = config.telemetry.sample_interval_ms / 1000
    daemon = Daemon(
        assistant=assistant,
        camera=open_camera("image", str(camera_file)),
        microphone=microphone,
        speaker=speaker,
        buttons=[control],
        control=control,
        log=log,
        settings=dataclasses.replace(config.daemon, follow_up_s=0.0, earcons=True),
        meters={"memory": lambda: MemoryMeter(interval=interval)},
    )
    daemon.closing.append(log.close)
    daemon.on_record = records.put
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(daemon.run(),), name="daemon-loop")
    thread.start()
    samples: list[Sample] = []
    started = time.monotonic()
    try:
        _wait(lambda: daemon.status()["ready"] or not thread.is_alive(), "the daemon to warm up")
        if not thread.is_alive():
            raise EdgevisionError("bench soak: the daemon stopped while starting; run with --debug to see why")
        started = time.monotonic()
        for i in range(n):
            _wait(lambda: daemon.state is State.IDLE and not speaker.playing, "the daemon to be idle")
            send_button(control.path, "press")
            time.sleep(_HOLD_S)
            send_button(control.path, "release")
            record = records.get(timeout=_TIMEOUT_S)
            _wait(lambda: daemon.state is State.IDLE, "the daemon to be idle")
            for played in speaker.played:  # the speaker's files are the bench's, not the daemon's, memory
                played.unlink(missing_ok=True)
            speaker.played.clear()
            samples.append(_sample(i + 1, record.get("error")))
            if (i + 1) % max(1, n // 20) == 0:
                logger.warning(
                    "soak: %d/%d answers, RSS %.1f MB, %d descriptors, %d threads",
                    i + 1,
                    n,
                    samples[-1].rss_mb,
                    samples[-1].fds,
                    samples[-1].threads,
                )
    finally:
        loop.call_soon_threadsafe(daemon.stop, "soak done")
        thread.join(_TIMEOUT_S)
        loop.close()
        shutil.rmtree(work, ignore_errors=True)
    return SoakReport(samples, time.monotonic() - started, tokens)


def _sample(answer: int, error: str | None) -> Sample:
    from edgevision.telemetry.memory import descendants, process_status

    own = process_status()
    children = sum(process_status(pid=pid).get("VmRSS", 0) for pid in descendants())
    return Sample(
        answer=answer,
        rss_mb=own.get("VmRSS", 0) / 1024,
        piper_rss_mb=children / 1024,
        fds=len(os.listdir("/proc/self/fd")),
        threads=_threads(),
        error=error,
    )


def _threads() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return threading.active_count()


def _wait(condition: Any, what: str, timeout: float = _TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise EdgevisionError(f"bench soak: waited {timeout:.0f} s for {what}")
        time.sleep(0.02)
