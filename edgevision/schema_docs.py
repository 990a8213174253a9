"""The settings described for people: the table `edgevision settings` prints and the commented example file.

Both are read from the declarations (`edgevision.schema`), so a setting is documented where it is declared.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from edgevision.schema import _first_line, _leaves, _Spec, _specs, kinds_described
from edgevision.schema_words import _num

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


def describe(root: type) -> list[SettingDoc]:
    """Every setting, in declaration order."""
    docs = []
    for key, spec in _leaves(root):
        assert spec.meta is not None
        kind = _TYPE_WORDS[spec.kind] if spec.kind != "path" else _path_noun(spec)
        if spec.nullable:
            kind += " or null"
        default = str(spec.default) if isinstance(spec.default, Path) else spec.default
        description = f"[{spec.only_for}] {spec.meta.description}" if spec.only_for else spec.meta.description
        docs.append(SettingDoc(key, kind, default, description, _allowed(spec)))
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


def render_example(root: type) -> str:
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
        if spec.kind == "kinds":
            assert spec.kinds is not None
            meta = spec.kinds
            lines.append(f"{indent}# {meta.description}")
            lines.append(f"{indent}{spec.name}:")
            lines.append(f"{indent}  # {kinds_described(meta)}")
            lines.append(f"{indent}  kind: {meta.default}")
            _render_section(meta.kinds[meta.default], depth + 1, lines)
            others = [
                f"{kind} ({', '.join(f.name for f in dataclasses.fields(kind_cls)) or 'no settings'})"
                for kind, kind_cls in meta.kinds.items()
                if kind != meta.default
            ]
            if others:
                lines.append(f"{indent}  # the other kinds' settings: {'; '.join(others)} (edgevision settings)")
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
