"""Tier 1: the config loader. Every error names file, line, key, the problem and a fix."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Literal

import pytest
import yaml

from edgevision.config import (
    Config,
    DecoderSettings,
    SettingDoc,
    describe,
    find_config,
    load,
    load_config,
    render_example,
    setting,
)
from edgevision.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "edgevision.yaml"

MODEL_FILES = [
    "models/piper/en_US-joe-medium.onnx",
    "models/synthetic/tower-smollm2-135m.onnx",
    "models/smollm2-135m-instruct-q4_1.gguf",
    "models/gemma-3-270m-q4_k_m.gguf",
]
MODEL_DIRS = ["models/whisper-tiny.en", "models/ppocrv5"]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A checkout-like tree: config/ beside models/ holding dummy files where the defaults point."""
    for rel in MODEL_FILES:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"dummy")
    for rel in MODEL_DIRS:
        (tmp_path / rel).mkdir(parents=True)
    (tmp_path / "config").mkdir()
    return tmp_path


def write(tree: Path, text: str, name: str = "edgevision.yaml") -> Path:
    path = tree / "config" / name
    path.write_text(text)
    return path


def errors_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value).splitlines()


def resolved_defaults(base: Path) -> Config:
    """Config() with its paths resolved the way the loader resolves them against `base`."""

    def resolve(obj):
        changes = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                changes[f.name] = resolve(value)
            elif isinstance(value, Path):
                changes[f.name] = (base / value).resolve()
        return dataclasses.replace(obj, **changes)

    return resolve(Config())


# --- the example file ---------------------------------------------------------------------------------------


def test_example_file_is_the_rendered_defaults():
    assert EXAMPLE.read_text() == render_example(), (
        "config/edgevision.yaml is stale: python -m edgevision.config > config/edgevision.yaml"
    )


def test_example_file_has_exactly_the_declared_keys():
    def keys(data, prefix=""):
        for k, v in data.items():
            if isinstance(v, dict):
                yield from keys(v, f"{prefix}{k}.")
            else:
                yield prefix + k

    in_file = list(keys(yaml.safe_load(EXAMPLE.read_text())))
    docs = describe()
    default_kind = {doc.key.removesuffix(".kind"): doc.default for doc in docs if doc.key.endswith(".kind")}

    def shown(doc) -> bool:  # the example spells out the default kind's settings of each back-end choice
        parent = doc.key.rpartition(".")[0]
        return (
            parent not in default_kind
            or not doc.description.startswith("[")
            or (doc.description.startswith(f"[{default_kind[parent]}]"))
        )

    assert in_file == [doc.key for doc in docs if shown(doc)]


def test_example_file_loads_and_equals_defaults(tree: Path):
    path = tree / "config" / "edgevision.yaml"
    shutil.copy(EXAMPLE, path)
    config = load_config(path)
    assert config == resolved_defaults(path.parent)
    assert config.decoder.n_ctx == 2048
    assert config.vision.backend == "onnxruntime"
    assert config.decoder.model == (tree / "models/smollm2-135m-instruct-q4_1.gguf").resolve()


def test_empty_file_and_missing_keys_take_defaults(tree: Path):
    assert load_config(write(tree, "")) == resolved_defaults(tree / "config")
    config = load_config(write(tree, "decoder:\n  n_ctx: 4096\nspeech:\n"))
    assert config.decoder.n_ctx == 4096
    assert config.decoder.max_answer_tokens == 48
    assert config.speech == resolved_defaults(tree / "config").speech


def test_values_have_their_declared_types(tree: Path):
    config = load_config(write(tree, "speech:\n  synthesizer:\n    length_scale: 1\ndecoder:\n  temperature: 0.7\n"))
    voice = config.speech.synthesizer.options
    assert voice.length_scale == 1.0 and isinstance(voice.length_scale, float)
    assert config.decoder.temperature == 0.7
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.decoder.n_ctx = 1  # type: ignore[misc]


# --- describe / render ----------------------------------------------------------------------------------


