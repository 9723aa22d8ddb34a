"""The demo's lifespan cohort: subjects made from the MNI template's anatomy (simulate.template_acquisition)."""
import numpy as np
import pytest

from qsmflow import simulate
from qsmflow.recon.dipole import ppm_to_hz


@pytest.fixture(scope="module")
def atlas():
    from qsmflow.segmentation import default_atlas

    return default_atlas()


def _label_mask(atlas, labels, abbreviation):
    return np.isin(labels, [row.index for row in atlas.table if row.abbreviation == abbreviation])


def test_template_heads_carry_the_trajectories_the_atlas_labels_and_the_size_for_age(atlas):
    child = simulate.template_acquisition(atlas, age=1.0, seed=5, snr=np.inf)
    adult = simulate.template_acquisition(atlas, age=60.0, seed=5, snr=np.inf)
    for acquisition in (child, adult):
        truth = acquisition.truth
        age = truth.age_years
        for roi in ("GP", "PU", "CN", "SCC", "IC"):
            assert truth.roi_chi[roi] == pytest.approx(simulate.true_susceptibility(roi, age))
            inside = _label_mask(atlas, truth.labels, roi)
            assert inside.sum() > 5, roi
        # the CSF reference label is there, at susceptibility 0 (blurred by the point-spread only)
        ventricles = _label_mask(atlas, truth.labels, "LV")
        assert ventricles.sum() > 50 and abs(float(np.median(truth.chi[ventricles]))) < 0.005
    # GP iron rises with age far more than the blur can change: the label means follow the truth
    gp_child = child.truth.chi[_label_mask(atlas, child.truth.labels, "GP")].mean()
    gp_adult = adult.truth.chi[_label_mask(atlas, adult.truth.labels, "GP")].mean()
    assert gp_adult - gp_child > 0.5 * (simulate.true_susceptibility("GP", 60) - simulate.true_susceptibility("GP", 1))
    # one anatomy, sized by age: volume ratio = linear size ratio cubed
    ratio = child.truth.brain_mask.sum() / adult.truth.brain_mask.sum()
    assert ratio == pytest.approx((simulate.head_size_for_age(1.0) / simulate.head_size_for_age(60.0)) ** 3, rel=0.05)
    # the phase carries the field: echo-to-echo phase difference = 2 pi f dTE inside the brain
    mask = adult.truth.brain_mask
    delta = np.angle(np.exp(1j * (adult.phase[..., 1] - adult.phase[..., 0])))
    expected = 2 * np.pi * ppm_to_hz(adult.fields.total, 3.0) * (adult.echo_times[1] - adult.echo_times[0])
    error = np.angle(np.exp(1j * (delta - expected)))[mask]
    assert np.median(np.abs(error)) < 0.02
    assert np.abs(adult.fields.background[mask]).max() > 0.01  # skull and air make a background field


def test_a_grid_too_small_for_the_head_is_refused(atlas):
    with pytest.raises(ValueError, match="too small for the template head"):
        simulate.template_acquisition(atlas, age=40.0, shape=(40, 48, 40))


def test_the_demo_dataset_of_template_heads_has_the_atlas_truth(tmp_path, atlas):
    from qsmflow.cli import DEMO_GRID
    from qsmflow.group import read_tsv

    root = simulate.write_bids_dataset(tmp_path / "bids", [{"label": "01", "age": 30.0, "sessions": {"1": 30.0}}],
                                       anatomy="template", atlas=atlas, **DEMO_GRID)
    truth = root / "derivatives" / "simulation" / "sub-01" / "ses-1" / "anat"
    table = read_tsv(truth / "sub-01_ses-1_dseg.tsv")
    assert {"LV", "GP", "SCC"} <= {row["abbreviation"] for row in table}
    stats = {row["name"]: row for row in read_tsv(truth / "sub-01_ses-1_desc-truth_roistats.tsv")}
    assert float(stats["GP_L"]["mean"]) == pytest.approx(simulate.true_susceptibility("GP", 30.0), abs=1e-6)
    assert int(stats["SCC_R"]["voxels"]) > 0
    assert len(list((root / "sub-01" / "ses-1" / "anat").glob("*_part-phase_MEGRE.nii.gz"))) == 4
    with pytest.raises(ValueError, match="anatomy must be"):
        simulate.write_bids_dataset(tmp_path / "other", [("01", 30.0)], anatomy="mni")
