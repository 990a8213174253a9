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
from typing import ClassVar, Literal

from edgevision.daemon.state import Mode
from edgevision.decoder.prompt import FORMATS as CHAT_FORMATS
from edgevision.devices.backends import BUTTONS, CAMERAS, MICROPHONES, SPEAKERS
from edgevision.errors import ConfigError
from edgevision.ocr.backends import BACKENDS as OCR_BACKENDS
from edgevision.plugins import settings_of
from edgevision.schema import Choice, check_declarations, kinds, load, section, setting, size_check
from edgevision.schema_docs import SettingDoc
from edgevision.schema_docs import describe as describe_root
from edgevision.schema_docs import render_example as render_root
from edgevision.speech.engines import RECOGNIZERS, SYNTHESIZERS
from edgevision.telemetry.power import POWER_READERS
from edgevision.vision.encoder import BACKENDS as VISION_BACKENDS

ENV_VAR = "EDGEVISION_CONFIG"
SYSTEM_CONFIG = Path("/etc/edgevision/config.yaml")

__all__ = ["Config", "SettingDoc", "describe", "find_config", "load", "load_config", "render_example", "setting"]


# --- the settings -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpeechSettings:
    """Speech recognition (the question) and speech synthesis (the answer)."""

    recognizer: Choice = kinds(settings_of(RECOGNIZERS, "speech.recognizer"), "whisper", "Speech recognition.")
    synthesizer: Choice = kinds(settings_of(SYNTHESIZERS, "speech.synthesizer"), "piper", "Speech synthesis.")

    # the flat settings of earlier versions: where each one is written now
    MOVED: ClassVar[dict[str, str]] = {
        "whisper_model": "write it as recognizer: {kind: whisper, model: ...}",
        "language": "write it as recognizer: {kind: whisper, language: ...}",
        "beam_size": "write it as recognizer: {kind: whisper, beam_size: ...}",
        "whisper_threads": "write it as recognizer: {kind: whisper, threads: ...}",
        "whisper_window": "write it as recognizer: {kind: whisper, window: ...}",
        "piper_voice": "write it as synthesizer: {kind: piper, voice: ...}",
        "length_scale": "write it as synthesizer: {kind: piper, length_scale: ...}",
    }


@dataclass(frozen=True)
class VisionSettings:
    """The vision tower that turns a photo into image embeddings."""

    backend: str = setting("onnxruntime", "Inference back-end for the vision tower.", choices=VISION_BACKENDS)
    tower: Path = setting(
        "../models/synthetic/tower-smollm2-135m.onnx",
        "Vision tower model (ONNX); for backend tensorrt, the plan 'make engines' built from it "
        "(../engines/NAME.plan).",
        path="file",
    )
    threads: int = setting(0, "CPU threads for the vision tower; 0 picks automatically.", min=0, max=64)


@dataclass(frozen=True)
class PlacementSettings:
    """Where a mixture-of-experts decoder's weights live: GPU, pinned in RAM, or paged from storage (docs/placement.md)."""

    ram_budget: str = setting(
        "none",
        "RAM for the decoder's weights: none (no placement: llama.cpp's defaults: the file mapped, nothing pinned), auto (the "
        "cgroup limit, or MemAvailable, less what the other stages use, the KV cache and the headroom), or a "
        "size such as 12GiB; 'edgevision plan MODEL' works it out for a board.",
        check=size_check("none", "auto"),
    )
    headroom: str = setting(
        "512MiB",
        "With ram_budget auto: memory left to the page cache, the speech synthesizer and allocations.",
        check=size_check(),
    )
    gpu_layers: int = setting(
        -1,
        "Layers offloaded to the GPU: -1 all (llama.cpp's default), 0 none. CPU-only builds have none.",
        min=-1,
        max=1000,
    )
    gpu_expert_budget: str = setting(
        "0",
        "GPU memory for expert tensors (whole MoE layers, the most evenly routed first); 0 keeps every expert in "
        "RAM. Needs a CUDA build; on a Jetson it comes out of the same DRAM and is counted once.",
        check=size_check(),
    )
    router_profile: Path | None = setting(
        None,
        "Router profile from 'edgevision calibrate' for this decoder: the first plan's prior (null: every expert "
        "alike until live routing is learned).",
        path="file",
        fix="make one with 'edgevision calibrate --decoder MODEL', or set router_profile: null",
    )
    lock_resident: bool = setting(True, "Lock the non-expert weights in RAM (needs LimitMEMLOCK or CAP_IPC_LOCK).")
    prefetch: bool = setting(True, "Read ahead the unpinned experts the router has just chosen.")
    online: bool = setting(True, "Re-plan the pinned experts from live routing, in the background.")
    replan_every: int = setting(64, "Tokens between re-plans (with online).", min=1, max=100000)
    observe_every: int = setting(
        1,
        "Count routing (for re-plans and the hit rate) on one decode step in this many; 1 counts every step.",
        min=1,
        max=1000,
    )