def test_describe_lists_every_setting_with_description():
    docs = {doc.key: doc for doc in describe()}
    assert docs["decoder.n_ctx"] == SettingDoc(
        "decoder.n_ctx", "integer", 2048, docs["decoder.n_ctx"].description, "256 to 131072"
    )
    assert docs["vision.backend"].allowed == "onnxruntime, tensorrt"
    assert docs["speech.recognizer.model"].type == "directory"
    assert docs["speech.synthesizer.voice"].default == "../models/piper/en_US-joe-medium.onnx"
    assert docs["decoder.seed"].allowed == "0 or more"
    assert {key.split(".")[0] for key in docs} == {f.name for f in dataclasses.fields(Config)}
    assert all(doc.description and "\n" not in doc.description for doc in docs.values())


def test_rendered_example_comments_each_setting():
    text = render_example()
    assert "  # Context window in tokens (image, prompt and answer). (256 to 131072)\n  n_ctx: 2048\n" in text
    assert "# Lowest level that is logged. (one of: debug, info, warning, error)" in text


# --- errors a user would read ---------------------------------------------------------------------------


def test_value_above_maximum(tree: Path):
    path = write(tree, "decoder:\n  n_ctx: 99999999\n")
    assert errors_of(path) == [
        f"{path}:2: decoder.n_ctx: 99999999 is above the maximum 131072 — set a value between 256 and 131072"
    ]


def test_value_below_minimum(tree: Path):
    path = write(tree, "speech:\n  synthesizer:\n    length_scale: 0.1\ndecoder:\n  seed: -1\n")
    assert errors_of(path) == [
        f"{path}:3: speech.synthesizer.length_scale: 0.1 is below the minimum 0.5 — set a value between 0.5 and 2.0",
        f"{path}:5: decoder.seed: -1 is below the minimum 0 — set a value of 0 or more",
    ]


def test_unknown_key_suggests_the_closest(tree: Path):
    path = write(tree, "decoder:\n  n_ctxx: 4096\nspeach:\n  language: en\n")
    assert errors_of(path) == [
        f"{path}:2: decoder.n_ctxx: unknown setting in decoder — did you mean 'n_ctx'?",
        f"{path}:3: speach: unknown section — did you mean 'speech'?",
    ]


def test_unknown_key_in_the_wrong_section_or_unlike_any(tree: Path):
    path = write(tree, "decoder:\n  beam_size: 3\n  colour: red\n")
    assert errors_of(path) == [
        f"{path}:2: decoder.beam_size: unknown setting in decoder — move it to speech.recognizer.beam_size",
        (
            f"{path}:3: decoder.colour: unknown setting in decoder — remove it; known settings in decoder: "
            + ", ".join(field.name for field in dataclasses.fields(DecoderSettings))
        ),
    ]


def test_wrong_types(tree: Path):
    path = write(
        tree,
        "speech:\n"
        "  recognizer:\n"
        "    beam_size: true\n"  # bools are not ints
        "    language: no\n"  # YAML reads this as false
        "    threads: 2.5\n"
        "  synthesizer: {length_scale: fast}\n"
        "decoder:\n"
        "  n_ctx: [1, 2]\n"
        "  max_answer_tokens:\n",
    )
    assert errors_of(path) == [
        (
            f"{path}:3: speech.recognizer.beam_size: true is a boolean, not a whole number"
            " — set a whole number (between 1 and 10)"
        ),
        f'{path}:4: speech.recognizer.language: no is a boolean, not text — put it in quotes: "no"',
        (
            f"{path}:5: speech.recognizer.threads: 2.5 is a number, not a whole number"
            " — set a whole number (between 0 and 64)"
        ),
        (
            f"{path}:6: speech.synthesizer.length_scale: 'fast' is text, not a number"
            " — set a number (between 0.5 and 2.0)"
        ),
        f"{path}:8: decoder.n_ctx: is a list — set a whole number (between 256 and 131072)",
        (
            f"{path}:9: decoder.max_answer_tokens: has no value — set a whole number (between 1 and 1024),"
            " or delete the line to use the default 48"
        ),
    ]


def test_bad_choice(tree: Path):
    path = write(tree, "vision:\n  backend: tensorrtt\nlogging:\n  level: verbose\n")
    assert errors_of(path) == [
        f"{path}:2: vision.backend: 'tensorrtt' is not one of onnxruntime, tensorrt — did you mean 'tensorrt'?",
        (
            f"{path}:4: logging.level: 'verbose' is not one of debug, info, warning, error"
            " — set one of: debug, info, warning, error"
        ),
    ]


