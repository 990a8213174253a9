"""edgevision's configuration: every setting declared once, loaded strictly from one YAML file.

Each section is a frozen dataclass of `setting()` fields (`edgevision.schema` has the declaration helpers,
the strict loader and the doc renderers). To add a section: declare a frozen dataclass whose fields use
`setting()`, give it a docstring (its first line is the section's comment), and add one `section()` field to
`Config`. Then regenerate the example file: `python -m edgevision.config > config/edgevision.yaml`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edgevision.errors import ConfigError
from edgevision.schema import SettingDoc, check_declarations, load, section, setting
from edgevision.schema import describe as describe_root
from edgevision.schema import render_example as render_root

ENV_VAR = "EDGEVISION_CONFIG"
SYSTEM_CONFIG = Path("/etc/edgevision/config.yaml")

__all__ = ["Config", "SettingDoc", "describe", "find_config", "load", "load_config", "render_example", "setting"]


# --- the settings -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpeechSettings:
    """Speech recognition (Whisper) and speech synthesis (Piper)."""

    whisper_model: Path = setting(
        "../models/whisper-tiny.en", "Whisper model directory (CTranslate2 format).", path="dir"
    )
    language: str = setting("en", "Language the user speaks, as a Whisper language code.")
    beam_size: int = setting(1, "Whisper beam size; 1 is greedy decoding, the fastest.", min=1, max=10)
    whisper_threads: int = setting(0, "CPU threads for Whisper; 0 picks automatically.", min=0, max=64)
    whisper_window: Literal["fit", "full"] = setting(
        "fit",
        "fit: Whisper's encoder sees the recording plus quiet, at least 10 s (a short question costs a third of "
        "a 30-s window, same words); full: its own 30-s window, as faster-whisper runs it.",
    )
    piper_voice: Path = setting(
        "../models/piper/en_US-joe-medium.onnx",
        "Piper voice model (.onnx, with its .onnx.json beside it).",
        path="file",
    )
    length_scale: float = setting(1.0, "Speaking rate: below 1 speaks faster, above 1 slower.", min=0.5, max=2.0)


@dataclass(frozen=True)
class VisionSettings:
    """The vision tower that turns a photo into image embeddings."""

    backend: Literal["onnxruntime", "tensorrt"] = setting("onnxruntime", "Inference back-end for the vision tower.")
    tower: Path = setting(
        "../models/synthetic/tower-gemma3-270m.onnx",
        "Vision tower model (ONNX); for backend tensorrt, the plan 'make engines' built from it "
        "(../engines/NAME.plan).",
        path="file",
    )
    threads: int = setting(0, "CPU threads for the vision tower; 0 picks automatically.", min=0, max=64)


@dataclass(frozen=True)
class DecoderSettings:
    """The language model (llama.cpp, GGUF) that answers from the image embeddings and the question."""

    model: Path = setting("../models/gemma-3-270m-q4_k_m.gguf", "Decoder model (GGUF).", path="file")
    n_ctx: int = setting(2048, "Context window in tokens (image, prompt and answer).", min=256, max=131072)
    n_threads: int = setting(0, "CPU threads for the decoder; 0 picks automatically.", min=0, max=64)
    chat_format: Literal["auto", "gemma3", "gemma4", "llava"] = setting(
        "auto",
        "How prompts are laid out for the decoder; auto follows its GGUF architecture (gemma3, gemma4). LLaVA-style "
        "decoders (MoE-LLaVA, LLaVA-GM) need llava.",
    )
    max_answer_tokens: int = setting(48, "Longest answer, in tokens.", min=1, max=1024)
    temperature: float = setting(0.0, "Sampling temperature; 0 always picks the likeliest token.", min=0.0, max=2.0)
    seed: int = setting(0, "Random seed for sampling, so answers repeat.", min=0)
    system_prompt: str = setting(
        "You are a visual assistant for a blind user. Answer in one or two short sentences; "
        "the first sentence answers the question.",
        "Instructions given to the model before every question.",
    )


@dataclass(frozen=True)
class LoggingSettings:
    """Log output."""

    level: Literal["debug", "info", "warning", "error"] = setting("info", "Lowest level that is logged.")


@dataclass(frozen=True)
class DaemonSettings:
    """The appliance daemon (`edgevision run`): how a press, a release and the answer play together."""

    mode: Literal["overlapped", "sequential"] = setting(
        "overlapped",
        "overlapped: encode the image while the button is held, so only the question is left after release; "
        "sequential: everything after release (for comparison).",
    )
    max_recording_s: float = setting(15.0, "Longest question: recording stops after this many seconds.", min=1, max=120)
    follow_up_s: float = setting(
        8.0,
        "A press this soon after an answer asks about the same scene, reusing its image; 0 turns it off.",
        min=0,
        max=120,
    )
    tap_s: float = setting(0.3, "A press released sooner than this is a tap, not a question.", min=0.05, max=2)
    double_press_s: float = setting(
        0.6, "A tap then a press within this many seconds repeats the last answer.", min=0.1, max=3
    )
    earcons: bool = setting(True, "Play short tones for listening, thinking and error.")
    didnt_catch: str = setting("Sorry, I didn't catch that.", "Said when no speech was recognised.")
    worker_timeout_s: float = setting(
        300.0,
        "If one model step runs longer than this, the systemd watchdog is no longer fed and restarts us.",
        min=10,
        max=3600,
    )


@dataclass(frozen=True)
class DevicesSettings:
    """The camera, the push-to-talk button, the microphone and the speaker."""

    camera: Literal["opencv", "video", "image"] = setting(
        "opencv", "opencv: a live camera (USB/V4L2, or CSI through GStreamer); video: a video file; image: a photo."
    )
    camera_source: str = setting(
        "0",
        "opencv: a camera index (0), a device (/dev/video0) or a GStreamer pipeline; video/image: the file's path.",
    )
    camera_width: int = setting(1280, "Requested frame width for a live camera; 0 keeps the driver's.", min=0, max=8192)
    camera_height: int = setting(
        720, "Requested frame height for a live camera; 0 keeps the driver's.", min=0, max=8192
    )
    button: Literal["socket", "evdev", "gpio"] = setting(
        "socket",
        "socket: only the control socket (edgevision press/release); evdev: a USB button or keyboard key; "
        "gpio: a button on the 40-pin header.",
    )
    control_socket: Path = setting(
        "/run/edgevision/control.sock",
        "Local control socket: press/release and status (mode 0660, the service's group).",
        path="file",
        must_exist=False,
    )
    button_device: str = setting(
        "", "evdev: the input device's path or part of its name; empty takes the first device with the key."
    )
    button_key: str = setting("KEY_SPACE", "evdev: the key code the button sends (`evtest` shows it).")
    button_pin: int = setting(
        7, "gpio: the BOARD pin number (Jetson.GPIO), or the line offset with button_chip.", min=0, max=1023
    )
    button_chip: str = setting("", "gpio: a gpiochip (/dev/gpiochip0) to use libgpiod; empty uses Jetson.GPIO.")
    button_active_low: bool = setting(True, "gpio: the button connects the pin to ground (pull-up on).")
    debounce_ms: int = setting(
        30, "Edges this soon after a reported press or release are contact bounce.", min=0, max=500
    )
    microphone: Literal["sounddevice", "wav"] = setting(
        "sounddevice", "sounddevice: a real microphone (PortAudio); wav: WAV files played in (tests, scripts)."
    )
    microphone_device: str = setting(
        "", "sounddevice: the input device's name or index, empty for the default; wav: a WAV file or a folder."
    )
    speaker: Literal["sounddevice", "wav"] = setting(
        "sounddevice", "sounddevice: a real speaker (PortAudio); wav: write what is played into WAV files."
    )
    speaker_device: str = setting(
        "", "sounddevice: the output device's name or index, empty for the default; wav: the folder to write into."
    )
    speaker_realtime: bool = setting(True, "wav: take as long as the audio lasts (false: write at once).")


@dataclass(frozen=True)
class TelemetrySettings:
    """The per-answer log of latency, memory, power and energy."""

    log_path: Path = setting(
        "/var/log/edgevision/interactions.jsonl",
        "Per-interaction log (JSON lines, one record per answer).",
        path="file",
        must_exist=False,
    )
    log_max_mb: float = setting(10.0, "Rotate the log when it would pass this size, in MiB.", min=0.01, max=10000)
    log_backups: int = setting(5, "Rotated logs kept (interactions.jsonl.1, .2, ...).", min=0, max=1000)
    power_reader: Literal["auto", "ina3221", "tegrastats", "rapl", "none"] = setting(
        "auto", "Power monitor: auto picks INA3221 (Jetson), then tegrastats, then Intel RAPL, else none."
    )
    sample_interval_ms: int = setting(
        100, "How often power and memory are sampled during an answer.", min=10, max=10000
    )
    store_audio: bool = setting(False, "Keep each question's recording (WAV) in capture_dir.")
    store_images: bool = setting(False, "Keep each question's camera frame (JPEG) in capture_dir.")
    capture_dir: Path = setting(
        "/var/lib/edgevision/captures",
        "Where stored recordings and frames go, when kept.",
        path="dir",
        must_exist=False,
    )


@dataclass(frozen=True)
class Config:
    """The whole configuration. `Config()` holds the declared defaults, with paths not yet resolved."""

    speech: SpeechSettings = section(SpeechSettings)
    vision: VisionSettings = section(VisionSettings)
    decoder: DecoderSettings = section(DecoderSettings)
    logging: LoggingSettings = section(LoggingSettings)
    daemon: DaemonSettings = section(DaemonSettings)
    devices: DevicesSettings = section(DevicesSettings)
    telemetry: TelemetrySettings = section(TelemetrySettings)


def describe(root: type = Config) -> list[SettingDoc]:
    """Every setting under `root` (default: the whole config), in declaration order."""
    return describe_root(root)


def render_example(root: type = Config) -> str:
    """A commented YAML file with every setting under `root` at its default."""
    return render_root(root)


# --- finding and loading the file ---------------------------------------------------------------------------


def find_config(
    cli_path: str | os.PathLike[str] | None,
    *,
    environ: Mapping[str, str] | None = None,
    system_path: Path = SYSTEM_CONFIG,
) -> Path:
    """The config file to load: `--config` if given, else $EDGEVISION_CONFIG if set, else /etc/edgevision.

    A path that was asked for but does not exist is an error; it never falls through to the next place.
    """
    env = os.environ if environ is None else environ
    example = "config/edgevision.yaml"
    if cli_path is not None and str(cli_path) != "":
        path, origin = Path(cli_path).expanduser(), "--config"
    elif env.get(ENV_VAR):
        path, origin = Path(env[ENV_VAR]).expanduser(), f"${ENV_VAR}"
    else:
        if system_path.is_file():
            return system_path
        raise ConfigError(
            f"no config file: --config was not given, ${ENV_VAR} is not set and {system_path} does not exist"
            f" — pass --config PATH, set {ENV_VAR}=PATH, or copy {example} to {system_path}"
        )
    if path.is_file():
        return path
    what = "is a directory, not a file" if path.is_dir() else "does not exist"
    raise ConfigError(f"config file {path} (from {origin}) {what} — check the path, or start from {example}")


def load_config(path: str | os.PathLike[str]) -> Config:
    """Load and check a config file; raises ConfigError listing every problem, one per line."""
    return load(Path(path), Config)


check_declarations(Config)  # a mistake in a declaration fails at import, naming the field


if __name__ == "__main__":
    print(render_example(), end="")
