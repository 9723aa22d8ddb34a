"""The same qsm-forward scan stored in several phase conventions gives the same Chimap.

Issue 8 measured a Chimap 40 % NRMSE away from the radians run when the phase was stored
GE-style (radians x 1000 as integers), and 0..2 pi radians refused. Here one run of the whole
pipeline (``--config fast``) reconstructs one qsm-forward head stored four ways, one subject
each: radians, GE milliradians, 0..2 pi, and a range that fits no convention clearly.

The run keeps the default reliability mask of the echo fit. Before its outlier rule dropped only
clusters (``echoes.outlier_min_cluster``), GE's 1 mrad rounding (0.3 mrad RMS, far below the
phase noise) moved noise-level outliers in and out of it, and the Chimap differed from the
radians run by 2.1 % NRMSE under the default preset and 6.7 % with V-SHARP and the edge factor;
the test then had to switch the mask off. With the cluster rule no mask voxel moves (0.13 %).
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest

from conftest import RECONSTRUCTION_ONLY
from qsmflow.cli import main

ECHO_TIMES = ("0.004", "0.012", "0.020")
STORED = {
    "radians": lambda phase: phase.astype(np.float32),
    "ge": lambda phase: np.round(phase * 1000).astype(np.int16),
    "twopi": lambda phase: np.mod(phase, 2 * np.pi).astype(np.float32),
    "unclear": lambda phase: ((phase + np.pi) / 2).astype(np.float32),  # 0..pi: -pi..pi or 0..2 pi?
}


@pytest.fixture(scope="module")
def conventions_run(tmp_path_factory):
    executable = shutil.which("qsm-forward")
    if executable is None:
        pytest.fail("qsm-forward (a test dependency, setup.cfg [test]) is not installed")
    base = tmp_path_factory.mktemp("conventions")
    simulated = base / "simulated"
    subprocess.run([executable, "simple", str(simulated), "--resolution", "64", "64", "64", "--TEs", *ECHO_TIMES,
                    "--B0", "3", "--generate-phase-offset", "--peak-snr", "100", "--random-seed", "3"],
                   check=True, capture_output=True)
    bids = base / "bids"
    bids.mkdir()
    shutil.copy(simulated / "dataset_description.json", bids)
    source = simulated / "sub-1" / "anat"
    for subject, store in STORED.items():
        target = bids / f"sub-{subject}" / "anat"
        target.mkdir(parents=True)
        for path in sorted(source.iterdir()):
            name = path.name.replace("sub-1_", f"sub-{subject}_")
            if path.suffix == ".nii" and "part-phase" in path.name:
                image = nib.load(str(path))
                stored = store(np.asarray(image.dataobj, dtype=np.float64))
                nib.save(nib.Nifti1Image(stored, image.affine), str(target / name))
            elif path.suffix == ".json":
                sidecar = json.loads(path.read_text())
                sidecar["Subject"] = subject
                (target / name).write_text(json.dumps(sidecar))
            else:
                shutil.copy(path, target / name)
    output = base / "out"
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        code = main([str(bids), str(output), "participant", "--config", "fast", "--work-dir", str(base / "work"),
                     "--progress", "off", *RECONSTRUCTION_ONLY])
    return {"code": code, "bids": bids, "output": output, "stderr": errors.getvalue()}


def _chimap(run, subject):
    path = run["output"] / f"sub-{subject}" / "anat" / f"sub-{subject}_Chimap.nii.gz"
    sidecar = json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())
    return np.asarray(nib.load(str(path)).dataobj), sidecar


@pytest.mark.slow
@pytest.mark.parametrize("subject, convention", [("ge", "milliradians"), ("twopi", "radians_0_2pi")])
def test_conventions_give_the_radians_chimap(conventions_run, subject, convention):
    reference, reference_sidecar = _chimap(conventions_run, "radians")
    chi, sidecar = _chimap(conventions_run, subject)
    assert reference_sidecar["PhaseInput"]["PhaseUnits"] == "radians"
    assert sidecar["PhaseInput"]["PhaseUnits"] == convention and sidecar["PhaseInput"]["PhaseUnitsDetected"] is True
    assert sidecar["PhaseInput"]["PhaseSign"] == 1
    for stage in ("Masking", "PhaseUnwrapping", "EchoCombination", "BackgroundFieldRemoval", "DipoleInversion"):
        assert sidecar[stage]["References"] and all(isinstance(r, str) for r in sidecar[stage]["References"]), stage
    assert any("Robinson" in r for r in sidecar["PhaseUnwrapping"]["References"])  # the temporal unwrapping's paper
    inside = reference != 0
    assert inside.sum() > 20000
    nrmse = 100 * np.linalg.norm(chi[inside] - reference[inside]) / np.linalg.norm(reference[inside])
    print(f"{convention}: Chimap NRMSE against the radians run {nrmse:.3f} %")
    assert nrmse < 1.0


@pytest.mark.slow
def test_unclear_phase_range_stops_that_scan_naming_the_setting_and_the_file(conventions_run):
    assert conventions_run["code"] == 1, conventions_run["stderr"]
    last = conventions_run["stderr"].strip().splitlines()[-1]
    phase_file = conventions_run["bids"] / "sub-unclear" / "anat" / "sub-unclear_echo-1_part-phase_MEGRE.nii"
    assert str(phase_file) in last and "input.phase_units" in last and "ambiguous" in last, last
    assert not (conventions_run["output"] / "sub-unclear").exists()
    assert (conventions_run["output"] / "sub-radians" / "anat" / "sub-radians_Chimap.nii.gz").is_file()


@pytest.mark.slow
def test_written_types_are_those_the_readme_states(conventions_run):
    """Maps float32, masks uint8 (README, Outputs); the field maps' magnitude keeps the input's type."""
    written = sorted((conventions_run["output"] / "sub-radians").rglob("*.nii.gz"))
    assert len(written) >= 6, written
    for path in written:
        dtype = nib.load(str(path)).get_data_dtype()
        if path.name.endswith("_mask.nii.gz"):
            assert dtype == np.uint8, path.name
        elif path.name.endswith("_magnitude.nii.gz"):
            source = conventions_run["bids"] / "sub-radians" / "anat" / "sub-radians_echo-1_part-mag_MEGRE.nii"
            assert dtype == nib.load(str(source)).get_data_dtype(), path.name
        else:
            assert dtype == np.float32, path.name


def _write_echoes(tmp_path, phases):
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    magnitude, phase = [], []
    for echo, values in enumerate(phases, start=1):
        for part, data in (("mag", np.ones(values.shape, np.float32)), ("phase", values)):
            path = tmp_path / f"echo-{echo}_part-{part}.nii.gz"
            nib.save(nib.Nifti1Image(data, affine), str(path))
            (magnitude if part == "mag" else phase).append(str(path))
    return magnitude, phase


def test_phase_sign_reverses_the_phase(tmp_path):
    from qsmflow.interfaces.recon import LoadEchoes

    truth = np.random.default_rng(0).uniform(-3, 3, (6, 6, 6)).astype(np.float32)
    magnitude, phase = _write_echoes(tmp_path, [-truth])
    result = LoadEchoes(magnitude_files=magnitude, phase_files=phase, phase_sign=-1).run(cwd=str(tmp_path))
    np.testing.assert_allclose(np.asarray(nib.load(result.outputs.phase).dataobj)[..., 0], truth, atol=1e-6)
    assert result.outputs.provenance["PhaseSign"] == -1


def test_unclear_range_names_the_file_and_the_setting(tmp_path):
    from qsmflow.interfaces.recon import LoadEchoes

    values = np.random.default_rng(1).uniform(0.1, 3.0, (6, 6, 6)).astype(np.float32)
    magnitude, phase = _write_echoes(tmp_path, [values, values])
    with pytest.raises(ValueError) as error:
        LoadEchoes(magnitude_files=magnitude, phase_files=phase).run(cwd=str(tmp_path))
    message = str(error.value)
    assert phase[0] in message and "input.phase_units" in message and "ambiguous" in message


def test_configured_units_are_used_and_checked(tmp_path):
    from qsmflow.interfaces.recon import LoadEchoes

    truth = np.random.default_rng(2).uniform(-0.5, 0.5, (6, 6, 6))
    magnitude, phase = _write_echoes(tmp_path, [np.round(truth * 1000).astype(np.int16)])
    # a narrow GE range is not detected (too little of a turn) but is accepted when configured
    with pytest.raises(ValueError, match="input.phase_units"):
        LoadEchoes(magnitude_files=magnitude, phase_files=phase).run(cwd=str(tmp_path))
    result = LoadEchoes(magnitude_files=magnitude, phase_files=phase, phase_units="milliradians").run(cwd=str(tmp_path))
    np.testing.assert_allclose(np.asarray(nib.load(result.outputs.phase).dataobj)[..., 0], truth, atol=6e-4)
    assert result.outputs.provenance["PhaseUnitsDetected"] is False
    with pytest.raises(ValueError, match=r"outside integers 0\.\.4095"):
        LoadEchoes(magnitude_files=magnitude, phase_files=phase, phase_units="integer_0_4095").run(cwd=str(tmp_path))


def test_single_echo_sidecar_says_the_offset_is_not_removed(tmp_path):
    from qsmflow.interfaces.recon import LoadEchoes

    magnitude, phase = _write_echoes(tmp_path, [np.random.default_rng(3).uniform(-3, 3, (6, 6, 6)).astype(np.float32)])
    single = LoadEchoes(magnitude_files=magnitude, phase_files=phase).run(cwd=str(tmp_path)).outputs.provenance
    assert single["PhaseOffset"].startswith("not removed")
    magnitude, phase = _write_echoes(tmp_path, [np.random.default_rng(4).uniform(-3, 3, (6, 6, 6)).astype(np.float32)] * 2)
    assert "PhaseOffset" not in LoadEchoes(magnitude_files=magnitude, phase_files=phase).run(cwd=str(tmp_path)).outputs.provenance


def test_unclear_range_stops_a_run_quickly(capsys, tmp_path, bids_root):
    """A scan whose phase only spans 0..pi ends the run at its input check, naming file and setting.

    Only the loader (and the atlas, which reads no scan) may have run: no reconstruction step.
    """
    from conftest import write_gre_scan

    paths = write_gre_scan(bids_root, "01")
    for path in paths:
        if "part-phase" in path.name:
            image = nib.load(str(path))
            nib.save(nib.Nifti1Image((np.asarray(image.dataobj) + np.pi) / 2, image.affine), str(path))
    code = main([str(bids_root), str(tmp_path / "out"), "participant", "--plugin", "Linear", "--progress", "off",
                 "--work-dir", str(tmp_path / "work")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1, code
    ran = {path.parent.name for path in (tmp_path / "work").rglob("result_*.pklz")}
    assert "load_echoes" in ran and ran <= {"load_echoes", "atlas"}, ran
    assert str(paths[1]) in last and "input.phase_units" in last and "ambiguous" in last, last
    assert not list((tmp_path / "out").rglob("*_Chimap.nii.gz"))