def test_choice_in_capitals_suggests_lower_case(tree: Path):
    (line,) = errors_of(write(tree, "logging:\n  level: INFO\n"))
    assert line.endswith("logging.level: 'INFO' is not one of debug, info, warning, error — did you mean 'info'?")


def test_section_that_is_not_a_mapping(tree: Path):
    path = write(tree, "logging: info\n")
    assert errors_of(path) == [
        (
            f"{path}:1: logging: is text 'info', not a section of settings"
            " — write its settings indented under 'logging:', one 'key: value' per line"
        )
    ]


def test_duplicate_key(tree: Path):
    path = write(tree, "decoder:\n  n_ctx: 1024\n  n_ctx: 4096\n")
    assert errors_of(path) == [f"{path}:3: decoder.n_ctx: set twice (first on line 2) — keep one of the two"]


def test_yaml_syntax_error_names_the_line(tree: Path):
    path = write(tree, "speech:\n  language: en\n  beam_size: [1\n")
    (line,) = errors_of(path)
    assert line.startswith(f"{path}:3: YAML syntax error: ")
    assert line.endswith("— fix the indentation, colons or quoting near this line")

    path = write(tree, "speech:\n  language: en\n bad: 1\n")
    (line,) = errors_of(path)
    assert line.startswith(f"{path}:3: YAML syntax error: ")


def test_top_level_not_a_mapping(tree: Path):
    path = write(tree, "- speech\n- vision\n")
    assert errors_of(path) == [
        (
            f"{path}:1: the top level is a list, not a mapping of sections — write the sections at the top level,"
            " without indentation (" + ", ".join(f"{f.name}:" for f in dataclasses.fields(Config)) + ")"
        )
    ]


def test_missing_model_file_says_make_models(tree: Path):
    (tree / "models/smollm2-135m-instruct-q4_1.gguf").unlink()
    path = write(tree, "decoder:\n  n_ctx: 2048\nvision:\n  tower: /nowhere/tower.onnx\n")
    assert errors_of(path) == [
        (
            f"{path}:4: vision.tower: file not found: /nowhere/tower.onnx"
            " — run 'make models', or register your model with 'edgevision models register'"
        ),
        (
            f"{path}: decoder.model: file not found: {(tree / 'models/smollm2-135m-instruct-q4_1.gguf').resolve()}"
            " (the default '../models/smollm2-135m-instruct-q4_1.gguf'; set decoder.model to yours)"
            " — run 'make models', or register your model with 'edgevision models register'"
        ),
    ]


def test_path_of_the_wrong_kind(tree: Path):
    path = write(
        tree,
        "speech:\n  recognizer: {model: ../models/gemma-3-270m-q4_k_m.gguf}\n  synthesizer: {voice: ../models}\n",
    )
    models = (tree / "models").resolve()
    assert errors_of(path) == [
        (
            f"{path}:2: speech.recognizer.model: {models}/gemma-3-270m-q4_k_m.gguf is a file, not a directory"
            " — point it at the directory that holds the model"
        ),
        (
            f"{path}:3: speech.synthesizer.voice: {models} is a directory, not a file"
            " — point it at the model file itself"
        ),
    ]


def test_all_errors_are_reported_together(tree: Path):
    path = write(
        tree,
        "speech:\n  recognizer:\n    beam_size: 0\n    modle: x\nvision:\n  backend: cuda\n"
        "decoder:\n  n_ctx: 99999999\n",
    )
    lines = errors_of(path)
    assert [line.split(": ")[1] for line in lines] == [
        "speech.recognizer.beam_size",
        "speech.recognizer.modle",
        "vision.backend",
        "decoder.n_ctx",
    ]
    assert all(line.startswith(f"{path}:") and " — " in line for line in lines)


def test_unreadable_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot read: No such file or directory — check the path"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"speech:\n  language: \xe9\n")
    with pytest.raises(ConfigError, match=r"not UTF-8 text .* — save the file as UTF-8"):
        load_config(bad)


# --- paths ----------------------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_directory(tree: Path, monkeypatch: pytest.MonkeyPatch):
    (tree / "config/voices").mkdir()
    (tree / "config/voices/mine.onnx").write_bytes(b"dummy")
    path = write(tree, "speech:\n  synthesizer: {kind: piper, voice: voices/mine.onnx}\n")
    monkeypatch.chdir(tree / "models")  # the working directory must not matter
    config = load_config(path)
    assert config.speech.synthesizer.options.voice == (tree / "config/voices/mine.onnx").resolve()
    assert config.speech.synthesizer.options.voice.is_absolute()
    assert config.decoder.model == (tree / "models/smollm2-135m-instruct-q4_1.gguf").resolve()


