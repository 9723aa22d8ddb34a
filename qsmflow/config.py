"""Load, merge and validate qsmflow configurations.

A configuration is a nested mapping. The reference is ``configs/default.yaml``: every key a
user may set appears there. Presets (``fast``, ``accurate``, ...) and user files only override
it, and ``--set section.key=value`` overrides those. The merged configuration is validated as a
whole, before any work starts, against a JSON schema (:func:`config_schema`, checked with the
``jsonschema`` library); every problem is reported at once, each naming the key, the value,
where it came from and the values allowed.

Why a schema built from the default and the signatures rather than a hand-written schema file
or typed signatures alone: the defaults of an algorithm live in exactly one place (its
signature) and the keys of the pipeline in one file (``configs/default.yaml``); the schema is
derived from both, so neither can drift from it, and a single table (:data:`RULES`) adds what
neither can say (ranges and choices). A schema library, unlike ad-hoc checks, treats every
key the same way and reports all errors with their paths.

How a key gets its type and range (read this when you add a section or a parameter)
------------------------------------------------------------------------------------
- **Type from the default.** A key of ``configs/default.yaml`` is checked against the type of
  its default: ``true``/``false`` -> boolean, ``3`` -> whole number (write ``3.0`` if fractions
  are allowed), ``3.0`` -> number, ``"text"`` -> string, ``[1, 2]`` -> list (of numbers, if the
  default's items are numbers), a non-empty mapping -> a mapping with exactly those keys, ``{}``
  -> any mapping. A new section (``registration:``, ``atlas:`` ...) is checked this way with no
  code at all. A key whose default is ``null`` accepts anything until it has a rule.
- **Ranges and choices: one entry in** :data:`RULES`, keyed by the dotted key, e.g.
  ``"registration.iterations": whole(1)``, ``"atlas.method": choice("syn", "affine")``,
  ``"group.bootstrap": nullable(whole(100))``. A rule replaces the type from the default. The
  helpers :func:`number`, :func:`positive`, :func:`fraction`, :func:`whole`, :func:`choice`,
  :func:`nullable`, :func:`list_of`, :func:`string`, :func:`either` build them, and
  :func:`describe` turns every rule into the "expected ..." text of the error message.
- **Algorithm parameters** (sections listed in :data:`ALGORITHM_STAGES`: ``mask``, ``unwrap``,
  ``echoes``, ``background``, ``inversion``): ``stage.method`` must name a function of the
  stage's registry, and ``stage.<method>.<parameter>`` must be a keyword parameter of that
  function, typed by its signature's default (or annotation) and ranged by
  ``RULES["stage.method.parameter"]`` (``"stage.*.parameter"`` applies to every method of the
  stage). ``tests/test_config.py`` fails when a numeric or optional parameter of a registry
  function has no rule, so a new algorithm comes with its ranges. Parameters the pipeline
  fills itself (arrays such as ``weight``) are marked :data:`NOT_SETTABLE`.
- **Scientific notation.** YAML 1.1 (PyYAML) reads ``2e-4`` as a string; files and ``--set``
  values are read with :func:`load_yaml`, which reads it as a number.
"""
from __future__ import annotations

import copy
import importlib
import inspect
import math
import re
from pathlib import Path
from typing import Any, Mapping

import jsonschema
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

#: Number of leading positional arguments of each stage's functions (the data arrays).
_DATA_ARGUMENTS = {"mask": 1, "unwrap": 1, "echoes": 3, "background": 3, "inversion": 3}

#: Keyword arguments the pipeline passes to every function of a stage (never set by users).
_PIPELINE_ARGUMENTS = {"mask", "voxel_size", "b0_direction"}


# ---------------------------------------------------------------------------------------------
# Rule builders: JSON-schema fragments.
def number(minimum: float | None = None, maximum: float | None = None, *, exclusive_minimum: bool = False,
           exclusive_maximum: bool = False) -> dict:
    """A real number, optionally bounded (inclusive unless said otherwise)."""
    rule: dict = {"type": "number"}
    if minimum is not None:
        rule["exclusiveMinimum" if exclusive_minimum else "minimum"] = minimum
    if maximum is not None:
        rule["exclusiveMaximum" if exclusive_maximum else "maximum"] = maximum
    return rule


