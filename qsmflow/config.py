"""Load, merge and validate qsmflow configurations.

A configuration is a nested mapping. The reference is ``configs/default.yaml``: every key a
user may set appears there. Presets (``fast``, ``accurate``, ...) and user files only override
it, and ``--set section.key=value`` overrides those. Algorithm parameters are validated
against the keyword arguments of the function the registry names, so the defaults of an
algorithm live in exactly one place: its signature.
"""
from __future__ import annotations

import copy
import importlib
import inspect
from pathlib import Path
from typing import Any, Mapping

import yaml


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the key."""


#: Configurable algorithm stages: section -> (module, registry attribute).
ALGORITHM_STAGES = {
    "mask": ("qsmflow.recon.masking", "MASKING_METHODS"),
    "unwrap": ("qsmflow.recon.unwrap", "SPATIAL_UNWRAPPERS"),
    "echoes": ("qsmflow.recon.echoes", "FIELD_FITS"),
    "background": ("qsmflow.recon.background", "BACKGROUND_METHODS"),
    "inversion": ("qsmflow.recon.inversion", "INVERSION_METHODS"),
}

#: Methods that are not functions of a registry but are handled by the pipeline itself.
PIPELINE_METHODS = {"mask": {"file"}}

#: Keys whose value must be one of a fixed set.
CHOICES = {
    ("input", "phase_units"): {"auto", "radians", "integer"},
    ("reference", "method"): {"mean", "none"},
    ("r2star", "method"): {"loglinear", "arlo"},
}

#: Number of leading positional arguments of each stage's functions (the data arrays).
_DATA_ARGUMENTS = {"mask": 1, "unwrap": 1, "echoes": 3, "background": 3, "inversion": 3}


def presets_dir() -> Path:
    """The ``configs/`` folder: inside the installed package, or beside it in a source tree."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "default.yaml").is_file():
            return candidate
    raise ConfigError(f"the presets folder 'configs' is missing next to {here}; reinstall qsmflow")


def preset_names() -> list[str]:
    """Names of the YAML presets shipped in ``configs/``."""
    return sorted(p.stem for p in presets_dir().glob("*.yaml"))


def _read_yaml(text: str, source: str) -> dict:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML ({error})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    return data


def _read_preset(name: str) -> dict:
    resource = presets_dir() / f"{name}.yaml"
    if not resource.is_file() or "/" in name:
        raise ConfigError(f"unknown preset '{name}' (available: {', '.join(preset_names())})")
    return _read_yaml(resource.read_text(), f"preset '{name}'")


