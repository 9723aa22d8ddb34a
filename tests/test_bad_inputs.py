"""Bad-input corpus at the command line.

Every case starts from one small simulated dataset (a subject to break, sub-01, next to a good
one, sub-02), breaks it in one way and runs ``qsmflow BIDS OUT participant``. Each must end
with a one-line message naming the file and the problem as the last line of standard error,
a non-zero exit code, no traceback (unless ``--debug``), no output for the broken scan and the
input dataset byte-identical afterwards. Scanner-integer phase is the exception: it must succeed,
with the rescaling stated in the Chimap sidecar.
"""
from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import RECONSTRUCTION_ONLY, tree_digest
from qsmflow import simulate
from qsmflow.cli import main

SHAPE, VOXEL = (48, 56, 48), (3.5, 3.5, 3.5)


@pytest.fixture(scope="module")
def clean_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean") / "bids"
    simulate.write_bids_dataset(root, [("01", 30.0), ("02", 60.0)], shape=SHAPE, voxel_size=VOXEL)
    shutil.rmtree(root / "derivatives")
    return root


@pytest.fixture
def dataset(clean_dataset, tmp_path):
    root = tmp_path / "bids"
    shutil.copytree(clean_dataset, root)
    return root


def anat(root, subject="01"):
    return root / f"sub-{subject}" / "anat"


def image_path(root, echo, part, subject="01"):
    return anat(root, subject) / f"sub-{subject}_echo-{echo}_part-{part}_MEGRE.nii.gz"


def sidecar(path: Path) -> Path:
    return path.with_name(path.name.replace(".nii.gz", ".json"))


def rewrite(path: Path, data, affine=None, dtype=np.float32):
    old = nib.load(str(path))
    image = nib.Nifti1Image(np.asarray(data, dtype=dtype), old.affine if affine is None else affine)
    nib.save(image, str(path))


def run_cli(capfd, *arguments):
    arguments = [str(a) for a in arguments]
    code = main(arguments + (list(RECONSTRUCTION_ONLY) if "participant" in arguments else []))
    captured = capfd.readouterr()
    return code, captured.out, captured.err


# --------------------------------------------------------------------------------------------
# One function per breakage: returns (the file the message must name, a phrase of the problem).
def missing_echo_time(root):
    path = sidecar(image_path(root, 2, "phase"))
    content = json.loads(path.read_text())
    del content["EchoTime"]
    path.write_text(json.dumps(content))
    return path, "EchoTime is missing"


def text_echo_time(root):
    path = sidecar(image_path(root, 3, "phase"))
    content = json.loads(path.read_text())
    content["EchoTime"] = "twelve ms"
    path.write_text(json.dumps(content))
    return path, "is not a number"


def different_shapes(root):
    path = image_path(root, 2, "phase")
    rewrite(path, np.zeros((48, 56, 40)))
    return path, "shape (48, 56, 40) differs"


def different_affines(root):
    path = image_path(root, 3, "mag")
    old = nib.load(str(path))
    affine = old.affine.copy()
    affine[:3, 3] += 7.0
    rewrite(path, np.asarray(old.dataobj), affine)
    return path, "affine differs"


def magnitude_without_phase(root):
    for path in sorted(anat(root).glob("*part-phase*")):
        path.unlink()
    return image_path(root, 1, "mag"), "magnitude without phase"


def missing_one_phase(root):
    path = image_path(root, 4, "phase")
    path.unlink()
    sidecar(path).unlink()
    return image_path(root, 4, "mag"), "no matching phase image for echo 4"


def nan_voxels(root):
    path = image_path(root, 2, "phase")
    data = np.asarray(nib.load(str(path)).dataobj).copy()
    data[20:22, 20:22, 20] = np.nan
    rewrite(path, data)
    return path, "4 voxels are NaN or infinite"


def inf_voxels(root):
    path = image_path(root, 1, "mag")
    data = np.asarray(nib.load(str(path)).dataobj).copy()
    data[5, 5, 5] = np.inf
    rewrite(path, data)
    return path, "1 voxels are NaN or infinite"


def two_dimensional(root):
    path = image_path(root, 2, "mag")
    rewrite(path, np.ones((48, 56)), np.eye(4))
    return path, "expected a 3-D image, found shape (48, 56)"


def four_dimensional(root):
    path = image_path(root, 1, "phase")
    data = np.asarray(nib.load(str(path)).dataobj)
    rewrite(path, np.stack([data, data], axis=-1))
    return path, "expected a 3-D image, found shape (48, 56, 48, 2)"


