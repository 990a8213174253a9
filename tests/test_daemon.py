"""The appliance daemon: its state machine (pure), then whole interactions driven through the control socket
with software devices (a still-image camera, WAV microphone and speaker) and the real small models, then
the real `edgevision run` under a fake systemd: sd_notify, SIGTERM during an answer, the unit file."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edgevision.config import DaemonSettings
from edgevision.daemon.earcons import EARCONS, earcon
from edgevision.daemon.notify import Notifier
from edgevision.daemon.state import PressKind, State, StateMachine, Timing, classify_press, is_tap

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "assets" / "photo.jpg"
SPOKEN = ROOT / "assets" / "question.wav"
LABEL = ROOT / "assets" / "label.jpg"
TIMEOUT = 90.0  # for any one interaction: a hang fails instead of blocking the suite

# --- tier 1: the state machine and what a press means -------------------------------------------------------

TIMING = Timing(follow_up_s=8.0, tap_s=0.3, double_press_s=0.6)


def _press(state: State, now: float, *, answer_end=None, tap_end=None, answer=True, scene=True) -> PressKind | None:
    return classify_press(
        state, now, last_answer_end=answer_end, last_tap_end=tap_end, has_answer=answer, has_scene=scene, timing=TIMING
    )


def test_a_press_while_thinking_or_speaking_barges_in_and_one_while_held_means_nothing() -> None:
    assert _press(State.THINKING, 10.0) is PressKind.BARGE_IN
    assert _press(State.SPEAKING, 10.0) is PressKind.BARGE_IN
    assert _press(State.LISTENING, 10.0) is None


def test_a_press_soon_after_an_answer_is_a_follow_up_about_the_same_scene() -> None:
    assert _press(State.IDLE, 105.0, answer_end=100.0) is PressKind.FOLLOW_UP
    assert _press(State.IDLE, 108.5, answer_end=100.0) is PressKind.NEW  # the window has passed
    assert _press(State.IDLE, 101.0, answer_end=100.0, scene=False) is PressKind.NEW  # nothing to follow up
    assert _press(State.IDLE, 101.0) is PressKind.NEW  # the first question of all


def test_a_tap_then_a_press_repeats_the_last_answer() -> None:
    assert is_tap(0.1, TIMING) and not is_tap(0.5, TIMING)
    assert _press(State.IDLE, 100.4, tap_end=100.0, answer_end=90.0) is PressKind.REPEAT
    assert _press(State.IDLE, 101.0, tap_end=100.0, answer_end=90.0) is PressKind.NEW  # too slow for a double
    assert _press(State.IDLE, 100.4, tap_end=100.0, answer=False) is PressKind.NEW  # nothing to repeat yet


def test_the_state_machine_allows_the_interaction_cycle_and_refuses_skipping_a_stage() -> None:
    machine = StateMachine()
    for to in (State.LISTENING, State.THINKING, State.SPEAKING, State.LISTENING, State.THINKING, State.IDLE):
        machine.move(to, "test")
    assert machine.state is State.IDLE
    with pytest.raises(RuntimeError, match="idle → thinking"):
        machine.move(State.THINKING, "a release without a press")
    assert [(a.value, b.value) for a, b, _ in machine.history[:2]] == [("idle", "listening"), ("listening", "thinking")]


def test_earcons_are_short_audible_tones_that_differ() -> None:
    sounds = {name: earcon(name, 22050) for name in EARCONS}
    for sound in sounds.values():
        assert 0.05 < sound.duration < 0.5
        assert 0.1 < np.abs(sound.samples).max() <= 0.5
        assert abs(sound.samples[0]) < 0.01 and abs(sound.samples[-1]) < 0.01  # faded: no click
    assert len({s.samples.tobytes() for s in sounds.values()}) == len(sounds)


def _tone(seconds: float, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * 16_000)) / 16_000
    return (amplitude * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def test_a_pause_after_speech_is_found_and_only_quiet_after_a_transcript_lets_it_stand() -> None:
    from edgevision.daemon.endpoint import ends_in_pause, only_quiet_after

    silence = np.zeros(3_200, dtype=np.float32)  # 0.2 s
    spoken = np.concatenate([_tone(0.5), silence])
    assert ends_in_pause(spoken, since=0)
    assert not ends_in_pause(spoken[:8_400], since=0)  # only 0.025 s quiet yet
    assert not ends_in_pause(spoken, since=len(spoken) - 2_000)  # nothing said since the last transcript
    assert not ends_in_pause(np.zeros(16_000, dtype=np.float32), since=0)  # silence is no question
    heard = len(spoken)
    more_quiet = np.concatenate([spoken, silence, 0.001 * _tone(0.3)])  # room noise after it
    assert only_quiet_after(more_quiet, heard)
    soft_end = np.concatenate([spoken, _tone(0.1, amplitude=0.02)])  # a faint last sound, 24 dB down
    assert not only_quiet_after(soft_end, heard)
    assert not only_quiet_after(np.concatenate([spoken, _tone(0.4)]), heard)


def test_the_first_clause_of_an_answer_is_spoken_on_its_own_once_it_has_a_few_words() -> None:
    from edgevision.speech.synthesis import split_sentences

    tokens = ["Yes,", " there", " is a red", " ball,", " and a", " cup of 3,000", " beads. It is", " new, I think."]
    assert list(split_sentences(tokens, first_clause_words=4)) == [
        "Yes, there is a red ball,",
        "and a cup of 3,000 beads.",
        "It is new, I think.",
    ]
    assert list(split_sentences(tokens)) == [
        "Yes, there is a red ball, and a cup of 3,000 beads.",
        "It is new, I think.",
    ]


def test_the_wav_microphone_lets_sound_in_as_it_is_spoken_and_stop_hands_in_what_was_captured() -> None:
    from edgevision.devices.wav_devices import WavMicrophone
    from edgevision.speech.audio import Audio

    clip = Audio(_tone(0.4), 16_000)
    for realtime in (False, True):
        microphone = WavMicrophone(realtime=realtime)
        microphone.push(clip)
        assert len(microphone.captured().samples) == 0  # not recording
        microphone.start()
        lengths = []
        for _ in range(3):
            time.sleep(0.1)
            lengths.append(len(microphone.captured().samples))
        assert 0 < lengths[0] < lengths[1] < lengths[2] < len(clip.samples)  # grows with time, never ahead of it
        time.sleep(0.25)  # the clip has been said
        so_far = microphone.captured()
        stopped = microphone.stop()
        assert np.array_equal(so_far.samples, clip.samples) and np.array_equal(stopped.samples, clip.samples)


def test_notifier_sends_datagrams_to_notify_socket_and_is_silent_without_one() -> None:
    with _notify_socket() as (path, receive):
        notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())})
        assert notifier.watchdog_s == 4.0
        notifier.ready("ready")
        notifier.watchdog()
        assert receive() == "READY=1\nSTATUS=ready"
        assert receive() == "WATCHDOG=1"
        notifier.close()
    assert Notifier({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}).watchdog_s is None  # meant for another pid
    Notifier({}).ready("nobody listens")  # no NOTIFY_SOCKET: nothing happens, nothing fails


class _notify_socket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET: yields (path, receive)."""

    def __enter__(self):
        self.dir = tempfile.mkdtemp(prefix="ev-notify-")  # short: AF_UNIX paths are limited to 107 bytes
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)

        def receive(timeout: float = 5.0) -> str:
            self.sock.settimeout(timeout)
            return self.sock.recv(4096).decode()

        return self.path, receive

    def __exit__(self, *exc) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# --- tier 2: whole interactions, driven through the control socket -------------------------------------------

