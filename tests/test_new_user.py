"""What a new user trips on: set-up, the demo's folders, --help, printing the configuration."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from qsmflow import cli
from qsmflow.config import ConfigError, load_config, load_yaml, preset_names

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(title_start: str) -> str:
    match = re.search(rf"^## {re.escape(title_start)}.*?(?=^## )", README, re.M | re.S)
    assert match, f"README has no section '## {title_start}'"
    return match.group(0)


def test_setup_says_clone_cd_and_the_python_version():
    setup = _section("Set-up")
    assert re.search(r"^git clone .+ qsmflow && cd qsmflow$", setup, re.M), setup
    required = re.search(r"python_requires\s*=\s*>=\s*([\d.]+)", (ROOT / "setup.cfg").read_text()).group(1)
    assert f"Python {required} or newer" in setup
    # the install runs from the clone's root, where setup.cfg is: it comes after the cd
    assert setup.index("cd qsmflow") < setup.index("pip install .")


def _demo_folder() -> str:
    commands = re.findall(r"^.*qsmflow demo (\S+)\s*$", _section("Set-up"), re.M)
    assert len(commands) == 1, commands
    return commands[0]


def test_the_demo_writes_nothing_git_would_pick_up():
    """The README's demo runs next to the clone; run inside it, its folder is ignored."""
    folder = _demo_folder()
    assert (ROOT / folder).resolve().is_relative_to(ROOT.parent) and not (ROOT / folder).resolve().is_relative_to(ROOT)
    ignored = [line.strip() for line in (ROOT / ".gitignore").read_text().splitlines()]
    assert f"{Path(folder).name}/" in ignored
    if (ROOT / ".git").exists():
        probe = subprocess.run(["git", "check-ignore", "-q", f"{Path(folder).name}/derivatives/qsmflow/x.nii.gz"],
                               cwd=ROOT, capture_output=True)
        assert probe.returncode == 0, "git does not ignore the demo folder inside the clone"


def _demo_paths(tmp_path, monkeypatch):
    """The folders ``qsmflow demo`` really uses, with the simulation and the run replaced by stubs."""
    import qsmflow.reports.accuracy
    import qsmflow.simulate

    used = {}

    def simulated(root, *args, **kwargs):
        used["bids"] = Path(root)

    def participant(bids_dir, output_dir, **kwargs):
        used["derivatives"], used["work"] = Path(output_dir), Path(kwargs["work_dir"])
        return 0

    monkeypatch.setattr(qsmflow.simulate, "write_bids_dataset", simulated)
    monkeypatch.setattr(qsmflow.reports.accuracy, "demo_accuracy_table", lambda *a, **k: "")
    monkeypatch.setattr(cli, "run_participant", participant)
    (tmp_path / "demo").mkdir()
    cli.run_demo(tmp_path / "demo", subjects=1, config=load_config())
    used["table"] = next((tmp_path / "demo").glob("*.tsv"))
    return {key: path.relative_to(tmp_path / "demo").as_posix() for key, path in used.items()}


def test_the_demo_folders_and_its_work_dir_are_documented(tmp_path, monkeypatch, capsys):
    import qsmflow.simulate

    paths = _demo_paths(tmp_path, monkeypatch)
    folder = _demo_folder()
    setup = _section("Set-up")
    for key in ("bids", "derivatives", "work"):
        assert f"`{folder}/{paths[key]}/`" in setup, (key, paths[key])
    assert f"`{folder}/{paths['table']}`" in setup
    truth = re.search(r'truth_root = root / "derivatives" / "(\w+)"', Path(qsmflow.simulate.__file__).read_text())
    assert truth and f"`bids/derivatives/{truth.group(1)}/`" in setup
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"(default: OUTPUT_DIR/{paths['work']})" in help_text, help_text
    assert f"OUTPUT_DIR/{paths['derivatives']}" in help_text


def test_help_lists_the_presets(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    listed = re.search(r"--config FILE\|PRESET (.*?) \(default: default\)", help_text)
    assert listed, help_text
    for name in preset_names():
        assert re.search(rf"\b{re.escape(name)}\b", listed.group(1)), name


def test_config_command_prints_the_effective_configuration(capsys, tmp_path):
    code = cli.main(["config", "fast", "--set", "inversion.tkd.threshold=2e-1", "--set", "execution.nprocs=2"])
    printed = capsys.readouterr().out
    assert code == 0
    expected = load_config("fast", ["inversion.tkd.threshold=2e-1", "execution.nprocs=2"])
    assert load_yaml(printed) == expected
    assert printed.startswith("preset: fast\n")
    saved = tmp_path / "effective.yaml"
    saved.write_text(printed)
    assert load_config(saved) == expected  # the printout is itself a valid configuration file
    assert cli.main(["config"]) == 0 and load_yaml(capsys.readouterr().out) == load_config()


def test_config_command_refuses_bad_values_naming_the_key(capsys):
    code = cli.main(["config", "--set", "inversion.tv.regularization=-1"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert "'inversion.tv.regularization'" in captured.err and "a number > 0" in captured.err
    assert cli.main(["config", "no-such-preset"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        load_config("no-such-preset")


def test_readme_states_the_types_the_writer_writes():
    outputs = _section("Outputs")
    assert "All maps are float32" not in outputs
    assert "float32 and the masks uint8" in outputs
