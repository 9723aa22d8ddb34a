import pytest

from qsmflow.config import ConfigError, load_config, preset_names


def test_default_preset_loads_and_names_itself():
    config = load_config()
    assert config["preset"] == "default"
    assert config["inversion"]["method"] in {"tkd", "tv", "tikhonov"}
    assert "default" in preset_names()


def test_overrides_parse_yaml_values():
    config = load_config(None, ["inversion.method=tikhonov", "input.field_strength=7", "input.b0_direction=[0, 0.5, 1]"])
    assert config["inversion"]["method"] == "tikhonov"
    assert config["input"]["field_strength"] == 7
    assert config["input"]["b0_direction"] == [0, 0.5, 1]


@pytest.mark.parametrize("override, key", [
    ("inversion.methd=tv", "inversion.methd"),
    ("nonsense.key=1", "nonsense.key"),
    ("inversion.method=magic", "inversion.method"),
    ("input.phase_units=degrees", "input.phase_units"),
    ("input.field_strength=fast", "input.field_strength"),
    ("inversion.tkd.treshold=0.2", "inversion.tkd.treshold"),
    ("inversion.tkd.threshold=high", "inversion.tkd.threshold"),
    ("background.vsharp.b0_direction=[0,0,1]", "background.vsharp.b0_direction"),
    ("input.b0_direction=[0,0,0]", "input.b0_direction"),
])
def test_bad_keys_and_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert key in str(error.value)