@dataclass(frozen=True)
class DecoderSettings:
    """The language model (llama.cpp, GGUF) that answers from the image embeddings and the question."""

    model: Path = setting("../models/smollm2-135m-instruct-q4_1.gguf", "Decoder model (GGUF).", path="file")
    n_ctx: int = setting(2048, "Context window in tokens (image, prompt and answer).", min=256, max=131072)
    n_threads: int = setting(0, "CPU threads for the decoder; 0 picks automatically.", min=0, max=64)
    chat_format: str = setting(
        "auto",
        "How prompts are laid out for the decoder; auto follows its GGUF architecture (gemma3, gemma4) or a ChatML "
        "chat template (SmolLM2). LLaVA-style decoders (MoE-LLaVA, LLaVA-GM) need llava.",
        choices=("auto", *CHAT_FORMATS),
    )
    extra_buffer_types: bool = setting(
        False,
        "Let llama.cpp copy weights into its CPU extra buffer types (AMX, CPU_REPACK). Off: AMX crashes on some "
        "x86 hosts (asked for there, a child process tries them first, and the decoder loads without them if it "
        "dies), and repacked weights leave the file mapping that expert residency manages; on may decode Q4_0 "
        "faster on a CPU without residency.",
    )
    max_answer_tokens: int = setting(48, "Longest answer, in tokens.", min=1, max=1024)
    temperature: float = setting(0.0, "Sampling temperature; 0 always picks the likeliest token.", min=0.0, max=2.0)
    seed: int = setting(0, "Random seed for sampling, so answers repeat.", min=0)
    system_prompt: str = setting(
        "You are a visual assistant for a blind user. Answer in one or two short sentences; "
        "the first sentence answers the question.",
        "Instructions given to the model before every question.",
    )
    placement: PlacementSettings = section(PlacementSettings)


@dataclass(frozen=True)
class OcrSettings:
    """Reading text in the frame (PP-OCRv5: detection, orientation, recognition), beside the vision tower."""

    enabled: bool = setting(True, "Read the text in each frame, while the vision tower encodes it.")
    backend: str = setting("onnxruntime", "Inference back-end for the OCR models.", choices=OCR_BACKENDS)
    models: Path = setting(
        "../models/ppocrv5",
        "OCR model directory: det.onnx, cls.onnx, rec.onnx and dict.txt; for backend tensorrt, the directory "
        "'make engines' built the plans in (../engines/ppocrv5).",
        path="dir",
    )
    threads: int = setting(0, "CPU threads for the OCR models; 0 picks automatically.", min=0, max=64)
    max_side: int = setting(
        960, "The frame's longest side is scaled to this for text detection (small text needs more).", min=64, max=4096
    )
    drop_below: float = setting(0.5, "Recognised lines less certain than this are not text.", min=0.0, max=1.0)
    uncertain_below: float = setting(
        0.85, "Recognised lines less certain than this are read out as uncertain.", min=0.0, max=1.0
    )


@dataclass(frozen=True)
class AnswersSettings:
    """How a question is answered: reading text aloud, answering with it, or describing the image."""

    mode: Literal["auto", "read", "answer", "describe"] = setting(
        "auto",
        "auto picks by the question's words; read: say the recognised text verbatim; answer: the decoder answers "
        "with the recognised text in its prompt; describe: the decoder answers from the image alone.",
    )
    no_text: str = setting(
        "I can't find any text; try moving the camera closer.", "Said when a question is about text and none is seen."
    )


@dataclass(frozen=True)
class LoggingSettings:
    """Log output."""

    level: Literal["debug", "info", "warning", "error"] = setting("info", "Lowest level that is logged.")


