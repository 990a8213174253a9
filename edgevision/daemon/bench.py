"""`edgevision bench e2e`: scripted spoken questions through the whole daemon, overlapped vs sequential.

A scripted user holds the (socket) button for as long as the question takes to say — the question is
spoken by Piper and played in through the WAV microphone in real time (the daemon hears only what has been
"said" so far, and on release only what was said while the button was held) — while the still-image camera shows one of the
scenes; the answer goes to a WAV speaker. The two modes alternate question by question in one run on the
same models, and the per-stage medians are printed side by side. The headline is release → first audio:
how long the user waits after letting go of the button.
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

from PIL import Image, ImageDraw

from edgevision.config import Config
from edgevision.errors import EdgevisionError

logger = logging.getLogger(__name__)

QUESTIONS = ("What is in front of me?", "What colour is the thing on the table?", "Is there any text I can read?")
MODES = ("overlapped", "sequential")
TARGET = 0.5  # overlapped release → first audio, as a fraction of sequential
_TIMEOUT_S = 600.0
# (label, record key, unit); durations in seconds unless the unit says otherwise
ROWS = (
    ("hold (question spoken)", "recording", "s"),
    ("capture (frame at press)", "capture", "s"),
    ("recognition", "recognition", "s"),
    ("  of which after release", "recognition_after_release", "s"),
    ("vision encode", "vision_encode", "s"),
    ("image prefill", "image_prefill", "s"),
    ("ocr (beside vision)", "ocr", "s"),
    ("  longer than vision", "ocr_wait", "s"),
    ("  of which after release", "look_after_release", "s"),
    ("text prefill", "text_prefill", "s"),
    ("decode", "decode_tokens_per_s", "tok/s"),
    ("release → first token", "release_to_first_token", "s"),
    ("release → first audio", "release_to_first_audio", "s"),
    ("press → answer spoken", "total", "s"),
)


@dataclass
class E2EReport:
    records: list[dict[str, Any]]
    images: list[str]

    def by_mode(self, mode: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["mode"] == mode and r["answer"] is not None]

    def median(self, mode: str, key: str) -> float | None:
        values = [r["durations_s"][key] for r in self.by_mode(mode) if key in r["durations_s"]]
        return statistics.median(values) if values else None

    def reading(self, mode: str, meter: str, key: str) -> float | None:
        values = [r[meter][key] for r in self.by_mode(mode) if isinstance(r.get(meter), dict) and key in r[meter]]
        return statistics.median(values) if values else None

    def table(self) -> str:
        n = {mode: len(self.by_mode(mode)) for mode in MODES}
        lines = [
            (f"edgevision bench e2e: {n['overlapped']} + {n['sequential']} scripted spoken questions about "
             f"{len(self.images)} scenes, medians"),
            f"{'stage':<28} {'overlapped':>14} {'sequential':>14} {'ratio':>7}",
        ]
        for label, key, unit in ROWS:
            lines.append(self._row(label, self.median("overlapped", key), self.median("sequential", key), unit))
        lines.append(self._row("peak RSS", self.reading("overlapped", "memory", "peak_rss_mb"),
                               self.reading("sequential", "memory", "peak_rss_mb"), "MB"))
        joules = [self.reading(mode, "energy", "joules") for mode in MODES]
        if None in joules:
            reasons = {r["energy"].get("reason") for r in self.records if isinstance(r.get("energy"), dict)}
            lines.append(f"{'energy per answer':<28} {'; '.join(sorted(filter(None, reasons)))}")
        else:
            lines.append(self._row("energy per answer", *joules, "J"))
        over, seq = self.median("overlapped", "release_to_first_audio"), self.median("sequential", "release_to_first_audio")
        if over is not None and seq:
            verdict = "met" if over / seq <= TARGET else "NOT met"
            lines.append(f"headline: release → first audio {over:.2f} s overlapped vs {seq:.2f} s sequential = "
                         f"{over / seq:.2f}× (target ≤ {TARGET}×: {verdict})")
        overlapped = self.by_mode("overlapped")
        if overlapped:
            early = sum(bool(r.get("early_transcript")) for r in overlapped)
            made = sum(r.get("early_transcripts_made", 0) for r in overlapped)
            lines.append(f"early transcript (recognised while held) used in {early} of {len(overlapped)} overlapped "
                         f"answers; {made} made in all")
        failed = [r for r in self.records if r["answer"] is None]
        if failed:
            lines.append(f"{len(failed)} interaction(s) gave no answer: {failed[0]['error']}")
        return "\n".join(lines)

    @staticmethod
    def _row(label: str, a: float | None, b: float | None, unit: str) -> str:
        def cell(v: float | None) -> str:
            return f"{v:8.2f} {unit:<5}" if v is not None else f"{'—':>8}{'':6}"

        ratio = f"{a / b:7.2f}" if a is not None and b else f"{'':>7}"
        return f"{label:<28} {cell(a):>14} {cell(b):>14} {ratio}"


def run_e2e(config: Config, *, n: int = 3, images: list[Path] | None = None, pause: float = 0.0) -> E2EReport:
    """Ask `n` questions in each mode (alternating) through a daemon built on the config's models. With
    `pause`, the scripted user stays quiet that many seconds after each question before letting go (the
    quiet is part of the clip the microphone plays in, and of the hold)."""
    from edgevision.assistant import Assistant
    from edgevision.daemon.daemon import Daemon
    from edgevision.daemon.state import State
    from edgevision.devices.backends import open_camera
    from edgevision.devices.socket_button import SocketButton, send_button
    from edgevision.devices.wav_devices import WavMicrophone, WavSpeaker
    from edgevision.moe.placement import PlacementMeter
    from edgevision.telemetry.memory import MemoryMeter
    from edgevision.telemetry.power import EnergyMeter, open_power_reader

    if n < 1:
        raise EdgevisionError("bench e2e: --interactions must be at least 1")
    work = Path(tempfile.mkdtemp(prefix="ev-e2e-"))
    named = [(p.name, _open_image(p)) for p in images] if images else default_scenes()
    scenes = [image for _, image in named]
    camera_file = work / "camera.png"
    scenes[0].save(camera_file)
    records: queue.Queue[dict[str, Any]] = queue.Queue()
    power = open_power_reader(config.telemetry.power_reader)
    interval = config.telemetry.sample_interval_ms / 1000
    assistant = Assistant.from_config(config)
    microphone, speaker = WavMicrophone(realtime=True), WavSpeaker(work / "spoken", realtime=False)
    control = SocketButton(work / "button.sock")
    daemon = Daemon(
        assistant=assistant,
        camera=open_camera("image", str(camera_file)),
        microphone=microphone,
        speaker=speaker,
        buttons=[control],
        control=control,
        settings=dataclasses.replace(config.daemon, follow_up_s=0.0, max_recording_s=60.0),
        meters={
            "memory": lambda: MemoryMeter(interval=interval),
            "energy": lambda: EnergyMeter(power, interval=interval),
            "placement": lambda: PlacementMeter(assistant.placement),
        },
    )
    daemon.on_record = records.put
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(daemon.run(),), name="daemon-loop")
    thread.start()
    results: list[dict[str, Any]] = []
    try:
        _wait(lambda: daemon.status()["ready"] or not thread.is_alive(), "the daemon to warm up")
        if not thread.is_alive():
            raise EdgevisionError("bench e2e: the daemon stopped while starting; run with --debug to see why")
        clips = [_then_quiet(assistant.synthesizer.synthesize(q), pause) for q in QUESTIONS]
        for i in range(n):
            for mode in MODES if i % 2 == 0 else MODES[::-1]:
                scene, clip = scenes[i % len(scenes)], clips[i % len(clips)]
                scene.save(camera_file.with_suffix(".new.png"))
                os.replace(camera_file.with_suffix(".new.png"), camera_file)  # whole, never half-written
                time.sleep(0.3)  # the camera re-reads a changed file within 0.1 s
                daemon.mode = mode
                _wait(lambda: daemon.state is State.IDLE and not speaker.playing, "the daemon to be idle")
                microphone.push(clip)
                send_button(control.path, "press")
                time.sleep(clip.duration)  # the user speaks while holding the button
                send_button(control.path, "release")
                record = records.get(timeout=_TIMEOUT_S)
                logger.info("%s: %s", mode, record["durations_s"].get("release_to_first_audio"))
                results.append(record)
    finally:
        loop.call_soon_threadsafe(daemon.stop, "benchmark done")
        thread.join(_TIMEOUT_S)
        loop.close()
        power.close()
        shutil.rmtree(work, ignore_errors=True)
    return E2EReport(results, [name for name, _ in named])


def _then_quiet(clip: Any, seconds: float) -> Any:
    import numpy as np

    from edgevision.speech.audio import Audio

    quiet = np.zeros(int(seconds * clip.sample_rate), dtype=np.float32)
    return Audio(np.concatenate([clip.samples, quiet]), clip.sample_rate)


def default_scenes() -> list[tuple[str, Image.Image]]:
    """The bundled photo (when run from a checkout) and two drawn scenes."""
    scenes = []
    photo = Path(__file__).resolve().parents[2] / "assets" / "photo.jpg"
    if photo.is_file():
        scenes.append((photo.name, _open_image(photo)))
    table = Image.new("RGB", (640, 480), (200, 190, 170))
    draw = ImageDraw.Draw(table)
    draw.rectangle((0, 300, 640, 480), fill=(120, 80, 50))  # a table top
    draw.ellipse((260, 200, 380, 320), fill=(200, 30, 30))  # a red ball on it
    sign = Image.new("RGB", (640, 480), (30, 90, 40))
    ImageDraw.Draw(sign).text((200, 220), "EXIT 12", fill=(255, 255, 255))
    return scenes + [("drawn table with a ball", table), ("drawn exit sign", sign)]


def _open_image(path: Path) -> Image.Image:
    from edgevision.vision.preprocess import load_image

    return load_image(path)


def _wait(condition, what: str, timeout: float = _TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise EdgevisionError(f"bench e2e: waited {timeout:.0f} s for {what}")
        time.sleep(0.05)

