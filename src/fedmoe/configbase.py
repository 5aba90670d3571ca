"""What every config section is built from: a strict pydantic model and the error type.

Method modules define their own sections on :class:`StrictModel` (``algorithm.<method>``); they import
this module, never :mod:`fedmoe.config` (which assembles the whole tree from the method registry).
"""

from __future__ import annotations

import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator


class ConfigError(ValueError):
    """A user-fixable problem in a run configuration."""


def _members(annotation) -> list:
    """The types a field's annotation admits at its top level (through Optional, unions, Annotated and
    Literal, whose values' types count)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _members(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return [m for a in get_args(annotation) for m in _members(a)]
    if origin is Literal:
        return [type(a) for a in get_args(annotation)]
    return [annotation]


def _misfit(value, annotation) -> str | None:
    """Why ``value`` must not pass as a number where ``annotation`` wants one, or as a boolean (None: let
    pydantic decide). pydantic's lax mode reads true as 1, 1 as true and "3" as 3; here a boolean is never a
    number nor a number a boolean, and text is a whole number's only where the field also takes text or a
    float (YAML 1.1 reads ``1e-4`` as text)."""
    members = _members(annotation)
    if Any in members or object in members:
        return None
    if isinstance(value, bool):
        if bool not in members and (int in members or float in members):
            return "a number is expected, not true/false"
        return None
    if isinstance(value, (int, float)) and bool in members and not {int, float} & set(members):
        return f"true or false is expected, not the number {value!r}"
    if isinstance(value, str):
        if int in members and not {str, float} & set(members):
            return f"a whole number is expected, not the text {value!r}"
        return None
    for m in members:
        origin, args = get_origin(m), get_args(m)
        if isinstance(value, (list, tuple)) and origin in (list, tuple, set, frozenset) and args:
            if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
                items = list(zip(value, args))
            else:
                items = [(v, args[0]) for v in value]
            for i, (v, a) in enumerate(items):
                why = _misfit(v, a)
                if why:
                    return f"item {i}: {why}"
        elif isinstance(value, dict) and origin is dict and len(args) == 2:
            for k, v in value.items():
                why = _misfit(v, args[1])
                if why:
                    return f"{k}: {why}"
    return None


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, assignments are validated, a number is never NaN or
    ±infinity, and a boolean (or text, for an int field) never passes as a number (pydantic's lax mode
    would read ``rounds: true`` as 1)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_or_text_as_number(cls, value, info: ValidationInfo):
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        why = None if field is None else _misfit(value, field.annotation)
        if why:
            raise ValueError(why)
        return value


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a mapping that sets one key twice is an error (PyYAML keeps the last value)."""

    source = "config"

    def construct_document(self, node):
        _check_duplicate_keys(node, [], self.source, set())
        return super().construct_document(node)


def _check_duplicate_keys(node, path: list[str], source: str, seen: set) -> None:
    if id(node) in seen:  # an alias of a node already checked
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict = {}
        for key, child in node.value:
            if isinstance(key, yaml.ScalarNode):
                name = (key.tag, key.value)
                where = ".".join([*path, key.value])
                if name in first:
                    raise ConfigError(f"{source}: the key '{where}' is set twice (lines {first[name] + 1} and "
                                      f"{key.start_mark.line + 1}); keep one of them")
                first[name] = key.start_mark.line
                _check_duplicate_keys(child, [*path, key.value], source, seen)
            else:
                _check_duplicate_keys(child, path, source, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, child in enumerate(node.value):
            _check_duplicate_keys(child, [*path[:-1], f"{path[-1]}[{i}]"] if path else [f"[{i}]"], source, seen)


def load_yaml(text: str, source: str):
    """``yaml.safe_load(text)``, refusing a mapping that sets a key twice with a :class:`ConfigError` that
    names ``source``, the key's path and both lines. Other YAML errors raise ``yaml.YAMLError`` as usual."""
    loader = _UniqueKeyLoader(text)
    loader.source = source
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _section_keys(model: type[BaseModel] | None, path: tuple) -> list[str]:
    """The keys the section at ``path`` (a key path below ``model``) may have; [] where it is not a section."""
    for part in path:
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            return []
        model = next((m for m in _members(field.annotation) if isinstance(m, type) and issubclass(m, BaseModel)), None)
    if model is None:
        return []
    return sorted({name for name in model.model_fields} | {f.alias for f in model.model_fields.values() if f.alias})


def unknown_key_hint(model: type[BaseModel] | None, loc: tuple) -> str:
    """``; did you mean 'train.batch_size'?`` for an unknown key ``loc`` whose name is close to one its section has
    (difflib), else ``""``."""
    import difflib

    if not loc:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), _section_keys(model, tuple(str(p) for p in loc[:-1])), n=1)
    return f"; did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?" if close else ""