@dataclass(frozen=True)
class DaemonSettings:
    """The appliance daemon (`edgevision run`): how a press, a release and the answer play together."""

    mode: str = setting(
        "overlapped",
        "overlapped: encode the image while the button is held, so only the question is left after release; "
        "sequential: everything after release (for comparison).",
        choices=tuple(Mode),
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

    camera: Choice = kinds(settings_of(CAMERAS, "devices.camera"), "opencv", "The camera.")
    button: Choice = kinds(
        settings_of(BUTTONS, "devices.button"),
        "socket",
        "The push-to-talk button (the control socket's press and release work with every kind).",
    )
    control_socket: Path = setting(
        "/run/edgevision/control.sock",
        "Local control socket: press/release and status (mode 0660, the service's group).",
        path="file",
        must_exist=False,
    )
    debounce_ms: int = setting(
        30, "Edges this soon after a reported press or release are contact bounce.", min=0, max=500
    )
    microphone: Choice = kinds(settings_of(MICROPHONES, "devices.microphone"), "sounddevice", "The microphone.")
    speaker: Choice = kinds(settings_of(SPEAKERS, "devices.speaker"), "sounddevice", "The speaker.")
    wait_s: float = setting(
        120.0,
        "At start-up, how long to wait (retrying with backoff) for a microphone or speaker that is not there yet "
        "before exiting with status 3 for systemd to start again.",
        min=0,
        max=3600,
    )

    # the flat settings of earlier versions: where each one is written now
    MOVED: ClassVar[dict[str, str]] = {
        "camera_source": "write it as camera: {kind: ..., source: ...}",
        "camera_width": "write it as camera: {kind: opencv, width: ...}",
        "camera_height": "write it as camera: {kind: opencv, height: ...}",
        "button_device": "write it as button: {kind: evdev, device: ...}",
        "button_key": "write it as button: {kind: evdev, key: ...}",
        "button_pin": "write it as button: {kind: gpio, pin: ...}",
        "button_chip": "write it as button: {kind: gpio, chip: ...}",
        "button_active_low": "write it as button: {kind: gpio, active_low: ...}",
        "microphone_device": "write it as microphone: {kind: sounddevice, device: ...} or {kind: wav, source: ...}",
        "speaker_device": "write it as speaker: {kind: sounddevice, device: ...} or {kind: wav, folder: ...}",
        "speaker_realtime": "write it as speaker: {kind: wav, realtime: ...}",
    }


@dataclass(frozen=True)
class TelemetrySettings:
    """The per-answer log of latency, memory, power and energy."""

    log_path: Path = setting(
        "/var/log/edgevision/interactions.jsonl",
        "Per-interaction log (JSON lines, one record per answer).",
        path="file",
        must_exist=False,
        writes=True,
    )
    log_max_mb: float = setting(10.0, "Rotate the log when it would pass this size, in MiB.", min=0.01, max=10000)
    log_backups: int = setting(5, "Rotated logs kept (interactions.jsonl.1, .2, ...).", min=0, max=1000)
    power_reader: str = setting(
        "auto",
        "Power monitor: auto picks INA3221 (Jetson), then tegrastats, then Intel RAPL, else none.",
        choices=("auto", *POWER_READERS),
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
        writes=True,
    )


@dataclass(frozen=True)
class Config:
    """The whole configuration. `Config()` holds the declared defaults, with paths not yet resolved."""

    speech: SpeechSettings = section(SpeechSettings)
    vision: VisionSettings = section(VisionSettings)
    decoder: DecoderSettings = section(DecoderSettings)
    ocr: OcrSettings = section(OcrSettings)
    answers: AnswersSettings = section(AnswersSettings)
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
    if path.is_dir():
        what = "is a directory, not a file"
    elif path.exists():
        what = "is not a regular file (a pipe, a device or a socket)"
    else:
        what = "does not exist"
    raise ConfigError(f"config file {path} (from {origin}) {what} — check the path, or start from {example}")


def load_config(path: str | os.PathLike[str]) -> Config:
    """Load and check a config file; raises ConfigError listing every problem, one per line."""
    return load(Path(path), Config)


check_declarations(Config)  # a mistake in a declaration fails at import, naming the field


if __name__ == "__main__":
    print(render_example(), end="")
