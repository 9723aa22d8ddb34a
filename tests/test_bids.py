import json
import time

import nibabel as nib
import numpy as np
import pytest

from conftest import write_gre_scan
from qsmflow.bids import (
    InputError,
    check_output_dir,
    check_participant_labels,
    collect_scans,
    derivative_path,
    write_dataset_description,
)


def test_sessions_acquisitions_runs_and_single_echo(bids_root):
    write_gre_scan(bids_root, "01", session="a", run=1, echo_times=(0.004, 0.01, 0.016))
    write_gre_scan(bids_root, "01", session="a", run=2, echo_times=(0.004, 0.01, 0.016))
    write_gre_scan(bids_root, "01", session="b", acquisition="hires")
    write_gre_scan(bids_root, "02", echo_times=(0.02,), suffix="T2starw")
    scans, errors = collect_scans(bids_root)
    assert errors == []
    names = [scan.name + "_" + scan.suffix for scan in scans]
    assert names == ["sub-01_ses-a_run-1_MEGRE", "sub-01_ses-a_run-2_MEGRE", "sub-01_ses-b_acq-hires_MEGRE", "sub-02_T2starw"]
    assert scans[0].echo_times == [0.004, 0.01, 0.016]
    assert [p.split("echo-")[1][0] for p in scans[0].phase_files] == ["1", "2", "3"]
    assert scans[3].echo_times == [0.02] and len(scans[3].magnitude_files) == 1
    assert all(scan.field_strength == 3.0 for scan in scans)
    only_two, _ = collect_scans(bids_root, ["sub-02"])
    assert [s.subject for s in only_two] == ["02"]


def test_echoes_sorted_numerically_beyond_nine(bids_root):
    times = tuple(0.002 * (i + 1) for i in range(11))
    write_gre_scan(bids_root, "01", echo_times=times, shape=(4, 4, 4))
    scans, _ = collect_scans(bids_root)
    assert scans[0].echo_times == list(times)


@pytest.mark.parametrize("breakage, message", [
    ("missing_echo_time", "EchoTime is missing"),
    ("text_echo_time", "is not a number"),
    ("missing_phase", "no matching phase image for echo 2"),
    ("shape", "differs from"),
    ("affine", "affine differs"),
    ("four_d", "expected a 3-D image"),
    ("no_field_strength", "MagneticFieldStrength is missing"),
    ("magnitude_only", "magnitude without phase"),
])
def test_broken_scans_are_reported_with_the_file(bids_root, breakage, message):
    import nibabel as nib

    write_gre_scan(bids_root, "02")  # a good subject next to the broken one
    paths = write_gre_scan(bids_root, "01", field_strength=None if breakage == "no_field_strength" else 3.0)
    mag2, phase2 = paths[2], paths[3]
    broken = phase2
    if breakage == "missing_echo_time":
        phase2.with_name(phase2.name.replace(".nii.gz", ".json")).write_text(json.dumps({"MagneticFieldStrength": 3}))
    elif breakage == "text_echo_time":
        phase2.with_name(phase2.name.replace(".nii.gz", ".json")).write_text(json.dumps({"EchoTime": "short", "MagneticFieldStrength": 3}))
    elif breakage == "missing_phase":
        phase2.unlink()
        broken = mag2
    elif breakage == "shape":
        nib.save(nib.Nifti1Image(np.zeros((12, 12, 9), np.float32), np.diag([1, 1, 1.5, 1])), phase2)
    elif breakage == "affine":
        nib.save(nib.Nifti1Image(np.zeros((12, 12, 10), np.float32), np.diag([1, 1, 2.0, 1])), phase2)
    elif breakage == "four_d":
        nib.save(nib.Nifti1Image(np.zeros((12, 12, 10, 2), np.float32), np.diag([1, 1, 1.5, 1])), phase2)
    elif breakage == "no_field_strength":
        broken = paths[1]
    elif breakage == "magnitude_only":
        for path in paths[1::2]:
            path.unlink()
        broken = paths[0]
    scans, errors = collect_scans(bids_root)
    assert [s.subject for s in scans] == ["02"]
    assert len(errors) == 1
    name, reason = errors[0]
    assert name == "sub-01_MEGRE"
    assert message in reason
    stem = broken.name.replace(".nii.gz", "")
    assert stem in reason and "\n" not in reason


def test_dataset_level_errors(tmp_path, bids_root):
    with pytest.raises(InputError, match="dataset_description.json: missing"):
        collect_scans(tmp_path)
    with pytest.raises(InputError, match="no MEGRE or T2starw images"):
        collect_scans(bids_root)
    write_gre_scan(bids_root, "01")
    with pytest.raises(InputError, match="no participant sub-07"):
        collect_scans(bids_root, ["07"])
    for label in ["../01", "01/anat", "sub-0 1", ""]:
        with pytest.raises(InputError, match="not a BIDS label"):
            check_participant_labels([label])


