"""Which device back-ends exist, and opening the one the config names.

Each registry maps a config value (`devices.camera`, `devices.button`, `devices.microphone`, `devices.speaker`)
to ``"module:class"``; a back-end module is imported only when its kind is chosen (cv2 is not needed for a
still image, nor PortAudio, evdev or Jetson.GPIO where they are not used). The interfaces live in camera.py,
button.py and sound.py, which the back-ends import; this module sits above both, so nothing imports in a circle.
A new back-end: one module implementing the interface and one line in its registry here.
"""

from __future__ import annotations

from typing import Any

from edgevision.devices.button import Button
from edgevision.devices.camera import Camera
from edgevision.devices.sound import Microphone, Speaker
from edgevision.plugins import load_class, open_chosen

# Camera kind → "module:class"; a module is imported only when its kind is chosen (cv2 is not needed for
# a still image).
CAMERAS: dict[str, str] = {
    "opencv": "edgevision.devices.opencv_camera:OpenCvCamera",
    "video": "edgevision.devices.opencv_camera:VideoFileCamera",
    "image": "edgevision.devices.image_camera:StillImageCamera",
}


def open_camera(kind: str, source: str, **options: Any) -> Camera:
    """The camera of `kind` reading `source` (not started yet: call `start()`).

    opencv: a V4L2 index ("0") or device path ("/dev/video0"), or a GStreamer pipeline (contains "!") for a
    CSI camera where OpenCV was built with GStreamer; video: a video file, played at its frame rate,
    looping; image: a still image file (re-read when it changes).
    """
    return load_class(CAMERAS, "devices.camera", kind)(source, **options)


def open_configured_camera(devices: Any) -> Camera:
    """The camera the config's `devices` section names (not started yet)."""
    return open_chosen(CAMERAS, "devices.camera", devices.camera)


# Button kind → "module:class"; evdev and GPIO libraries are imported only when their kind is chosen.
BUTTONS: dict[str, str] = {
    "socket": "edgevision.devices.socket_button:SocketButton",
    "evdev": "edgevision.devices.evdev_button:EvdevButton",
    "gpio": "edgevision.devices.gpio_button:GpioButton",
}


def open_button(kind: str, **options: Any) -> Button:
    """The button of `kind`; options are the back-end's (socket_path, device and key, pin and chip, debounce)."""
    return load_class(BUTTONS, "devices.button", kind)(**options)


# Kind → "module:class"; sounddevice (PortAudio) is imported only when its kind is chosen.
MICROPHONES: dict[str, str] = {
    "sounddevice": "edgevision.devices.portaudio:SounddeviceMicrophone",
    "wav": "edgevision.devices.wav_devices:WavMicrophone",
}

SPEAKERS: dict[str, str] = {
    "sounddevice": "edgevision.devices.portaudio:SounddeviceSpeaker",
    "wav": "edgevision.devices.wav_devices:WavSpeaker",
}


def open_microphone(kind: str, **options: Any) -> Microphone:
    """sounddevice: options device (name or index; None = default), max_seconds; wav: files, loop, max_seconds."""
    return load_class(MICROPHONES, "devices.microphone", kind)(**options)


def open_speaker(kind: str, **options: Any) -> Speaker:
    """sounddevice: options device (name or index; None = default); wav: folder, realtime."""
    return load_class(SPEAKERS, "devices.speaker", kind)(**options)
