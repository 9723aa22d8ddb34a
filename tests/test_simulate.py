"""Tests of the brain phantom, the multi-echo simulation and the BIDS writer."""
from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from qsmflow import simulate
from qsmflow.recon.dipole import b0_direction_from_affine, ppm_to_hz, voxel_sizes_from_affine

TEST_SHAPE = (60, 72, 60)
TEST_VOXEL = (3.0, 3.0, 3.0)
HZ_PER_PPM_3T = float(ppm_to_hz(1.0, 3.0))


@pytest.fixture(scope="module")
def phantom():
    return simulate.brain_phantom(TEST_SHAPE, TEST_VOXEL, age_years=45.0, seed=3)


@pytest.fixture(scope="module")
def fields(phantom):
    return simulate.simulate_field(phantom)


@pytest.fixture(scope="module")
def default_grid():
    demo_phantom = simulate.brain_phantom(age_years=60.0, seed=11)
    return demo_phantom, simulate.simulate_field(demo_phantom)


def read_tsv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


# --- phantom ------------------------------------------------------------------------------


def test_phantom_arrays_have_documented_types(phantom):
    assert phantom.chi.dtype == np.float32 and phantom.chi.shape == TEST_SHAPE
    assert phantom.brain_mask.dtype == bool and phantom.head_mask.dtype == bool
    assert phantom.labels.dtype == np.int16
    assert phantom.m0.dtype == np.float32 and phantom.r2star.dtype == np.float32
    assert phantom.label_names == {r.index: r.abbreviation for r in simulate.ROI_LABELS}
    # The head sits inside the grid with air all around except below (the neck is cut).
    head = phantom.head_mask
    assert not head[0].any() and not head[-1].any() and not head[:, 0].any() and not head[:, -1].any()
    assert not head[:, :, -1].any() and head[:, :, 0].any()
    assert (phantom.brain_mask & ~head).sum() == 0
    assert 0.9 < phantom.anatomy_scale <= 1.0


def test_every_roi_is_present_inside_the_brain_and_symmetric(phantom):
    centre_x = (TEST_SHAPE[0] - 1) / 2
    for roi in simulate.ROI_LABELS:
        where = phantom.labels == roi.index
        assert where.sum() >= 10, roi.abbreviation
        assert phantom.brain_mask[where].all(), roi.abbreviation
        # One susceptibility per ROI, the value recorded in roi_chi.
        np.testing.assert_allclose(phantom.chi[where], phantom.roi_chi[roi.abbreviation], atol=1e-6)
        if roi.abbreviation != "SCC":  # bilateral: both hemispheres, similar sizes when large
            left = where[: int(np.ceil(centre_x))].sum()
            right = where[int(np.ceil(centre_x)):].sum()
            assert left > 0 and right > 0, roi.abbreviation
            if where.sum() > 40:
                assert 0.6 < left / right < 1.6, (roi.abbreviation, left, right)
    assert set(np.unique(phantom.labels)) == {0} | {r.index for r in simulate.ROI_LABELS}


def test_tissue_contrasts_follow_the_anatomy(phantom):
    t = {tissue.name: phantom.tissues == tissue.index for tissue in simulate.TISSUES}
    chi, m0 = phantom.chi, phantom.m0
    assert np.all(chi[t["csf"]] == 0.0)
    assert np.all(chi[t["white_matter"]] < -0.015) and np.all(np.abs(chi[t["cortex"]]) < 0.02)
    assert np.all(chi[t["air"]] == phantom.air_chi) and np.all(chi[t["sinus_air"]] == phantom.air_chi)
    assert t["sinus_air"].sum() > 50 and not (t["sinus_air"] & phantom.brain_mask).any()
    # Bright scalp, dark skull, brain in between (the magnitude alone cannot separate them).
    assert m0[t["scalp"]].mean() > m0[t["white_matter"]].mean() > 5 * m0[t["bone"]].mean()
    # R2* grows with iron.
    gp = phantom.labels == 2
    th = phantom.labels == 4
    assert phantom.r2star[gp].mean() > phantom.r2star[th].mean() + 15


