"""The configuration: every setting declared once, loaded strictly from one YAML file.

Settings are fields of frozen dataclasses, one dataclass per section, declared with `setting()` (default,
one-line description, limits). The loader walks the YAML node tree, so each error names the file, the line,
the dotted key, what is wrong and how to fix it; it collects every error before raising one `ConfigError`.
`describe()` and `render_example()` read the same declarations for the CLI, the README and
config/edgevision.yaml.

To add a section: declare a frozen dataclass whose fields use `setting()`, give it a docstring (its first
line is the section's comment), and add one `section()` field to `Config`. Then regenerate the example file:
`python -m edgevision.config > config/edgevision.yaml`.

Field types the loader understands: str, int, float, bool, Path (with `path="file"` or `path="dir"`),
Literal["a", "b"] (a choice), any of these `| None` (then `null` is accepted), and nested section
dataclasses.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml

from edgevision.errors import ConfigError

ENV_VAR = "EDGEVISION_CONFIG"
SYSTEM_CONFIG = Path("/etc/edgevision/config.yaml")
MODELS_FIX = "run 'make models', or register your model with 'edgevision models register'"

_META = "edgevision"


# --- declaring settings -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Meta:
    """What a setting declares besides its type and default."""

    description: str
    min: float | None = None
    max: float | None = None
    path: Literal["file", "dir"] | None = None
    must_exist: bool = True
    fix: str = MODELS_FIX  # said when a path that must exist is missing


def setting(
    default: Any,
    description: str,
    *,
    min: float | None = None,
    max: float | None = None,
    path: Literal["file", "dir"] | None = None,
    must_exist: bool = True,
    fix: str = MODELS_FIX,
) -> Any:
    """Declare one setting: its default, a one-line description and its limits.

    For a path, `default` is written as in the YAML file (relative to the config file's directory) and
    `path` says whether it names a file or a directory; it must exist unless `must_exist=False`.
    """
    if path is not None:
        default = Path(default)
    meta = Meta(description, min, max, path, must_exist, fix)
    return field(default=default, metadata={_META: meta})


def section(cls: type) -> Any:
    """Declare a section of the root (or of another section): a dataclass whose fields are settings."""
    return field(default_factory=cls)


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
        8.0, "A press this soon after an answer asks about the same scene, reusing its image; 0 turns it off.",
        min=0, max=120,
    )
    tap_s: float = setting(0.3, "A press released sooner than this is a tap, not a question.", min=0.05, max=2)
    double_press_s: float = setting(0.6, "A tap then a press within this many seconds repeats the last answer.",
                                    min=0.1, max=3)
    earcons: bool = setting(True, "Play short tones for listening, thinking and error.")
    didnt_catch: str = setting("Sorry, I didn't catch that.", "Said when no speech was recognised.")
    worker_timeout_s: float = setting(
        300.0, "If one model step runs longer than this, the systemd watchdog is no longer fed and restarts us.",
        min=10, max=3600,
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
    camera_height: int = setting(720, "Requested frame height for a live camera; 0 keeps the driver's.", min=0, max=8192)
    button: Literal["socket", "evdev", "gpio"] = setting(
        "socket",
        "socket: only the control socket (edgevision press/release); evdev: a USB button or keyboard key; "
        "gpio: a button on the 40-pin header.",
    )
    control_socket: Path = setting(
        "/run/edgevision/control.sock",
        "Local control socket: press/release and status (mode 0660, the service's group).",
        path="file", must_exist=False,
    )
    button_device: str = setting("", "evdev: the input device's path or part of its name; empty takes the first "
                                     "device with the key.")
    button_key: str = setting("KEY_SPACE", "evdev: the key code the button sends (`evtest` shows it).")
    button_pin: int = setting(7, "gpio: the BOARD pin number (Jetson.GPIO), or the line offset with button_chip.",
                              min=0, max=1023)
    button_chip: str = setting("", "gpio: a gpiochip (/dev/gpiochip0) to use libgpiod; empty uses Jetson.GPIO.")
    button_active_low: bool = setting(True, "gpio: the button connects the pin to ground (pull-up on).")
    debounce_ms: int = setting(30, "Edges this soon after a reported press or release are contact bounce.",
                               min=0, max=500)
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
        "/var/log/edgevision/interactions.jsonl", "Per-interaction log (JSON lines, one record per answer).",
        path="file", must_exist=False,
    )
    log_max_mb: float = setting(10.0, "Rotate the log when it would pass this size, in MiB.", min=0.01, max=10000)
    log_backups: int = setting(5, "Rotated logs kept (interactions.jsonl.1, .2, ...).", min=0, max=1000)
    power_reader: Literal["auto", "ina3221", "tegrastats", "rapl", "none"] = setting(
        "auto", "Power monitor: auto picks INA3221 (Jetson), then tegrastats, then Intel RAPL, else none."
    )
    sample_interval_ms: int = setting(100, "How often power and memory are sampled during an answer.",
                                      min=10, max=10000)
    store_audio: bool = setting(False, "Keep each question's recording (WAV) in capture_dir.")
    store_images: bool = setting(False, "Keep each question's camera frame (JPEG) in capture_dir.")
    capture_dir: Path = setting(
        "/var/lib/edgevision/captures", "Where stored recordings and frames go, when kept.",
        path="dir", must_exist=False,
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


# --- the schema, read from the declarations -----------------------------------------------------------------

_Kind = Literal["str", "int", "float", "bool", "path", "choice", "section"]


@dataclass(frozen=True)
class _Spec:
    name: str
    kind: _Kind
    nullable: bool
    default: Any
    meta: Meta | None  # None for a section
    choices: tuple[str, ...] = ()
    section: type | None = None


@cache
def _specs(cls: type) -> dict[str, _Spec]:
    """The fields of a section class, checked: a mistake in a declaration fails here, at import."""
    hints = typing.get_type_hints(cls)
    specs: dict[str, _Spec] = {}
    for f in dataclasses.fields(cls):
        tp, nullable = _strip_none(hints[f.name])
        where = f"{cls.__name__}.{f.name}"
        if dataclasses.is_dataclass(tp):
            specs[f.name] = _Spec(f.name, "section", False, None, None, section=tp)
            _specs(tp)
            continue
        meta = f.metadata.get(_META)
        if meta is None:
            raise TypeError(f"{where}: declare it with setting(...) or section(...)")
        kind: _Kind
        choices: tuple[str, ...] = ()
        if typing.get_origin(tp) is Literal:
            kind, choices = "choice", tuple(typing.get_args(tp))
            if not all(isinstance(c, str) for c in choices):
                raise TypeError(f"{where}: choices must be strings")
        elif tp is Path:
            kind = "path"
            if meta.path not in ("file", "dir"):
                raise TypeError(f"{where}: a Path setting needs path='file' or path='dir'")
        elif tp in (str, int, float, bool):
            kind = tp.__name__
        else:
            raise TypeError(f"{where}: unsupported setting type {tp!r}")
        spec = _Spec(f.name, kind, nullable, f.default, meta, choices)
        if f.default is not None or not nullable:
            problem = _check_value(spec, f.default)
            if problem:
                raise TypeError(f"{where}: default {f.default!r} does not fit its declaration: {problem}")
        specs[f.name] = spec
    return specs


def _strip_none(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
        raise TypeError(f"unsupported setting type {tp!r}")
    return tp, False


def _check_value(spec: _Spec, value: Any) -> str | None:
    """Whether a (default) value has the declared type and limits; the problem in words, or None."""
    expected = {"str": str, "int": int, "float": (int, float), "bool": bool, "path": Path, "choice": str}
    if isinstance(value, bool) and spec.kind != "bool":
        return "a boolean"
    if not isinstance(value, expected[spec.kind]):
        return f"not a {spec.kind}"
    if spec.kind == "choice" and value not in spec.choices:
        return f"not one of {', '.join(spec.choices)}"
    if spec.kind in ("int", "float"):
        assert spec.meta is not None
        if spec.meta.min is not None and value < spec.meta.min:
            return f"below the minimum {spec.meta.min}"
        if spec.meta.max is not None and value > spec.meta.max:
            return f"above the maximum {spec.meta.max}"
    return None


def _leaves(cls: type, prefix: str = "") -> typing.Iterator[tuple[str, _Spec]]:
    for spec in _specs(cls).values():
        key = prefix + spec.name
        if spec.kind == "section":
            assert spec.section is not None
            yield from _leaves(spec.section, key + ".")
        else:
            yield key, spec


# --- describing the settings --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SettingDoc:
    """One row of the settings table, for the CLI and the README."""

    key: str  # dotted: "decoder.n_ctx"
    type: str  # "integer", "number", "string", "boolean", "file", "directory", "choice"
    default: Any  # as written in the YAML file (paths as strings)
    description: str
    allowed: str  # the limits in words: "256 to 131072", "onnxruntime, tensorrt", "" when any value goes


_TYPE_WORDS = {"str": "string", "int": "integer", "float": "number", "bool": "boolean", "choice": "choice"}


def describe(root: type = Config) -> list[SettingDoc]:
    """Every setting, in declaration order."""
    docs = []
    for key, spec in _leaves(root):
        assert spec.meta is not None
        kind = _TYPE_WORDS[spec.kind] if spec.kind != "path" else _path_noun(spec)
        if spec.nullable:
            kind += " or null"
        default = str(spec.default) if isinstance(spec.default, Path) else spec.default
        docs.append(SettingDoc(key, kind, default, spec.meta.description, _allowed(spec)))
    return docs


def _path_noun(spec: _Spec) -> str:
    assert spec.meta is not None
    return "file" if spec.meta.path == "file" else "directory"


def _allowed(spec: _Spec) -> str:
    assert spec.meta is not None
    lo, hi = spec.meta.min, spec.meta.max
    if spec.kind == "choice":
        return ", ".join(spec.choices)
    if spec.kind == "path":
        if not spec.meta.must_exist:
            return ""
        return "an existing " + ("file" if spec.meta.path == "file" else "directory")
    if lo is not None and hi is not None:
        return f"{_num(lo)} to {_num(hi)}"
    if lo is not None:
        return f"{_num(lo)} or more"
    if hi is not None:
        return f"{_num(hi)} or less"
    return ""


def _num(x: float) -> str:
    return str(x)


def render_example(root: type = Config) -> str:
    """A commented YAML file holding every setting at its default; config/edgevision.yaml is this text."""
    lines = [
        "# edgevision configuration: every setting, at its default.",
        "# Generated from edgevision/config.py: python -m edgevision.config > config/edgevision.yaml",
        "# Relative paths are relative to the directory this file is in (after following symlinks).",
    ]
    _render_section(root, 0, lines)
    return "\n".join(lines) + "\n"


def _render_section(cls: type, depth: int, lines: list[str]) -> None:
    indent = "  " * depth
    for spec in _specs(cls).values():
        if spec.kind == "section":
            assert spec.section is not None
            lines.append("")
            lines.append(f"{indent}# {_first_line(spec.section.__doc__)}")
            lines.append(f"{indent}{spec.name}:")
            _render_section(spec.section, depth + 1, lines)
            continue
        assert spec.meta is not None
        allowed = _allowed(spec)
        if spec.kind == "choice":
            allowed = "one of: " + allowed
        comment = spec.meta.description + (f" ({allowed})" if allowed and spec.kind != "path" else "")
        lines.append(f"{indent}# {comment}")
        default = str(spec.default) if isinstance(spec.default, Path) else spec.default
        dumped = yaml.safe_dump({spec.name: default}, default_flow_style=False, width=math.inf, allow_unicode=True)
        lines.append(indent + dumped.rstrip("\n"))


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if doc and doc.strip() else ""


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


_T = typing.TypeVar("_T")


def load(path: Path, root: type[_T]) -> _T:
    """Load `path` into the settings tree `root` (normally `Config`)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}) — save the file as UTF-8") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror} — check the path and its permissions") from e
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        if e.context_mark is not None and "<stream end>" in (e.problem or ""):
            mark = e.context_mark  # an unclosed bracket or quote: point where it opened
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = " ".join(p for p in (e.context, e.problem) if p)
        raise ConfigError(
            f"{path}{line}: YAML syntax error: {problem} — fix the indentation, colons or quoting near this line"
        ) from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not readable as YAML: {e} — check the file's encoding and characters") from e
    loader = _Loader(path, path.resolve().parent, root)
    if node is not None and not isinstance(node, yaml.MappingNode):
        sections = ", ".join(f"{name}:" for name in _specs(root))
        loader.error(
            node,
            "",
            f"the top level is {_describe_node(node)}, not a mapping of sections",
            f"write the sections at the top level, without indentation ({sections})",
        )
        loader.raise_if_errors()
    config = loader.build(root, node, "")
    loader.raise_if_errors()
    return config