def test_absolute_paths_are_kept(tree: Path, tmp_path_factory: pytest.TempPathFactory):
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "model.gguf"
    elsewhere.write_bytes(b"dummy")
    config = load_config(write(tree, f"decoder:\n  model: {elsewhere}\n"))
    assert config.decoder.model == elsewhere


# --- finding the file -----------------------------------------------------------------------------------


def test_find_config_precedence(tmp_path: Path):
    cli, env, system = (tmp_path / n for n in ("cli.yaml", "env.yaml", "system.yaml"))
    for p in (cli, env, system):
        p.write_text("")
    environ = {"EDGEVISION_CONFIG": str(env)}
    assert find_config(str(cli), environ=environ, system_path=system) == cli
    assert find_config(None, environ=environ, system_path=system) == env
    assert find_config(None, environ={}, system_path=system) == system
    assert find_config(None, environ={"EDGEVISION_CONFIG": ""}, system_path=system) == system


def test_find_config_does_not_fall_through_a_missing_choice(tmp_path: Path):
    system = tmp_path / "system.yaml"
    system.write_text("")
    with pytest.raises(ConfigError) as info:
        find_config(str(tmp_path / "typo.yaml"), environ={}, system_path=system)
    assert str(info.value) == (
        f"config file {tmp_path / 'typo.yaml'} (from --config) does not exist"
        " — check the path, or start from config/edgevision.yaml"
    )
    with pytest.raises(ConfigError, match=r"\(from \$EDGEVISION_CONFIG\) does not exist"):
        find_config(None, environ={"EDGEVISION_CONFIG": str(tmp_path / "gone.yaml")}, system_path=system)
    with pytest.raises(ConfigError, match="is a directory, not a file"):
        find_config(str(tmp_path), environ={}, system_path=system)


def test_find_config_nothing_anywhere_says_where_it_looked(tmp_path: Path):
    system = tmp_path / "etc/edgevision/config.yaml"
    with pytest.raises(ConfigError) as info:
        find_config(None, environ={}, system_path=system)
    assert str(info.value) == (
        f"no config file: --config was not given, $EDGEVISION_CONFIG is not set and {system} does not exist"
        f" — pass --config PATH, set EDGEVISION_CONFIG=PATH, or copy config/edgevision.yaml to {system}"
    )


def test_find_config_reads_the_real_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    env = tmp_path / "env.yaml"
    env.write_text("")
    monkeypatch.setenv("EDGEVISION_CONFIG", str(env))
    assert find_config(None) == env


# --- adding a section -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Telemetry:
    """Per-interaction measurements."""

    enabled: bool = setting(True, "Write the per-interaction log.")
    sink: Literal["file", "udp"] = setting("file", "Where measurements go.")
    label: str | None = setting(None, "A name for this device in the log.")


@dataclasses.dataclass(frozen=True)
class _Root:
    telemetry: _Telemetry = dataclasses.field(default_factory=_Telemetry)