def test_output_directory_rules(tmp_path, bids_root):
    check_output_dir(bids_root, bids_root / "derivatives" / "qsmflow")
    check_output_dir(bids_root, tmp_path / "out")
    for inside in (bids_root, bids_root / "sub-01", bids_root / "out"):
        with pytest.raises(InputError, match="inside the input dataset"):
            check_output_dir(bids_root, inside)


def test_derivative_names_and_description(tmp_path):
    entities = {"subject": "01", "session": "pre", "acquisition": "fast", "run": 2}
    path = derivative_path(tmp_path, entities, "Chimap")
    assert path == tmp_path / "sub-01" / "ses-pre" / "anat" / "sub-01_ses-pre_acq-fast_run-2_Chimap.nii.gz"
    assert derivative_path(tmp_path, {"subject": "01"}, "mask", desc="brain").name == "sub-01_desc-brain_mask.nii.gz"
    description = json.loads(write_dataset_description(tmp_path).read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "qsmflow" and description["GeneratedBy"][0]["Version"]


def test_derivative_path_orders_any_bids_entity_as_the_schema_does(tmp_path):
    xfm = derivative_path(tmp_path, {"subject": "01", "session": "2", "run": "1"}, "xfm", extension=".h5",
                          **{"from": "MNI152NLin2009aSym", "to": "scanner", "mode": "image"})
    assert xfm == tmp_path / "sub-01/ses-2/anat/sub-01_ses-2_run-1_from-MNI152NLin2009aSym_to-scanner_mode-image_xfm.h5"
    chimap = derivative_path(tmp_path, {"sub": "01", "desc": "cosmos", "space": "MNI152NLin2009aSym", "res": "2"}, "Chimap")
    assert chimap.name == "sub-01_space-MNI152NLin2009aSym_res-2_desc-cosmos_Chimap.nii.gz"
    dseg = derivative_path(tmp_path, {"subject": "01", "atlas": "qsmflow", "hemi": "L"}, "dseg", extension=".tsv")
    assert dseg.name == "sub-01_hemi-L_atlas-qsmflow_dseg.tsv"
    # templates as TemplateFlow lays them out: no datatype folder, cohort folders
    band = derivative_path(tmp_path / "atlas", {"tpl": "qsmflowLifespan", "cohort": "2", "res": "2"}, "Chimap")
    assert band == tmp_path / "atlas/tpl-qsmflowLifespan/cohort-2/tpl-qsmflowLifespan_cohort-2_res-2_Chimap.nii.gz"
    assert derivative_path(tmp_path, {"template": "X", "desc": "brain"}, "mask").name == "tpl-X_desc-brain_mask.nii.gz"
    with pytest.raises(ValueError, match="'colour' is not a BIDS entity"):
        derivative_path(tmp_path, {"subject": "01", "colour": "red"}, "Chimap")
    with pytest.raises(ValueError, match="not a BIDS label"):
        derivative_path(tmp_path, {"subject": "01", "desc": "two words"}, "Chimap")
    with pytest.raises(ValueError, match="needs a subject or a template"):
        derivative_path(tmp_path, {"desc": "x"}, "Chimap")


def test_write_derivative_is_atomic_reproducible_and_leaves_unchanged_files(tmp_path):
    from qsmflow.bids import write_derivative

    image = tmp_path / "x.nii"
    nib.save(nib.Nifti1Image(np.arange(24, dtype=np.float32).reshape(2, 3, 4), np.eye(4)), image)
    out = tmp_path / "out"
    first = write_derivative(out, image, {"subject": "01"}, "Chimap", metadata={"Units": "ppm"})
    assert first.name == "sub-01_Chimap.nii.gz" and json.loads(first.with_name("sub-01_Chimap.json").read_text()) == {"Units": "ppm"}
    stamp = first.stat().st_mtime_ns
    data = first.read_bytes()
    time.sleep(0.01)
    nib.save(nib.Nifti1Image(np.arange(24, dtype=np.float32).reshape(2, 3, 4), np.eye(4)), image)  # same content, new file
    assert write_derivative(out, image, {"subject": "01"}, "Chimap", metadata={"Units": "ppm"}).read_bytes() == data
    assert first.stat().st_mtime_ns == stamp  # unchanged: not rewritten
    table = tmp_path / "stats.tsv"
    table.write_text("roi\tmean\nPU\t0.1\n")
    written = write_derivative(out, table, {"subject": "01", "atlas": "qsmflow"}, "roistats", extension=".tsv")
    assert written.read_text() == table.read_text() and not list(out.rglob("*.tmp"))
