"""Plain data (a mapping read from YAML or JSON) -> a frozen dataclass, by its real types.

One machinery for the trial spec and the sweep file. Each field is coerced by its type
hint (``typing.get_type_hints``): int, float, bool, str, ``Literal[...]``, unions
(``Optional[X]``, ``X | None``, ``X | tuple[X, ...]``), ``tuple[X, ...]`` from a list,
``tuple[tuple[str, X], ...]`` from a mapping ``{name: x}`` (sorted pairs, so equal
mappings give equal, hashable values), nested dataclasses (by key path, e.g.
``train.lr``) and ``dict``. Then the rules in the field's metadata are checked. Every
refusal is a ConfigError that names the full key path, the value and what is allowed.

A field's metadata may hold (all optional; see ``option``):
  rules      Rule(ok, allowed) constraints beyond the type, checked on non-null values
  parse      (key, value) -> value, for a field that plain typing cannot describe
  expected   what a value of this field looks like, for the message of a wrong type
  shorthand  a bare scalar stands for {shorthand: scalar} (``model: conv2``)
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from typing import Any, Callable, Literal, NamedTuple, Union

from trials.core.errors import ConfigError, check

MISSING = dataclasses.MISSING
_UNIONS = (Union, types.UnionType)
_NONE = type(None)
INT64 = 2**63  # integers a config may hold: what torch, numpy and seeds take (64-bit signed)


def _finite(v) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an int beyond any float
        return False


_SCALARS = {  # type -> (accepts, what is expected); bool is an int to Python, not to a config
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    bool: (lambda v: isinstance(v, bool), "true or false"),
    str: (lambda v: isinstance(v, str), "a string"),
}
_PLURALS = {int: "integers", float: "numbers", bool: "true/false values", str: "strings"}


class Rule(NamedTuple):
    """A constraint beyond the type: `ok(value)` must hold; `allowed` says what does."""

    ok: Callable[[Any], bool]
    allowed: str


def at_least(low, noun: str = "a number") -> Rule:
    return Rule(lambda v: v >= low, f"{noun} >= {low}")


def above(low, noun: str = "a number") -> Rule:
    return Rule(lambda v: v > low, f"{noun} > {low}")


def option(default=MISSING, *rules: Rule, factory=MISSING, parse=None, expected=None, **metadata):
    """A dataclass field with rules, a `parse` hook and/or `expected` text (module docstring)."""
    metadata = {**metadata, "rules": rules, "parse": parse, "expected": expected}
    return dataclasses.field(default=default, default_factory=factory, metadata=metadata)


# ---------------------------------------------------------------- building


def build(cls, data, path: str = ""):
    """An instance of dataclass `cls` from a mapping; `path` is where the mapping sits."""
    check(isinstance(data, dict), path or "config", data, "expected a mapping of keys")
    fields, hints = _fields(cls), _hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(_join(path, unknown[0]), data[unknown[0]],
                          f"unknown key; known keys here: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = _join(path, name)
        if name in data:
            kwargs[name] = _field_value(f, hints[name], key, data[name])
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(key, None, f"a value is required: {_expected(f, hints[name])}")
    try:
        return cls(**kwargs)
    except ConfigError as e:  # a __post_init__ check names keys relative to its own class
        if not path:
            raise
        raise ConfigError(_join(path, e.key), e.value, e.allowed) from None


def _field_value(f: dataclasses.Field, tp, key: str, value):
    meta = f.metadata
    if meta.get("shorthand") and isinstance(value, str):
        value = {meta["shorthand"]: value}
    try:
        out = meta["parse"](key, value) if meta.get("parse") else coerce(key, value, tp)
    except ConfigError as e:
        if meta.get("expected") and e.key == key and e.value is value:  # the field's own shape is wrong
            raise ConfigError(key, value, f"expected {meta['expected']}") from None
        raise
    for rule in meta.get("rules", ()):
        check(out is None or rule.ok(out), key, out, rule.allowed)
    return out


def coerce(key: str, value, tp):
    """One value checked against type `tp` at `key`; returns it built (lists -> tuples,
    ints -> floats where a float is asked for, mappings -> dataclasses)."""
    if tp in _SCALARS:  # first: most leaves are scalars, and sweeps build thousands of specs
        accepts, text = _SCALARS[tp]
        check(accepts(value), key, value, f"expected {text}")
        if tp is int:  # what torch, numpy and seeds take
            check(-INT64 <= value < INT64, key, value, "expected an integer of 64 bits (-2^63 .. 2^63-1)")
        elif tp is float:  # a step with lr .inf diverges only after the trial folder was made
            check(_finite(value), key, value, "expected a finite number")
        return float(value) if tp is float else value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_dataclass(tp):
        return build(tp, {} if value is None else value, key)  # null: all defaults
    if origin in _UNIONS:
        return _union(key, value, args)
    if origin is Literal:
        check(any(value == a and type(value) is type(a) for a in args), key, value,
              f"allowed: {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        return _tuple(key, value, tp)
    if tp is dict or origin is dict:
        check(isinstance(value, dict), key, value, f"expected {describe(tp)}")
        return {k: coerce(_join(key, str(k)), v, args[1]) for k, v in value.items()} if args else dict(value)
    raise TypeError(f"no coercion for {tp!r}")  # a programming error, not user input


def _union(key: str, value, arms: tuple):
    if value is None and _NONE in arms:
        return None
    errors = []
    for arm in (a for a in arms if a is not _NONE):
        try:
            return coerce(key, value, arm)
        except ConfigError as e:
            errors.append((arm, e))
    fitting = [e for arm, e in errors if _shape(arm) == _shape_of(value)]
    if len(fitting) == 1:  # one arm is written like the value: its message is the precise one
        raise fitting[0]
    raise ConfigError(key, value, f"expected {describe(Union[arms])}")


def _tuple(key: str, value, tp):
    args = typing.get_args(tp)
    if _is_pairs(tp):  # written as a mapping {name: x}; kept as sorted (name, x) pairs
        check(isinstance(value, dict), key, value, f"expected {describe(tp)}")
        item = typing.get_args(args[0])[1]
        return tuple(sorted((str(k), coerce(_join(key, str(k)), v, item)) for k, v in value.items()))
    if len(args) != 2 or args[1] is not Ellipsis:
        raise TypeError(f"no coercion for {tp!r}")  # fixed-length tuples: none in a config yet
    check(isinstance(value, (list, tuple)), key, value, f"expected {describe(tp)}")
    return tuple(coerce(key, v, args[0]) for v in value)


# ---------------------------------------------------------------- describing types


def describe(tp) -> str:
    """What plain data a value of type `tp` is written as, for messages."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in _UNIONS:
        text = " or ".join(describe(a) for a in args if a is not _NONE)
        return f"{text}, or null" if _NONE in args else text
    if origin is Literal:
        return f"one of {', '.join(map(str, args))}"
    if _is_pairs(tp):
        return f"a mapping of names to {_plural(typing.get_args(args[0])[1])}"
    if origin is tuple:
        return f"a list of {_plural(args[0])}"
    if _is_dataclass(tp):
        return "a mapping of keys"
    if tp is dict or origin is dict:
        return "a mapping"
    return _SCALARS[tp][1] if tp in _SCALARS else repr(tp)