class _Loader:
    """Walks the YAML node tree into the dataclasses, collecting every error."""

    def __init__(self, path: Path, base: Path, root: type) -> None:
        self.path = path
        self.base = base
        self.root = root
        self.errors: list[tuple[int, str]] = []
        self.constructor = yaml.constructor.SafeConstructor()

    def error(self, node: yaml.Node | None, key: str, problem: str, fix: str) -> None:
        line = node.start_mark.line + 1 if node is not None else 0
        where = f"{self.path}:{line}" if line else str(self.path)
        self.errors.append((line, f"{where}: {key + ': ' if key else ''}{problem} — {fix}"))

    def raise_if_errors(self) -> None:
        if self.errors:
            ordered = sorted(self.errors, key=lambda e: (e[0] == 0, e[0]))  # lines in order, then defaults
            raise ConfigError("\n".join(text for _, text in ordered))

    def build(self, cls: type, node: yaml.Node | None, prefix: str) -> Any:
        specs = _specs(cls)
        given: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                name = key_node.value if _is_str(key_node) else None
                if name is None or name not in specs:
                    scalar = isinstance(key_node, yaml.ScalarNode)
                    raw = key_node.value if scalar else _describe_node(key_node)
                    self._unknown(key_node, prefix, str(raw), specs)
                elif name in given:
                    first = given[name][0].start_mark.line + 1
                    self.error(key_node, prefix + name, f"set twice (first on line {first})", "keep one of the two")
                else:
                    given[name] = (key_node, value_node)
        values = {}
        for name, spec in specs.items():
            key_node, value_node = given.get(name, (None, None))
            if spec.kind == "section":
                assert spec.section is not None
                malformed = value_node is not None and not _is_null(value_node)
                if malformed and not isinstance(value_node, yaml.MappingNode):
                    self.error(
                        key_node,
                        prefix + name,
                        f"is {_describe_node(value_node)}, not a section of settings",
                        f"write its settings indented under '{name}:', one 'key: value' per line",
                    )
                    value_node = None
                sub = value_node if isinstance(value_node, yaml.MappingNode) else None
                values[name] = self.build(spec.section, sub, prefix + name + ".")
            else:
                values[name] = self.leaf(spec, prefix + name, key_node, value_node)
        return cls(**values)

    def _unknown(self, key_node: yaml.Node, prefix: str, raw: str, specs: dict[str, _Spec]) -> None:
        section = prefix.rstrip(".")
        what = f"unknown setting in {section}" if section else "unknown section"
        key = prefix + raw
        close = difflib.get_close_matches(raw, list(specs), n=1, cutoff=0.6)
        elsewhere = [k for k, _ in _leaves(self.root) if k.rsplit(".", 1)[-1] == raw and k != key]
        if close:
            fix = f"did you mean '{close[0]}'?"
        elif elsewhere:
            fix = f"move it to {elsewhere[0]}"
        else:
            fix = f"remove it; known {'settings in ' + section if section else 'sections'}: {', '.join(specs)}"
        self.error(key_node, key, what, fix)

    def leaf(self, spec: _Spec, key: str, key_node: yaml.Node | None, node: yaml.Node | None) -> Any:
        assert spec.meta is not None
        if node is None:  # not in the file: the default, with a path resolved and checked like a given one
            value = spec.default
            if spec.kind == "path" and value is not None:
                return self._path(spec, key, None, str(value), default=True)
            return value
        expect = _expectation(spec)
        if _is_null(node):
            if spec.nullable:
                return None
            self.error(
                key_node,
                key,
                "has no value",
                f"set {expect}, or delete the line to use the default {_yaml_text(spec.default)}",
            )
            return spec.default
        if not isinstance(node, yaml.ScalarNode):
            self.error(key_node, key, f"is {_describe_node(node)}", f"set {expect}")
            return spec.default
        raw, tag = node.value, node.tag.rsplit(":", 1)[-1]
        shown = _show(node)
        if spec.kind in ("str", "path", "choice") and tag != "str":
            if spec.kind == "choice":
                self.error(key_node, key, f"{shown} is not one of {', '.join(spec.choices)}", f"set {expect}")
            else:
                self.error(key_node, key, f"{shown} is {_tag_word(tag)}, not text", f'put it in quotes: "{raw}"')
            return spec.default
        if spec.kind == "int" and tag != "int":
            self.error(key_node, key, f"{shown} is {_tag_word(tag)}, not a whole number", f"set {expect}")
            return spec.default
        if spec.kind == "float" and tag not in ("int", "float"):
            self.error(key_node, key, f"{shown} is {_tag_word(tag)}, not a number", f"set {expect}")
            return spec.default
        if spec.kind == "bool" and tag != "bool":
            self.error(key_node, key, f"{shown} is {_tag_word(tag)}, not true or false", "set true or false")
            return spec.default
        value = self.constructor.construct_object(node)
        if spec.kind == "float":
            value = float(value)
            if math.isnan(value):
                self.error(key_node, key, f"{shown} is not a number", f"set {expect}")
                return spec.default
        if spec.kind == "choice" and value not in spec.choices:
            close = difflib.get_close_matches(value.lower(), spec.choices, n=1, cutoff=0.6)
            fix = f"did you mean '{close[0]}'?" if close else f"set one of: {', '.join(spec.choices)}"
            self.error(key_node, key, f"{shown} is not one of {', '.join(spec.choices)}", fix)
            return spec.default
        if spec.kind in ("int", "float"):
            lo, hi = spec.meta.min, spec.meta.max
            fix = "set " + _range_words(lo, hi)
            if lo is not None and value < lo:
                self.error(key_node, key, f"{shown} is below the minimum {_num(lo)}", fix)
                return spec.default
            if hi is not None and value > hi:
                self.error(key_node, key, f"{shown} is above the maximum {_num(hi)}", fix)
                return spec.default
        if spec.kind == "path":
            return self._path(spec, key, key_node, value, default=False)
        return value

    def _path(self, spec: _Spec, key: str, key_node: yaml.Node | None, raw: str, *, default: bool) -> Path | None:
        assert spec.meta is not None
        path = Path(os.path.abspath(self.base / Path(raw).expanduser()))
        if not spec.meta.must_exist:
            return path
        want_file = spec.meta.path == "file"
        noun = "file" if want_file else "directory"
        note = f" (the default '{raw}'; set {key} to yours)" if default else ""
        if not path.exists():
            self.error(key_node, key, f"{noun} not found: {path}{note}", spec.meta.fix)
        elif want_file and not path.is_file():
            self.error(key_node, key, f"{path} is a directory, not a file{note}", "point it at the model file itself")
        elif not want_file and not path.is_dir():
            self.error(
                key_node,
                key,
                f"{path} is a file, not a directory{note}",
                "point it at the directory that holds the model",
            )
        return path


