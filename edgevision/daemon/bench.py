"""`edgevision bench e2e`: scripted spoken questions through the whole daemon, overlapped vs sequential.

A scripted user holds the (socket) button for as long as the question takes to say — the question is
spoken by Piper and played in through the WAV microphone in real time (the daemon hears only what has been
"said" so far, and on release only what was said while the button was held) — while the still-image camera shows one of the
scenes; the answer goes to a WAV speaker. The two modes alternate question by question in one run on the
same models, and the per-stage medians are printed side by side. The headline is release → first audio:
how long the user waits after letting go of the button.

With `peer`, the daemon (overlapped) is compared instead with the sequential pipeline a user would script
(`peer.py`, its own process; `versus.py`), question by question, warm, and with `cold` rounds in which each
side is a new process asked one question (release = the process's start). Recorded questions (`audio`)
replace the synthesised ones. Every side's memory and CPU time count all of its processes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
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
from edgevision.daemon.versus import PeerModels
from edgevision.errors import EdgevisionError

logger = logging.getLogger(__name__)

QUESTIONS = ("What is in front of me?", "What colour is the thing on the table?", "Is there any text I can read?")
MODES = ("overlapped", "sequential")
PEER_MODES = ("overlapped", "peer")
TARGET = 0.5  # overlapped release → first audio, as a fraction of sequential (or of the peer's)
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
    modes: tuple[str, str] = MODES
    questions: str = "scripted spoken"
    cold: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def by_mode(self, mode: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["mode"] == mode and r["answer"] is not None]

    def median(self, mode: str, key: str) -> float | None:
        values = [r["durations_s"][key] for r in self.by_mode(mode) if key in r["durations_s"]]
        return statistics.median(values) if values else None

    def reading(self, mode: str, meter: str, key: str) -> float | None:
        values = [r[meter][key] for r in self.by_mode(mode) if isinstance(r.get(meter), dict) and key in r[meter]]
        return statistics.median(values) if values else None

    def table(self) -> str:
        a, b = self.modes
        n = {mode: len(self.by_mode(mode)) for mode in self.modes}
        lines = [
            (
                f"edgevision bench e2e: {n[a]} + {n[b]} {self.questions} questions about {len(self.images)} scenes, "
                f"warm, interleaved, medians"
            ),
            f"{'stage':<28} {a:>14} {b:>14} {'ratio':>7}",
        ]
        for label, key, unit in ROWS:
            lines.append(self._row(label, self.median(a, key), self.median(b, key), unit))
            if key == "release_to_first_audio":
                lines.append(
                    self._row(
                        "  without CPU-queue waits",
                        self.reading(a, "usage", "free_to_first_audio_s"),
                        self.reading(b, "usage", "free_to_first_audio_s"),
                        "s",
                    )
                )
        lines.append(
            self._row(
                "CPU, release → first audio",
                self.reading(a, "usage", "cpu_to_first_audio_s"),
                self.reading(b, "usage", "cpu_to_first_audio_s"),
                "s",
            )
        )
        lines.append(
            self._row(
                "peak RSS, all processes",
                self.reading(a, "usage", "peak_rss_mb"),
                self.reading(b, "usage", "peak_rss_mb"),
                "MB",
            )
        )
        joules = [self.reading(mode, "energy", "joules") for mode in self.modes]
        if None in joules:
            reasons = {r["energy"].get("reason") for r in self.records if isinstance(r.get("energy"), dict)}
            if reasons - {None}:
                lines.append(f"{'energy per answer':<28} {'; '.join(sorted(filter(None, reasons)))}")
        else:
            lines.append(self._row("energy per answer", *joules, "J"))
        heard = {mode: [r for r in self.by_mode(mode) if r.get("expected")] for mode in self.modes}
        if heard[a] or heard[b]:
            cells = [
                f"{sum(_same_words(r['question'], r['expected']) for r in heard[m])}/{len(heard[m])}"
                for m in self.modes
            ]
            lines.append(f"{'question heard as spoken':<28} {cells[0]:>14} {cells[1]:>14}")
        over, other = self.median(a, "release_to_first_audio"), self.median(b, "release_to_first_audio")
        if over is not None and other:
            verdict = "met" if over / other <= TARGET else "NOT met"
            lines.append(
                f"headline: release → first audio {over:.2f} s {a} vs {other:.2f} s {b} = "
                f"{over / other:.2f}× (target ≤ {TARGET}×: {verdict})"
            )
        over, other = (self.reading(m, "usage", "free_to_first_audio_s") for m in self.modes)
        if over is not None and other:
            verdict = "met" if over / other <= TARGET else "NOT met"
            lines.append(
                f"  without waits for CPUs other programs held: {over:.2f} s vs {other:.2f} s = "
                f"{over / other:.2f}× ({verdict})"
            )
        overlapped = self.by_mode("overlapped")
        if overlapped:
            early = sum(bool(r.get("early_transcript")) for r in overlapped)
            made = sum(r.get("early_transcripts_made", 0) for r in overlapped)
            lines.append(
                f"early transcript (recognised while held) used in {early} of {len(overlapped)} overlapped "
                f"answers; {made} made in all"
            )
        if self.cold:
            lines += self._cold_table()
        failed = [r for r in self.records if r["answer"] is None]
        if failed:
            lines.append(f"{len(failed)} interaction(s) gave no answer: {failed[0]['error']}")
        return "\n".join(lines)

    def _cold_table(self) -> list[str]:
        sides = ("edgevision", "peer")
        runs = {
            side: [r for r in self.cold if r["side"] == side and r.get("first_audio_s") is not None] for side in sides
        }
        heading = (
            f"cold: a new process per question, started as the button is let go ({len(runs['edgevision'])} + "
            f"{len(runs['peer'])} runs, model files in the page cache), medians"
        )
        lines = [heading, f"{'':<28} {'edgevision':>14} {'peer':>14} {'ratio':>7}"]
        rows = (
            ("start → models loaded", "loaded_s", "s"),
            ("start → first audio", "first_audio_s", "s"),
            ("peak RSS, all processes", "peak_rss_mb", "MB"),
        )
        for label, key, unit in rows:
            values = [[r[key] for r in runs[side] if r.get(key) is not None] for side in sides]
            lines.append(self._row(label, *(statistics.median(v) if v else None for v in values), unit))
        return lines

    @staticmethod
    def _row(label: str, a: float | None, b: float | None, unit: str) -> str:
        def cell(v: float | None) -> str:
            return f"{v:8.2f} {unit:<5}" if v is not None else f"{'—':>8}{'':6}"

        ratio = f"{a / b:7.2f}" if a is not None and b else f"{'':>7}"
        return f"{label:<28} {cell(a):>14} {cell(b):>14} {ratio}"


def run_e2e(
    config: Config,
    *,
    n: int = 3,
    images: list[Path] | None = None,
    pause: float = 0.0,
    audio: list[Path] | None = None,
    peer: PeerModels | None = None,
    cold: int = 0,
    config_path: Path | None = None,
) -> E2EReport:
    """Ask `n` questions in each mode (alternating) through a daemon built on the config's models. With
    `pause`, the scripted user stays quiet that many seconds after each question before letting go (the
    quiet is part of the clip the microphone plays in, and of the hold). `audio`: recorded questions (WAV)
    instead of synthesised ones. `peer`: overlapped against the scripted peer (its tower replaces the
    config's, so both run the same one), then `cold` new-process rounds of each."""
    from edgevision.assistant import Assistant
    from edgevision.daemon.daemon import Daemon
    from edgevision.daemon.state import Mode, State
    from edgevision.daemon.versus import (
        PeerProcess,
        ProcessSampler,
        attend_as_mtmd,
        peer_command,
        peer_record,
        tree,
    )
    from edgevision.devices.backends import open_camera
    from edgevision.devices.socket_button import SocketButton, send_button
    from edgevision.devices.wav_devices import WavMicrophone, WavSpeaker
    from edgevision.moe.placement import PlacementMeter
    from edgevision.speech.audio import WHISPER_SAMPLE_RATE, read_wav, resample
    from edgevision.telemetry.memory import MemoryMeter
    from edgevision.telemetry.power import EnergyMeter, open_power_reader

    if n < 1:
        raise EdgevisionError("bench e2e: --interactions must be at least 1")
    if peer is not None:
        for path in (peer.mmproj, peer.tower):
            if not path.is_file():
                raise EdgevisionError(f"bench e2e --peer: {path} not found; make it with `make peer-models`")
        config = dataclasses.replace(config, vision=dataclasses.replace(config.vision, tower=peer.tower))
    modes = PEER_MODES if peer is not None else MODES
    work = Path(tempfile.mkdtemp(prefix="ev-e2e-"))
    named = [(p.name, _open_image(p)) for p in images] if images else default_scenes()
    scenes = [image for _, image in named]
    scene_files = []
    for i, scene in enumerate(scenes):
        scene_files.append(work / f"scene{i}.png")
        scene.save(scene_files[-1])
    camera_file = work / "camera.png"
    scenes[0].save(camera_file)
    records: queue.Queue[dict[str, Any]] = queue.Queue()
    power = open_power_reader(config.telemetry.power_reader)
    interval = config.telemetry.sample_interval_ms / 1000
    peers: set[int] = set()  # the peer's processes, left out of the daemon's side
    sampler = ProcessSampler(
        {
            "daemon": lambda: tree(os.getpid(), without=lambda: set(peers)),
            "peer": lambda: [p for root in list(peers) for p in tree(root)],
        }
    )
    sampler.start()
    peer_process = None
    if peer is not None:  # loaded first, so the daemon's warm-up does not share the CPU with its loading
        peer_process = PeerProcess(peer_command(config, peer.mmproj))
        peers.add(peer_process.pid)
    assistant = Assistant.from_config(config)
    if peer is not None:
        attend_as_mtmd(assistant)
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
    cold_runs: list[dict[str, Any]] = []
    try:
        _wait(lambda: daemon.status()["ready"] or not thread.is_alive(), "the daemon to warm up")
        if not thread.is_alive():
            raise EdgevisionError("bench e2e: the daemon stopped while starting; run with --debug to see why")
        if audio:
            spoken = [(path.name, read_wav(path), _expected(path)) for path in audio]
        else:
            spoken = [(q, assistant.synthesizer.synthesize(q), q) for q in QUESTIONS]
        clips = [_then_quiet(clip, pause) for _, clip, _ in spoken]
        clip_files = []
        for i, clip in enumerate(clips):  # what the peer's script recorded, at Whisper's rate
            clip_files.append(work / f"question{i}.npy")
            _save_samples(clip_files[-1], resample(clip, WHISPER_SAMPLE_RATE).samples)
        if peer_process is not None:  # warm it as the daemon warmed itself
            peer_process.ask(clip_files[0], scene_files[0], time.monotonic())
        for i in range(n):
            for mode in modes if i % 2 == 0 else modes[::-1]:
                k = i % len(clips)
                scene, clip = scenes[i % len(scenes)], clips[k]
                if mode == "peer":
                    assert peer_process is not None
                    pressed = time.monotonic()
                    time.sleep(clip.duration)  # the user speaks while holding the button; the script records
                    reply = peer_process.ask(clip_files[k], scene_files[i % len(scenes)], time.monotonic())
                    record = peer_record(reply, pressed=pressed, scene=named[i % len(scenes)][0], expected=spoken[k][2])
                    side = "peer"
                else:
                    scene.save(camera_file.with_suffix(".new.png"))
                    os.replace(camera_file.with_suffix(".new.png"), camera_file)  # whole, never half-written
                    time.sleep(0.3)  # the camera re-reads a changed file within 0.1 s
                    daemon.mode = Mode(mode)
                    _wait(lambda: daemon.state is State.IDLE and not speaker.playing, "the daemon to be idle")
                    microphone.push(clip)
                    pressed = time.monotonic()
                    send_button(control.path, "press")
                    time.sleep(clip.duration)  # the user speaks while holding the button
                    released = time.monotonic()
                    send_button(control.path, "release")
                    record = dict(
                        records.get(timeout=_TIMEOUT_S), expected=spoken[k][2], scene=named[i % len(scenes)][0]
                    )
                    durations = record["durations_s"]
                    record["moments"] = {"press": pressed, "release": released}
                    for name, key in (("first_audio", "release_to_first_audio"), ("answered", "release_to_answer_end")):
                        if key in durations:
                            record["moments"][name] = released + durations[key]
                    side = "daemon"
                time.sleep(3 * sampler.interval)  # a sample after the end
                record["usage"] = _usage(sampler, side, record["moments"])
                logger.info("%s: %s", mode, record["durations_s"].get("release_to_first_audio"))
                results.append(record)
    finally:
        loop.call_soon_threadsafe(daemon.stop, "benchmark done")
        thread.join(_TIMEOUT_S)
        loop.close()
        power.close()
        if peer_process is not None:
            peer_process.close()
    try:
        if peer is not None and cold:
            if config_path is None:
                raise EdgevisionError("bench e2e: cold rounds need the config file's path")
            cold_runs = _cold_rounds(config, config_path, peer, cold, clip_files, scene_files, sampler, peers, work)
    finally:
        sampler.stop()
        shutil.rmtree(work, ignore_errors=True)
    questions = "recorded spoken" if audio else "scripted spoken"
    return E2EReport(results, [name for name, _ in named], modes=modes, questions=questions, cold=cold_runs)


def _cold_rounds(
    config: Config,
    config_path: Path,
    peer: PeerModels,
    rounds: int,
    clip_files: list[Path],
    scene_files: list[Path],
    sampler: Any,
    peers: set[int],
    work: Path,
) -> list[dict[str, Any]]:
    """Each side as a new process asked one question the moment it starts, alternating which goes first."""
    import subprocess
    import sys

    from edgevision.daemon.versus import PeerProcess, peer_command

    runs = []
    for i in range(rounds):
        audio, image = clip_files[i % len(clip_files)], scene_files[i % len(scene_files)]
        for side in ("edgevision", "peer") if i % 2 == 0 else ("peer", "edgevision"):
            started = time.monotonic()
            if side == "peer":
                process = PeerProcess(
                    peer_command(config, peer.mmproj),
                    requests=[{"audio": str(audio), "image": str(image), "release": started}],
                )
                peers.add(process.pid)
                reply = process.answer()
                process.close()
                loaded, first_audio = process.ready["load_s"], reply["moments"].get("first_audio")
            else:
                out = work / f"cold{i}.json"
                command = [
                    sys.executable,
                    "-m",
                    "edgevision.daemon.versus",
                    "--tower",
                    str(peer.tower),
                    "--config",
                    str(config_path),
                    "--decoder",
                    str(config.decoder.model),
                    "--audio",
                    str(audio),
                    "--image",
                    str(image),
                    "--out",
                    str(out),
                ]
                process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                peers.add(process.pid)
                _, errors = process.communicate(timeout=_TIMEOUT_S)
                if process.returncode:
                    raise EdgevisionError(f"bench e2e: the cold edgevision process failed: {errors.strip()[-300:]}")
                reply = json.loads(out.read_text())
                loaded, first_audio = reply["loaded"] - started, reply["moments"].get("first_audio")
            ended = time.monotonic()
            peers.discard(process.pid)
            runs.append(
                {
                    "side": side,
                    "question": reply["question"],
                    "answer": reply["answer"],
                    "loaded_s": round(loaded, 4),
                    "first_audio_s": None if first_audio is None else round(first_audio - started, 4),
                    "peak_rss_mb": sampler.peak_rss_mb("peer", started, ended),
                }
            )
            logger.info("cold %s: %s", side, runs[-1]["first_audio_s"])
    return runs


def _usage(sampler: Any, side: str, moments: dict[str, float]) -> dict[str, Any]:
    """Peak memory over the interaction and CPU time from release to first audio, of all the side's processes."""
    end = moments.get("answered", moments["release"])
    usage: dict[str, Any] = {"peak_rss_mb": sampler.peak_rss_mb(side, moments["press"], end + 0.1)}
    if "first_audio" in moments:
        usage["cpu_to_first_audio_s"] = sampler.cpu_between(side, moments["release"], moments["first_audio"])
        usage["free_to_first_audio_s"] = sampler.free_between(side, moments["release"], moments["first_audio"])
    return usage


def _expected(path: Path) -> str | None:
    """What a recorded question says, from the .txt beside it (assets/question.txt), if there is one."""
    text = path.with_suffix(".txt")
    return text.read_text(encoding="utf-8").strip() if text.is_file() else None


def _same_words(heard: str | None, expected: str) -> bool:
    import re

    def words(text: str) -> list[str]:
        return re.sub(r"[^a-z0-9 ]", "", text.lower().replace("colour", "color")).split()

    return heard is not None and words(heard) == words(expected)


def _save_samples(path: Path, samples: Any) -> None:
    import numpy as np

    np.save(path, samples.astype(np.float32))


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
