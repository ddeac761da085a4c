"""The one typed config reader: a mapping (from YAML) -> a dataclass, checked against its annotations.

Used by every config in the platform: ``dino train``'s ``TrainConfig`` (``train/config.py``), the
pipeline spec and its stage kinds, the sweep spec. Unknown fields fail with a did-you-mean, values
with the dotted field and what would be accepted (``optim.lr: expected a number, got 'fast'``).
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Dict, List, Literal, Union

from dino_platform.errors import ConfigError


def parse_section(cls: type, raw: Any, prefix: str) -> Any:
    """Build the dataclass ``cls`` from a mapping; errors name ``prefix.field`` (did-you-mean on unknown ones)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        where = f"{prefix}." if prefix else ""
        close = difflib.get_close_matches(unknown[0], names, n=1)
        hint = f"; did you mean {where}{close[0]}?" if close else ""
        raise ConfigError(f"unknown field {where}{unknown[0]}; allowed: {', '.join(names)}{hint}")
    values = {name: _coerce(hints[name], raw[name], f"{prefix}.{name}".lstrip(".")) for name in names if name in raw}
    try:
        return cls(**values)
    except ConfigError as exc:  # a dataclass's own checks (``__post_init__``) name its fields without the prefix
        raise ConfigError(f"{prefix}.{exc}" if prefix else str(exc)) from None


def _coerce(tp: Any, value: Any, name: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return parse_section(tp, value, name)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or isinstance(value, bool):
            raise ConfigError(f"{name}: {value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{name}: a value is required")
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(inner[0], value, name)
        for alternative in inner:  # e.g. Union[int, List[int]]: the first that fits
            try:
                return _coerce(alternative, value, name)
            except ConfigError:
                continue
        raise ConfigError(f"{name}: {value!r} is not {' or '.join(_describe(a) for a in inner)}")
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        if key_tp is int:  # JSON object keys are strings: a train_config.json round trip gives {"1": 2}
            value = {int(k) if isinstance(k, str) and re.fullmatch(r"-?\d+", k) else k: v for k, v in value.items()}
        return {_coerce(key_tp, k, f"{name}[{k}]"): _coerce(val_tp, v, f"{name}[{k}]") for k, v in value.items()}
    if origin in (list, List):
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(item_tp, v, f"{name}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if tp is float:
        return float(number(value, name))
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {name}")  # a bug in this file, not user input


def number(value: Any, name: str) -> Union[int, float]:
    """``value`` as given if it is an int or a float, a float if it is a numeric string (YAML 1.1 reads
    ``1e-4``, without a dot, as one); else ConfigError naming ``name``."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    return value


def _describe(tp: Any) -> str:
    if tp is int:
        return "an integer"
    if typing.get_origin(tp) in (list, List):
        return "a list [min, max]" if typing.get_args(tp) == (int,) else "a list"
    return getattr(tp, "__name__", str(tp))