def positive() -> dict:
    """A number > 0."""
    return number(0, exclusive_minimum=True)


def fraction(maximum: float = 1.0) -> dict:
    """A number in the open interval (0, maximum)."""
    return number(0, maximum, exclusive_minimum=True, exclusive_maximum=True)


def whole(minimum: int | None = None, maximum: int | None = None) -> dict:
    """A whole number (``2.0`` counts, ``2.5`` does not), optionally bounded (inclusive)."""
    rule: dict = {"type": "integer"}
    if minimum is not None:
        rule["minimum"] = minimum
    if maximum is not None:
        rule["maximum"] = maximum
    return rule


def string() -> dict:
    return {"type": "string"}


def choice(*values) -> dict:
    """One of the given values."""
    return {"enum": list(values)}


def nullable(rule: dict) -> dict:
    """``null`` or a value satisfying ``rule``."""
    return {"anyOf": [{"type": "null"}, rule]}


def either(*rules: dict) -> dict:
    """A value satisfying one of ``rules``."""
    return {"anyOf": list(rules)}


def list_of(rule: dict, *, length: int | None = None, min_items: int = 1) -> dict:
    """A list whose items satisfy ``rule``: of exactly ``length`` items, or at least ``min_items``."""
    result: dict = {"type": "array", "items": rule}
    if length is not None:
        result["minItems"] = result["maxItems"] = length
    elif min_items:
        result["minItems"] = min_items
    return result


#: Marks a function parameter that the pipeline fills (e.g. an array) and a user may not set.
NOT_SETTABLE = {"not": {}}

_PHASE_UNITS = ("auto", "radians", "radians_0_2pi", "integer_4096", "integer_0_4095", "milliradians", "radians_x10000")

