"""End to end: a tilted head in three runs → qsmflow participant with cosmos.enabled → rec-cosmos
Chimap; recovered rotations against the simulator's; a fourth orientation reruns only its own
registration and the COSMOS solve (nipype cache)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qsmflow import simulate
from qsmflow.recon.cosmos import rotation_matrix


def _run(bids, out, work):
    # a new process per run, as users run it (a second qsmflow.cli.main in one process reruns every node)
    return subprocess.run([sys.executable, "-m", "qsmflow.cli", str(bids), str(out), "participant", "--work-dir",
                           str(work), "--nprocs", "2", "--set", "cosmos.enabled=true",
                           # no atlas registration (minutes per scan): the reference orientation's brain
                           # mask serves the susceptibility reference of every map, COSMOS's included
                           "--set", "segmentation.enabled=false", "--set", "reference.method=brain",
                           "--set", "report.enabled=false"]).returncode


def _nodes_run_since(work: Path, start: float) -> set[str]:
    """Node directories (relative to the subject workflow) whose result was written after ``start``."""
    return {"/".join(p.parent.relative_to(work).parts[2:]) for p in work.rglob("result_*.pklz")
            if p.stat().st_mtime >= start}


@pytest.mark.slow
def test_tilted_head_three_then_four_orientations(tmp_path):
    bids, out, work = tmp_path / "bids", tmp_path / "out", tmp_path / "work"
    simulate.write_multi_orientation_dataset(bids, shape=(48, 48, 48), voxel_size=(4.0, 4.0, 4.0),
                                             head_rotations=simulate.DEFAULT_HEAD_ROTATIONS[:4])
    held = tmp_path / "held"
    held.mkdir()
    for path in (bids / "sub-01" / "anat").glob("sub-01_run-4_*"):
        shutil.move(str(path), held / path.name)
    assert _run(bids, out, work) == 0
    chimap = out / "sub-01" / "anat" / "sub-01_rec-cosmos_Chimap.nii.gz"
    sidecar = json.loads(chimap.with_name("sub-01_rec-cosmos_Chimap.json").read_text())
    truth_dir = bids / "derivatives" / "simulation" / "sub-01" / "anat"
    for index, orientation in enumerate(sidecar["Orientations"]):
        truth = json.loads((truth_dir / f"sub-01_run-{index + 1}_Chimap.json").read_text())
        assert orientation["Source"].endswith(f"run-{index + 1}_echo-1_part-mag_MEGRE.nii.gz")
        np.testing.assert_allclose(orientation["RotationDegrees"], truth["HeadRotationDegrees"], atol=0.5)
        expected = rotation_matrix(truth["HeadRotationDegrees"]).T @ [0.0, 0.0, 1.0]
        np.testing.assert_allclose(orientation["B0Direction"], expected, atol=0.01)
    image = nib.load(str(chimap))
    reference = nib.load(str(next((bids / "sub-01" / "anat").glob("sub-01_run-1_echo-1_part-mag_MEGRE.nii.gz"))))
    np.testing.assert_allclose(image.affine, reference.affine, atol=1e-4)
    assert (out / "sub-01" / "anat" / "sub-01_run-2_Chimap.nii.gz").is_file()

    for path in held.iterdir():
        shutil.move(str(path), bids / "sub-01" / "anat" / path.name)
    start = time.time()
    time.sleep(1.1)
    assert _run(bids, out, work) == 0
    ran = _nodes_run_since(work, start)
    cosmos_wf = "sub_01_run_1_MEGRE_cosmos_wf/"
    # the unchanged orientations: nothing but their always-run writers (and trivial joins)
    for run in (1, 2, 3):
        rerun = {n for n in ran if n.startswith(f"sub_01_run_{run}_MEGRE_wf/")}
        assert {n.split("/")[-1] for n in rerun} <= {"write_derivatives", "collect_provenance"}, rerun
    assert cosmos_wf + "align_sub_01_run_2_MEGRE" not in ran and cosmos_wf + "align_sub_01_run_3_MEGRE" not in ran
    computing = {n for n in ran if n.startswith(cosmos_wf)} - {cosmos_wf + n for n in (
        "merge_fields", "merge_masks", "merge_directions", "merge_rotations", "merge_registrations",
        "cosmos_metadata", "collect_outputs", "write_derivatives", "select_chimap", "reference_chi")}
    assert computing == {cosmos_wf + "align_sub_01_run_4_MEGRE", cosmos_wf + "solve_cosmos"}, computing
    sidecar = json.loads(chimap.with_name("sub-01_rec-cosmos_Chimap.json").read_text())
    assert len(sidecar["Orientations"]) == 4
    assert "brain" in json.dumps(sidecar["SusceptibilityReference"])
