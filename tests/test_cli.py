"""Bad input at the command line: one-line errors naming the file, non-zero exit, nothing written."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from conftest import RECONSTRUCTION_ONLY, tree_digest, write_gre_scan
from qsmflow.cli import main


def run(capsys, *arguments):
    arguments = [str(a) for a in arguments]
    code = main(arguments + (list(RECONSTRUCTION_ONLY) if "participant" in arguments else []))
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()


def _sidecar(path):
    return path.with_name(path.name.replace(".nii.gz", ".json"))


@pytest.mark.parametrize("breakage, expected", [
    ("missing_echo_time", "sub-01_echo-2_part-phase_MEGRE.json: EchoTime is missing"),
    ("different_shapes", "sub-01_echo-2_part-phase_MEGRE.nii.gz: shape (12, 12, 9) differs"),
    ("missing_phase", "sub-01_echo-2_part-mag_MEGRE.nii.gz: no matching phase image for echo 2"),
])
def test_broken_scan_gives_one_line_error_and_no_output(capsys, tmp_path, bids_root, breakage, expected):
    paths = write_gre_scan(bids_root, "01")
    phase2 = paths[3]
    if breakage == "missing_echo_time":
        _sidecar(phase2).write_text(json.dumps({"MagneticFieldStrength": 3.0}))
    elif breakage == "different_shapes":
        nib.save(nib.Nifti1Image(np.zeros((12, 12, 9), np.float32), np.diag([1, 1, 1.5, 1])), phase2)
    elif breakage == "missing_phase":
        phase2.unlink()
        _sidecar(phase2).unlink()
    digest = tree_digest(bids_root)
    output = tmp_path / "out"
    code, lines = run(capsys, bids_root, output, "participant")
    assert code != 0
    assert lines[-1].startswith("qsmflow: error: ") and expected in lines[-1]
    assert "Traceback" not in "\n".join(lines)
    assert not list(tmp_path.rglob("*_Chimap.nii.gz"))
    assert tree_digest(bids_root) == digest


def test_dataset_level_errors(capsys, tmp_path, bids_root):
    code, lines = run(capsys, bids_root, tmp_path / "out", "participant")
    assert code != 0 and "no MEGRE or T2starw images found" in lines[-1] and str(bids_root) in lines[-1]

    write_gre_scan(bids_root, "01")
    code, lines = run(capsys, bids_root, tmp_path / "out", "participant", "--participant-label", "02")
    assert code != 0 and lines[-1].endswith("no participant sub-02 in this dataset")

    code, lines = run(capsys, bids_root, tmp_path / "out", "participant", "--participant-label", "../01")
    assert code != 0 and "not a BIDS label" in lines[-1]

    code, lines = run(capsys, bids_root, bids_root / "out", "participant")
    assert code != 0 and "inside the input dataset" in lines[-1]
    assert not (bids_root / "out").exists()

    (tmp_path / "plain").mkdir()
    code, lines = run(capsys, tmp_path / "plain", tmp_path / "out", "participant")
    assert code != 0 and "dataset_description.json: missing" in lines[-1]

    code, lines = run(capsys, bids_root, tmp_path / "out", "participant", "--set", "inversion.metod=tv")
    assert code != 0 and "inversion.metod" in lines[-1]
    assert not list(tmp_path.rglob("*_Chimap.nii.gz"))
