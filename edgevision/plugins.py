"""Back-ends chosen by name: each registry maps a config value to ``"module:Class"``, imported only when chosen.

A registry is the one list of choices for its setting: the config declares the setting with
``choices=REGISTRY``, and `load_class` imports the chosen back-end, so a machine without TensorRT, evdev or
PortAudio never imports them. A new back-end is one module and one registry line.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any

from edgevision.errors import ConfigError, MissingDependencyError


def load_class(registry: Mapping[str, str], setting: str, name: str) -> Any:
    """The class registered as `name` in `registry`, its module imported now.

    Raises:
        ConfigError: `name` is not registered (the message names `setting` and the choices).
        MissingDependencyError: the back-end's module needs a package that is not installed.
    """
    try:
        module_name, class_name = registry[name].split(":")
    except KeyError:
        raise ConfigError(f"{setting}: {name!r} is not available; choose one of {', '.join(registry)}") from None
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name == "edgevision" or (error.name or "").startswith("edgevision."):
            raise  # a mistake in the registry, not a missing package
        raise MissingDependencyError(
            f"{setting}: {name} needs the Python package {error.name!r}, which is not installed here — install "
            f"it (see the README) or choose another of {', '.join(registry)}"
        ) from error
    return getattr(module, class_name)


def settings_of(registry: Mapping[str, str], setting: str) -> dict[str, type]:
    """Each kind's settings dataclass: the ``Settings`` its back-end class declares (for `schema.kinds`).

    This imports every back-end module of the registry; they import their heavy libraries only when opened.
    """
    return {name: load_class(registry, setting, name).Settings for name in registry}


def open_chosen(registry: Mapping[str, str], setting: str, choice: Any, **runtime: Any) -> Any:
    """The back-end a config `Choice` names, made from its settings plus the `runtime` arguments."""
    options = {f.name: getattr(choice.options, f.name) for f in dataclasses.fields(choice.options)}
    return load_class(registry, setting, choice.kind)(**options, **runtime)