def truncated_gzip(root):
    path = image_path(root, 3, "mag")
    content = path.read_bytes()
    assert len(gzip.decompress(content)) > 100_000
    path.write_bytes(content[: len(content) // 2])  # the header (first bytes) still reads
    nib.load(str(path))
    return path, "cannot read image data"


def empty_file(root):
    path = image_path(root, 2, "mag")
    path.write_bytes(b"")
    return path, "cannot read NIfTI header"


def phase_in_degrees(root):
    for echo in range(1, 5):
        path = image_path(root, echo, "phase")
        data = np.asarray(nib.load(str(path)).dataobj)
        rewrite(path, np.degrees(data) + 0.5)
    return image_path(root, 1, "phase"), "neither radians"


def mixed_phase_units(root):
    path = image_path(root, 2, "phase")
    phase = np.asarray(nib.load(str(path)).dataobj)
    rewrite(path, np.round((phase + np.pi) / (2 * np.pi) * 4095), dtype=np.int16)
    return path, "phase in integer units, but"


SCAN_BREAKAGES = [missing_echo_time, text_echo_time, different_shapes, different_affines, magnitude_without_phase,
                  missing_one_phase, nan_voxels, inf_voxels, two_dimensional, four_dimensional, truncated_gzip,
                  empty_file, phase_in_degrees, mixed_phase_units]


@pytest.mark.parametrize("breakage", SCAN_BREAKAGES, ids=lambda f: f.__name__)
def test_broken_scan_next_to_a_good_one(capfd, dataset, tmp_path, breakage):
    named_file, problem = breakage(dataset)
    digest = tree_digest(dataset)
    output = tmp_path / "out"
    code, out, err = run_cli(capfd, dataset, output, "participant", "--work-dir", tmp_path / "work", "--plugin", "Linear")
    lines = err.strip().splitlines()
    assert code == 1, err
    last = lines[-1]
    assert last.startswith("qsmflow: error: "), last
    assert str(named_file) in last and problem in last, last
    assert "Traceback" not in err + out
    assert not (output / "sub-01").exists(), sorted((output / "sub-01").rglob("*"))
    assert (output / "sub-02" / "anat" / "sub-02_Chimap.nii.gz").is_file()  # the good subject finished
    assert not list(output.rglob("*.tmp"))
    assert tree_digest(dataset) == digest


def test_scanner_integer_phase_is_rescaled_and_reported(capfd, dataset, tmp_path):
    radians_output = tmp_path / "radians"
    code, _, err = run_cli(capfd, dataset, radians_output, "participant", "--participant-label", "01",
                           "--work-dir", tmp_path / "work1", "--plugin", "Linear")
    assert code == 0, err
    for echo in range(1, 5):
        path = image_path(dataset, echo, "phase")
        phase = np.asarray(nib.load(str(path)).dataobj)
        integers = np.clip(np.round((phase + np.pi) / (2 * np.pi) * 8192) - 4096, -4096, 4095)
        rewrite(path, integers, dtype=np.int16)
    digest = tree_digest(dataset)
    output = tmp_path / "integers"
    code, _, err = run_cli(capfd, dataset, output, "participant", "--participant-label", "01",
                           "--work-dir", tmp_path / "work2", "--plugin", "Linear")
    assert code == 0, err
    chimap = output / "sub-01" / "anat" / "sub-01_Chimap.nii.gz"
    phase_input = json.loads(sidecar(chimap).read_text())["PhaseInput"]
    assert phase_input["PhaseUnits"] == "integer_4096" and phase_input["PhaseUnitsDetected"] is True
    assert phase_input["PhaseRange"] == [-4096.0, 4095.0]
    assert phase_input["PhaseRescaling"] == "radians = value * 2 pi / 8192, wrapped to [-pi, pi]"
    radians_sidecar = json.loads(sidecar(radians_output / "sub-01" / "anat" / "sub-01_Chimap.nii.gz").read_text())
    assert radians_sidecar["PhaseInput"]["PhaseUnits"] == "radians"
    chi_integer = np.asarray(nib.load(str(chimap)).dataobj)
    chi_radians = np.asarray(nib.load(str(radians_output / "sub-01" / "anat" / "sub-01_Chimap.nii.gz")).dataobj)
    inside = (chi_integer != 0) & (chi_radians != 0)
    assert inside.sum() > 1000
    assert np.corrcoef(chi_integer[inside], chi_radians[inside])[0, 1] > 0.99
    assert tree_digest(dataset) == digest


# --------------------------------------------------------------------------------------------
# Problems of the dataset or the command line, found before anything runs.
def _no_description(root, tmp_path):
    (root / "dataset_description.json").unlink()
    return [root, tmp_path / "out", "participant"], str(root / "dataset_description.json"), "missing"


def _output_inside_input(root, tmp_path):
    return [root, root / "sub-02" / "qsm", "participant"], str(root / "sub-02" / "qsm"), "inside the input dataset"


def _path_in_label(root, tmp_path):
    return [root, tmp_path / "out", "participant", "--participant-label", "../sub-01"], "'../sub-01'", "not a BIDS label"


def _unknown_label(root, tmp_path):
    return [root, tmp_path / "out", "participant", "--participant-label", "07"], str(root), "no participant sub-07"


def _output_under_a_file(root, tmp_path):
    blocker = tmp_path / "results.txt"
    blocker.write_text("not a directory")
    return [root, blocker / "qsm", "participant"], str(blocker), "is a file, not a directory"


def _work_dir_under_a_file(root, tmp_path):
    blocker = tmp_path / "work.txt"
    blocker.write_text("not a directory")
    return ([root, tmp_path / "out", "participant", "--work-dir", blocker / "cache"], str(blocker),
            "is a file, not a directory")


@pytest.mark.parametrize("problem", [_no_description, _output_inside_input, _path_in_label, _unknown_label,
                                     _output_under_a_file, _work_dir_under_a_file], ids=lambda f: f.__name__[1:])
def test_dataset_and_command_line_problems(capfd, dataset, tmp_path, problem):
    arguments, named, phrase = problem(dataset, tmp_path)
    digest = tree_digest(dataset)
    before = sorted(tmp_path.rglob("*"))  # every file and folder, the dataset's included
    code, out, err = run_cli(capfd, *arguments)
    last = err.strip().splitlines()[-1]
    assert code != 0
    assert last.startswith("qsmflow: error: ") and named in last and phrase in last, last
    assert "Traceback" not in err + out
    assert not list(tmp_path.rglob("*_Chimap.nii.gz"))
    assert sorted(tmp_path.rglob("*")) == before  # no output, work or log folder was created
    assert tree_digest(dataset) == digest


def _chattr(flag, path) -> bool:
    try:
        return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


def test_unwritable_output_directory(capfd, dataset, tmp_path):
    """root ignores permission bits, so make the directory immutable (chattr +i), which binds root too."""
    locked = tmp_path / "locked"
    locked.mkdir()
    if not _chattr("+i", locked):
        pytest.skip("chattr +i is not possible here (needs CAP_LINUX_IMMUTABLE on ext2/3/4, xfs or btrfs)")
    try:
        probe = locked / "probe"
        with pytest.raises(PermissionError):
            probe.mkdir()  # the lock really binds this process
        digest = tree_digest(dataset)
        for output in (locked, locked / "derivatives"):
            code, out, err = run_cli(capfd, dataset, output, "participant", "--work-dir", tmp_path / "work")
            last = err.strip().splitlines()[-1]
            assert code != 0
            assert last.startswith("qsmflow: error: ") and str(output) in last and "not writable" in last, last
            assert "Traceback" not in err + out
        assert list(locked.iterdir()) == []
        assert tree_digest(dataset) == digest
    finally:
        _chattr("-i", locked)


def test_debug_shows_the_traceback(dataset, tmp_path):
    import sys

    missing_echo_time(dataset)
    shutil.rmtree(dataset / "sub-02")
    arguments = [sys.executable, "-m", "qsmflow.cli", str(dataset), str(tmp_path / "out"), "participant"]
    quiet = subprocess.run(arguments, capture_output=True, text=True)
    verbose = subprocess.run(arguments + ["--debug"], capture_output=True, text=True)
    assert quiet.returncode == verbose.returncode == 1
    assert "Traceback" not in quiet.stderr and "EchoTime is missing" in quiet.stderr.splitlines()[-1]
    assert "Traceback (most recent call last)" in verbose.stderr and "EchoTime is missing" in verbose.stderr


def test_integer_phase_echoes_share_one_range(tmp_path):
    """An echo whose integers happen to span less than the scanner's range is scaled like the others."""
    from qsmflow.interfaces.recon import LoadEchoes

    rng = np.random.default_rng(3)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    magnitude, phase = [], []
    for echo, span in ((1, 900), (2, 4096)):
        values = rng.integers(-span, span, size=(8, 8, 8)).astype(np.int16)
        for part, data in (("mag", np.ones((8, 8, 8), np.float32)), ("phase", values)):
            path = tmp_path / f"echo-{echo}_part-{part}.nii.gz"
            nib.save(nib.Nifti1Image(data, affine), str(path))
            (magnitude if part == "mag" else phase).append(str(path))
    result = LoadEchoes(magnitude_files=magnitude, phase_files=phase).run(cwd=str(tmp_path))
    radians = np.asarray(nib.load(result.outputs.phase).dataobj)
    for echo in range(2):
        integers = np.asarray(nib.load(phase[echo]).dataobj).astype(np.float64)
        np.testing.assert_allclose(radians[..., echo], (integers + 4096) / 8192 * 2 * np.pi - np.pi, atol=1e-5)
    assert result.outputs.provenance["PhaseUnits"] == "integer_4096"
