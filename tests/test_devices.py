"""Devices through their real code paths with software stand-ins: still-image and video-file cameras, the
control-socket button, WAV microphone and speaker, and the real sounddevice code on ALSA's null device."""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgevision.devices.backends import open_camera, open_microphone, open_speaker
from edgevision.devices.button import Debouncer, Pressed, Released
from edgevision.devices.socket_button import SocketButton, send_button
from edgevision.errors import ConfigError, DeviceError
from edgevision.speech.audio import Audio, read_wav, write_wav

ROOT = Path(__file__).resolve().parent.parent


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll `check` until it holds or `timeout` passes (devices run on their own threads)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


def problem(camera) -> str | None:
    """What `latest()` says is wrong, or None when it gives a frame."""
    try:
        camera.latest()
    except DeviceError as error:
        return str(error)
    return None


def gone(camera) -> bool:
    return problem(camera) is not None


# --- cameras ------------------------------------------------------------------------------------------------


def test_still_image_camera_follows_the_file_and_recovers_when_it_comes_back(tmp_path: Path):
    photo = tmp_path / "scene.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(photo)
    camera = open_camera("image", str(photo), rate=50)
    with pytest.raises(DeviceError, match="not started"):
        camera.latest()
    camera.start()
    try:
        frame = camera.latest()
        assert frame.image.mode == "RGB" and frame.image.size == (64, 48)
        assert frame.image.getpixel((0, 0)) == (200, 30, 30)

        Image.new("RGB", (64, 48), (20, 180, 40)).save(tmp_path / "next.png")
        os.replace(tmp_path / "next.png", photo)
        assert eventually(lambda: camera.latest().image.getpixel((0, 0)) == (20, 180, 40))

        photo.unlink()  # the camera is gone: a press now gets an error it can speak, not an old picture
        assert eventually(lambda: "image file not found" in (problem(camera) or ""))

        Image.new("RGB", (64, 48), (10, 10, 220)).save(photo)
        assert eventually(lambda: not gone(camera), timeout=10)
        assert camera.latest().image.getpixel((0, 0)) == (10, 10, 220)
    finally:
        camera.close()


def _write_video(path: Path, colours: list[tuple[int, int, int]], fps: float = 25.0) -> None:
    cv2 = pytest.importorskip("cv2", reason="OpenCV is not installed: pip install opencv-python-headless")
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (64, 48))
    assert writer.isOpened()
    for r, g, b in colours:
        writer.write(np.full((48, 64, 3), (b, g, r), dtype=np.uint8))  # OpenCV writes BGR
    writer.release()


def test_video_camera_plays_at_its_frame_rate_loops_and_survives_removal(tmp_path: Path):
    video = tmp_path / "walk.avi"
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 0), (0, 250, 250)]
    _write_video(video, colours)
    camera = open_camera("video", str(video))
    camera.start()
    try:
        first = camera.latest()
        pixel = np.array(first.image.getpixel((32, 24)))
        assert min(np.abs(pixel - np.array(c)).max() for c in colours) < 40  # one of the frames, in RGB
        assert eventually(lambda: camera.latest().index > len(colours))  # past the end: it loops
        assert camera.latest().timestamp > first.timestamp

        moved = video.rename(tmp_path / "elsewhere.avi")
        assert eventually(lambda: gone(camera))
        moved.rename(video)
        assert eventually(lambda: not gone(camera), timeout=10)
    finally:
        camera.close()


def test_camera_errors_say_what_to_do(tmp_path: Path):
    with pytest.raises(ConfigError, match="choose one of"):
        open_camera("webcam", "0")
    with pytest.raises(DeviceError, match="not found"):
        open_camera("image", str(tmp_path / "missing.jpg")).start()
    pytest.importorskip("cv2", reason="OpenCV is not installed: pip install opencv-python-headless")
    with pytest.raises(DeviceError, match="plugged in"):
        open_camera("opencv", "/dev/video-edgevision-test").start()
    from edgevision.devices.opencv_camera import csi_pipeline, has_gstreamer, import_cv2

    if not has_gstreamer(import_cv2()):  # pip's OpenCV: a CSI pipeline is refused with the way out
        with pytest.raises(DeviceError, match="no GStreamer"):
            open_camera("opencv", csi_pipeline())