#: Ranges and choices by dotted key (see the module docstring). ``stage.*.parameter`` applies to
#: every method of an algorithm stage that has that parameter.
RULES: dict[str, dict] = {
    # input
    "input.field_strength": nullable(number(0.1, 20)),
    "input.b0_direction": nullable(list_of(number(), length=3)),
    "input.phase_units": choice(*_PHASE_UNITS),
    "input.phase_sign": choice(1, -1),
    # pipeline stages
    "mask.file": nullable(string()),
    "echoes.outlier_factor": nullable(positive()),
    "echoes.edge_outlier_factor": nullable(positive()),
    "echoes.edge_mm": number(0),
    "echoes.outlier_min_cluster": whole(1),
    "r2star.method": choice("loglinear", "arlo"),
    "reference.method": choice("csf", "brain", "mean", "none"),
    "reference.erosion_mm": nullable(number(0, 30)),
    "segmentation.atlas.template": nullable(string()),
    "segmentation.atlas.labels": nullable(string()),
    "segmentation.atlas.table": nullable(string()),
    "segmentation.atlas.built": nullable(string()),
    "segmentation.atlas.built_susceptibility_weight": nullable(number(0, 0.9)),
    "segmentation.registration.preset": choice("default", "fast"),
    "segmentation.registration.seed": whole(0, 2**31 - 1),
    "segmentation.registration.n_procs": whole(1, 64),
    "segmentation.registration.susceptibility_weight": number(0, 0.9),
    "segmentation.registration.susceptibility_stages": list_of(choice("rigid", "affine", "syn")),
    "segmentation.refine": list_of(choice("RN", "SN", "DN", "GP"), min_items=0),
    "roistats.erosion_mm": number(0, 10),
    # COSMOS (multi-orientation)
    "cosmos.group_by": choice("run", "acq", "files"),
    "cosmos.files": list_of(list_of(string()), min_items=0),
    "cosmos.threshold": number(0, 4 / 9, exclusive_minimum=True),
    "cosmos.iterations": whole(0),
    "cosmos.weighting": choice("none", "noise"),
    "cosmos.interpolation": choice("bSpline", "linear", "lanczosWindowedSinc"),
    # group level
    "group.value": choice("mean", "median"),
    "group.age_column": string(),
    "group.age_tolerance": number(0),
    "group.covariates": list_of(string(), min_items=0),
    "group.models.deep_grey": list_of(choice("exponential", "poisson", "linear", "quadratic", "cubic")),
    "group.models.white_matter": list_of(choice("exponential", "poisson", "linear", "quadratic", "cubic")),
    "group.models.other": list_of(choice("exponential", "poisson", "linear", "quadratic", "cubic")),
    "group.normative_model": choice("aicc", "bic", "primary"),
    "group.grid_points": whole(21, 2001),
    "group.level": number(0.5, 0.999),
    "group.bootstrap": whole(0),
    "group.test_bootstrap": whole(19),
    "group.test_bootstrap_structured": whole(19),
    "group.seed": whole(0, 2**32 - 1),
    "group.figures.dpi": whole(30, 600),
    "group.figures.format": choice("png", "svg"),
    "group.figures.point_size": positive(),
    # atlas level
    "atlas.name": string(),
    "atlas.bands.edges": nullable(list_of(number(0), min_items=2)),
    "atlas.bands.quantiles": nullable(whole(1)),
    "atlas.min_scans": whole(1),
    "atlas.resolution_mm": nullable(positive()),
    "atlas.iterations": whole(1),
    "atlas.step_two_iterations": whole(1),
    "atlas.gradient_step": number(0, 1, exclusive_minimum=True),
    "atlas.blending_weight": fraction(),
    "atlas.mem_gb": positive(),
    "atlas.hybrid.chi_weight": number(0),
    "atlas.registration.initial_transform": choice("rigid", "affine"),
    "atlas.registration.transform": choice("rigid", "affine", "syn"),
    "atlas.parcellation.template": nullable(string()),
    "atlas.parcellation.labels": nullable(string()),
    "atlas.parcellation.table": nullable(string()),
    "atlas.parcellation.min_contrast": number(0),
    "atlas.figures.window": positive(),
    # report
    "report.orientation": choice("radiological", "neurological"),
    "report.chi_window": positive(),
    "report.figure_format": choice("png", "svg"),
    # execution
    "execution.nprocs": nullable(whole(1)),
    "execution.mem_gb": nullable(positive()),
    "execution.cluster.partition": nullable(string()),
    "execution.cluster.account": nullable(string()),
    "execution.cluster.time": nullable(string()),
    "execution.cluster.extra_args": either(string(), list_of(string(), min_items=0)),
    "execution.array.cpus_per_task": whole(1),
    "execution.array.mem_gb": nullable(positive()),
    "execution.array.time": nullable(string()),
    "execution.array.max_parallel": nullable(whole(1)),
    "execution.array.poll_seconds": positive(),
    # algorithm parameters: mask
    "mask.threshold.threshold": nullable(fraction()),
    "mask.threshold.erosion_mm": number(0),
    "mask.threshold.closing_mm": number(0),
    # unwrap
    "unwrap.laplacian.max_iterations": whole(0),
    "unwrap.laplacian.tolerance": positive(),
    "unwrap.quality.seed": whole(0, 2**32 - 1),
    # echoes
    "echoes.complex.iterations": whole(0),
    "echoes.complex.tolerance_hz": positive(),
    # background
    "background.sharp.radius_mm": positive(),
    "background.*.threshold": fraction(),
    "background.vsharp.radii_mm": nullable(list_of(positive())),
    "background.*.tolerance": fraction(),
    "background.*.iterations": whole(1),
    "background.pdf.padding": whole(0),
    "background.pdf.weight": NOT_SETTABLE,
    "background.lbv.peel": whole(0),
    "background.*.harmonic_order": nullable(whole(0, 4)),
    # inversion
    "inversion.tkd.threshold": fraction(2.0 / 3.0),
    "inversion.*.regularization": positive(),
    "inversion.*.padding": either(whole(0), list_of(whole(0), length=3)),
    "inversion.*.iterations": whole(1),
    "inversion.*.tolerance": number(0),
    "inversion.tv.penalty": nullable(positive()),
    "inversion.weighted_tv.gradient_penalty": nullable(positive()),
    "inversion.weighted_tv.data_penalty": positive(),
    "inversion.*.data_weight": NOT_SETTABLE,
    "inversion.*.gradient_weight": NOT_SETTABLE,
    "inversion.tfi.data_mask": NOT_SETTABLE,
    "inversion.tfi.preconditioner": positive(),
    "inversion.tfi.cg_iterations": whole(1),
    "inversion.tfi.epsilon": positive(),
}


