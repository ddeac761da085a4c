"""Reading the YAML documents users write (train configs, pipeline specs, sweep specs) and editing
them the same way everywhere: presets (deep merge), ``dotted.key=value`` overrides, strict keys.

PyYAML keeps the last of two equal keys silently, which would drop a whole stage, dataset or config
section; the loader here refuses it instead. Errors name the file; callers prefix the field.
"""
from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Collection, Dict, Iterable, Tuple, Union

import yaml

from dino_platform.errors import ConfigError


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
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {item!r}: empty key")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {'.'.join(parts[:depth + 1])} is not a mapping")
    node[parts[-1]] = yaml.safe_load(text)


def did_you_mean(word: Any, choices: Iterable[Any]) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]}?)" if close else ""