# --- button -------------------------------------------------------------------------------------------------


def test_debouncer_reports_the_first_edge_at_once_and_the_settled_state_after_the_window():
    bounce = Debouncer(0.03)
    assert bounce.feed(True, 1.000) == Pressed(1.000)
    assert bounce.feed(False, 1.005) is None  # contact bounce
    assert bounce.feed(True, 1.008) is None
    assert bounce.deadline() is None  # settled where it was reported
    assert bounce.feed(False, 1.500) == Released(1.500)

    tap = Debouncer(0.03)
    assert tap.feed(True, 2.000) == Pressed(2.000)
    assert tap.feed(False, 2.010) is None  # a real but very short tap ...
    assert tap.deadline() == pytest.approx(2.030)
    assert tap.settle(2.030) == Released(2.030)  # ... is not lost
    assert tap.feed(False, 2.100) is None  # a repeated release is not reported twice


async def _collect(button: SocketButton, events: list) -> None:
    async for event in button.events():
        events.append(event)


def test_socket_button_press_release_debounce_and_commands(tmp_path: Path):
    path = tmp_path / "run" / "control.sock"

    async def scenario() -> list:
        button = SocketButton(path, debounce=0.05, commands={"status": lambda rest: json.dumps({"state": "idle"})})
        events: list = []
        reader = asyncio.create_task(_collect(button, events))
        send = asyncio.to_thread
        assert await send(send_button, path, "press") == "ok"  # waits for the socket to appear
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        await send(send_button, path, "release")
        await send(send_button, path, "press")  # chatter within 50 ms: still one press
        await asyncio.sleep(0.1)
        await send(send_button, path, "release")
        assert json.loads(await send(send_button, path, "status")) == {"state": "idle"}
        with pytest.raises(DeviceError, match="unknown command 'jump'"):
            await send(send_button, path, "jump")
        second = SocketButton(path)
        with pytest.raises(DeviceError, match="in use"):
            await second.start()
        await asyncio.sleep(0.1)
        await button.close()
        await asyncio.wait_for(reader, 5)
        return events

    events = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert [type(e) for e in events] == [Pressed, Released]
    assert events[0].t < events[1].t
    assert not path.exists()


def test_socket_button_replaces_a_stale_socket_and_clients_fail_clearly(tmp_path: Path):
    path = tmp_path / "control.sock"
    with pytest.raises(DeviceError, match="no edgevision is listening"):
        send_button(path, "press", timeout=0.2)
    import socket

    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # left by a process that died
    stale.close()

    async def scenario() -> list:
        button = SocketButton(path)
        events: list = []
        reader = asyncio.create_task(_collect(button, events))
        await asyncio.to_thread(send_button, path, "press")
        await asyncio.to_thread(send_button, path, "release")
        await asyncio.sleep(0.05)
        await button.close()
        await asyncio.wait_for(reader, 5)
        return events

    assert [type(e) for e in asyncio.run(asyncio.wait_for(scenario(), 30))] == [Pressed, Released]


def test_evdev_button_through_a_virtual_input_device():
    if not os.access("/dev/uinput", os.W_OK):
        pytest.skip("/dev/uinput is not usable here (no uinput module or no access), so no virtual key can be made")
    evdev = pytest.importorskip("evdev", reason="python-evdev is not installed (pip install edgevision[evdev])")
    from edgevision.devices.backends import open_button

    ui = evdev.UInput({evdev.ecodes.EV_KEY: [evdev.ecodes.KEY_F13]}, name="edgevision-test-button")
    try:
        time.sleep(0.3)  # udev makes the node

        async def scenario() -> list:
            button = open_button("evdev", device="edgevision-test-button", key="KEY_F13", debounce=0.01)
            events: list = []
            reader = asyncio.create_task(_collect(button, events))
            await asyncio.sleep(0.3)
            for value in (1, 0):
                ui.write(evdev.ecodes.EV_KEY, evdev.ecodes.KEY_F13, value)
                ui.syn()
                await asyncio.sleep(0.1)
            await button.close()
            await asyncio.wait_for(reader, 5)
            return events

        assert [type(e) for e in asyncio.run(asyncio.wait_for(scenario(), 30))] == [Pressed, Released]
    finally:
        ui.close()