def describe(rule: Mapping) -> str:
    """The values a rule allows, in words (used in error messages)."""
    if "enum" in rule:
        return "one of " + ", ".join(_show(v) for v in rule["enum"])
    if "anyOf" in rule:
        parts = [describe(r) for r in rule["anyOf"]]
        return " or ".join(parts)
    kind = rule.get("type")
    if isinstance(kind, list):
        return " or ".join(describe({"type": k}) for k in kind)
    if kind == "null":
        return "null"
    if kind in ("number", "integer"):
        noun = "a number" if kind == "number" else "a whole number"
        low = rule.get("minimum", rule.get("exclusiveMinimum"))
        high = rule.get("maximum", rule.get("exclusiveMaximum"))
        if low is not None and high is not None:
            return (f"{noun} in {'(' if 'exclusiveMinimum' in rule else '['}{_show(low)}, "
                    f"{_show(high)}{')' if 'exclusiveMaximum' in rule else ']'}")
        if low is not None:
            return f"{noun} {'>' if 'exclusiveMinimum' in rule else '>='} {_show(low)}"
        if high is not None:
            return f"{noun} {'<' if 'exclusiveMaximum' in rule else '<='} {_show(high)}"
        return noun
    if kind == "array":
        items = describe(rule.get("items", {}))
        items = re.sub(r"^an? ", "", items).replace("number", "numbers").replace("string", "strings")
        if rule.get("minItems") is not None and rule.get("minItems") == rule.get("maxItems"):
            return f"a list of {rule['minItems']} {items}"
        return f"a {'non-empty ' if rule.get('minItems') else ''}list of {items}"
    if kind == "string":
        return "a string"
    if kind == "boolean":
        return "true or false"
    if kind == "object":
        return "a mapping"
    if rule == NOT_SETTABLE:
        return "nothing (the pipeline sets it)"
    return "any value"