def test_seed_makes_subjects_differ_and_is_reproducible():
    a = simulate.brain_phantom(TEST_SHAPE, TEST_VOXEL, seed=1)
    b = simulate.brain_phantom(TEST_SHAPE, TEST_VOXEL, seed=1)
    c = simulate.brain_phantom(TEST_SHAPE, TEST_VOXEL, seed=2)
    np.testing.assert_array_equal(a.chi, b.chi)
    assert a.roi_chi == b.roi_chi
    assert np.mean(a.brain_mask != c.brain_mask) > 0.005
    assert a.roi_chi != c.roi_chi


def test_a_shared_sulcal_seed_gives_every_subject_the_same_sulci_in_the_anatomical_frame():
    csf = simulate._TISSUE["csf"].index

    def pair(**kwargs):
        return [simulate.brain_phantom(TEST_SHAPE, TEST_VOXEL, seed=seed, anatomical_variation=False, **kwargs)
                for seed in (1, 2)]

    def csf_dice(a, b):
        x, y = a.tissues == csf, b.tissues == csf
        return 2 * (x & y).sum() / (x.sum() + y.sum())

    own, shared = pair(), pair(sulcal_seed=7)
    assert csf_dice(*own) < 0.95
    np.testing.assert_array_equal(shared[0].tissues, shared[1].tissues)
    assert shared[0].roi_chi != shared[1].roi_chi  # the subjects' other draws are still their own
    fractions = [(p.tissues == csf)[p.brain_mask].mean() for p in (own[0], shared[0])]
    assert fractions[1] == pytest.approx(fractions[0], rel=0.25)
    # a head of another size and position samples the same field at the same anatomical points
    axis = np.arange(-60.0, 60.0, 1.0, dtype=np.float32)
    fine = simulate._anatomical_folding(7, axis[:, None, None], axis[None, :, None], axis[None, None, :])
    coarse = simulate._anatomical_folding(7, axis[::3, None, None], axis[None, ::3, None], axis[None, None, ::3])
    np.testing.assert_allclose(coarse, fine[::3, ::3, ::3], atol=1e-5)
    assert 0.7 < fine.std() < 1.3


def test_small_grids_shrink_the_head_and_tiny_ones_are_refused():
    small = simulate.brain_phantom((48, 56, 48), (2.0, 2.0, 2.0))
    assert small.anatomy_scale < 0.6
    assert all((small.labels == r.index).any() for r in simulate.ROI_LABELS)
    with pytest.raises(ValueError, match="too small"):
        simulate.brain_phantom((16, 16, 16), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError):
        simulate.brain_phantom(age_years=-1)


# --- trajectories -------------------------------------------------------------------------


def test_deep_grey_follows_the_exponential_trajectory():
    kwargs = dict(shape=TEST_SHAPE, voxel_size=TEST_VOXEL, seed=4, deep_grey_sd=0.0, white_matter_sd=0.0)
    young = simulate.brain_phantom(age_years=10.0, **kwargs)
    old = simulate.brain_phantom(age_years=80.0, **kwargs)
    for roi in simulate.ROI_LABELS:
        params = simulate.TRUE_TRAJECTORIES[roi.abbreviation]
        for phantom, age in ((young, 10.0), (old, 80.0)):
            measured = phantom.chi[phantom.labels == roi.index].mean()
            if roi.kind == "deep_grey":
                expected = params["a"] * (1 - np.exp(-params["b"] * age)) + params["c"]
            else:
                expected = params["A"] * age * np.exp(-age / params["B"]) + params["C"]
            assert measured == pytest.approx(expected, abs=1e-6), (roi.abbreviation, age)
        if roi.kind == "deep_grey":
            assert old.roi_chi[roi.abbreviation] > young.roi_chi[roi.abbreviation] + 0.02
    assert old.roi_chi["GP"] == pytest.approx(0.19, abs=0.01)


def test_white_matter_trajectories_are_negative_with_minimum_at_B():
    ages = np.linspace(0.0, 100.0, 10001)
    for roi in (r for r in simulate.ROI_LABELS if r.kind == "white_matter"):
        curve = simulate.true_susceptibility(roi.abbreviation, ages)
        assert np.all(curve < 0)
        assert ages[np.argmin(curve)] == pytest.approx(simulate.TRUE_TRAJECTORIES[roi.abbreviation]["B"], abs=0.05)
    assert simulate.TRUE_TRAJECTORIES.keys() == {r.abbreviation for r in simulate.ROI_LABELS}
    with pytest.raises(ValueError):
        simulate.true_susceptibility("XX", 30)