def _plural(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return f"values from {', '.join(map(str, typing.get_args(tp)))}"
    return _PLURALS.get(tp) or f"items, each {describe(tp)}"


def _expected(f: dataclasses.Field, tp) -> str:
    rules = f.metadata.get("rules") or ()
    return f.metadata.get("expected") or (rules[0].allowed if rules else describe(tp))


def _shape(tp) -> str:
    """How a value of `tp` is written in plain data: a mapping, a list or a scalar."""
    origin = typing.get_origin(tp)
    if _is_dataclass(tp) or tp is dict or origin is dict or _is_pairs(tp):
        return "mapping"
    return "list" if origin is tuple else "scalar"


def _shape_of(value) -> str:
    return "mapping" if isinstance(value, dict) else "list" if isinstance(value, (list, tuple)) else "scalar"


def non_null(tp):
    """Optional[X] (or X | None) -> X; any other type as it is."""
    if typing.get_origin(tp) in _UNIONS and _NONE in typing.get_args(tp):
        arms = tuple(a for a in typing.get_args(tp) if a is not _NONE)
        return arms[0] if len(arms) == 1 else Union[arms]
    return tp


def from_logged(value, tp):
    """A value as a tracking store logged it (MLflow keeps params as strings) back as type
    `tp`: None, "None" and NaN are None; tuples were logged as JSON (a mapping stays one)."""
    if value is None or value == "None" or (isinstance(value, float) and value != value):
        return None
    core = non_null(tp)
    if core is bool:
        return value in (True, "True", "true")
    if core is int:
        return int(value)
    if core is float:
        return float(value)
    if typing.get_origin(core) is tuple:
        parsed = json.loads(value) if isinstance(value, str) else value
        return parsed if isinstance(parsed, dict) else tuple(parsed)
    return str(value)


def field_paths(cls, prefix: str = "") -> dict[str, Any]:
    """Every leaf path of dataclass `cls` (nested dataclasses by dots) -> its real type."""
    out = {}
    for name, tp in ((f.name, _hints(cls)[f.name]) for f in dataclasses.fields(cls)):
        if _is_dataclass(tp):
            out.update(field_paths(tp, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = tp
    return out


# ---------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=None)
def _is_dataclass(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


@functools.lru_cache(maxsize=None)
def _is_pairs(tp) -> bool:
    """tuple[tuple[str, X], ...]: a mapping name -> X kept as sorted pairs."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is not tuple or len(args) != 2 or args[1] is not Ellipsis:
        return False
    inner = typing.get_args(args[0])
    return typing.get_origin(args[0]) is tuple and len(inner) == 2 and inner[0] is str


def _join(path: str, name) -> str:
    return f"{path}.{name}" if path else str(name)


@functools.lru_cache(maxsize=None)  # sweeps build thousands of specs; hints resolve once per class
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


@functools.lru_cache(maxsize=None)
def _fields(cls) -> dict:
    return {f.name: f for f in dataclasses.fields(cls)}