def _deep_merge(base: dict, override: Mapping) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_override(assignment: str) -> tuple[list[str], Any]:
    """Split ``section.key=value`` into a key path and a YAML-parsed value."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. inversion.method=tv")
    key, _, text = assignment.partition("=")
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise ConfigError(f"--set {assignment!r}: empty key")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"--set {assignment!r}: value is not valid YAML") from None
    return path, value


def _nest(path: list[str], value: Any) -> dict:
    nested: Any = value
    for part in reversed(path):
        nested = {part: nested}
    return nested


def load_config(config: str | Path | None = None, overrides: list[str] = ()) -> dict:
    """Build a validated configuration.

    Parameters
    ----------
    config : str or Path, optional
        A preset name (``default``, ``fast``, ``accurate`` ...) or a YAML file. A file may
        name a preset to start from with a top-level ``preset:`` key.
    overrides : list of str
        ``section.key=value`` assignments applied last.

    Returns
    -------
    dict
        The merged configuration, with ``preset`` naming what it started from.
    """
    reference = _read_preset("default")
    layers: list[tuple[str, dict]] = []
    preset = "default"
    if config is not None:
        path = Path(config)
        if path.suffix in {".yaml", ".yml"} or path.exists():
            if not path.is_file():
                raise ConfigError(f"{path}: configuration file not found")
            user = _read_yaml(path.read_text(), str(path))
            preset = user.pop("preset", "default")
            layers.append((f"preset '{preset}'", _read_preset(preset)))
            layers.append((str(path), user))
        else:
            preset = str(config)
            layers.append((f"preset '{preset}'", _read_preset(preset)))
    for assignment in overrides:
        path_parts, value = parse_override(assignment)
        layers.append((f"--set {assignment}", _nest(path_parts, value)))

    merged = copy.deepcopy(reference)
    for source, layer in layers:
        _check_known_keys(layer, reference, source)
        merged = _deep_merge(merged, layer)
    merged["preset"] = preset
    validate(merged)
    return merged


def _check_known_keys(layer: Mapping, reference: Mapping, source: str, prefix: str = "") -> None:
    for key, value in layer.items():
        dotted = f"{prefix}{key}"
        if key not in reference:
            if prefix and prefix.rstrip(".").split(".")[0] in ALGORITHM_STAGES and isinstance(value, Mapping):
                continue  # parameters of a method: checked against its signature in validate()
            known = ", ".join(sorted(map(str, reference)))
            raise ConfigError(f"{source}: unknown configuration key '{dotted}' (known here: {known})")
        if isinstance(value, Mapping) and isinstance(reference[key], Mapping) and reference[key]:
            _check_known_keys(value, reference[key], source, dotted + ".")


def registry(stage: str) -> dict:
    """The registry of algorithm functions for a configurable stage."""
    module_name, attribute = ALGORITHM_STAGES[stage]
    return getattr(importlib.import_module(module_name), attribute)


def method_parameters(config: Mapping, stage: str) -> dict:
    """Keyword arguments for the configured method of ``stage``."""
    section = config[stage]
    return dict(section.get(section["method"]) or {})


def _check_type(key: str, value: Any, default: Any) -> None:
    if default is None or value is None:
        return
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, (int, float)):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"configuration key '{key}': expected {type(default).__name__}, got {value!r}")


def validate(config: Mapping) -> None:
    """Raise :class:`ConfigError` naming the first invalid key of ``config``."""
    reference = _read_preset("default")
    for section, keys in reference.items():
        if not isinstance(keys, Mapping):
            continue
        for key, default in keys.items():
            if isinstance(default, Mapping):
                continue
            _check_type(f"{section}.{key}", config[section].get(key), default)
    for (section, key), allowed in CHOICES.items():
        value = config[section][key]
        if value not in allowed:
            raise ConfigError(f"configuration key '{section}.{key}': {value!r} is not one of {sorted(allowed)}")

    for stage in ALGORITHM_STAGES:
        section = config[stage]
        method = section["method"]
        functions = registry(stage)
        allowed = sorted(set(functions) | PIPELINE_METHODS.get(stage, set()))
        if method not in allowed:
            raise ConfigError(f"configuration key '{stage}.method': {method!r} is not one of {allowed}")
        for name, parameters in section.items():
            if name == "method" or not isinstance(parameters, Mapping):
                continue
            if name not in functions:
                if name in PIPELINE_METHODS.get(stage, set()):
                    continue
                raise ConfigError(f"configuration key '{stage}.{name}': no such {stage} method (known: {allowed})")
            signature = inspect.signature(functions[name])
            accepted = {
                p.name: p.default
                for i, p in enumerate(signature.parameters.values())
                if i >= _DATA_ARGUMENTS[stage] and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
            }
            for parameter, value in parameters.items():
                if parameter not in accepted or parameter in {"mask", "voxel_size", "b0_direction"}:
                    raise ConfigError(
                        f"configuration key '{stage}.{name}.{parameter}': not a parameter of {name} "
                        f"(parameters: {', '.join(sorted(set(accepted) - {'mask', 'voxel_size', 'b0_direction'}))})"
                    )
                default = accepted[parameter]
                if default is not inspect.Parameter.empty:
                    _check_type(f"{stage}.{name}.{parameter}", value, default)

    direction = config["input"]["b0_direction"]
    if direction is not None and (
        not isinstance(direction, list) or len(direction) != 3
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in direction)
        or not any(direction)
    ):
        raise ConfigError("configuration key 'input.b0_direction': expected three numbers, not all zero")
    strength = config["input"]["field_strength"]
    if strength is not None and (isinstance(strength, bool) or not isinstance(strength, (int, float))):
        raise ConfigError(f"configuration key 'input.field_strength': expected a number of tesla, got {strength!r}")
    if strength is not None and not 0.1 <= float(strength) <= 20:
        raise ConfigError(f"configuration key 'input.field_strength': {strength} T is outside 0.1..20 T")
    if config["mask"]["method"] == "file" and not config["mask"].get("file"):
        raise ConfigError("configuration key 'mask.file': required when mask.method is 'file'")
