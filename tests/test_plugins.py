"""Back-ends chosen by name: one registry per setting is both the config's list of choices and the loader's."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from edgevision.config import describe
from edgevision.devices.backends import BUTTONS, CAMERAS, MICROPHONES, SPEAKERS
from edgevision.errors import ConfigError, MissingDependencyError
from edgevision.ocr.backends import BACKENDS as OCR_BACKENDS
from edgevision.plugins import load_class
from edgevision.speech.engines import RECOGNIZERS, SYNTHESIZERS
from edgevision.telemetry.power import POWER_READERS
from edgevision.vision.encoder import BACKENDS


def test_each_setting_offers_exactly_its_registry() -> None:
    allowed = {doc.key: doc.allowed for doc in describe() if doc.type == "choice"}
    assert allowed["devices.camera.kind"] == ", ".join(CAMERAS)
    assert allowed["devices.button.kind"] == ", ".join(BUTTONS)
    assert allowed["devices.microphone.kind"] == ", ".join(MICROPHONES)
    assert allowed["devices.speaker.kind"] == ", ".join(SPEAKERS)
    assert allowed["vision.backend"] == ", ".join(BACKENDS)
    assert allowed["ocr.backend"] == ", ".join(OCR_BACKENDS)
    assert allowed["speech.recognizer.kind"] == ", ".join(RECOGNIZERS)
    assert allowed["speech.synthesizer.kind"] == ", ".join(SYNTHESIZERS)
    assert allowed["telemetry.power_reader"] == ", ".join(("auto", *POWER_READERS))


def test_every_registered_back_end_names_a_class_that_exists() -> None:
    """Registries hold "module:Class" strings; a typo would only show when a user picks that back-end."""
    registries = (
        CAMERAS,
        BUTTONS,
        MICROPHONES,
        SPEAKERS,
        BACKENDS,
        POWER_READERS,
        RECOGNIZERS,
        SYNTHESIZERS,
        OCR_BACKENDS,
    )
    for registry in registries:
        for name, target in registry.items():
            module, _, cls = target.partition(":")
            source = importlib.util.find_spec(module)
            assert source is not None and source.origin, f"{name}: module {module} not found"
            assert f"class {cls}" in Path(source.origin).read_text(encoding="utf-8"), f"{name}: {target}"


def test_an_unknown_name_says_which_setting_and_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"devices\.camera: 'webcam' is not available; choose one of opencv, video"):
        load_class(CAMERAS, "devices.camera", "webcam")


def test_a_back_end_whose_package_is_missing_says_what_to_install() -> None:
    registry = {"toy": "edgevision_toy_backend_not_installed.module:Toy"}
    with pytest.raises(MissingDependencyError, match="edgevision_toy_backend_not_installed"):
        load_class(registry, "devices.camera", "toy")