def test_a_new_section_needs_only_its_dataclass(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("telemetry:\n  enabled: false\n  label: kitchen\n")
    assert load(path, _Root) == _Root(_Telemetry(enabled=False, label="kitchen"))
    path.write_text("telemetry:\n  enabled: 1\n  label: null\n")
    with pytest.raises(ConfigError) as info:
        load(path, _Root)
    assert str(info.value) == f"{path}:2: telemetry.enabled: 1 is a whole number, not true or false — set true or false"
    assert [d.key for d in describe(_Root)] == ["telemetry.enabled", "telemetry.sink", "telemetry.label"]
    assert describe(_Root)[2].type == "string or null"
    assert "  # Write the per-interaction log.\n  enabled: true\n" in render_example(_Root)
    assert "  label: null\n" in render_example(_Root)


def test_a_bad_declaration_fails_naming_the_field():
    from edgevision.schema import check_declarations

    @dataclasses.dataclass(frozen=True)
    class Broken:
        n: int = setting(0, "Too small a default.", min=1)

    with pytest.raises(TypeError, match=r"Broken\.n: default 0 does not fit its declaration: below the minimum"):
        check_declarations(Broken)


def test_placement_budgets_are_sizes_or_words_and_a_bare_off_is_explained(tree: Path):
    path = write(
        tree,
        "decoder:\n  placement:\n    ram_budget: 12GB please\n    gpu_expert_budget: off\n    headroom: 1024\n",
    )
    assert errors_of(path) == [
        (
            f"{path}:3: decoder.placement.ram_budget: '12GB please' is not a size — write none, auto, a number of "
            "bytes, or a size such as 512MiB or 12GiB"
        ),
        f'{path}:4: decoder.placement.gpu_expert_budget: off is a boolean, not text — put it in quotes: "off"',
    ]
    ok = write(tree, "decoder:\n  placement:\n    ram_budget: 12GiB\n    headroom: 1048576\n", "ok.yaml")
    placement = load_config(ok).decoder.placement
    assert (placement.ram_budget, placement.headroom, placement.gpu_layers) == ("12GiB", "1048576", -1)
    assert (
        load_config(
            write(tree, "decoder:\n  placement:\n    ram_budget: auto\n", "auto.yaml")
        ).decoder.placement.ram_budget
        == "auto"
    )


# --- back-ends chosen by kind, each with its own settings ---------------------------------------------------


def test_a_back_end_is_chosen_by_kind_with_its_own_settings(tree: Path):
    path = write(
        tree,
        "devices:\n  camera: {kind: image, source: /srv/photo.jpg}\n  button:\n    kind: gpio\n    pin: 12\n"
        "  microphone: wav\n",
    )
    devices = load_config(path).devices
    assert (devices.camera.kind, devices.camera.options.source) == ("image", "/srv/photo.jpg")
    assert (devices.button.kind, devices.button.options.pin, devices.button.options.active_low) == ("gpio", 12, True)
    assert devices.microphone.kind == "wav" and devices.microphone.options.loop is True  # the kind's defaults
    assert devices.speaker.kind == "sounddevice"  # not in the file: the default kind


def test_a_setting_of_another_kind_says_whose_it_is(tree: Path):
    path = write(tree, "devices:\n  camera:\n    kind: image\n    width: 640\n  button: {kind: gpio, key: KEY_A}\n")
    assert errors_of(path) == [
        f"{path}:4: devices.camera.width: is a setting of opencv, not of kind image — remove it, or set kind: opencv",
        f"{path}:5: devices.button.key: is a setting of evdev, not of kind gpio — remove it, or set kind: evdev",
    ]


def test_an_unknown_kind_lists_the_registered_ones(tree: Path):
    path = write(tree, "devices:\n  camera: {kind: webcam}\n  speaker: wave\n")
    assert errors_of(path) == [
        f"{path}:2: devices.camera.kind: 'webcam' is not one of opencv, video, image — set one of: opencv, video, image",
        f"{path}:3: devices.speaker: 'wave' is not one of sounddevice, wav — did you mean 'wav'?",
    ]


def test_the_old_flat_device_settings_say_how_to_write_them_now(tree: Path):
    path = write(tree, "devices:\n  camera: image\n  camera_source: photo.jpg\n  button_pin: 7\n")
    assert errors_of(path) == [
        f"{path}:3: devices.camera_source: this setting has moved — write it as camera: {{kind: ..., source: ...}}",
        f"{path}:4: devices.button_pin: this setting has moved — write it as button: {{kind: gpio, pin: ...}}",
    ]


def test_the_old_flat_speech_settings_say_how_to_write_them_now(tree: Path):
    path = write(tree, "speech:\n  whisper_model: ../models/whisper-tiny.en\n  length_scale: 0.9\n")
    assert errors_of(path) == [
        f"{path}:2: speech.whisper_model: this setting has moved — write it as recognizer: {{kind: whisper, model: ...}}",
        f"{path}:3: speech.length_scale: this setting has moved — write it as synthesizer: {{kind: piper, length_scale: ...}}",
    ]


def test_every_kinds_settings_are_listed_with_their_kind():
    docs = {(doc.key, doc.description.split("]")[0]) for doc in describe() if doc.key.startswith("devices.")}
    assert ("devices.button.pin", "[gpio") in docs and ("devices.speaker.folder", "[wav") in docs
    assert ("devices.camera.source", "[opencv") in docs and ("devices.camera.source", "[image") in docs
