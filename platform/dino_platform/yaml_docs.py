"""Reading the YAML documents users write (train configs, pipeline specs, sweep specs) and editing
them the same way everywhere: presets (deep merge), ``dotted.key=value`` overrides, strict keys.

PyYAML keeps the last of two equal keys silently, which would drop a whole stage, dataset or config
section; the loader here refuses it instead. Errors name the file; callers prefix the field.
"""
from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Callable, Collection, Dict, Iterable, List, Optional, Sequence, Tuple, TypeVar, Union

import yaml

from dino_platform.errors import ConfigError

T = TypeVar("T")


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load``, except that a key given twice in one mapping is an error."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_mapping(source: Union[str, Path, Dict[str, Any]], what: str, layout: str,
                 label: str = "spec") -> Tuple[Dict[str, Any], str]:
    """(a private copy of the document, where it came from: the path, or ``label`` for a dict).

    ``what`` names the kind of file in errors ("pipeline spec", "config file"); ``layout`` says what
    the top level should hold ("name, output_root, datasets, stages").
    """
    if isinstance(source, dict):
        return copy.deepcopy(source), label
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        raw = yaml.load(path.read_text(), Loader=UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping ({layout}) at the top level")
    return raw, str(path)


def deep_merge(base: Dict[str, Any], update: Dict[str, Any], replace: Collection[str] = ()) -> Dict[str, Any]:
    """Mappings merge key by key; anything else (lists, scalars, null), and the keys in ``replace``
    at any depth, replace what was there."""
    out = dict(base)
    for key, value in (update or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in replace:
            out[key] = deep_merge(out[key], value, replace)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_preset(raw: Dict[str, Any], preset: str | None, replace: Collection[str] = ()) -> Dict[str, Any]:
    """``raw`` without its ``presets`` section, with ``presets[preset]`` deep-merged over it."""
    raw = copy.deepcopy(raw)
    presets = raw.pop("presets", None) or {}
    if not isinstance(presets, dict):
        raise ConfigError("presets: expected a mapping of preset name -> overrides")
    if preset is None:
        return raw
    if preset not in presets:
        available = ", ".join(sorted(presets)) or "none defined"
        raise ConfigError(f"--preset {preset}: no such preset{did_you_mean(preset, presets)}; available: {available}")
    if not isinstance(presets[preset], dict):
        raise ConfigError(f"presets.{preset}: expected a mapping of overrides")
    return deep_merge(raw, presets[preset], replace)


def apply_override(raw: Dict[str, Any], item: str, example: str) -> None:
    """``a.b.c=value``: set one field (the value is read as YAML; missing sections are created)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. {example}")
    key, text = item.split("=", 1)
    set_dotted(raw, key.strip(), yaml.safe_load(text), f"--set {item!r}")


def set_dotted(raw: Dict[str, Any], key: str, value: Any, where: str) -> None:
    """``raw[a][b][c] = value`` for ``key`` ``a.b.c``, creating missing sections; errors start with ``where``."""
    parts = [p for p in key.split(".") if p]
    if not parts:
        raise ConfigError(f"{where}: empty key")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: {'.'.join(parts[:depth + 1])} is not a mapping")
    node[parts[-1]] = value


def load_document(source: Union[str, Path, Dict[str, Any]], what: str, layout: str, preset: Optional[str],
                  overrides: Optional[List[str]], example: str, build: Callable[[Dict[str, Any], str], T],
                  replace: Collection[str] = ()) -> T:
    """``build(raw, origin)`` of ``source`` with ``preset`` and ``--set`` ``overrides`` applied; errors name the file.

    ``what``/``layout`` as in ``read_mapping``; ``example``: a ``KEY=VALUE`` for a malformed override;
    ``replace``: keys a preset replaces rather than merges (``deep_merge``).
    """
    raw, origin = read_mapping(source, what, layout)
    try:
        raw = apply_preset(raw, preset, replace)
        for item in overrides or []:
            apply_override(raw, item, example)
        return build(raw, origin)
    except ConfigError as exc:
        raise ConfigError(f"{origin}: {exc}") from None


def check_keys(raw: Dict[str, Any], allowed: Sequence[str]) -> None:
    """A top-level key not in ``allowed`` fails with a did-you-mean."""
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown field {unknown[0]}{did_you_mean(unknown[0], allowed)}; "
                          f"allowed: {', '.join(allowed)}")


def did_you_mean(word: Any, choices: Iterable[Any]) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]}?)" if close else ""
