"""The atlas level end to end on a tiny simulated cohort: outputs, units, and what a rerun recomputes."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("ants")

SHAPE, VOXEL = (30, 36, 30), (6.0, 6.0, 6.0)


def _labelled_template(root: Path) -> list[str]:
    from qsmflow.segmentation import write_table
    from qsmflow.simulate import phantom_label_atlas

    atlas = phantom_label_atlas(SHAPE, VOXEL)
    folder = root / "labelled"
    folder.mkdir()
    nib.save(nib.Nifti1Image(atlas.template, atlas.affine), str(folder / "template.nii.gz"))
    nib.save(nib.Nifti1Image(atlas.labels, atlas.affine), str(folder / "labels.nii.gz"))
    write_table(folder / "table.tsv", atlas.table)
    return [f"atlas.parcellation.{key}={folder / name}" for key, name in
            (("template", "template.nii.gz"), ("labels", "labels.nii.gz"), ("table", "table.tsv"))]


def _output_times(work: Path) -> dict:
    """Node folder -> newest modification time of the files the node computed (images,
    transforms, tables; not nipype's bookkeeping, which a cache hit may rewrite)."""
    times = {}
    for path in work.rglob("*"):
        if path.is_file() and path.name.endswith((".nii.gz", ".h5", ".tsv", ".png")) and "_report" not in path.parts:
            key = str(path.parent.relative_to(work))
            times[key] = max(times.get(key, 0), path.stat().st_mtime_ns)
    return times


@pytest.mark.slow
def test_atlas_level_outputs_units_and_rerun_of_one_band(tmp_path):
    from qsmflow.cli import main
    from qsmflow.execution import configure_nipype
    from qsmflow.simulate import write_atlas_inputs

    bids, out, work = tmp_path / "bids", tmp_path / "out", tmp_path / "work"
    # The command line configures nipype (content hashing) after the level has built its
    # workflow, so in one process the first run's nodes would hash by timestamp and the
    # second run's by content; configure first, as a fresh process for each run would see it.
    configure_nipype(work, work / "crashes")
    cohort = [("01", 3.0), ("02", 6.0), ("03", 40.0), ("04", 60.0)]
    write_atlas_inputs(bids, out, cohort, shape=SHAPE, voxel_size=VOXEL)
    options = ["--work-dir", str(work), "--nprocs", "2", "--progress", "off",
               "--set", "atlas.bands.edges=[0,12,120]", "--set", "atlas.min_scans=2", "--set", "atlas.iterations=1",
               "--set", "atlas.step_two_iterations=1", "--set", "atlas.resolution_mm=6.0",
               "--set", "atlas.name=Test"]
    for assignment in _labelled_template(tmp_path):
        options += ["--set", assignment]
    for stage in ("rigid", "affine"):
        options += ["--set", f"atlas.registration.stages.{stage}.iterations=[20,10,0]"]
    options += ["--set", "atlas.registration.stages.syn.iterations=[10,5,0]"]
    # the parcellation's registrations (labelled template -> each template) as short: this test
    # checks outputs, units and reruns, not accuracy (tests/benchmarks/atlas.py measures that)
    for stage, iterations in (("rigid", "[20,10,0]"), ("affine", "[20,10,0]"), ("syn", "[10,5,0]")):
        options += ["--set", f"atlas.parcellation.stages.{stage}.iterations={iterations}",
                    "--set", f"atlas.parcellation.stages.{stage}.shrink_factors=[4,2,1]",
                    "--set", f"atlas.parcellation.stages.{stage}.smoothing_sigmas=[2,1,0]"]
    assert main([str(bids), str(out), "atlas", *options]) == 0
    from conftest import bids_validator_errors

    assert bids_validator_errors(out) == []  # the atlas level leaves a valid derivatives dataset

    tpl = out / "atlas" / "tpl-Test"
    description = json.loads((tpl / "template_description.json").read_text())
    assert description["cohort"]["1"]["scans"] == ["sub-01", "sub-02"]
    assert description["cohort"]["2"]["age"] == [12.0, 120.0]
    for band in ("1", "2"):
        stem = tpl / f"cohort-{band}" / f"tpl-Test_cohort-{band}_res-6"
        for suffix in ("_Chimap.nii.gz", "_T2starw.nii.gz", "_desc-hybrid_T2starw.nii.gz", "_desc-brain_mask.nii.gz",
                       "_dseg.nii.gz", "_dseg.tsv", "_desc-atlas_roistats.tsv", "_from-labelled_mode-image_xfm.nii.gz"):
            assert Path(f"{stem}{suffix}").is_file(), f"{stem}{suffix}"
    for name in ("tpl-Test_res-6_Chimap.nii.gz", "tpl-Test_res-6_dseg.nii.gz", "tpl-Test_res-6_from-cohort1_mode-image_xfm.nii.gz",
                 "tpl-Test_res-6_from-sub03_mode-image_xfm.nii.gz", "tpl-Test_desc-labelled_dseg.nii.gz", "index.html",
                 "figures/montage.png"):
        assert (tpl / name).is_file(), name
    # chi is averaged in ppm: the band template keeps the cohort's range (no intensity normalisation)
    chi = np.asarray(nib.load(str(tpl / "cohort-2" / "tpl-Test_cohort-2_res-6_Chimap.nii.gz")).dataobj)
    assert 0.02 < chi.max() < 0.3 and chi.min() > -0.2
    sidecar = json.loads((tpl / "tpl-Test_res-6_Chimap.json").read_text())
    assert sidecar["Units"] == "ppm"

    # one band gets a subject: that band and step two rerun, the other band does not
    before = _output_times(work)
    write_atlas_inputs(bids, out, cohort + [("05", 50.0)], shape=SHAPE, voxel_size=VOXEL)
    assert main([str(bids), str(out), "atlas", *options]) == 0
    after = _output_times(work)
    ran = {name for name, stamp in after.items() if before.get(name) != stamp}
    band_1 = {n for n in ran if "/cohort_1_wf/" in f"/{n}/" and not n.endswith("write_outputs")}
    band_2 = {n for n in ran if "/cohort_2_wf/" in f"/{n}/"}
    step_two = {n for n in ran if "/atlas_template_wf/" in f"/{n}/"}
    assert not band_1, band_1
    assert any(n.endswith("hybrid_sub_05") for n in band_2) and any("register_0_sub_03" in n for n in band_2)
    assert any("update_0" in n for n in step_two)
    assert not any(n.endswith("hybrid_sub_01") for n in ran)
    description = json.loads((tpl / "template_description.json").read_text())
    assert description["cohort"]["2"]["scans"] == ["sub-03", "sub-04", "sub-05"]
