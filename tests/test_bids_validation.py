"""The official BIDS validator accepts the demo's raw dataset and the participant level's
derivatives (other levels run it on theirs in their own tests)."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import QUICK_REGISTRATION, bids_validator_errors
from qsmflow import cli, simulate


@pytest.fixture(scope="module")
def participant_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation")
    bids = root / "bids"
    simulate.write_bids_dataset(bids, [{"label": "01", "age": 30, "sessions": {"1": 30, "2": 32}},
                                       {"label": "02", "age": 60, "sessions": {"1": 60}}],
                                shape=(40, 48, 40), voxel_size=(4.0, 4.0, 4.0))
    out = root / "out"
    # 4 mm voxels: the eroded ventricles of the CSF reference vanish, so the brain reference
    code = cli.main([str(bids), str(out), "participant", "--config", "fast", "--work-dir", str(root / "work"),
                     "--progress", "off", "--set", "reference.method=brain", *QUICK_REGISTRATION])
    assert code == 0
    return bids, out


def test_demo_raw_dataset_is_valid_bids(tmp_path):
    bids = tmp_path / "bids"
    simulate.write_bids_dataset(bids, simulate.default_demo_cohort(2), shape=(40, 48, 40), voxel_size=(4.0, 4.0, 4.0))
    shutil.rmtree(bids / "derivatives")  # the raw dataset as the demo hands it to qsmflow
    assert bids_validator_errors(bids) == []


def test_participant_derivatives_are_valid_bids(participant_run):
    bids, out = participant_run
    assert bids_validator_errors(out) == []
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["DatasetLinks"]["raw"] == bids.resolve().as_uri()
    sidecar = json.loads((out / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_Chimap.json").read_text())
    source = sidecar["Sources"][0]
    assert source.startswith("bids:raw:") and (bids / source[len("bids:raw:"):]).is_file()
    for datatype, name in [("fmap", "desc-total_fieldmap"), ("fmap", "desc-local_fieldmap"), ("fmap", "magnitude"),
                           ("anat", "Chimap")]:
        assert (out / "sub-02" / "ses-1" / datatype / f"sub-02_ses-1_{name}.nii.gz").is_file()


def test_the_validator_check_can_fail(participant_run, tmp_path):
    """The check is real: yesterday's names (field maps in anat/ without a magnitude) are errors."""
    _, out = participant_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    session = copy / "sub-02" / "ses-1"
    for name in ("sub-02_ses-1_desc-total_fieldmap.nii.gz", "sub-02_ses-1_desc-total_fieldmap.json"):
        (session / "fmap" / name).rename(session / "anat" / name)
    errors = bids_validator_errors(copy)
    assert any(e.startswith("ALL_FILENAME_RULES_HAVE_ISSUES") or e.startswith("FIELDMAP_WITHOUT_MAGNITUDE_FILE")
               for e in errors), errors