@pytest.mark.board
@pytest.mark.skipif(
    not os.environ.get("EDGEVISION_TEST_CSI"),
    reason="needs a CSI camera on a Jetson: set "
    "EDGEVISION_TEST_CSI=1 (with JetPack's OpenCV, which has GStreamer) to run it",
)
def test_csi_camera_through_gstreamer_on_the_board():
    from edgevision.devices.opencv_camera import csi_pipeline

    camera = open_camera("opencv", csi_pipeline(width=1280, height=720, fps=30))
    camera.start()
    try:
        frame = camera.latest()
        assert frame.image.size == (1280, 720) and frame.image.mode == "RGB"
    finally:
        camera.close()


@pytest.mark.board
def test_gpio_button_on_the_board():
    """Opens the configured pin and, with the button untouched, reports nothing (no floating input)."""
    pytest.importorskip("Jetson.GPIO", reason="Jetson.GPIO is board-only: run this on the Jetson")
    from edgevision.devices.backends import open_button

    async def scenario() -> list:
        button = open_button("gpio", pin=int(os.environ.get("EDGEVISION_TEST_PIN", "7")))
        events: list = []
        reader = asyncio.create_task(_collect(button, events))
        await asyncio.sleep(0.5)
        await button.close()
        await asyncio.wait_for(reader, 5)
        return events

    assert asyncio.run(asyncio.wait_for(scenario(), 30)) == []


# --- WAV microphone and speaker -----------------------------------------------------------------------------


def _tone(seconds: float, rate: int, hz: float = 440.0) -> Audio:
    t = np.arange(int(seconds * rate)) / rate
    return Audio((0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32), rate)


def test_wav_microphone_plays_one_file_per_press_at_16_khz(tmp_path: Path):
    folder = tmp_path / "questions"
    folder.mkdir()
    write_wav(folder / "01.wav", _tone(0.5, 22050))
    write_wav(folder / "02.wav", _tone(3.0, 8000))
    mic = open_microphone("wav", source=str(folder), max_seconds=2.0)
    assert mic.next_duration == pytest.approx(0.5)
    mic.start()
    first = mic.stop()
    assert first.sample_rate == 16000 and first.duration == pytest.approx(0.5)
    mic.start()
    assert mic.stop().duration == pytest.approx(2.0)  # capped at max_seconds
    with pytest.raises(DeviceError, match="no more clips"):
        mic.start()
    mic.push(_tone(1.0, 16000))
    live = open_microphone("wav", realtime=True)
    live.push(_tone(5.0, 16000))
    live.start()
    time.sleep(0.2)
    assert 0.15 < live.stop().duration < 2.0  # cut where the button was released


def test_wav_speaker_plays_in_order_and_stop_is_immediate(tmp_path: Path):
    speaker = open_speaker("wav", folder=str(tmp_path / "out"), realtime=True)
    try:
        speaker.play(_tone(0.2, 16000, 300))
        speaker.play(_tone(0.3, 22050, 500))
        assert speaker.playing
        assert speaker.wait(10)
        assert not speaker.playing
        assert [p.name for p in speaker.played] == ["speech-0001.wav", "speech-0002.wav"]
        assert read_wav(speaker.played[1]).duration == pytest.approx(0.3, abs=0.01)

        speaker.play(_tone(5.0, 16000))  # a long answer, then the user presses: barge-in
        speaker.play(_tone(5.0, 16000))
        time.sleep(0.2)
        speaker.stop()
        assert not speaker.playing and speaker.wait(0)
        assert len(speaker.played) == 3  # the queued sentence is dropped
        heard = read_wav(speaker.played[2]).duration
        assert 0.1 < heard < 2.0  # the file holds only what was heard before the press
        speaker.play(_tone(0.1, 16000))
        assert speaker.wait(10) and len(speaker.played) == 4
    finally:
        speaker.close()