SETTINGS = DaemonSettings(follow_up_s=0.0, max_recording_s=2.0)  # every press a new question, unless a test
# opens the follow-up window
HOLD_S = 0.6  # how long the scripted user holds the button (the WAV microphone hands in the whole clip)


class Harness:
    """A daemon with software devices, running its asyncio loop in a thread; the test is the user."""

    def __init__(self, daemon, camera_file: Path, microphone, speaker, socket_path: Path, log_path: Path) -> None:
        self.daemon, self.camera_file = daemon, camera_file
        self.microphone, self.speaker = microphone, speaker
        self.socket_path, self.log_path = socket_path, log_path
        self.records: queue.Queue[dict] = queue.Queue()
        daemon.on_record = self.records.put

    def send(self, command: str) -> str:
        from edgevision.devices.socket_button import send_button

        return send_button(self.socket_path, command)

    def status(self) -> dict:
        return json.loads(self.send("status"))

    def wait_state(self, state: str, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while (now := self.status()["state"]) != state:
            assert time.monotonic() < deadline, f"still {now}, waited {timeout:.0f} s for {state}"
            time.sleep(0.05)

    def record(self, timeout: float = TIMEOUT) -> dict:
        return self.records.get(timeout=timeout)

    def quiet(self) -> None:
        """Wait until the daemon is idle and has said everything."""
        self.wait_state("idle")
        self.speaker.wait(TIMEOUT)

    def ask(self, clip, *, hold: float = HOLD_S) -> dict:
        self.microphone.push(clip)
        self.send("press")
        time.sleep(hold)
        self.send("release")
        return self.record()

    def spoken_since(self, n_files: int) -> list:
        from edgevision.speech.audio import read_wav

        self.speaker.wait(TIMEOUT)
        return [read_wav(path) for path in self.speaker.played[n_files:]]


@pytest.fixture(scope="module")
def daemon(demo_config: Path, tmp_path_factory: pytest.TempPathFactory):
    from edgevision.assistant import Assistant
    from edgevision.config import load_config
    from edgevision.daemon.daemon import Daemon
    from edgevision.devices.backends import open_camera
    from edgevision.devices.socket_button import SocketButton
    from edgevision.devices.wav_devices import WavMicrophone, WavSpeaker
    from edgevision.telemetry.log import InteractionLog
    from edgevision.telemetry.memory import MemoryMeter
    from edgevision.telemetry.power import EnergyMeter, detect_power_reader

    base = tmp_path_factory.mktemp("daemon")
    camera_file = base / "camera.jpg"
    shutil.copy(PHOTO, camera_file)
    socket_dir = Path(tempfile.mkdtemp(prefix="ev-"))
    assistant = Assistant.from_config(load_config(demo_config))
    assistant.max_answer_tokens = 8  # short answers: the tests wait while they are spoken in real time
    microphone, speaker = WavMicrophone(), WavSpeaker(base / "spoken", realtime=True)
    control = SocketButton(socket_dir / "control.sock")
    power = detect_power_reader()
    log = InteractionLog(base / "interactions.jsonl")
    daemon = Daemon(
        assistant=assistant,
        camera=open_camera("image", str(camera_file)),
        microphone=microphone,
        speaker=speaker,
        buttons=[control],
        control=control,
        settings=SETTINGS,
        log=log,
        meters={"memory": MemoryMeter, "energy": lambda: EnergyMeter(power)},
        models={"decoder": "gemma-3-270m"},
    )
    daemon.closing += [log.close, power.close]
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(daemon.run(),), name="daemon-loop")
    thread.start()
    harness = Harness(daemon, camera_file, microphone, speaker, control.path, log.path)
    try:
        deadline = time.monotonic() + 120
        while not (thread.is_alive() and socket_ready(control.path) and harness.status()["ready"]):
            assert thread.is_alive() and time.monotonic() < deadline, "the daemon did not become ready"
            time.sleep(0.2)
        yield harness
    finally:
        loop.call_soon_threadsafe(daemon.stop, "tests done")
        thread.join(60)
        loop.close()
        shutil.rmtree(socket_dir, ignore_errors=True)
    assert not thread.is_alive(), "the daemon did not stop"