def _is_str(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:str"


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _describe_node(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return f"{_tag_word(node.tag.rsplit(':', 1)[-1])} {_show(node)}"


def _tag_word(tag: str) -> str:
    return {
        "int": "a whole number",
        "float": "a number",
        "bool": "a boolean",
        "null": "empty",
        "str": "text",
        "timestamp": "a date",
        "binary": "binary data",
    }.get(tag, f"a {tag}")


def _show(node: yaml.Node) -> str:
    raw = str(node.value)
    if len(raw) > 60:
        raw = raw[:57] + "..."
    return f"'{raw}'" if node.tag.endswith(":str") else raw


def _yaml_text(value: Any) -> str:
    if isinstance(value, Path):
        value = str(value)
    return yaml.safe_dump(value, default_flow_style=True, width=math.inf).split("\n...")[0].strip()


def _range_words(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f"a value between {_num(lo)} and {_num(hi)}"
    if lo is not None:
        return f"a value of {_num(lo)} or more"
    if hi is not None:
        return f"a value of {_num(hi)} or less"
    return "a number"


def _expectation(spec: _Spec) -> str:
    assert spec.meta is not None
    match spec.kind:
        case "int":
            return "a whole number" + _range_tail(spec)
        case "float":
            return "a number" + _range_tail(spec)
        case "bool":
            return "true or false"
        case "choice":
            return "one of: " + ", ".join(spec.choices)
        case "path":
            return "the path of a " + ("file" if spec.meta.path == "file" else "directory")
        case _:
            return "some text"


def _range_tail(spec: _Spec) -> str:
    assert spec.meta is not None
    lo, hi = spec.meta.min, spec.meta.max
    if lo is None and hi is None:
        return ""
    return " (" + _range_words(lo, hi).removeprefix("a value ").removeprefix("of ") + ")"


_specs(Config)  # a mistake in a declaration fails at import, naming the field


if __name__ == "__main__":
    print(render_example(), end="")