# --- the real sounddevice code on ALSA's null device --------------------------------------------------------

_NULL_ASOUNDRC = """
pcm.!default { type plug; slave.pcm "null" }
ctl.!default { type hw; card 0 }
"""

_SOUND_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    from edgevision.devices.backends import open_microphone, open_speaker
    from edgevision.speech.audio import Audio

    def until(check, timeout=20):
        deadline = time.monotonic() + timeout
        while not check() and time.monotonic() < deadline:
            time.sleep(0.005)
        return check()

    out = {}
    mic = open_microphone("sounddevice", max_seconds=1.0)
    out["mic_rate"] = mic.sample_rate
    for _ in range(2):  # twice: the stream is stopped between presses and started again
        mic.start()
        until(lambda: mic.captured_seconds >= 1.0)  # the null device has no clock: count samples, not time
        audio = mic.stop()
        out.setdefault("recorded", []).append([audio.sample_rate, len(audio.samples), bool(np.isfinite(audio.samples).all())])
    mic.close()

    speaker = open_speaker("sounddevice", blocksize=256)
    rate = speaker.sample_rate
    tone = Audio((0.2 * np.sin(np.arange(8000) / 16000 * 2 * np.pi * 440)).astype(np.float32), 16000)
    speaker.play(tone)
    out["short_done"] = speaker.wait(20)
    out["short_played"] = speaker.played_samples
    out["short_expected"] = round(8000 * rate / 16000)
    long = Audio(np.zeros(rate * 30, dtype=np.float32), rate)
    before = speaker.played_samples
    for _ in range(3):
        speaker.play(long)
    until(lambda: speaker.played_samples > before)
    speaker.stop()
    out["playing_after_stop"] = speaker.playing
    stopped_at = speaker.played_samples
    time.sleep(0.2)
    out["kept_playing"] = speaker.played_samples - stopped_at
    out["long_played"] = stopped_at - before
    out["long_total"] = 3 * len(long.samples)
    speaker.play(tone)
    out["after_stop_done"] = speaker.wait(20)
    speaker.close()
    print(json.dumps(out))
    """
)


def test_sounddevice_microphone_and_speaker_on_alsa_null_device(tmp_path: Path):
    try:
        import sounddevice  # noqa: F401
    except OSError as error:
        pytest.skip(f"PortAudio is not installed (apt libportaudio2): {error}")
    home = tmp_path / "home"
    home.mkdir()
    (home / ".asoundrc").write_text(_NULL_ASOUNDRC)  # ALSA's null device as the default: a sound card in software
    env = {**os.environ, "HOME": str(home)}
    result = subprocess.run(
        [sys.executable, "-c", _SOUND_SCRIPT],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["mic_rate"] > 0
    assert out["recorded"] == [[16000, 16000, True], [16000, 16000, True]]  # 1 s each, at 16 kHz, all real samples
    assert out["short_done"] and out["short_played"] >= out["short_expected"]
    assert out["playing_after_stop"] is False and out["kept_playing"] == 0
    assert 0 < out["long_played"] < out["long_total"]  # the queue was dropped, not played out
    assert out["after_stop_done"]


def test_devices_command_lists_what_this_machine_has(tmp_path: Path):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".asoundrc").write_text(_NULL_ASOUNDRC)
    env = {**os.environ, "HOME": str(home)}
    command = [sys.executable, "-m", "edgevision", "devices"]
    result = subprocess.run(
        [*command, "--json"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    sound = found["sound"]
    if sound["available"]:
        default = [d for d in sound["devices"] if d["default_input"] and d["default_output"]]
        assert default and default[0]["name"] == "default"  # the null device the asoundrc made the default
    else:  # no PortAudio here: the survey must say so and what to install, not fail
        assert "PortAudio" in sound["reason"] or "sounddevice" in sound["reason"], sound
    assert found["power"]["reader"] in ("ina3221", "tegrastats", "rapl", "none")
    text = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=True).stdout
    assert "power:" in text
    if sound["available"]:
        assert "microphones:" in text and "speakers:" in text
    else:
        assert re.search(rf"sound:\s+{re.escape(sound['reason'])}", text), text  # the columns are aligned
