"""How the config loader words what it found and what it expected ("a whole number (between 1 and 10)")."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from edgevision.schema import _Spec


def _num(x: float) -> str:
    return str(x)


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
