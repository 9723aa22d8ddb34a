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