def test_config_file_with_preset_and_unknown_key(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("preset: default\ninversion:\n  method: tikhonov\n")
    assert load_config(good)["inversion"]["method"] == "tikhonov"
    bad = tmp_path / "bad.yaml"
    bad.write_text("mask:\n  metod: threshold\n")
    with pytest.raises(ConfigError, match=r"mask\.metod"):
        load_config(bad)
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("no-such-preset")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_every_preset_is_valid():
    for name in preset_names():
        assert load_config(name)["preset"] == name


# ------------------------------------------------------------------ types and ranges (issue 8)

import qsmflow.config as config_module  # noqa: E402
from qsmflow.config import (NOT_SETTABLE, RULES, config_schema, describe, load_yaml,  # noqa: E402
                            settable_parameters, registry, ALGORITHM_STAGES)


@pytest.mark.parametrize("override, key, allowed", [
    # the five values of issue 8 that used to run the pipeline and fail per scan
    ("inversion.tv.regularization=-1", "inversion.tv.regularization", "a number > 0"),
    ("inversion.tv.penalty=abc", "inversion.tv.penalty", "null or a number > 0"),
    ("background.vsharp.radii_mm=hello", "background.vsharp.radii_mm", "list of numbers > 0"),
    ("mask.threshold.threshold=banana", "mask.threshold.threshold", "null or a number in (0, 1)"),
    ("unwrap.quality.seed=1.5", "unwrap.quality.seed", "a whole number"),
    # the new user's values
    ("inversion.tv.iterations=-5", "inversion.tv.iterations", "a whole number >= 1"),
    ("inversion.tv.iterations=2.5", "inversion.tv.iterations", "a whole number >= 1"),
    ("inversion.tv.regularization=0", "inversion.tv.regularization", "a number > 0"),
    ("inversion.tikhonov.regularization=0", "inversion.tikhonov.regularization", "a number > 0"),
    ("background.pdf.padding=-1", "background.pdf.padding", "a whole number >= 0"),
    ("echoes.outlier_factor=-2", "echoes.outlier_factor", "null or a number > 0"),
    ("execution.nprocs=-3", "execution.nprocs", "null or a whole number >= 1"),
    ("execution.nprocs=0", "execution.nprocs", "null or a whole number >= 1"),
    # a few more of every kind
    ("background.vsharp.radii_mm=[6, -2]", "background.vsharp.radii_mm", "list of numbers > 0"),
    ("inversion.tkd.threshold=0.8", "inversion.tkd.threshold", "a number in (0, 0.6667)"),
    ("inversion.tv.padding=[1, 2]", "inversion.tv.padding", "a list of 3 whole numbers >= 0"),
    ("unwrap.laplacian.max_iterations=-1", "unwrap.laplacian.max_iterations", "a whole number >= 0"),
    ("mask.threshold.fill_holes=3", "mask.threshold.fill_holes", "true or false"),
    ("input.phase_sign=2", "input.phase_sign", "one of 1, -1"),
    ("input.phase_units=integer", "input.phase_units", "'milliradians'"),
    ("input.field_strength=0", "input.field_strength", "[0.1, 20]"),
    ("r2star.method=median", "r2star.method", "one of 'loglinear', 'arlo'"),
])
def test_bad_values_name_the_key_and_the_allowed_values(override, key, allowed):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    message = str(error.value)
    assert f"'{key}'" in message and allowed in message, message
    assert f"--set {override}" in message  # where the value came from


def test_parameters_of_a_method_listed_in_the_default_are_not_the_only_ones():
    """default.yaml sets background.pdf.padding; the other PDF parameters must stay settable."""
    config = load_config(None, ["background.pdf.tolerance=1e-2", "background.pdf.iterations=80"])
    assert config["background"]["pdf"] == {"padding": 0, "tolerance": 0.01, "iterations": 80}
    with pytest.raises(ConfigError, match=r"'background\.pdf\.tolerence'.*not a parameter of pdf"):
        load_config(None, ["background.pdf.tolerence=1e-2"])


def test_every_error_is_reported_at_once():
    with pytest.raises(ConfigError) as error:
        load_config(None, ["inversion.tv.regularization=-1", "execution.nprocs=0", "unwrap.quality.seed=1.5"])
    message = str(error.value)
    assert message.startswith("3 configuration errors")
    for key in ("inversion.tv.regularization", "execution.nprocs", "unwrap.quality.seed"):
        assert key in message


def test_scientific_notation_in_set_and_in_files(tmp_path):
    assert load_yaml("2e-4") == 2e-4 and load_yaml("-1E+3") == -1000.0 and load_yaml("1.5e2") == 150.0
    assert load_yaml("'2e-4'") == "2e-4" and load_yaml("e5") == "e5" and load_yaml("2e") == "2e"
    config = load_config(None, ["inversion.tv.regularization=2e-4", "inversion.tv.iterations=1e2"])
    assert config["inversion"]["tv"]["regularization"] == 2e-4
    assert config["inversion"]["tv"]["iterations"] == 100 and isinstance(config["inversion"]["tv"]["iterations"], int)
    path = tmp_path / "mine.yaml"
    path.write_text("inversion:\n  method: weighted_tv\n  weighted_tv: {regularization: 2e-4, tolerance: 1E-3}\n")
    loaded = load_config(path)["inversion"]["weighted_tv"]
    assert loaded == {"regularization": 2e-4, "tolerance": 1e-3}


def test_bad_value_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("preset: fast\ninversion:\n  tkd: {threshold: -0.1}\n")
    with pytest.raises(ConfigError, match=r"'inversion\.tkd\.threshold' \(from .*mine\.yaml\)"):
        load_config(path)


def _numeric_or_optional(parameter):
    default = parameter.default
    return default is None or (isinstance(default, (int, float, list, tuple)) and not isinstance(default, bool))


def test_every_parameter_of_every_registry_function_is_typed_and_ranged():
    """A numeric or optional parameter needs a range in RULES; every parameter gets a rule."""
    _, rules = config_schema()
    missing = []
    for stage in ALGORITHM_STAGES:
        for method in registry(stage):
            for name, parameter in settable_parameters(stage, method).items():
                key = f"{stage}.{method}.{name}"
                assert rules[key], f"{key} is not type-checked"
                explicit = key in RULES or f"{stage}.*.{name}" in RULES
                if _numeric_or_optional(parameter) and not explicit:
                    missing.append(key)
    assert not missing, f"add a range for these parameters to qsmflow.config.RULES: {missing}"
    assert all(rule is not NOT_SETTABLE for rule in rules.values())


def test_every_default_value_satisfies_its_own_rule():
    """The signatures' defaults and the presets lie inside the ranges."""
    import inspect

    import jsonschema

    _, rules = config_schema()
    for stage in ALGORITHM_STAGES:
        for method in registry(stage):
            for name, parameter in settable_parameters(stage, method).items():
                if parameter.default is not inspect.Parameter.empty:
                    jsonschema.validate(parameter.default, rules[f"{stage}.{method}.{name}"])
    for name in preset_names():
        load_config(name)


def test_a_new_section_is_type_checked_from_its_default(monkeypatch):
    """How other parts of qsmflow get validation: a section in default.yaml, a range in RULES."""
    original = config_module._read_preset

    def with_registration(name):
        preset = original(name)
        if name == "default":
            preset["registration"] = {"iterations": 4, "metric": "mattes", "sigmas_mm": [3.0, 1.0], "template": None,
                                      "enabled": True}
        return preset

    monkeypatch.setattr(config_module, "_read_preset", with_registration)
    assert load_config(None, ["registration.iterations=8"])["registration"]["iterations"] == 8
    for override, allowed in [("registration.iterations=2.5", "a whole number"), ("registration.metric=3", "a string"),
                              ("registration.sigmas_mm=[a]", "a list of numbers"), ("registration.enabled=yes please", "true or false")]:
        with pytest.raises(ConfigError, match=allowed):
            load_config(None, [override])
    load_config(None, ["registration.template=anything"])  # null default: no rule, anything goes
    monkeypatch.setitem(RULES, "registration.metric", config_module.choice("mattes", "cc"))
    monkeypatch.setitem(RULES, "registration.iterations", config_module.whole(1, 10))
    with pytest.raises(ConfigError, match=r"'registration\.metric'.*one of 'mattes', 'cc'"):
        load_config(None, ["registration.metric=mi"])
    with pytest.raises(ConfigError, match=r"in \[1, 10\]"):
        load_config(None, ["registration.iterations=11"])


def test_describe_reads_like_english():
    assert describe(config_module.nullable(config_module.positive())) == "null or a number > 0"
    assert describe(config_module.fraction()) == "a number in (0, 1)"
    assert describe(config_module.list_of(config_module.whole(0), length=3)) == "a list of 3 whole numbers >= 0"


def test_cli_stops_on_bad_values_before_any_work(capsys, tmp_path, bids_root):
    from conftest import write_gre_scan
    from qsmflow.cli import main

    write_gre_scan(bids_root, "01")
    output = tmp_path / "out"
    for override in ("inversion.tv.regularization=-1", "inversion.tv.penalty=abc", "background.vsharp.radii_mm=hello",
                     "mask.threshold.threshold=banana", "unwrap.quality.seed=1.5", "execution.nprocs=0"):
        code = main([str(bids_root), str(output), "participant", "--set", override])
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 2, code
        assert last.startswith("qsmflow: error: configuration key") and override.split("=")[0] in last, last
    assert not output.exists()


def test_nprocs_option_refuses_zero(capsys, tmp_path, bids_root):
    from qsmflow.cli import main

    code = main([str(bids_root), str(tmp_path / "out"), "participant", "--nprocs", "0"])
    assert code != 0 and "--nprocs 0" in capsys.readouterr().err
