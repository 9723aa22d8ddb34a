"""End-to-end: qsm-forward writes a BIDS dataset, the qsmflow command line reconstructs it.

Ground truth comes from the independent ``qsm-forward`` simulator (3 T, four echoes, phase
offset and shim field, peak SNR 100); an axial and an oblique subject share one dataset.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import RECONSTRUCTION_ONLY, tree_digest
from qsmflow import metrics

pytestmark = pytest.mark.slow

ECHO_TIMES = ["0.004", "0.012", "0.020", "0.028"]
# qsm-forward 0.32 builds its dipole kernel from --B0-dir as given, without normalising it
# (its affine uses the normalised vector), so only a unit vector gives a physical field.
OBLIQUE_B0 = np.array([0.35, 0.2, 1.0]) / np.linalg.norm([0.35, 0.2, 1.0])


def qsmflow(*arguments, cwd=None):
    arguments = [str(a) for a in arguments] + (list(RECONSTRUCTION_ONLY) if "participant" in map(str, arguments) else [])
    return subprocess.run([sys.executable, "-m", "qsmflow.cli", *arguments], capture_output=True, text=True, cwd=cwd)


def simulate_with_qsm_forward(root: Path, subject: str, *extra: str) -> None:
    subprocess.run(
        ["qsm-forward", "simple", str(root), "--subject", subject, "--TEs", *ECHO_TIMES, "--B0", "3",
         "--peak-snr", "100", "--generate-phase-offset", "--generate-shim-field", "--random-seed", "7", *extra],
        check=True, capture_output=True,
    )


@pytest.fixture(scope="module")
def reconstructed(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    bids_dir = root / "bids"
    simulate_with_qsm_forward(bids_dir, "axial")
    simulate_with_qsm_forward(bids_dir, "oblique", "--B0-dir", *(f"{v:.8f}" for v in OBLIQUE_B0))
    digest = tree_digest(bids_dir)
    output_dir, work_dir = root / "derivatives", root / "work"
    first = qsmflow(bids_dir, output_dir, "participant", "--work-dir", work_dir, "--nprocs", "2")
    assert first.returncode == 0, first.stderr
    return {"bids": bids_dir, "out": output_dir, "work": work_dir, "digest": digest, "root": root}


def _load(path):
    return np.asarray(nib.load(str(path)).dataobj)


def _scores(reconstructed, subject):
    truth_dir = reconstructed["bids"] / "derivatives" / "qsm-forward" / f"sub-{subject}" / "anat"
    anat = reconstructed["out"] / f"sub-{subject}" / "anat"
    chi = _load(anat / f"sub-{subject}_Chimap.nii.gz")
    qsm_mask = _load(anat / f"sub-{subject}_desc-qsm_mask.nii.gz") > 0
    brain_mask = _load(anat / f"sub-{subject}_desc-brain_mask.nii.gz") > 0
    truth = _load(truth_dir / f"sub-{subject}_Chimap.nii")
    true_mask = _load(truth_dir / f"sub-{subject}_mask.nii") > 0
    evaluation = qsm_mask & true_mask
    return {
        "nrmse": metrics.nrmse(chi, truth, evaluation),
        "correlation": metrics.correlation(chi, truth, evaluation),
        "brain_coverage": (brain_mask & true_mask).sum() / true_mask.sum(),
        "qsm_coverage": evaluation.sum() / true_mask.sum(),
    }


def test_default_chimap_matches_qsm_forward_truth(reconstructed):
    scores = _scores(reconstructed, "axial")
    print("axial", scores)
    assert scores["nrmse"] <= 40.0
    assert scores["correlation"] >= 0.9
    assert scores["brain_coverage"] >= 0.8
    assert scores["qsm_coverage"] >= 0.8


def test_oblique_acquisition_reconstructs_about_as_well(reconstructed):
    axial, oblique = _scores(reconstructed, "axial"), _scores(reconstructed, "oblique")
    print("oblique", oblique)
    assert oblique["nrmse"] <= 40.0
    assert oblique["nrmse"] <= axial["nrmse"] + 5.0
    sidecar = json.loads((reconstructed["out"] / "sub-oblique" / "anat" / "sub-oblique_Chimap.json").read_text())
    direction = np.asarray(sidecar["DipoleInversion"]["B0Direction"])
    np.testing.assert_allclose(direction, OBLIQUE_B0, atol=1e-4)


def test_outputs_follow_the_derivatives_contract(reconstructed):
    out = reconstructed["out"]
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "qsmflow"
    source = nib.load(str(reconstructed["bids"] / "sub-axial" / "anat" / "sub-axial_echo-1_part-phase_MEGRE.nii"))
    expected_units = {("anat", "Chimap"): "ppm", ("anat", "desc-brain_mask"): "arbitrary",
                      ("anat", "desc-qsm_mask"): "arbitrary", ("fmap", "desc-total_fieldmap"): "Hz",
                      ("fmap", "desc-local_fieldmap"): "ppm", ("fmap", "magnitude"): "arbitrary", ("anat", "R2starmap"): "1/s"}
    for (datatype, suffix), units in expected_units.items():
        image = nib.load(str(out / "sub-axial" / datatype / f"sub-axial_{suffix}.nii.gz"))
        assert image.shape == source.shape
        np.testing.assert_allclose(image.affine, source.affine, atol=1e-5)
        sidecar = json.loads((out / "sub-axial" / datatype / f"sub-axial_{suffix}.json").read_text())
        assert sidecar["Units"] == units
        assert sidecar["MagneticFieldStrength"] == 3.0
        assert sidecar["EchoTime"] == (float(ECHO_TIMES[0]) if suffix == "magnitude" else [float(t) for t in ECHO_TIMES])
    assert nib.load(str(out / "sub-axial" / "anat" / "sub-axial_Chimap.nii.gz")).get_data_dtype() == np.float32
    chimap = json.loads((out / "sub-axial" / "anat" / "sub-axial_Chimap.json").read_text())
    for stage in ("PhaseUnwrapping", "EchoCombination", "BackgroundFieldRemoval", "DipoleInversion"):
        assert chimap[stage]["Function"].startswith("qsmflow.recon.")
        assert isinstance(chimap[stage]["Parameters"], dict)
    assert chimap["PhaseInput"]["PhaseUnits"] == "radians"
    r2star = _load(out / "sub-axial" / "anat" / "sub-axial_R2starmap.nii.gz")
    true_mask = _load(reconstructed["bids"] / "derivatives" / "qsm-forward" / "sub-axial" / "anat" / "sub-axial_mask.nii") > 0
    assert abs(np.median(r2star[true_mask]) - 50.0) < 5.0  # qsm-forward's default R2* is 50/s


def test_input_dataset_is_untouched(reconstructed):
    assert tree_digest(reconstructed["bids"]) == reconstructed["digest"]


def test_second_run_reuses_every_node(reconstructed):
    work = reconstructed["work"]
    results = {p: p.stat().st_mtime_ns for p in work.rglob("result_*.pklz") if "write_derivatives" not in str(p)}
    assert len(results) >= 14  # 7 computing nodes per scan, two scans
    chimaps = {p: p.stat().st_mtime_ns for p in reconstructed["out"].rglob("*_Chimap.nii.gz")}
    again = qsmflow(reconstructed["bids"], reconstructed["out"], "participant", "--work-dir", work, "--nprocs", "2")
    assert again.returncode == 0, again.stderr
    assert {p: p.stat().st_mtime_ns for p in results} == results
    assert {p: p.stat().st_mtime_ns for p in chimaps} == chimaps
    # a deleted output comes back without recomputing anything
    victim = reconstructed["out"] / "sub-axial" / "anat" / "sub-axial_Chimap.nii.gz"
    content = victim.read_bytes()
    victim.unlink()
    third = qsmflow(reconstructed["bids"], reconstructed["out"], "participant", "--work-dir", work, "--participant-label", "axial")
    assert third.returncode == 0, third.stderr
    assert victim.read_bytes() == content
    assert {p: p.stat().st_mtime_ns for p in results} == results


def test_changed_configuration_recomputes_only_downstream(reconstructed):
    work = reconstructed["work"]
    before = {p.parent.name: p.stat().st_mtime_ns for p in work.rglob("result_*.pklz") if "sub_axial_MEGRE_wf" in str(p)}
    run = qsmflow(reconstructed["bids"], reconstructed["root"] / "derivatives-tikhonov", "participant", "--work-dir", work,
                  "--participant-label", "axial", "--set", "inversion.method=tikhonov")
    assert run.returncode == 0, run.stderr
    after = {p.parent.name: p.stat().st_mtime_ns for p in work.rglob("result_*.pklz") if "sub_axial_MEGRE_wf" in str(p)}
    for upstream in ("load_echoes", "brain_mask", "unwrap_phase", "fit_field", "remove_background"):
        assert after[upstream] == before[upstream], upstream
    assert after["invert_dipole"] != before["invert_dipole"]
