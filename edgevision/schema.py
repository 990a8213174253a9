"""Typed, strict settings from YAML: declarations with `setting()`/`section()`/`kinds()`, and the loader.

Settings are fields of frozen dataclasses, one dataclass per section, declared with `setting()` (default,
one-line description, limits). `load` walks the YAML node tree, so each error names the file, the line, the
dotted key, what is wrong and how to fix it; it collects every error before raising one `ConfigError`.
`edgevision.schema_docs` describes the same declarations for people. edgevision's own settings are declared
in `edgevision.config`.

Field types the loader understands: str, int, float, bool, Path (with `path="file"` or `path="dir"`),
Literal["a", "b"] or str with `choices=` (a choice), any of these `| None` (then `null` is accepted), nested
section dataclasses, and `Choice` declared with `kinds()`: a back-end picked by `kind:` with its own settings.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml

from edgevision.errors import ConfigError
from edgevision.files import read_text_file
from edgevision.schema_words import _describe_node, _expectation, _num, _range_words, _show, _tag_word, _yaml_text

MODELS_FIX = "run 'make models', or register your model with 'edgevision models register'"

_KINDS = "edgevision.kinds"
# A config file is a page of settings: nested deeper than this, it is not one of ours (its size: files.py).
MAX_CONFIG_DEPTH = 16

# Folders a path that edgevision writes (a log, captures) may never be in, even through symbolic links.
SYSTEM_DIRS = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/proc", "/sbin", "/sys", "/usr")

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
    choices: tuple[str, ...] = ()  # for a str setting: the allowed values (a back-end registry's names)
    writes: bool = False  # edgevision writes there: no '..' and no system folder
    check: Any = None  # check(value) -> (problem, fix) or None: a rule beyond type and limits


def setting(
    default: Any,
    description: str,
    *,
    min: float | None = None,
    max: float | None = None,
    path: Literal["file", "dir"] | None = None,
    must_exist: bool = True,
    fix: str = MODELS_FIX,
    choices: Iterable[str] = (),
    writes: bool = False,
    check: Any = None,
) -> Any:
    """Declare one setting: its default, a one-line description and its limits.

    For a path, `default` is written as in the YAML file (relative to the config file's directory) and
    `path` says whether it names a file or a directory; it must exist unless `must_exist=False`. A path that
    edgevision `writes` may not climb out of its folder with '..' nor lie in a system folder (`SYSTEM_DIRS`).
    For a choice, declare the type `str` and pass `choices` (a back-end registry, so the list of choices is
    written once), or declare a ``Literal[...]`` type. `check(value)` may add a rule of its own: it returns
    None, or ``(problem, fix)`` in words.
    """
    if path is not None and default is not None:
        default = Path(default)
    meta = Meta(description, min, max, path, must_exist, fix, tuple(choices), writes, check)
    return field(default=default, metadata={_META: meta})


def section(cls: type) -> Any:
    """Declare a section of the root (or of another section): a dataclass whose fields are settings."""
    return field(default_factory=cls)


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 2**10,
    "kib": 2**10,
    "kb": 2**10,
    "m": 2**20,
    "mib": 2**20,
    "mb": 2**20,
    "g": 2**30,
    "gib": 2**30,
    "gb": 2**30,
    "t": 2**40,
    "tib": 2**40,
    "tb": 2**40,
}


def parse_size(text: str) -> int:
    """'12GiB', '512MiB', '1.5G', '123456' → bytes (K, M, G are binary, as memory budgets are). ValueError if
    it is not a size."""
    raw = str(text).strip().lower().replace(" ", "")
    number = raw.rstrip("kmgtib")
    unit = raw[len(number) :]
    if unit not in _SIZE_UNITS or not number:
        raise ValueError(f"{text!r} is not a size")
    value = float(number) * _SIZE_UNITS[unit]
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{text!r} is not a size")
    return int(value)


def size_check(*words: str) -> Any:
    """A `setting(check=...)` for a text setting holding a size ('12GiB'), or one of `words` ('auto')."""
    choices = "".join(f"{word}, " for word in words)

    def check(value: str) -> tuple[str, str] | None:
        if value.strip().lower() in words:
            return None
        try:
            parse_size(value)
        except ValueError:
            return "is not a size", f"write {choices}a number of bytes, or a size such as 512MiB or 12GiB"
        return None

    return check


@dataclass(frozen=True)
class Choice:
    """A back-end chosen by `kind`, with that back-end's own settings (`options`, its settings dataclass)."""

    kind: str
    options: Any

    def paths(self) -> dict[str, Path]:
        """The back-end's path settings by name (a model file or folder), for checks and status lines."""
        return {name: value for name, value in vars(self.options).items() if isinstance(value, Path)}


@dataclass(frozen=True)
class KindsMeta:
    description: str
    kinds: Mapping[str, type]  # kind → its settings dataclass (declared beside the back-end)
    default: str


def kinds(registry: Mapping[str, type], default: str, description: str) -> Any:
    """Declare a back-end choice: in YAML ``camera: {kind: image, source: photo.jpg}`` (or just ``camera: image``).

    `registry` maps each kind to the settings dataclass its back-end declares (fields made with `setting()`; its
    docstring's first line says what the kind is). The value is a `Choice`; a key of another kind is an error
    that says which kind it belongs to.
    """
    if default not in registry:
        raise TypeError(f"default kind {default!r} is not one of {', '.join(registry)}")
    meta = KindsMeta(description, dict(registry), default)
    return field(default_factory=lambda: Choice(default, registry[default]()), metadata={_KINDS: meta})


# --- the schema, read from the declarations -----------------------------------------------------------------

_Kind = Literal["str", "int", "float", "bool", "path", "choice", "section", "kinds"]


@dataclass(frozen=True)
class _Spec:
    name: str
    kind: _Kind
    nullable: bool
    default: Any
    meta: Meta | None  # None for a section
    choices: tuple[str, ...] = ()
    section: type | None = None
    kinds: KindsMeta | None = None  # for a back-end choice
    only_for: str = ""  # a setting of this kind of back-end only


@cache
def _specs(cls: type) -> dict[str, _Spec]:
    """The fields of a section class, checked: a mistake in a declaration fails here, at import."""
    hints = typing.get_type_hints(cls)
    specs: dict[str, _Spec] = {}
    for f in dataclasses.fields(cls):
        tp, nullable = _strip_none(hints[f.name])
        where = f"{cls.__name__}.{f.name}"
        if _KINDS in f.metadata:
            kinds_meta = f.metadata[_KINDS]
            if tp is not Choice:
                raise TypeError(f"{where}: declare a back-end choice with the type Choice")
            for kind_cls in kinds_meta.kinds.values():
                _specs(kind_cls)
            specs[f.name] = _Spec(f.name, "kinds", False, kinds_meta.default, None, kinds=kinds_meta)
            continue
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
        elif tp is str and meta.choices:
            kind, choices = "choice", meta.choices
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
    if spec.meta is not None and spec.meta.check is not None and (problem := spec.meta.check(value)):
        return problem[0]
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
        elif spec.kind == "kinds":
            assert spec.kinds is not None
            yield key + ".kind", _kind_spec(spec.kinds)
            for kind, kind_cls in spec.kinds.kinds.items():
                for sub_key, sub in _leaves(kind_cls, key + "."):
                    yield sub_key, dataclasses.replace(sub, only_for=kind)
        else:
            yield key, spec


def _kind_spec(meta: KindsMeta) -> _Spec:
    """The `kind:` key of a back-end choice, as a choice setting."""
    return _Spec(
        "kind", "choice", False, meta.default, Meta(f"{meta.description} {kinds_described(meta)}."), tuple(meta.kinds)
    )


def kinds_described(meta: KindsMeta) -> str:
    """ "opencv: a live camera ...; image: a still photo ..." from each kind's settings docstring."""
    return "; ".join(f"{kind}: {_first_line(cls.__doc__)}" for kind, cls in meta.kinds.items())


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if doc and doc.strip() else ""


_T = typing.TypeVar("_T")


def load(path: Path, root: type[_T]) -> _T:
    """Load `path` into the settings tree `root` (normally `Config`)."""
    text = read_text_file(path)
    try:
        _check_depth(text, path)
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


def _check_depth(text: str, path: Path) -> None:
    """Refuse YAML nested deeper than MAX_CONFIG_DEPTH, from the event stream (no recursion), before composing
    it (PyYAML's composer recurses once per level)."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_CONFIG_DEPTH:
                line = event.start_mark.line + 1
                raise ConfigError(
                    f"{path}:{line}: nested more than {MAX_CONFIG_DEPTH} levels deep — a config file has sections "
                    "of settings, two levels: check the brackets and indentation near this line"
                )
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


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
                    self._unknown(key_node, prefix, str(raw), specs, cls)
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
            elif spec.kind == "kinds":
                values[name] = self.choice(spec, prefix + name, key_node, value_node)
            else:
                values[name] = self.leaf(spec, prefix + name, key_node, value_node)
        return cls(**values)

    def choice(self, spec: _Spec, key: str, key_node: yaml.Node | None, node: yaml.Node | None) -> Choice:
        """A back-end choice: ``{kind: NAME, its settings...}``, or just ``NAME``."""
        meta = spec.kinds
        assert meta is not None
        kind_spec = _kind_spec(meta)
        kind, rest = meta.default, None
        if node is None or _is_null(node):
            pass
        elif isinstance(node, yaml.ScalarNode):
            kind = self.leaf(kind_spec, key, key_node, node)
        elif isinstance(node, yaml.MappingNode):
            pairs = [(k, v) for k, v in node.value if not (_is_str(k) and k.value == "kind")]
            kind_pair = next(((k, v) for k, v in node.value if _is_str(k) and k.value == "kind"), None)
            if kind_pair is not None:
                kind = self.leaf(kind_spec, key + ".kind", kind_pair[0], kind_pair[1])
            own = {f.name for f in dataclasses.fields(meta.kinds[kind])}
            kept = []
            for k, v in pairs:
                owners = [other for other, cls in meta.kinds.items() if _is_str(k) and k.value in _specs(cls)]
                if _is_str(k) and k.value not in own and owners:
                    self.error(
                        k,
                        f"{key}.{k.value}",
                        f"is a setting of {' and '.join(owners)}, not of kind {kind}",
                        f"remove it, or set kind: {owners[0]}",
                    )
                else:
                    kept.append((k, v))
            rest = yaml.MappingNode(node.tag, kept, node.start_mark, node.end_mark)
        else:
            self.error(
                key_node,
                key,
                f"is {_describe_node(node)}",
                f"write the back-end's kind and settings under '{spec.name}:' (kind: {meta.default}, ...)",
            )
        return Choice(kind, self.build(meta.kinds[kind], rest, key + "."))

    def _unknown(self, key_node: yaml.Node, prefix: str, raw: str, specs: dict[str, _Spec], cls: type) -> None:
        section = prefix.rstrip(".")
        what = f"unknown setting in {section}" if section else "unknown section"
        key = prefix + raw
        close = difflib.get_close_matches(raw, list(specs), n=1, cutoff=0.6)
        elsewhere = [k for k, _ in _leaves(self.root) if k.rsplit(".", 1)[-1] == raw and k != key]
        moved = getattr(cls, "MOVED", {}).get(raw)
        if moved:
            self.error(key_node, key, "this setting has moved", moved)
            return
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
        if spec.kind == "str" and tag == "int" and spec.meta.check is not None:
            tag = "str"  # a size given as a plain number of bytes (ram_budget: 12884901888)
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
        value = raw if spec.kind == "str" else self.constructor.construct_object(node)
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
        if spec.meta.check is not None and (problem := spec.meta.check(value)):
            self.error(key_node, key, f"{shown} {problem[0]}", problem[1])
            return spec.default
        return value

    def _path(self, spec: _Spec, key: str, key_node: yaml.Node | None, raw: str, *, default: bool) -> Path | None:
        assert spec.meta is not None
        path = Path(os.path.abspath(self.base / Path(raw).expanduser()))
        if spec.meta.writes and not self._writable_place(key, key_node, raw, path):
            return None
        if not spec.meta.must_exist:
            return path
        want_file = spec.meta.path == "file"
        noun = "file" if want_file else "directory"
        note = f" (the default '{raw}'; set {key} to yours)" if default else ""
        if not path.exists() and path.is_symlink():
            self.error(
                key_node,
                key,
                f"{path} is a symbolic link to nothing (broken, or a loop){note}",
                "point it at the model itself, or fix the link",
            )
        elif not path.exists():
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

    def _writable_place(self, key: str, key_node: yaml.Node | None, raw: str, path: Path) -> bool:
        """Whether `path`, which edgevision will write, stays out of '..' tricks and system folders."""
        fix = "write the full path of a place edgevision owns, e.g. /var/log/edgevision/ or /var/lib/edgevision/"
        if ".." in Path(raw).parts:
            self.error(key_node, key, f"'{raw}' climbs out of its folder with '..'", fix)
            return False
        real = Path(os.path.realpath(path.parent)) / path.name  # where the folder's symbolic links lead
        for place in (path, real):
            system = next((d for d in SYSTEM_DIRS if place == Path(d) or Path(d) in place.parents), None)
            if system is not None:
                self.error(key_node, key, f"{path} is in the system folder {system}", fix)
                return False
        return True


def _is_str(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:str"


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def check_declarations(root: type) -> None:
    """Raise TypeError naming the field if a declaration under `root` is inconsistent (e.g. a default out of
    its own range)."""
    _specs(root)