def socket_ready(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        return probe.connect_ex(str(path)) == 0


def _speech(clips) -> list:
    """The clips that are speech, not earcons (earcons are under half a second)."""
    return [clip for clip in clips if clip.duration > 0.5 and np.sqrt(np.mean(clip.samples**2)) > 0.01]


@pytest.fixture(scope="module")
def synth(daemon):
    """Piper, to speak the scripted user's other questions."""
    return daemon.daemon.assistant.synthesizer


@pytest.fixture(scope="module")
def first_answer(daemon: Harness) -> tuple[dict, list]:
    """The first question asked of the daemon: its record and what the speaker played for it."""
    daemon.quiet()
    n_files = len(daemon.speaker.played)
    record = daemon.ask(SPOKEN)
    return record, daemon.spoken_since(n_files)


def test_a_question_spoken_while_the_button_is_held_is_answered_aloud_and_logged(
    daemon: Harness, first_answer: tuple[dict, list]
) -> None:
    from edgevision.telemetry.log import read

    record, played = first_answer
    assert "table" in record["question"].lower()
    assert record["answer"] and record["error"] is None and record["kind"] == "new"
    spoken = _speech(played)
    assert spoken and sum(clip.duration for clip in spoken) == pytest.approx(
        record["durations_s"]["answer_speech"], abs=0.05
    )
    # the log on disk holds the same record, with every stage of the overlapped pipeline measured
    assert json.loads(json.dumps(record)) in read(daemon.log_path)
    stages = record["durations_s"]
    for stage in (
        "capture",
        "recording",
        "recognition",
        "vision_encode",
        "image_prefill",
        "text_prefill",
        "first_token",
        "release_to_first_audio",
        "total",
    ):
        assert stages[stage] >= 0, stage
    assert stages["decode_tokens_per_s"] > 0
    assert stages["release_to_first_token"] <= stages["release_to_first_audio"] <= stages["total"]
    assert record["memory"]["rss_mb"] > 50 and record["memory"]["peak_rss_mb"] >= record["memory"]["rss_mb"] * 0.5
    assert (
        record["energy"]["available"] in (True, False)
        and ("joules" in record["energy"]) == record["energy"]["available"]
    )
    assert set(record["timestamps"]) >= {"press", "release", "first_audio", "speech_done"}
    assert "audio_file" not in record and "image_file" not in record  # not kept unless configured


def test_a_press_soon_after_an_answer_asks_about_the_same_image_without_encoding_it_again(
    daemon: Harness, synth, first_answer: tuple[dict, list]
) -> None:
    first = first_answer[0]  # answered just before (this test runs right after the first one)
    daemon.quiet()
    daemon.daemon.timing = replace(daemon.daemon.timing, follow_up_s=120.0)  # the window opens
    try:
        follow_up = daemon.ask(synth.synthesize("What colour is it?"))
    finally:
        daemon.daemon.timing = replace(daemon.daemon.timing, follow_up_s=SETTINGS.follow_up_s)
    assert follow_up["kind"] == "follow_up" and follow_up["follow_up"] and follow_up["reused_image"]
    assert "colo" in follow_up["question"].lower() and follow_up["answer"]
    assert "vision_encode" not in follow_up["durations_s"] and "image_prefill" not in follow_up["durations_s"]
    assert first["durations_s"]["image_prefill"] > 0


def test_sequential_mode_answers_the_same_way_and_keeps_recordings_and_frames_only_when_asked(
    daemon: Harness, tmp_path: Path
) -> None:
    from edgevision.speech.audio import read_wav

    daemon.quiet()
    core = daemon.daemon
    core.mode, core.captures, core.store_audio, core.store_images = "sequential", tmp_path, True, True
    try:
        record = daemon.ask(SPOKEN)
    finally:
        core.mode, core.captures, core.store_audio, core.store_images = SETTINGS.mode, None, False, False
    assert record["mode"] == "sequential" and "table" in record["question"].lower() and record["answer"]
    assert record["durations_s"]["vision_encode"] > 0 and "look_after_release" not in record["durations_s"]
    assert read_wav(record["audio_file"]).duration == pytest.approx(read_wav(SPOKEN).duration, abs=0.05)
    assert Path(record["image_file"]).stat().st_size > 1000


def test_a_press_while_it_speaks_silences_it_at_once_and_takes_a_new_question(daemon: Harness, synth) -> None:
    daemon.quiet()
    n_files, played_before = len(daemon.speaker.played), daemon.speaker.played_seconds
    daemon.microphone.push(SPOKEN)
    daemon.microphone.push(synth.synthesize("Is there a door?"))
    daemon.send("press")
    time.sleep(HOLD_S)
    daemon.send("release")
    daemon.wait_state("speaking")
    time.sleep(0.3)
    daemon.send("press")  # barge in
    daemon.wait_state("listening", timeout=5)
    time.sleep(HOLD_S)
    daemon.send("release")
    interrupted, second = daemon.record(), daemon.record()
    assert interrupted["interrupted"] == "barge_in" and not interrupted["barge_in"]
    assert second["barge_in"] and second["interrupted"] is None and "door" in second["question"].lower()
    daemon.spoken_since(n_files)
    # the first answer was cut off: less was played than both answers and the earcons would take
    earcons = 2 * (0.16 + 0.12)
    full = interrupted["durations_s"]["answer_speech"] + second["durations_s"]["answer_speech"] + earcons
    assert daemon.speaker.played_seconds - played_before < full - 0.5


def test_silence_gets_a_spoken_i_did_not_catch_that(daemon: Harness) -> None:
    from edgevision.speech.audio import Audio

    daemon.quiet()
    n_files = len(daemon.speaker.played)
    record = daemon.ask(Audio(np.zeros(24_000, dtype=np.float32), 16_000))
    assert record["said"] == SETTINGS.didnt_catch and "no speech" in record["error"] and record["answer"] is None
    assert len(_speech(daemon.spoken_since(n_files))) == 1  # the phrase, after the error earcon


def test_a_camera_that_disappears_is_reported_aloud_and_used_again_once_it_is_back(daemon: Harness) -> None:
    from edgevision.errors import DeviceError

    daemon.quiet()
    hidden = daemon.camera_file.with_suffix(".away")
    daemon.camera_file.rename(hidden)
    try:
        _wait_for(lambda: _camera_gone(daemon.daemon.camera, DeviceError), "the camera to notice it is gone")
        n_files = len(daemon.speaker.played)
        daemon.send("press")  # no frame: it says so at once, without opening the microphone
        daemon.send("release")
        gone = daemon.record()
        assert gone["said"] == "The camera is not working." and "camera" in gone["error"]
        assert len(_speech(daemon.spoken_since(n_files))) == 1
    finally:
        hidden.rename(daemon.camera_file)
    _wait_for(lambda: not _camera_gone(daemon.daemon.camera, DeviceError), "the camera to come back")
    daemon.quiet()
    back = daemon.ask(SPOKEN)
    assert back["error"] is None and back["answer"] and back["durations_s"]["vision_encode"] > 0


def test_a_double_press_repeats_the_last_answer(daemon: Harness, first_answer: tuple[dict, list]) -> None:
    daemon.quiet()
    answered = next(r for r in reversed(daemon.daemon.records) if r["answer"] and not r["interrupted"])
    n_files = len(daemon.speaker.played)
    daemon.microphone.push(SPOKEN)  # the tap opens the microphone, like any press
    daemon.send("press")
    daemon.send("release")  # a tap ...
    daemon.send("press")  # ... and a press: repeat
    daemon.send("release")
    daemon.wait_state("idle")
    repeated = _speech(daemon.spoken_since(n_files))
    assert len(repeated) == 1  # the whole answer again, as one clip (the record's duration is rounded: 4 places)
    assert repeated[0].duration == pytest.approx(answered["durations_s"]["answer_speech"], abs=0.001)
    assert daemon.records.empty()  # a repeat is not a new answer


def test_a_question_held_too_long_is_cut_at_the_longest_recording(daemon: Harness) -> None:
    from edgevision.speech.audio import Audio

    daemon.quiet()
    daemon.microphone.push(Audio(np.zeros(16_000 * 4, dtype=np.float32), 16_000))
    daemon.send("press")
    record = daemon.record()  # never released
    daemon.send("release")
    assert record["recording_capped"] and record["said"] == SETTINGS.didnt_catch
    assert SETTINGS.max_recording_s - 0.05 <= record["durations_s"]["recording"] < SETTINGS.max_recording_s + 2


def _trim_quiet_end(clip):
    """The clip without its trailing quiet: speech right up to its end."""
    from edgevision.daemon.endpoint import FRAME_S, frame_rms, quiet_level
    from edgevision.speech.audio import Audio, resample

    clip = resample(clip, 16_000)
    rms = frame_rms(clip.samples)
    last = int(np.nonzero(rms >= quiet_level(rms.max()))[0][-1])
    return Audio(clip.samples[: int((last + 1) * FRAME_S * 16_000)], 16_000)


def _ask_at_length(daemon: Harness, clip) -> dict:
    """Hold the button for as long as the clip lasts (allowed a longer recording than the other tests)."""
    core = daemon.daemon
    core.settings = replace(core.settings, max_recording_s=clip.duration + 3)
    try:
        return daemon.ask(clip, hold=clip.duration)
    finally:
        core.settings = SETTINGS


def test_a_question_followed_by_a_pause_before_release_is_recognised_while_the_button_is_held(daemon: Harness) -> None:
    from edgevision.speech.audio import Audio, read_wav, resample

    daemon.quiet()
    spoken = resample(read_wav(SPOKEN), 16_000)
    quiet = np.zeros(int(1.5 * 16_000), dtype=np.float32)  # the user stops talking, then lets go
    clip = Audio(np.concatenate([spoken.samples, quiet]), 16_000)
    record = _ask_at_length(daemon, clip)
    assert "table" in record["question"].lower() and record["answer"]
    assert record["early_transcript"] is True and record["early_transcripts_made"] >= 1
    assert record["durations_s"]["recognition_after_release"] >= 0


def test_speech_going_on_up_to_release_is_recognised_again_in_full(daemon: Harness, synth) -> None:
    from edgevision.speech.audio import Audio, resample

    daemon.quiet()
    first = resample(synth.synthesize("What is this?"), 16_000)
    second = _trim_quiet_end(synth.synthesize("Is it on the table?"))
    pause = np.zeros(int(0.8 * 16_000), dtype=np.float32)  # an early transcript is made here ...
    clip = Audio(np.concatenate([first.samples, pause, second.samples]), 16_000)  # ... and then it goes on
    record = _ask_at_length(daemon, clip)
    assert record["early_transcripts_made"] >= 1 and record["early_transcript"] is False
    question = record["question"].lower()
    assert "this" in question and "table" in question  # the whole recording's words, not the early ones


def _camera_gone(camera, error_type) -> bool:
    try:
        camera.latest()
    except error_type:
        return True
    return False


def _wait_for(condition, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout:.0f} s for {what}"
        time.sleep(0.1)


def test_a_label_held_up_while_asking_is_read_aloud_from_the_frame_taken_at_the_press(daemon: Harness, synth) -> None:
    from PIL import Image

    daemon.quiet()
    shutil.copy(LABEL, daemon.camera_file)  # the still camera shows the label from the next frame on
    try:
        with Image.open(LABEL) as label:
            pixels = label.convert("RGB").tobytes()
        _wait_for(lambda: daemon.daemon.camera.latest().image.tobytes() == pixels, "the camera to show the label")
        record = daemon.ask(synth.synthesize("What does this label say?"))
    finally:
        shutil.copy(PHOTO, daemon.camera_file)
    assert record["answer_mode"] == "read" and record["n_tokens"] == 0
    assert record["answer"] == "It says: GREEN TEA. with lemon. 20 tea bags."
    # the text was read in the look at the frame taken at the press, beside the vision tower (how much of it
    # lands after release is what 'edgevision bench e2e' measures, not a test)
    assert record["durations_s"]["ocr"] > 0 and record["durations_s"]["vision_encode"] > 0


# --- tier 3: `edgevision run` as systemd starts it ---------------------------------------------------------


def test_edgevision_run_notifies_systemd_serves_the_cli_and_stops_cleanly_on_sigterm_mid_answer(
    demo_config: Path, tmp_path: Path
) -> None:
    from edgevision.telemetry.log import read

    socket_dir = Path(tempfile.mkdtemp(prefix="ev-"))
    control, log = socket_dir / "control.sock", tmp_path / "interactions.jsonl"
    config = tmp_path / "config.yaml"
    config.write_text(
        demo_config.read_text(encoding="utf-8")
        + f"devices:\n  camera: {{kind: image, source: {PHOTO}}}\n  button: socket\n  control_socket: {control}\n"
        f"  microphone: {{kind: wav, source: {SPOKEN}}}\n  speaker: {{kind: wav, folder: {tmp_path / 'spoken'}}}\n"
        f"telemetry:\n  log_path: {log}\n  power_reader: none\n",
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if k not in ("EDGEVISION_CONFIG", "INVOCATION_ID")}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "edgevision", *args, "--socket", str(control)],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    with _notify_socket() as (notify_path, receive), open(tmp_path / "stderr", "w+") as stderr:
        service_env = dict(env, NOTIFY_SOCKET=notify_path, WATCHDOG_USEC="1000000")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "edgevision", "run", "--config", str(config)],
            env=service_env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        messages: list[str] = []

        def listen() -> None:  # all the time, as systemd does (an unread socket fills up after 10 messages)
            while True:
                try:
                    messages.extend(receive(timeout=0.5).splitlines())
                except (TimeoutError, OSError):
                    if daemon.poll() is not None:
                        return

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()

        def until(field: str, timeout: float) -> None:
            deadline = time.monotonic() + timeout
            while field not in messages:
                assert daemon.poll() is None or field == "STOPPING=1", _tail(stderr)
                assert time.monotonic() < deadline, f"no {field} within {timeout:.0f} s; got {messages}"
                time.sleep(0.1)

        try:
            until("READY=1", 240)  # only once the models are loaded and warmed up
            assert cli("press").returncode == 0
            time.sleep(HOLD_S)
            assert cli("release").returncode == 0
            status = cli("status")
            assert status.returncode == 0 and re.search(r"state:\s+(thinking|speaking)", status.stdout), status
            assert "gemma-3-270m" in status.stdout  # the loaded models
            daemon.send_signal(signal.SIGTERM)  # mid-answer
            assert daemon.wait(timeout=120) == 0, _tail(stderr)
            until("STOPPING=1", 5)
            assert "Traceback" not in _tail(stderr)
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
            shutil.rmtree(socket_dir, ignore_errors=True)
    assert "WATCHDOG=1" in messages[messages.index("READY=1") :]
    (record,) = read(log)  # the interrupted answer was still recorded
    assert record["interrupted"] == "shutdown" and record["kind"] == "new"
    assert record["energy"] == {"source": "none", "available": False, "reason": record["energy"]["reason"]}
    assert not control.exists()  # the control socket was removed on the way out


def _tail(stream) -> str:
    stream.flush()
    stream.seek(0)
    return stream.read()[-3000:]


def test_the_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    unit = (ROOT / "systemd" / "edgevision.service").read_text(encoding="utf-8")
    installed = "/opt/edgevision/venv/bin/edgevision"
    assert f"ExecStart={installed} run --config /etc/edgevision/config.yaml" in unit
    assert "Type=notify" in unit and "WatchdogSec=" in unit and "IPAddressDeny=any" in unit
    # verify checks that ExecStart's program exists: point it at this environment's entry point instead
    local = tmp_path / "edgevision.service"
    local.write_text(unit.replace(installed, str(Path(sys.executable).parent / "edgevision")), encoding="utf-8")
    result = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True, timeout=60, check=False)
    complaints = [line for line in result.stderr.splitlines() if "edgevision.service" in line]
    assert result.returncode == 0 and not complaints, result.stderr