def test_subject_variation_is_centred_on_the_trajectory():
    deviations = [
        simulate.brain_phantom((48, 56, 48), (4.0, 4.0, 4.0), age_years=50.0, seed=s).roi_chi["GP"]
        - simulate.true_susceptibility("GP", 50.0)
        for s in range(12)
    ]
    assert abs(np.mean(deviations)) < 0.01
    assert 0.003 < np.std(deviations) < 0.02


# --- field and signal ---------------------------------------------------------------------


def test_simulated_phase_difference_recovers_the_field(phantom, fields):
    echo_times = (0.004, 0.012, 0.020, 0.028)
    magnitude, phase = simulate.simulate_multi_echo(
        phantom, echo_times=echo_times, snr=200.0, seed=5, field_ppm=fields.total)
    assert magnitude.shape == TEST_SHAPE + (4,) and magnitude.dtype == np.float32
    assert phase.dtype == np.float32 and phase.min() >= -np.pi and phase.max() < np.pi
    z1 = magnitude[..., 0] * np.exp(1j * phase[..., 0])
    z2 = magnitude[..., 1] * np.exp(1j * phase[..., 1])
    delta_te = echo_times[1] - echo_times[0]
    measured_hz = np.angle(z2 * np.conj(z1)) / (2 * np.pi * delta_te)
    true_hz = fields.total * HZ_PER_PPM_3T
    # Only where the difference cannot wrap (|f| well below 1 / (2 ΔTE) = 62.5 Hz).
    usable = phantom.brain_mask & (np.abs(true_hz) < 40.0)
    assert usable.mean() > 0.9 * phantom.brain_mask.mean()
    error = measured_hz[usable] - true_hz[usable]
    assert np.median(np.abs(error)) < 0.5
    assert np.corrcoef(measured_hz[usable], true_hz[usable])[0, 1] > 0.995
    # Without the offset, the first echo's phase is 2π f TE1 itself.
    _, phase_no_offset = simulate.simulate_multi_echo(
        phantom, echo_times=echo_times, snr=np.inf, phase_offset=False, field_ppm=fields.total)
    expected = simulate.wrap_phase(2 * np.pi * true_hz * echo_times[0])
    difference = np.angle(np.exp(1j * (phase_no_offset[..., 0] - expected)))
    assert np.abs(difference[phantom.brain_mask]).max() < 1e-3


def test_magnitude_decays_with_r2star_and_noise_matches_snr(phantom, fields):
    echo_times = (0.005, 0.025)
    magnitude, _ = simulate.simulate_multi_echo(
        phantom, echo_times=echo_times, snr=50.0, seed=1, field_ppm=fields.total)
    brain = phantom.brain_mask & (phantom.m0 > 0.5)
    r2star = np.log(magnitude[..., 0] / magnitude[..., 1]) / (echo_times[1] - echo_times[0])
    assert np.median(np.abs(r2star[brain] - phantom.r2star[brain])) < 3.0
    sigma = phantom.m0[phantom.brain_mask].mean() / 50.0
    air = phantom.tissues == 0
    rayleigh_mean = sigma * np.sqrt(np.pi / 2)
    assert magnitude[air, 0].mean() == pytest.approx(rayleigh_mean, rel=0.05)


def test_background_field_is_large_compared_with_local_field(phantom, fields):
    brain = phantom.brain_mask
    ratio = fields.background[brain].std() / fields.local[brain].std()
    assert ratio > 4.0
    np.testing.assert_allclose(fields.total, fields.local + fields.background, atol=1e-6)
    # The sinus and skull make it: without them the background nearly vanishes.
    no_sources = simulate.brain_phantom(TEST_SHAPE, TEST_VOXEL, age_years=45.0, seed=3, air_chi=0.0, bone_chi=0.0)
    quiet = simulate.simulate_field(no_sources)
    assert quiet.background[brain].std() < 0.2 * fields.background[brain].std()
    # Near the sinus the background differs from the brain's typical value by several Hz.
    sinus = phantom.tissues == 4
    sinus_centre = np.argwhere(sinus).mean(axis=0)
    brain_points = np.argwhere(brain)
    distance = np.linalg.norm((brain_points - sinus_centre) * TEST_VOXEL, axis=1)
    near = tuple(brain_points[distance < np.percentile(distance, 1)].T)
    offset_hz = (np.median(fields.background[near]) - np.median(fields.background[brain])) * HZ_PER_PPM_3T
    assert abs(offset_hz) > 5.0


