"""Everything the daemon uses, built in one place from the config: the models, the devices, the telemetry.

Tests and the benchmark build a `Daemon` themselves from software devices; `edgevision run` builds it here.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from edgevision.config import Config
from edgevision.daemon.daemon import Daemon
from edgevision.daemon.notify import Notifier

logger = logging.getLogger(__name__)


def build_daemon(config: Config, *, notifier: Notifier | None = None) -> Daemon:
    """Open the devices and load the models the config names; on failure, what was opened is closed again."""
    from edgevision.assistant import Assistant
    from edgevision.devices.backends import BUTTONS, MICROPHONES, SPEAKERS, open_configured_camera
    from edgevision.devices.socket_button import SocketButton
    from edgevision.plugins import open_chosen
    from edgevision.telemetry.log import InteractionLog
    from edgevision.telemetry.memory import MemoryMeter
    from edgevision.telemetry.power import EnergyMeter, open_power_reader

    devices, telemetry = config.devices, config.telemetry
    notifier = notifier or Notifier()
    with contextlib.ExitStack() as stack:
        debounce = devices.debounce_ms / 1000
        # The control socket serves `edgevision status`, and press/release, whatever the button is.
        control = SocketButton(devices.control_socket, debounce=debounce)
        buttons: list[Any] = [control]
        if devices.button.kind != "socket":  # the socket is always there; another kind is a second button
            buttons.append(open_chosen(BUTTONS, "devices.button", devices.button, debounce=debounce))
        camera = open_configured_camera(devices)
        stack.callback(camera.close)
        microphone = open_chosen(
            MICROPHONES, "devices.microphone", devices.microphone, max_seconds=config.daemon.max_recording_s + 1
        )
        stack.callback(microphone.close)
        speaker = open_chosen(SPEAKERS, "devices.speaker", devices.speaker)
        stack.callback(speaker.close)

        log = InteractionLog(telemetry.log_path, max_bytes=int(telemetry.log_max_mb * 2**20),
                             backups=telemetry.log_backups)
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
    paths = [value for value in vars(choice.options).values() if isinstance(value, Path)]
    return paths[0].name if paths else choice.kind