def _show(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return repr(value) if isinstance(value, str) else str(value)


# ---------------------------------------------------------------------------------------------
# YAML with scientific notation.
class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads ``2e-4``, ``1E+3`` as floats (as YAML 1.2 does)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str):
    """Parse YAML text; numbers in scientific notation (``2e-4``) are numbers, not strings."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


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
        data = load_yaml(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML ({error})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    return data


def _read_preset(name: str) -> dict:
    resource = presets_dir() / f"{name}.yaml"
    if not isinstance(name, str) or "/" in name or not resource.is_file():
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
        value = load_yaml(text)
    except yaml.YAMLError:
        raise ConfigError(f"--set {assignment!r}: value is not valid YAML") from None
    return path, value


def _nest(path: list[str], value: Any) -> dict:
    nested: Any = value
    for part in reversed(path):
        nested = {part: nested}
    return nested


def _leaf_keys(mapping: Mapping, prefix: str = ""):
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        yield dotted
        if isinstance(value, Mapping):
            yield from _leaf_keys(value, dotted + ".")


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

    Raises
    ------
    ConfigError
        Naming every invalid key, its value, where it was set and the values allowed.
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
    sources: dict[str, str] = {}
    for source, layer in layers:
        _check_known_keys(layer, reference, source)
        merged = _deep_merge(merged, layer)
        sources.update({key: source for key in _leaf_keys(layer)})
    validate(merged, sources)
    merged["preset"] = preset
    return merged


def _check_known_keys(layer: Mapping, reference: Mapping, source: str, prefix: str = "") -> None:
    for key, value in layer.items():
        dotted = f"{prefix}{key}"
        if key not in reference:
            if prefix and prefix.rstrip(".").split(".")[0] in ALGORITHM_STAGES and isinstance(value, Mapping):
                continue  # parameters of a method: checked against its signature by the schema
            known = ", ".join(sorted(map(str, reference)))
            raise ConfigError(f"{source}: unknown configuration key '{dotted}' (known here: {known})")
        if prefix[:-1] in ALGORITHM_STAGES and key != "method":
            continue  # a method's parameters (the default may list some): checked against its signature
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


# ---------------------------------------------------------------------------------------------
# The schema.
def _rule_from_default(default) -> dict:
    if default is None:
        return {}
    if isinstance(default, bool):
        return {"type": "boolean"}
    if isinstance(default, int):
        return {"type": "integer"}
    if isinstance(default, float):
        return {"type": "number"}
    if isinstance(default, str):
        return {"type": "string"}
    if isinstance(default, (list, tuple)):
        items = [_rule_from_default(item) for item in default]
        if items and all(item.get("type") in ("number", "integer") for item in items):
            return {"type": "array", "items": {"type": "number"}}
        if items and all(item == items[0] for item in items):
            return {"type": "array", "items": items[0]}
        return {"type": "array"}
    if isinstance(default, Mapping):
        return {"type": "object"}
    return {}


_ANNOTATION_TYPES = {"int": {"type": "integer"}, "float": {"type": "number"}, "bool": {"type": "boolean"},
                     "str": {"type": "string"}}


def _rule_for_parameter(key: str, parameter: inspect.Parameter) -> dict | None:
    stage, method, name = key.split(".")
    for candidate in (key, f"{stage}.*.{name}"):
        if candidate in RULES:
            return RULES[candidate]
    if parameter.default is not inspect.Parameter.empty and parameter.default is not None:
        return _rule_from_default(parameter.default)
    annotation = parameter.annotation
    annotation = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    return _ANNOTATION_TYPES.get(annotation.replace(" | None", ""))


def settable_parameters(stage: str, method: str) -> dict[str, inspect.Parameter]:
    """The keyword parameters of a registry function that a configuration may set."""
    function = registry(stage)[method]
    parameters = list(inspect.signature(function).parameters.values())[_DATA_ARGUMENTS[stage]:]
    return {p.name: p for p in parameters
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in _PIPELINE_ARGUMENTS
            and RULES.get(f"{stage}.{method}.{p.name}") is not NOT_SETTABLE
            and RULES.get(f"{stage}.*.{p.name}") is not NOT_SETTABLE}


def _section_schema(reference: Mapping, prefix: str, rules_out: dict) -> dict:
    properties = {}
    for key, default in reference.items():
        dotted = f"{prefix}{key}"
        if isinstance(default, Mapping) and default and dotted not in RULES:
            properties[key] = _section_schema(default, dotted + ".", rules_out)
            continue
        rule = RULES.get(dotted, _rule_from_default(default))
        rules_out[dotted] = rule
        properties[key] = rule
    return {"type": "object", "properties": properties, "additionalProperties": False}


def config_schema() -> tuple[dict, dict[str, dict]]:
    """The JSON schema of a merged configuration, and the rule of every dotted key in it."""
    reference = _read_preset("default")
    rules: dict[str, dict] = {}
    schema = _section_schema(reference, "", rules)
    schema["properties"]["preset"] = {"type": "string"}
    schema["required"] = sorted(reference)
    for stage in ALGORITHM_STAGES:
        functions = registry(stage)
        section = schema["properties"][stage]
        methods = sorted(set(functions) | PIPELINE_METHODS.get(stage, set()))
        section["properties"]["method"] = rules[f"{stage}.method"] = choice(*methods)
        for method in functions:
            properties = {}
            for name, parameter in settable_parameters(stage, method).items():
                key = f"{stage}.{method}.{name}"
                rule = _rule_for_parameter(key, parameter) or {}
                properties[name] = rules[key] = rule
            section["properties"][method] = rules[f"{stage}.{method}"] = {
                "type": ["null", "object"], "properties": properties, "additionalProperties": False}
    return schema, rules


def _value_at(config: Mapping, path) -> Any:
    value: Any = config
    for part in path:
        value = value[part]
    return value


def _source_of(key: str, sources: Mapping[str, str]) -> str:
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        source = sources.get(".".join(parts[:end]))
        if source:
            return source
    return "configs/default.yaml"


def _message(error: jsonschema.ValidationError, config: Mapping, rules: Mapping, sources: Mapping) -> str:
    path = [str(part) for part in error.absolute_path if isinstance(part, str)]
    key = ".".join(path)
    if error.validator == "additionalProperties" and isinstance(error.instance, Mapping):
        allowed = sorted(error.schema.get("properties", {}))
        unexpected = sorted(set(error.instance) - set(allowed))
        dotted = f"{key}.{unexpected[0]}" if key else unexpected[0]
        if len(path) == 2 and path[0] in ALGORITHM_STAGES:
            return (f"configuration key '{dotted}' (from {_source_of(dotted, sources)}): not a parameter of "
                    f"{path[1]} (parameters: {', '.join(allowed) or 'none'})")
        return f"configuration key '{dotted}' (from {_source_of(dotted, sources)}): unknown (known here: {', '.join(allowed)})"
    while key and key not in rules and "." in key:
        key = key.rsplit(".", 1)[0]
    rule = rules.get(key, error.schema)
    value = _value_at(config, key.split(".")) if key else error.instance
    return (f"configuration key '{key}' (from {_source_of(key, sources)}): {value!r} is not allowed; "
            f"expected {describe(rule)}")


def validate(config: Mapping, sources: Mapping[str, str] | None = None) -> None:
    """Raise :class:`ConfigError` listing every invalid key of a merged ``config``.

    ``sources`` maps dotted keys to where they were set (a preset, a file, ``--set``), for the
    messages.
    """
    sources = sources or {}
    schema, rules = config_schema()
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path])
    messages = list(dict.fromkeys(_message(error, config, rules, sources) for error in errors))
    messages += _cross_checks(config, sources) if not messages else []
    if messages:
        if len(messages) == 1:
            raise ConfigError(messages[0])
        raise ConfigError(f"{len(messages)} configuration errors:\n  " + "\n  ".join(messages))
    _normalise_whole_numbers(config, rules)


def _cross_checks(config: Mapping, sources: Mapping) -> list[str]:
    """Conditions that involve more than one key or more than a value's type and range."""
    messages = []
    direction = config["input"]["b0_direction"]
    if direction is not None and not any(direction):
        messages.append(f"configuration key 'input.b0_direction' (from {_source_of('input.b0_direction', sources)}): "
                        f"{direction!r} is not allowed; expected three numbers, not all zero")
    if config["mask"]["method"] == "file" and not config["mask"].get("file"):
        messages.append("configuration key 'mask.file': required when mask.method is 'file' "
                        "(a path template such as /masks/sub-{subject}_mask.nii.gz)")
    return messages


def _normalise_whole_numbers(config: Mapping, rules: Mapping) -> None:
    """Write whole numbers given as ``1e3`` or ``2.0`` as integers where the rule asks for one."""
    for key, rule in rules.items():
        wants_integer = rule.get("type") == "integer" or (
            "anyOf" in rule and [r.get("type") for r in rule["anyOf"]] == ["null", "integer"])
        if not wants_integer:
            continue
        *parents, leaf = key.split(".")
        try:
            section = _value_at(config, parents)
        except (KeyError, TypeError):
            continue
        if isinstance(section, dict) and isinstance(section.get(leaf), float) and math.isfinite(section[leaf]):
            section[leaf] = int(section[leaf])


def config_yaml(config: Mapping) -> str:
    """The configuration as YAML, in the order of ``configs/default.yaml`` (``preset`` first)."""
    ordered = {"preset": config.get("preset", "default")}
    ordered.update({key: value for key, value in config.items() if key != "preset"})
    return yaml.safe_dump(ordered, sort_keys=False, default_flow_style=False)