def flat_keys(tree: dict, prefix: str = "") -> dict:
    """A config tree as ``{"section.key": value}`` (an empty section stays one key, its value ``{}``)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(flat_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def yaml_problem(e: yaml.YAMLError) -> tuple[str, str]:
    """A YAML error on one line: (where — `` line L, column C``, 1-based, or "" —, why)."""
    mark = getattr(e, "problem_mark", None)
    where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return where, getattr(e, "problem", None) or str(e).splitlines()[0]


def check_device_name(value: str) -> str:
    """``value`` if torch reads it as a device (or it is ``auto``); else a ValueError saying what to give."""
    import torch

    if value != "auto":
        try:
            torch.device(value)
        except RuntimeError:
            raise ValueError(f"{value!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    return value


def _union_key(model: type[BaseModel] | None, loc: tuple) -> int:
    """How many leading parts of an error's ``loc`` name a key whose annotation is a union of two or more types
    (``data.source: str | list[str]``), when the parts after it go on into one of its members (pydantic names the
    member: ``data.source.list[str].0``); 0 otherwise."""
    current = model
    for i, part in enumerate(loc):
        fields = getattr(current, "model_fields", None) if isinstance(current, type) else None
        if not fields or part not in fields:
            return 0
        annotation = fields[part].annotation
        while get_origin(annotation) is Annotated:
            annotation = get_args(annotation)[0]
        if get_origin(annotation) in (Union, types.UnionType):
            members = [a for a in get_args(annotation) if a is not type(None)]
            if len(members) > 1:
                return i + 1 if len(loc) > i + 1 else 0
            annotation = members[0]
        current = annotation
    return 0


_NO_VALUE = object()


def format_errors(err: ValidationError, source: str, model: type[BaseModel] | None = None) -> str:
    """The errors of validating ``model`` (the config's class: it gives an unknown key's close match) read from
    ``source``, one line each, naming the key. A value that fits no member of a union key is one line naming the
    members (pydantic gives one error per member, and per item of a list member)."""
    lines = [f"invalid configuration ({source}):"]
    unions: dict[tuple, list] = {}  # a union key's loc -> [the members its value failed, the value, its line's index]
    for e in err.errors():
        n = _union_key(model, e["loc"])
        if n:
            head = tuple(e["loc"][:n])
            if head not in unions:
                unions[head] = [[], _NO_VALUE, len(lines)]
                lines.append("")
            member = str(e["loc"][n])
            if member not in unions[head][0]:
                unions[head][0].append(member)
            if len(e["loc"]) == n + 1:  # the member's own error holds the whole value (an item's, only the item)
                unions[head][1] = e.get("input")
            continue
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  - unknown key '{key}': remove it or check its spelling{unknown_key_hint(model, e['loc'])}")
        elif e["type"] == "value_error":  # our own checks: the message names the keys
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"  - {msg}" if key == "<root>" else f"  - {key}: {msg} (got {e.get('input')!r})")
        else:
            lines.append(f"  - {key}: {e['msg']} (got {e.get('input')!r})")
    for head, (members, value, at) in unions.items():
        got = "" if value is _NO_VALUE else f" (got {value!r})"
        lines[at] = f"  - {'.'.join(map(str, head))}: should be {' or '.join(members)}{got}"
    return "\n".join(lines)


__all__ = ["ConfigError", "StrictModel", "check_device_name", "format_errors", "load_yaml", "yaml_problem"]
