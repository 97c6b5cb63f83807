"""Typed method configs and the seed's JSON config file.

Each method owns a frozen dataclass (in its module under ``sparseattn.methods``) that validates
itself in ``__post_init__``. This module maps plain dicts and JSON files onto those dataclasses by
field name, rejecting unknown keys with the list of valid ones.

The seed's file ``config/xattn_config.json`` is *flat*: each key applies to every method that has
a field of that name (``block_size`` to all, ``stride``/``threshold`` to XAttention,
``sparsity_ratio`` to FlexPrefill, ``adaptive_budget`` to MInference). A nested form
``{"xattention": {...}, "flexprefill": {...}}`` sets methods one by one; both can be mixed, the
nested values winning.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from pathlib import Path
from typing import Any, Mapping

import torch


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _check_type(cls_name: str, key: str, value, hint):
    """Reject JSON values of the wrong type (bool is not a number, str is not a float)."""
    origin = typing.get_origin(hint)
    options = typing.get_args(hint) if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return
        if option is bool and isinstance(value, bool):
            return
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return
        if option is str and isinstance(value, str):
            return
        if option is torch.Tensor and isinstance(value, (torch.Tensor, list)):
            return
        if typing.get_origin(option) in (list, tuple) and isinstance(value, (list, tuple)):
            return
    names = ", ".join(getattr(o, "__name__", str(o)) for o in options)
    raise TypeError(f"{cls_name}.{key} must be of type {names}, got {type(value).__name__} ({value!r})")


def build_config(cls, values: Mapping[str, Any] | None = None, **overrides):
    """Instantiate ``cls`` from ``values`` and ``overrides``; unknown keys and wrong types raise."""
    merged = dict(values or {})
    merged.update(overrides)
    types = _field_types(cls)
    unknown = sorted(set(merged) - set(types))
    if unknown:
        raise ValueError(
            f"unknown {cls.__name__} option(s) {unknown}; valid options are {sorted(types)}"
        )
    for key, value in merged.items():
        _check_type(cls.__name__, key, value, types[key])
        if isinstance(value, list) and typing.get_origin(types[key]) not in (list, tuple):
            merged[key] = torch.tensor(value, dtype=torch.float32)  # per-head parameters
    return cls(**merged)


def config_from_dict(data: Mapping[str, Any]) -> dict[str, Any]:
    """Map a (flat or nested) config dict onto every registered method's config.

    Returns ``{method_name: config}``. Flat keys apply to each method that has the field; a key that
    no method has is an error listing the valid keys.
    """
    from .methods import METHODS

    if not isinstance(data, Mapping):
        raise TypeError(f"a config must be a JSON object (dict), got {type(data).__name__}")
    nested = {k: v for k, v in data.items() if k in METHODS}
    flat = {k: v for k, v in data.items() if k not in METHODS}
    all_fields = set()
    for spec in METHODS.values():
        if spec.config_cls is not None:
            all_fields |= set(_field_types(spec.config_cls))
    unknown = sorted(set(flat) - all_fields)
    if unknown:
        raise ValueError(
            f"unknown config key(s) {unknown}; valid keys are method names {sorted(METHODS)} "
            f"or fields {sorted(all_fields)}"
        )
    configs = {}
    for name, spec in METHODS.items():
        if spec.config_cls is None:
            continue
        fields = _field_types(spec.config_cls)
        values = {k: v for k, v in flat.items() if k in fields}
        section = nested.get(name, {})
        if not isinstance(section, Mapping):
            raise TypeError(f"config section {name!r} must be an object, got {type(section).__name__}")
        values.update(section)
        configs[name] = build_config(spec.config_cls, values)
    return configs


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON config file (e.g. ``config/xattn_config.json``) into ``{method: config}``.

    Example:
        >>> from sparseattn.config import load_config
        >>> cfgs = load_config("config/xattn_config.json")
        >>> cfgs["xattention"].stride, cfgs["flexprefill"].sparsity_ratio
        (16, 0.2)
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"config file {path} is not valid JSON: {err}") from None
    return config_from_dict(data)


def default_config_path() -> Path:
    """The seed's config file shipped with the package."""
    return Path(__file__).parent / "data" / "xattn_config.json"