def test_default_grid_phase_is_unwrappable_in_the_brain(default_grid):
    demo_phantom, demo_fields = default_grid
    assert demo_phantom.shape == simulate.DEFAULT_SHAPE and demo_phantom.anatomy_scale > 0.9
    brain = demo_phantom.brain_mask
    radians_per_ppm = 2 * np.pi * 0.028 * HZ_PER_PPM_3T
    steps = []
    for axis in range(3):
        both = np.logical_and(np.take(brain, range(brain.shape[axis] - 1), axis=axis),
                              np.take(brain, range(1, brain.shape[axis]), axis=axis))
        steps.append(np.abs(np.diff(demo_fields.total, axis=axis))[both] * radians_per_ppm)
    steps = np.concatenate(steps)
    assert steps.max() < np.pi
    assert np.percentile(steps, 99.9) < np.pi / 2
    ratio = demo_fields.background[brain].std() / demo_fields.local[brain].std()
    assert ratio > 4.0


def test_oblique_affine_round_trip():
    rng = np.random.default_rng(0)
    directions = [(0, 0, 1), (0, 0, -1), (1, 0, 0), (0.0, np.sin(0.3), np.cos(0.3))]
    directions += [tuple(v) for v in rng.normal(size=(5, 3))]
    voxel_size = (1.0, 1.5, 2.5)
    for direction in directions:
        affine = simulate.affine_for_b0_direction(direction, voxel_size, shape=(10, 12, 14))
        expected = np.asarray(direction, float) / np.linalg.norm(direction)
        np.testing.assert_allclose(b0_direction_from_affine(affine), expected, atol=1e-12)
        np.testing.assert_allclose(voxel_sizes_from_affine(affine), voxel_size, atol=1e-12)
        rotation = affine[:3, :3] / np.asarray(voxel_size)
        np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(rotation) == pytest.approx(1.0)
        centre = affine @ np.array([4.5, 5.5, 6.5, 1.0])
        np.testing.assert_allclose(centre[:3], 0.0, atol=1e-12)
    np.testing.assert_allclose(simulate.affine_for_b0_direction((0, 0, 1), voxel_size)[:3, :3],
                               np.diag(voxel_size))
    with pytest.raises(ValueError):
        simulate.affine_for_b0_direction((0, 0, 0), voxel_size)


def test_oblique_field_differs_from_axial(phantom):
    tilted = simulate.simulate_field(phantom, b0_direction=(0.0, np.sin(0.35), np.cos(0.35)), shim_order=None)
    axial = simulate.simulate_field(phantom, shim_order=None)
    brain = phantom.brain_mask
    assert np.corrcoef(tilted.local[brain], axial.local[brain])[0, 1] < 0.98


def test_bad_arguments_raise():
    tiny = simulate.brain_phantom((40, 48, 40), (4.0, 4.0, 4.0))
    with pytest.raises(ValueError):
        simulate.simulate_multi_echo(tiny, echo_times=(0.02, 0.01))
    with pytest.raises(ValueError):
        simulate.simulate_multi_echo(tiny, b0_direction=(0, 0, 0))
    with pytest.raises(ValueError):
        simulate.simulate_field(tiny, shim_order=3)
    with pytest.raises(ValueError):
        simulate.write_bids_dataset("/nonexistent-never-written", [("0 1", 20)])
    with pytest.raises(ValueError):
        simulate.default_demo_cohort(0)


# --- BIDS ---------------------------------------------------------------------------------


def test_default_demo_cohort_spans_the_lifespan():
    cohort = simulate.default_demo_cohort(4)
    ages = [s["age"] for s in cohort]
    assert ages[0] == 8.0 and ages[-1] == 80.0 and ages == sorted(ages)
    assert len({s["label"] for s in cohort}) == 4 and all(s["sex"] in "FM" for s in cohort)


