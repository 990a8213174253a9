"""Everything the daemon uses, built in one place from the config: the models, the devices, the telemetry.

Tests and the benchmark build a `Daemon` themselves from software devices; `edgevision run` builds it here.

The order fails fast and waits well: the control socket first (a socket path that cannot be used is a lasting
fault, reported before minutes of model loading), then the log and the models, then the sound devices,
which may appear late — a USB microphone enumerated a moment after boot is waited for, with backoff, a
STATUS= line for systemd and (once the speaker and Piper are up) a spoken sentence, for up to
`devices.wait_s`; then `DeviceMissing` (exit status 3, which the unit restarts).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from edgevision.config import Config
from edgevision.daemon.daemon import Daemon
from edgevision.daemon.notify import Notifier
from edgevision.errors import DeviceError, DeviceMissing, EdgevisionError

logger = logging.getLogger(__name__)

T = TypeVar("T")
_DEVICE_BACKOFF_S = (0.5, 10.0)  # waiting for a late device: first and longest pause between tries


def build_daemon(config: Config, *, notifier: Notifier | None = None) -> Daemon:
    """Open the devices and load the models the config names; on failure, what was opened is closed again."""
    from edgevision.assistant import Assistant
    from edgevision.devices.backends import BUTTONS, MICROPHONES, SPEAKERS, open_configured_camera
    from edgevision.devices.socket_button import SocketButton
    from edgevision.moe.placement import PlacementMeter
    from edgevision.plugins import open_chosen
    from edgevision.telemetry.log import InteractionLog
    from edgevision.telemetry.memory import MemoryMeter
    from edgevision.telemetry.power import EnergyMeter, open_power_reader

    devices, telemetry = config.devices, config.telemetry
    notifier = notifier or Notifier()
    with contextlib.ExitStack() as stack:
        debounce = devices.debounce_ms / 1000
        # The control socket serves `edgevision status`, and press/release, whatever the button is. It is
        # taken now, before the models load, so a second instance or an unusable path stops us at once.
        control = SocketButton(devices.control_socket, debounce=debounce)
        control.listen()
        stack.callback(control.unlisten)
        buttons: list[Any] = [control]
        if devices.button.kind != "socket":  # the socket is always there; another kind is a second button
            buttons.append(open_chosen(BUTTONS, "devices.button", devices.button, debounce=debounce))
        camera = open_configured_camera(devices)
        stack.callback(camera.close)

        log = InteractionLog(
            telemetry.log_path, max_bytes=int(telemetry.log_max_mb * 2**20), backups=telemetry.log_backups
        )
        stack.callback(log.close)
        interval = telemetry.sample_interval_ms / 1000
        power = open_power_reader(telemetry.power_reader)
        stack.callback(power.close)
        meters = {
            "memory": lambda: MemoryMeter(interval=interval),
            "energy": lambda: EnergyMeter(power, interval=interval),
        }
        notifier.status("loading the models")
        assistant = Assistant.from_config(config)
        stack.callback(assistant.close)
        # per answer: major faults, bytes read from storage and (with a placement) the experts' hit rate
        meters["placement"] = lambda: PlacementMeter(assistant.placement)

        waiting = DeviceWait(devices.wait_s, notifier)
        speaker = waiting.open("speaker", lambda: open_chosen(SPEAKERS, "devices.speaker", devices.speaker))
        stack.callback(speaker.close)
        if assistant.synthesizer is not None:
            waiting.say = lambda text: speaker.play(assistant.synthesizer.synthesize(text))
        microphone = waiting.open(
            "microphone",
            lambda: open_chosen(
                MICROPHONES, "devices.microphone", devices.microphone, max_seconds=config.daemon.max_recording_s + 1
            ),
        )
        stack.callback(microphone.close)

        daemon = Daemon(
            assistant=assistant,
            camera=camera,
            microphone=microphone,
            speaker=speaker,
            buttons=buttons,
            control=control,
            settings=config.daemon,
            log=log,
            meters=meters,
            notifier=notifier,
            captures=telemetry.capture_dir if telemetry.store_audio or telemetry.store_images else None,
            store_audio=telemetry.store_audio,
            store_images=telemetry.store_images,
            models=model_names(config),
        )
        daemon.closing.extend([log.close, power.close])
        stack.pop_all()
        return daemon


class DeviceWait:
    """Opens a device that may not be there yet: retries DeviceError with backoff for up to `wait_s` in all,
    saying so in the log, in systemd's STATUS= and (through `say`, once a speaker is open) aloud."""

    def __init__(self, wait_s: float, notifier: Notifier, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.notifier, self.clock = notifier, clock
        self.deadline = clock() + wait_s
        self.say: Callable[[str], None] | None = None

    def open(self, what: str, opener: Callable[[], T]) -> T:
        delay, said = _DEVICE_BACKOFF_S[0], False
        while True:
            try:
                device = opener()
            except DeviceMissing:
                raise
            except DeviceError as error:
                left = self.deadline - self.clock()
                if left <= 0:
                    raise DeviceMissing(f"no {what} after waiting: {error}") from error
                logger.warning("waiting for the %s (%.0f s left): %s", what, left, error)
                self.notifier.status(f"waiting for the {what}: {error}"[:200])
                if not said and self.say is not None:
                    said = True
                    try:
                        self.say(f"Waiting for the {what}.")
                    except (EdgevisionError, OSError) as speech_error:
                        logger.warning("could not say that the %s is missing: %s", what, speech_error)
                time.sleep(min(delay, max(left, 0.0)))
                delay = min(delay * 2, _DEVICE_BACKOFF_S[1])
                continue
            if said or delay > _DEVICE_BACKOFF_S[0]:
                logger.info("the %s is here now", what)
            return device


def model_names(config: Config) -> dict[str, str]:
    """The loaded models, for `edgevision status`."""
    return {
        "recognizer": _model_name(config.speech.recognizer),
        "vision": Path(config.vision.tower).name,
        "decoder": Path(config.decoder.model).name,
        "voice": _model_name(config.speech.synthesizer),
    }


def _model_name(choice: Any) -> str:
    """The file or folder an engine's first path setting names ("whisper-tiny.en"), else its kind."""
    paths = list(choice.paths().values())
    return paths[0].name if paths else choice.kind