def test_written_dataset_is_bids_with_ground_truth(tmp_path):
    echo_times = (0.004, 0.012, 0.020)
    direction = (0.0, np.sin(0.25), np.cos(0.25))
    root = simulate.write_bids_dataset(
        tmp_path / "bids", [("01", 12.0), {"label": "sub-02", "age": 70, "sex": "M"}],
        echo_times=echo_times, b0_direction=direction, shape=(48, 56, 48), voxel_size=(4.0, 4.0, 4.0))
    description = json.loads((root / "dataset_description.json").read_text())
    assert description["BIDSVersion"] == "1.9.0" and description["DatasetType"] == "raw"
    assert description["Name"]
    participants = read_tsv(root / "participants.tsv")
    assert [p["participant_id"] for p in participants] == ["sub-01", "sub-02"]
    assert [float(p["age"]) for p in participants] == [12.0, 70.0]
    assert {"age", "sex"} <= json.loads((root / "participants.json").read_text()).keys()
    truth_description = json.loads((root / "derivatives/simulation/dataset_description.json").read_text())
    assert truth_description["DatasetType"] == "derivative" and truth_description["GeneratedBy"]

    expected_direction = np.asarray(direction) / np.linalg.norm(direction)
    for label in ("01", "02"):
        anat = root / f"sub-{label}" / "anat"
        assert sorted(p.name for p in anat.iterdir()) == sorted(
            f"sub-{label}_echo-{e}_part-{part}_MEGRE.{ext}"
            for e in (1, 2, 3) for part in ("mag", "phase") for ext in ("nii.gz", "json"))
        for echo, te in enumerate(echo_times, start=1):
            for part in ("mag", "phase"):
                stem = anat / f"sub-{label}_echo-{echo}_part-{part}_MEGRE"
                sidecar = json.loads(stem.with_suffix(".json").read_text())
                assert sidecar["EchoTime"] == te and sidecar["MagneticFieldStrength"] == 3.0
                image = nib.load(f"{stem}.nii.gz")
                assert image.shape == (48, 56, 48) and image.get_data_dtype() == np.float32
                np.testing.assert_allclose(b0_direction_from_affine(image.affine), expected_direction, atol=1e-6)
                np.testing.assert_allclose(voxel_sizes_from_affine(image.affine), 4.0, atol=1e-5)
            phase = np.asarray(nib.load(f"{anat}/sub-{label}_echo-{echo}_part-phase_MEGRE.nii.gz").dataobj)
            assert phase.min() >= -np.pi and phase.max() < np.pi and phase.std() > 0.5

        truth = root / "derivatives/simulation" / f"sub-{label}" / "anat"
        chi = np.asarray(nib.load(truth / f"sub-{label}_Chimap.nii.gz").dataobj)
        mask = np.asarray(nib.load(truth / f"sub-{label}_desc-brain_mask.nii.gz").dataobj).astype(bool)
        dseg = np.asarray(nib.load(truth / f"sub-{label}_dseg.nii.gz").dataobj)
        total = np.asarray(nib.load(truth / f"sub-{label}_desc-total_fieldmap.nii.gz").dataobj)
        local = np.asarray(nib.load(truth / f"sub-{label}_desc-local_fieldmap.nii.gz").dataobj)
        assert chi.dtype == np.float32 and np.all(chi[~mask] == 0) and np.any(chi[mask] != 0)
        assert np.all(mask[dseg > 0])
        assert json.loads((truth / f"sub-{label}_desc-total_fieldmap.json").read_text())["Units"] == "ppm"
        assert json.loads((truth / f"sub-{label}_Chimap.json").read_text())["Units"] == "ppm"
        assert (total[mask] - local[mask]).std() > 2 * local[mask].std()
        table = read_tsv(truth / f"sub-{label}_dseg.tsv")
        assert {int(row["index"]) for row in table} == set(np.unique(dseg)) - {0}
        stats = {row["name"]: float(row["mean"]) for row in read_tsv(truth / f"sub-{label}_desc-truth_roistats.tsv")}
        for row in table:
            values = chi[dseg == int(row["index"])]
            assert values.mean() == pytest.approx(stats[row["abbreviation"]], abs=1e-5)

    # The phase of the written echoes carries the written total field.
    anat = root / "sub-02" / "anat"
    z = [np.asarray(nib.load(anat / f"sub-02_echo-{e}_part-mag_MEGRE.nii.gz").dataobj)
         * np.exp(1j * np.asarray(nib.load(anat / f"sub-02_echo-{e}_part-phase_MEGRE.nii.gz").dataobj))
         for e in (1, 2)]
    truth = root / "derivatives/simulation/sub-02/anat"
    mask = np.asarray(nib.load(truth / "sub-02_desc-brain_mask.nii.gz").dataobj).astype(bool)
    total_hz = np.asarray(nib.load(truth / "sub-02_desc-total_fieldmap.nii.gz").dataobj) * HZ_PER_PPM_3T
    measured_hz = np.angle(z[1] * np.conj(z[0])) / (2 * np.pi * 0.008)
    usable = mask & (np.abs(total_hz) < 40)
    assert np.corrcoef(measured_hz[usable], total_hz[usable])[0, 1] > 0.99


def test_sessions_are_written_with_their_own_folders(tmp_path):
    root = simulate.write_bids_dataset(
        tmp_path / "bids", [{"label": "01", "age": 30, "sessions": {"1": 30, "2": 34}}],
        echo_times=(0.005, 0.010), shape=(40, 48, 40), voxel_size=(5.0, 5.0, 5.0))
    for session in ("1", "2"):
        anat = root / "sub-01" / f"ses-{session}" / "anat"
        assert (anat / f"sub-01_ses-{session}_echo-2_part-phase_MEGRE.nii.gz").exists()
        truth = root / "derivatives/simulation/sub-01" / f"ses-{session}" / "anat"
        assert (truth / f"sub-01_ses-{session}_Chimap.nii.gz").exists()
    sessions = read_tsv(root / "sub-01" / "sub-01_sessions.tsv")
    assert [(row["session_id"], float(row["age"])) for row in sessions] == [("ses-1", 30.0), ("ses-2", 34.0)]
    first = read_tsv(root / "derivatives/simulation/sub-01/ses-1/anat/sub-01_ses-1_desc-truth_roistats.tsv")
    second = read_tsv(root / "derivatives/simulation/sub-01/ses-2/anat/sub-01_ses-2_desc-truth_roistats.tsv")
    gp = [float(next(r["trajectory"] for r in rows if r["name"] == "GP")) for rows in (first, second)]
    assert gp[1] > gp[0]
    with pytest.raises(ValueError):
        simulate.write_bids_dataset(tmp_path / "other", [("01", 20), ("01", 30)], shape=(40, 48, 40),
                                    voxel_size=(5.0, 5.0, 5.0))


def test_supersampled_acquisition_dephases_next_to_air_and_keeps_full_strength_sources():
    import scipy.ndimage as ndi

    kwargs = dict(shape=(40, 48, 40), voxel_size=(4.0, 4.0, 4.0), seed=2, snr=float("inf"), phase_offset=False)
    fine = simulate.simulate_acquisition(supersampling=2, **kwargs)
    single = simulate.simulate_acquisition(supersampling=1, **kwargs)
    assert fine.magnitude.shape == (40, 48, 40, 4) and fine.phase.dtype == np.float32
    assert np.all(np.abs(fine.phase) <= np.pi)
    assert fine.truth.air_chi == simulate.PHYSICAL_AIR_CHI and fine.supersampling == 2
    assert fine.truth.voxel_size == (4.0, 4.0, 4.0) and fine.truth.brain_mask.shape == (40, 48, 40)
    # The truth is the mean of each voxel's sub-voxels: between the extremes of the tissues.
    assert fine.truth.chi[fine.truth.brain_mask].max() <= max(fine.truth.roi_chi.values()) + 1e-6
    # Next to the sinus the sub-voxel fields differ, so the averaged signal decays faster than R2*
    # alone makes it (intravoxel dephasing); deep in the brain it does not.
    sinus = fine.truth.tissues == next(t.index for t in simulate.TISSUES if t.name == "sinus_air")
    near_air = ndi.binary_dilation(sinus, iterations=2) & ~sinus & (fine.truth.m0 > 0.3)
    deep = ndi.binary_erosion(fine.truth.brain_mask, iterations=4)
    decay = lambda acquisition, region: (acquisition.magnitude[..., 3][region] / acquisition.magnitude[..., 0][region]).mean()  # noqa: E731
    assert near_air.any() and deep.any()
    assert decay(fine, near_air) < 0.9 * decay(single, near_air)
    assert decay(fine, deep) == pytest.approx(decay(single, deep), rel=0.05)
    with pytest.raises(ValueError, match="supersampling"):
        simulate.simulate_acquisition(supersampling=0, **kwargs)
