"""qsmflow.segmentation: atlas, subject labels, ROI statistics, reference regions, and the
segmentation workflow against ground truth."""
import csv

import nibabel as nib
import numpy as np
import pytest

from conftest import QUICK_REGISTRATION
from qsmflow import segmentation
from qsmflow.segmentation import AtlasLabel


def _table(*rows):
    return tuple(AtlasLabel(i, a, a.lower(), h, "test", k) for i, a, h, k in rows)


# ---------------------------------------------------------------------------------------------
# ROI statistics (analytic)

def test_roi_statistics_are_the_plain_numbers():
    labels = np.zeros((6, 6, 6), np.int16)
    labels[1:3, 1:3, 1:3] = 101  # 8 voxels
    labels[4, 4, 4] = 201
    chi = np.zeros((6, 6, 6), np.float32)
    chi[1:3, 1:3, 1:3] = np.arange(8, dtype=np.float32).reshape(2, 2, 2) / 100
    chi[4, 4, 4] = -0.05
    table = _table((101, "CN", "left", "deep_grey"), (201, "CN", "right", "deep_grey"),
                   (107, "DN", "left", "deep_grey"))
    rows = segmentation.roi_statistics(chi, labels, table, voxel_size=(2.0, 2.0, 2.0), reference="csf")
    left, right, empty = rows
    values = np.arange(8) / 100
    assert left["roi"] == "CN_L" and right["roi"] == "CN_R"
    assert left["num_voxels"] == 8 and left["volume_mm3"] == 64.0
    assert left["mean"] == pytest.approx(values.mean(), abs=1e-7)
    assert left["median"] == pytest.approx(np.median(values), abs=1e-7)
    assert left["std"] == pytest.approx(values.std(), abs=1e-7)
    assert (left["min"], left["max"]) == (pytest.approx(0.0), pytest.approx(0.07))
    assert right["mean"] == pytest.approx(-0.05) and right["std"] == 0.0
    assert empty["num_voxels"] == 0 and np.isnan(empty["mean"])
    assert {r["reference"] for r in rows} == {"csf"}
    # Voxels outside the QSM mask are not counted.
    mask = np.ones_like(labels, bool)
    mask[1, 1, 1] = False
    masked = segmentation.roi_statistics(chi, labels, table, voxel_size=(2.0, 2.0, 2.0), mask=mask)[0]
    assert masked["num_voxels"] == 7 and masked["mean"] == pytest.approx(values[1:].mean(), abs=1e-7)


def test_roistats_file_has_qsmxt_columns(tmp_path):
    table = _table((101, "GP", "left", "deep_grey"))
    labels = np.zeros((4, 4, 4), np.int16)
    labels[1:3, 1:3, 1:3] = 101
    rows = segmentation.roi_statistics(np.full((4, 4, 4), 0.1, np.float32), labels, table, voxel_size=(1, 1, 1),
                                       reference="lateral-ventricle CSF")
    path = segmentation.write_roistats(tmp_path / "roistats.tsv", rows)
    with open(path) as handle:
        read = list(csv.DictReader(handle, delimiter="\t"))
    assert {"roi", "num_voxels", "min", "max", "median", "mean", "std"} <= set(read[0])  # QSMxT's names
    assert {"hemisphere", "volume_mm3", "reference"} <= set(read[0])
    assert read[0]["mean"] == "0.100000" and read[0]["num_voxels"] == "8"


def test_erosion_shrinks_rois_but_never_deletes_one():
    labels = np.zeros((12, 12, 12), np.int16)
    labels[2:9, 2:9, 2:9] = 1
    labels[10, 10, 10] = 2
    eroded = segmentation.erode_labels(labels, 1.0, (1.0, 1.0, 1.0))
    assert (eroded == 1).sum() == 5**3
    assert (eroded == 2).sum() == 1


# ---------------------------------------------------------------------------------------------
# refinement by contrast and reference regions

def test_refinement_finds_the_paramagnetic_core_inside_the_search_region():
    shape = (30, 30, 30)
    grid = np.indices(shape)
    true_core = ((grid - np.array([15, 15, 15])[:, None, None, None]) ** 2).sum(axis=0) <= 9
    chi = np.where(true_core, 0.15, -0.01).astype(np.float32)
    chi += np.random.default_rng(1).normal(0, 0.005, shape).astype(np.float32)
    # The atlas label is shifted by 2 voxels and too large.
    atlas = ((grid - np.array([17, 15, 14])[:, None, None, None]) ** 2).sum(axis=0) <= 20
    labels = np.where(atlas, 105, 0).astype(np.int16)
    table = _table((105, "RN", "left", "deep_grey"), (103, "CN", "left", "deep_grey"))
    refined = segmentation.refine_by_contrast(labels, chi, table, voxel_size=(1, 1, 1), search_mm=3)

    def dice(a, b):
        return 2 * (a & b).sum() / (a.sum() + b.sum())

    assert dice(refined == 105, true_core) > 0.95 > dice(atlas, true_core)
    # Offset-invariant: the reference chosen later cannot change the labels.
    np.testing.assert_array_equal(segmentation.refine_by_contrast(labels, chi + 0.3, table, voxel_size=(1, 1, 1),
                                                                 search_mm=3), refined)
    # ROIs not listed are untouched.
    assert np.array_equal(segmentation.refine_by_contrast(labels, chi, table, rois=("SN",)), labels)


def test_core_fraction_is_the_half_maximum_at_1_mm_and_lower_for_coarser_voxels():
    assert segmentation.core_fraction((1.0, 1.0, 1.0)) == pytest.approx(0.5)
    assert segmentation.core_fraction((0.7, 0.7, 0.7)) == pytest.approx(0.5)
    assert segmentation.core_fraction((1.5, 1.5, 1.5)) == pytest.approx(0.4 + 0.1 / 3)
    assert segmentation.core_fraction((2.0, 2.0, 2.0)) == pytest.approx(0.4)
    assert segmentation.core_fraction((3.0, 3.0, 3.0)) == pytest.approx(0.4)
    assert segmentation.core_fraction((1.0, 1.0, 8.0)) == pytest.approx(0.4)  # geometric mean 2 mm
    # A nucleus whose edge voxels sit at 45 % of its contrast: kept at 2 mm, dropped at 1 mm.
    labels = np.zeros((16, 16, 16), np.int16)
    labels[5:11, 5:11, 5:11] = 105
    chi = np.full(labels.shape, -0.01, np.float32)
    chi[5:11, 5:11, 5:11] = -0.01 + 0.45 * 0.16
    chi[6:10, 6:10, 6:10] = 0.15
    table = _table((105, "RN", "left", "deep_grey"))
    coarse = segmentation.refine_by_contrast(labels, chi, table, voxel_size=(2, 2, 2), search_mm=2)
    fine = segmentation.refine_by_contrast(labels, chi, table, voxel_size=(1, 1, 1), search_mm=2)
    assert (coarse == 105).sum() == 6**3 and (fine == 105).sum() == 4**3
    np.testing.assert_array_equal(segmentation.refine_by_contrast(labels, chi, table, voxel_size=(1, 1, 1),
                                                                 search_mm=2, fraction=0.4), coarse)


def test_refinement_shares_the_gap_between_two_nuclei_by_distance():
    """RN and SN side by side, both atlas labels too small: the unlabelled core voxels between
    them go to the nearer atlas label, whichever nucleus the table lists first (the nucleus
    refined later used to take every voxel of both search regions)."""
    shape = (30, 24, 24)
    x = np.indices(shape)[0]
    slab = np.zeros(shape, bool)
    slab[:, 8:16, 8:16] = True
    true_rn, true_sn = slab & (x >= 8) & (x <= 14), slab & (x >= 15) & (x <= 21)
    chi = np.where(true_rn | true_sn, 0.15, -0.01).astype(np.float32)
    chi += np.random.default_rng(2).normal(0, 0.005, shape).astype(np.float32)
    labels = np.zeros(shape, np.int16)
    labels[slab & (x >= 9) & (x <= 12)] = 105
    labels[slab & (x >= 17) & (x <= 19)] = 106
    table = _table((105, "RN", "left", "deep_grey"), (106, "SN", "left", "deep_grey"))
    refined = segmentation.refine_by_contrast(labels, chi, table, voxel_size=(1, 1, 1), search_mm=3)
    np.testing.assert_array_equal(refined == 105, true_rn)
    np.testing.assert_array_equal(refined == 106, true_sn)
    np.testing.assert_array_equal(segmentation.refine_by_contrast(labels, chi, table[::-1], voxel_size=(1, 1, 1),
                                                                 search_mm=3), refined)


def test_boundary_refinement_moves_a_shrunk_gp_to_its_contrast_against_labelled_neighbours():
    """GP between PU (lateral) and IC (medial), the registered GP label shifted medially and too
    small (as the susceptibility channel leaves it): the boundary moves to GP's contrast in the
    blurred map, the ROI mean of the map comes within 0.005 ppm, PU keeps its own voxels."""
    from scipy import ndimage

    shape = (40, 40, 40)
    z, y, x = np.indices(shape)
    true = np.where((x >= 10) & (x < 14) & (abs(y - 20) < 12) & (abs(z - 20) < 12), 3, 0).astype(np.int16)  # IC
    true[(x - 20) ** 2 + (y - 20) ** 2 + (z - 20) ** 2 <= 36] = 1  # GP
    true[(x >= 26) & (x < 34) & (abs(y - 20) < 10) & (abs(z - 20) < 10) & (true == 0)] = 2  # PU
    values = np.array([-0.02, 0.18, 0.08, -0.04], np.float32)
    sharp = values[true]
    truth = ndimage.gaussian_filter(sharp, 0.7)  # the true map's partial volume
    chi = ndimage.gaussian_filter(sharp, 1.0) + np.random.default_rng(3).normal(0, 0.005, shape).astype(np.float32)
    labels = true.copy()
    labels[labels == 1] = 0
    labels[((x - 18) ** 2 + (y - 20) ** 2 + (z - 20) ** 2 <= 30) & (true != 2)] = 1
    table = _table((1, "GP", "left", "deep_grey"), (2, "PU", "left", "deep_grey"), (3, "IC", "left", "white_matter"))
    refined = segmentation.refine_boundaries(labels, chi, table, voxel_size=(1, 1, 1))

    def dice(a, b):
        return 2 * (a & b).sum() / (a.sum() + b.sum())

    def error(estimated):
        return abs(float(truth[estimated].mean() - truth[true == 1].mean()))

    assert dice(labels == 1, true == 1) < 0.8 and error(labels == 1) > 0.01
    assert dice(refined == 1, true == 1) > 0.95 and error(refined == 1) < 0.005
    assert dice(refined == 2, true == 2) > 0.97 and dice(refined == 3, true == 3) > 0.9
    # Offset- and scale-invariant; ROIs not listed are untouched.
    np.testing.assert_array_equal(segmentation.refine_boundaries(labels, 2 * chi + 0.3, table, voxel_size=(1, 1, 1)),
                                  refined)
    assert np.array_equal(segmentation.refine_boundaries(labels, chi, table, rois=("SN",)), labels)


def test_final_labels_narrow_the_small_nuclei_then_move_gps_boundary():
    """refine_labels, what SubjectLabels writes: an RN label too large around its core is narrowed,
    a shrunk GP between PU and IC grows to its contrast, in one call; nothing listed, nothing changed."""
    from scipy import ndimage

    shape = (40, 40, 48)
    z, y, x = np.indices(shape)
    true = np.where((x >= 10) & (x < 14) & (abs(y - 20) < 12) & (abs(z - 20) < 12), 3, 0).astype(np.int16)  # IC
    true[(x - 20) ** 2 + (y - 20) ** 2 + (z - 20) ** 2 <= 36] = 1  # GP
    true[(x >= 26) & (x < 34) & (abs(y - 20) < 10) & (abs(z - 20) < 10) & (true == 0)] = 2  # PU
    true[(x - 20) ** 2 + (y - 20) ** 2 + (z - 40) ** 2 <= 9] = 4  # RN
    chi = ndimage.gaussian_filter(np.array([-0.02, 0.18, 0.08, -0.04, 0.15], np.float32)[true], 0.7)
    chi += np.random.default_rng(4).normal(0, 0.003, shape).astype(np.float32)
    labels = true.copy()
    labels[labels == 1] = 0
    labels[((x - 18) ** 2 + (y - 20) ** 2 + (z - 20) ** 2 <= 30) & (true != 2)] = 1
    labels[((x - 21) ** 2 + (y - 20) ** 2 + (z - 41) ** 2 <= 20)] = 4
    table = _table((1, "GP", "left", "deep_grey"), (2, "PU", "left", "deep_grey"), (3, "IC", "left", "white_matter"),
                   (4, "RN", "left", "deep_grey"))

    def dice(a, b):
        return 2 * (a & b).sum() / (a.sum() + b.sum())

    final, settings = segmentation.refine_labels(labels, chi, table, rois=("RN", "GP"), voxel_size=(1, 1, 1))
    assert final.dtype == np.int16
    assert settings == {"cores": ["RN"], "fraction": segmentation.core_fraction((1, 1, 1)), "boundaries": ["GP"]}
    for index in (1, 4):
        assert dice(labels == index, true == index) < 0.85 < 0.9 < dice(final == index, true == index)
    # Voxels wider than the boundary band: GP is not moved, and the settings say so.
    coarse, skipped = segmentation.refine_labels(labels, chi, table, rois=("GP",), voxel_size=(3, 3, 3))
    np.testing.assert_array_equal(coarse, labels)
    assert list(skipped) == ["boundaries_skipped"] and "3 mm" in skipped["boundaries_skipped"]
    unchanged, none = segmentation.refine_labels(labels, chi, table, rois=(), voxel_size=(1, 1, 1))
    np.testing.assert_array_equal(unchanged, labels)
    assert none == {}


def test_reference_regions():
    shape = (40, 40, 40)
    grid = np.indices(shape)
    brain = ((grid - 20) ** 2).sum(axis=0) <= 18**2
    qsm = ((grid - 20) ** 2).sum(axis=0) <= 15**2
    labels = np.zeros(shape, np.int16)
    labels[16:24, 14:26, 18:23] = 131
    table = _table((131, "LV", "left", "csf"))
    brain_region = segmentation.reference_region("brain", brain_mask=brain, qsm_mask=qsm, voxel_size=(2, 2, 2))
    # 10 mm (5 voxels) inside the brain, whatever the QSM mask as long as it covers that region.
    from scipy import ndimage

    expected = ndimage.distance_transform_edt(brain) * 2.0 > 10.0
    np.testing.assert_array_equal(brain_region, expected)
    assert 0 < brain_region.sum() < qsm.sum()
    larger_qsm = ((grid - 20) ** 2).sum(axis=0) <= 17**2
    np.testing.assert_array_equal(segmentation.reference_region("brain", brain_mask=brain, qsm_mask=larger_qsm,
                                                                voxel_size=(2, 2, 2)), brain_region)
    csf = segmentation.reference_region("csf", qsm_mask=qsm, labels=labels, table=table, voxel_size=(1, 1, 1))
    assert csf.sum() == 4 * 8 * 1  # 2 mm in from every face of the 8x12x5 box
    assert segmentation.reference_region("mean", qsm_mask=qsm) is not None
    assert segmentation.reference_region("none", qsm_mask=qsm) is None
    with pytest.raises(ValueError, match="kind 'csf'"):
        segmentation.reference_region("csf", qsm_mask=qsm, labels=labels, table=_table((131, "LV", "left", "other")))
    with pytest.raises(ValueError, match="empty"):
        segmentation.reference_region("csf", qsm_mask=qsm, labels=labels, table=table, erosion_mm=20.0)


def test_reference_interface_names_the_region_it_used(tmp_path):
    """The Chimap sidecar used to say 'mean over the brain mask' while the code referenced the
    QSM mask (the mask after background removal)."""
    from qsmflow.interfaces.recon import ReferenceSusceptibility

    affine = np.eye(4)
    chi = np.random.default_rng(0).normal(0.05, 0.01, (10, 10, 10)).astype(np.float32)
    qsm = np.zeros((10, 10, 10), np.uint8)
    qsm[2:8, 2:8, 2:8] = 1
    nib.save(nib.Nifti1Image(chi, affine), tmp_path / "chi.nii.gz")
    nib.save(nib.Nifti1Image(qsm, affine), tmp_path / "qsm.nii.gz")
    result = ReferenceSusceptibility(chi=str(tmp_path / "chi.nii.gz"), mask=str(tmp_path / "qsm.nii.gz"),
                                     method="mean").run(cwd=str(tmp_path))
    provenance = result.outputs.provenance
    assert "brain mask" not in provenance["Reference"]
    assert provenance["Reference"] == segmentation.REFERENCE_METHODS["mean"]
    assert "QSM mask" in provenance["Reference"]
    referenced = nib.load(result.outputs.chi).get_fdata()
    assert abs(referenced[qsm > 0].mean()) < 1e-6
    with pytest.raises(ValueError, match="needs subject-space labels"):
        ReferenceSusceptibility(chi=str(tmp_path / "chi.nii.gz"), mask=str(tmp_path / "qsm.nii.gz"),
                                method="csf").run(cwd=str(tmp_path))


# ---------------------------------------------------------------------------------------------
# atlases

def test_user_atlas_errors_name_the_file(tmp_path):
    affine = np.eye(4)
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), affine), tmp_path / "t.nii.gz")
    labels = np.zeros((8, 8, 8), np.int16)
    labels[2:4, 2:4, 2:4] = 5
    labels[5:7, 5:7, 5:7] = 9
    nib.save(nib.Nifti1Image(labels, affine), tmp_path / "l.nii.gz")
    (tmp_path / "table.tsv").write_text("index\tname\n5\tputamen\n")
    with pytest.raises(ValueError, match=r"table.tsv: no row for label value\(s\) \[9\]"):
        segmentation.load_user_atlas(tmp_path / "t.nii.gz", tmp_path / "l.nii.gz", tmp_path / "table.tsv")
    (tmp_path / "table.tsv").write_text("index\tname\themisphere\tkind\n5\tputamen\tleft\tdeep_grey\n9\tventricle\tbilateral\tcsf\n")
    atlas = segmentation.load_user_atlas(tmp_path / "t.nii.gz", tmp_path / "l.nii.gz", tmp_path / "table.tsv",
                                         name="MyTemplate")
    assert [r.kind for r in atlas.table] == ["deep_grey", "csf"] and atlas.name == "MyTemplate"
    with pytest.raises(FileNotFoundError, match="segmentation.atlas.labels"):
        segmentation.load_user_atlas(tmp_path / "t.nii.gz", tmp_path / "missing.nii.gz", tmp_path / "table.tsv")


@pytest.fixture(scope="module")
def default_atlas():
    return segmentation.default_atlas()


def test_default_atlas_has_every_roi_on_both_sides(default_atlas):
    volumes = {}
    for row in default_atlas.table:
        volumes[(row.abbreviation, row.hemisphere)] = int((default_atlas.labels == row.index).sum())  # 1 mm^3 voxels
    for abbreviation in ("CN", "PU", "GP", "TH", "RN", "SN", "DN", "IC", "SCC", "OR", "LV"):
        for side in ("left", "right"):
            assert volumes[(abbreviation, side)] > 100, (abbreviation, side)
    # Plausible adult volumes (mL): caudate 3-6, putamen 4-9, pallidum 1.5-3.5, thalamus 6-12.
    for abbreviation, (low, high) in {"CN": (3, 6), "PU": (4, 9), "GP": (1.5, 3.5), "TH": (6, 12)}.items():
        for side in ("left", "right"):
            assert low * 1000 < volumes[(abbreviation, side)] < high * 1000, (abbreviation, side)
    # Left labels lie left of the midline (RAS x < 0).
    x = segmentation._world_x(default_atlas.labels.shape, default_atlas.affine)
    for row in default_atlas.table:
        where = x[np.broadcast_to(default_atlas.labels == row.index, x.shape)]
        assert (where < 0).all() if row.hemisphere == "left" else (where > 0).all()


def test_susceptibility_prior_marks_the_iron_rich_nuclei(default_atlas):
    prior = segmentation.susceptibility_prior(default_atlas)
    assert prior.shape == default_atlas.labels.shape and prior.dtype == np.float32
    means = {row.abbreviation: float(prior[default_atlas.labels == row.index].mean())
             for row in default_atlas.table if row.hemisphere == "left"}
    # GP, the nucleus the magnitude hardly shows, is the most paramagnetic; white matter is
    # diamagnetic; outside the brain the prior is 0. Values from segmentation.PRIOR_CHI (literature).
    assert max(means, key=means.get) == "GP"
    assert means["GP"] > means["PU"] > means["TH"] > 0 > means["IC"]
    assert abs(means["GP"] - segmentation.PRIOR_CHI["GP"]) < 0.03
    assert not prior[~default_atlas.brain_mask].any()
    # An atlas without any of the known abbreviations cannot have a prior: a clear error.
    other = segmentation.Atlas(template=default_atlas.template, brain_mask=default_atlas.brain_mask,
                               labels=default_atlas.labels, affine=default_atlas.affine,
                               table=tuple(row._replace(abbreviation=f"X{row.index}", kind="other")
                                           for row in default_atlas.table), name="custom")
    with pytest.raises(ValueError, match="susceptibility_weight"):
        segmentation.susceptibility_prior(other)


# ---------------------------------------------------------------------------------------------
# ground truth: the template registered to subjects made from it, deformed by a known warp

DEEP_GREY = ("CN", "PU", "GP", "TH")


def _dice(a, b):
    return 2 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


@pytest.fixture(scope="module")
def registered_subject(default_atlas, tmp_path_factory):
    from qsmflow import simulate

    from benchmarks.segmentation import reconstructed_chi
    from qsmflow.config import load_config

    subject = simulate.template_subject(default_atlas, voxel_size=(2.0, 2.0, 2.0), seed=3, nonlinear_rms_mm=3.5)
    # The default registration: first echo plus the susceptibility channel, whose subject image
    # is a Chimap reconstructed from the subject's noisy local field (not the true map); SyN with
    # 40x20 instead of 100x70 iterations (a third of the time). Seed 3 then gives the same Dice
    # and errors to +-0.01/0.001 (below); without the channel GP fails both tests (Dice
    # 0.80/0.81, GP_R error 0.0117 ppm).
    settings = load_config("default")["segmentation"]["registration"]
    labels, warped, result = segmentation.template_to_subject(
        subject.magnitude, subject.brain_mask, subject.affine, default_atlas, threads=1,
        stages={"syn": {"iterations": (40, 20, 0)}},
        output_dir=tmp_path_factory.mktemp("registration"), chi=reconstructed_chi(subject, seed=3),
        qsm_mask=subject.brain_mask, susceptibility_weight=settings["susceptibility_weight"],
        susceptibility_stages=tuple(settings["susceptibility_stages"]))
    return subject, labels, warped, result


@pytest.mark.slow  # one 2 mm SyN registration, shared by the three tests
def test_simulated_subject_is_deformed_and_biased(registered_subject, default_atlas):
    subject, *_ = registered_subject
    assert subject.deformation.rms_nonlinear_mm >= 3.0
    assert max(abs(a) for a in subject.deformation.rotation_degrees) > 0.5
    assert subject.labels.dtype == np.int16
    assert (subject.labels == segmentation.label_index("GP", "left")).sum() > 200


@pytest.mark.slow  # one 2 mm SyN registration, shared by the three tests
def test_registration_recovers_the_true_labels(registered_subject, default_atlas):
    subject, labels, warped, _ = registered_subject
    dices = {}
    for row in default_atlas.table:
        dices[(row.abbreviation, row.hemisphere)] = _dice(labels == row.index, subject.labels == row.index)
    print("Dice:", {f"{a}_{h[0].upper()}": round(d, 3) for (a, h), d in dices.items()})
    # Issue 9 asks Dice >= 0.85 for CN, PU, GP and TH. With the susceptibility channel (2 mm,
    # seed 3, one thread, SyN 40x20): CN 0.93/0.94, PU 0.88/0.90, GP 0.92/0.92, TH 0.95/0.96
    # (left/right; 100x70: 0.93/0.93, 0.88/0.90, 0.91/0.92, 0.96/0.96); with the magnitude alone
    # GP is 0.80/0.81 (100x70: 0.72/0.78). Seeds 4 and 5 (benchmark, 100x70): all >= 0.88.
    minimum = {"CN": 0.85, "PU": 0.85, "TH": 0.85, "GP": 0.85}
    for abbreviation in DEEP_GREY:
        for side in ("left", "right"):
            assert dices[(abbreviation, side)] >= minimum[abbreviation], (abbreviation, side, dices[(abbreviation, side)])
    # The template warped into the subject lines up with the subject (registration check image).
    inside = subject.brain_mask
    first_echo = subject.magnitude if subject.magnitude.ndim == 3 else subject.magnitude[..., 0]
    assert np.corrcoef(warped[inside], first_echo[inside])[0, 1] < 0  # T1w vs GRE contrast
    assert set(np.unique(labels)) <= {0} | {row.index for row in default_atlas.table}


@pytest.mark.slow  # one 2 mm SyN registration, shared by the three tests
def test_segmentation_error_alone_moves_roi_means_little(registered_subject, default_atlas):
    """ROI means of the true chi map: estimated labels vs the true labels."""
    subject, labels, *_ = registered_subject
    errors = {}
    for row in default_atlas.table:
        estimated, true = labels == row.index, subject.labels == row.index
        errors[f"{row.abbreviation}_{row.hemisphere[0].upper()}"] = float(subject.chi[estimated].mean() - subject.chi[true].mean())
    print("ROI mean error (ppm):", {k: round(v, 4) for k, v in errors.items()})
    # Target 0.005 ppm. Measured with the susceptibility channel (seed 3, one thread, SyN 40x20):
    # CN 0.0013/0.0004, PU 0.0044/0.0021, GP 0.0036/0.0034, TH 0.0000/0.0001 (100x70: PU
    # 0.0047/0.0025, GP 0.0037/0.0044; magnitude alone, 40x20: GP_R 0.0117). Not met for every
    # subject: GP_R is 0.0063 and 0.0053 ppm in seeds 4 and 5 (benchmark, 100x70).
    maximum = {"CN": 0.005, "GP": 0.005, "TH": 0.005, "PU": 0.005}
    for abbreviation in DEEP_GREY:
        for side in ("L", "R"):
            assert abs(errors[f"{abbreviation}_{side}"]) <= maximum[abbreviation], (abbreviation, side)


# ---------------------------------------------------------------------------------------------
# the workflow end to end: outputs, caching, reruns

def _qsmflow(*arguments, wait=True):
    """Run the CLI; ``wait=False`` returns the running process (``_finish`` collects it)."""
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-m", "qsmflow.cli", *map(str, arguments)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    return _finish(process) if wait else process


def _finish(process):
    import subprocess

    stdout, stderr = process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.slow
def test_segmentation_workflow_outputs_cache_and_reruns(tmp_path, request):
    from qsmflow import simulate

    bids = simulate.write_bids_dataset(tmp_path / "bids", [("01", 50.0)], shape=(44, 52, 44), voxel_size=(4.0, 4.0, 4.0))
    # Outputs, caching and reruns, not accuracy (the registered_subject tests): a short schedule.
    settings = ["--set", "segmentation.enabled=true", "--set", "reference.method=csf", "--nprocs", "2",
                "--set", "segmentation.registration.preset=fast", *QUICK_REGISTRATION]
    # A run from scratch (its own output and work directories), started now beside the first run
    # (the registration uses one core): compared byte for byte with the first run's outputs below.
    scratch = _qsmflow(bids, tmp_path / "out2", "participant", "--work-dir", tmp_path / "work2", *settings, wait=False)
    request.addfinalizer(scratch.kill)  # not left running when an assertion fails first
    first = _qsmflow(bids, tmp_path / "out", "participant", "--work-dir", tmp_path / "work", *settings)
    assert first.returncode == 0, first.stderr
    anat = tmp_path / "out" / "sub-01" / "anat"
    names = {"dseg": "sub-01_dseg.nii.gz", "table": "sub-01_dseg.tsv", "roistats": "sub-01_roistats.tsv",
             "template_chimap": "sub-01_space-MNI152NLin2009aSym_Chimap.nii.gz",
             "forward": "sub-01_from-MNI152NLin2009aSym_to-scanner_mode-image_xfm.h5",
             "inverse": "sub-01_from-scanner_to-MNI152NLin2009aSym_mode-image_xfm.h5"}
    for name in names.values():
        assert (anat / name).is_file(), name
    from conftest import bids_validator_errors

    assert bids_validator_errors(tmp_path / "out") == []
    chimap = nib.load(anat / "sub-01_Chimap.nii.gz")
    dseg = nib.load(anat / names["dseg"])
    assert dseg.shape == chimap.shape and np.allclose(dseg.affine, chimap.affine)
    table = segmentation.read_table(anat / names["table"])
    assert set(np.unique(np.asarray(dseg.dataobj))) <= {0} | {r.index for r in table}
    import json

    sidecar = json.loads((anat / "sub-01_Chimap.json").read_text())
    assert segmentation.REFERENCE_METHODS["csf"] in json.dumps(sidecar)
    # The dseg's sidecar says how the labels were made: atlas, registration, refinement (at
    # 4 mm GP's boundary band holds no voxel, and the sidecar says it was skipped).
    labels_sidecar = json.loads((anat / "sub-01_dseg.json").read_text())
    assert labels_sidecar["Registration"]["Preset"] == "fast" and "RandomSeed" in labels_sidecar["Registration"]
    assert labels_sidecar["AtlasProvenance"]["Template"] == segmentation.DEFAULT_TEMPLATE
    assert labels_sidecar["LabelRefinement"]["Refinement"]["Parameters"]["rois"] == ["RN", "SN", "DN"]
    assert labels_sidecar["LabelRefinement"]["BoundaryRefinement"].startswith("skipped: GP not moved")
    with open(anat / names["roistats"]) as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert len(rows) == len(table)
    assert {row["reference"] for row in rows} == {"csf"}
    # Mean CSF susceptibility after referencing to the eroded ventricles is small.
    ventricles = [row for row in rows if row["roi"].startswith("LV") and row["mean"] != "n/a"]
    assert ventricles and all(abs(float(row["mean"])) < 0.02 for row in ventricles)

    # Only the statistics (and the writers) run again when only a statistics option changes.
    work = tmp_path / "work"
    before = {p.parent.name: p.stat().st_mtime_ns for p in work.rglob("result_*.pklz")}
    content = {key: (anat / name).read_bytes() for key, name in names.items()}
    second = _qsmflow(bids, tmp_path / "out", "participant", "--work-dir", work, *settings,
                      "--set", "roistats.erosion_mm=4.0")
    assert second.returncode == 0, second.stderr
    after = {p.parent.name: p.stat().st_mtime_ns for p in work.rglob("result_*.pklz")}
    rerun = {name for name in after if after[name] != before.get(name)}
    assert "roi_statistics" in rerun
    assert not rerun & {"register_template", "atlas", "subject_labels", "reference_chi", "invert_dipole",
                        "chimap_to_template"}, rerun
    assert (anat / names["roistats"]).read_bytes() != content["roistats"]
    assert (anat / names["dseg"]).read_bytes() == content["dseg"]

    # The run from scratch (new work directory) gives byte-identical labels, table and template map.
    third = _finish(scratch)
    assert third.returncode == 0, third.stderr
    again = tmp_path / "out2" / "sub-01" / "anat"
    for key in ("dseg", "table", "roistats", "template_chimap"):
        assert (again / names[key]).read_bytes() == content[key], key


def test_t1w_is_rigidly_aligned_to_the_magnitude(tmp_path):
    """A T1w-like image (other contrast, grid and position) comes out on the magnitude's grid, aligned."""
    from scipy import ndimage

    from qsmflow.interfaces.segmentation import RegisterT1wToMagnitude

    shape, voxel = (36, 40, 34), 3.0
    axes = [(np.arange(n) - (n - 1) / 2) * voxel for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")

    def head(shift):
        sx, sy, sz = shift
        brain = ((x - sx) / 45) ** 2 + ((y - sy) / 52) ** 2 + ((z - sz) / 40) ** 2 <= 1
        nucleus = ((x - sx - 15) / 10) ** 2 + ((y - sy - 8) / 14) ** 2 + ((z - sz) / 10) ** 2 <= 1
        ventricle = ((x - sx + 12) / 8) ** 2 + ((y - sy) / 18) ** 2 + ((z - sz - 8) / 6) ** 2 <= 1
        return brain, nucleus, ventricle

    affine = np.diag([voxel, voxel, voxel, 1.0])
    affine[:3, 3] = [-(n - 1) / 2 * voxel for n in shape]
    brain, nucleus, ventricle = head((0, 0, 0))
    magnitude = ndimage.gaussian_filter(0.7 * brain + 0.2 * nucleus + 0.3 * ventricle, 0.8).astype(np.float32)
    t_brain, t_nucleus, t_ventricle = head((9.0, -7.0, 5.0))  # T1w: head shifted, contrast inverted for CSF
    t1w = ndimage.gaussian_filter(0.6 * t_brain + 0.3 * t_nucleus - 0.5 * t_ventricle, 0.8).astype(np.float32)
    nib.save(nib.Nifti1Image(magnitude, affine), tmp_path / "mag.nii.gz")
    nib.save(nib.Nifti1Image(brain.astype(np.uint8), affine), tmp_path / "mask.nii.gz")
    nib.save(nib.Nifti1Image(t1w, affine), tmp_path / "t1w.nii.gz")
    result = RegisterT1wToMagnitude(t1w=str(tmp_path / "t1w.nii.gz"), magnitude=str(tmp_path / "mag.nii.gz"),
                                    brain_mask=str(tmp_path / "mask.nii.gz")).run(cwd=str(tmp_path))
    aligned = nib.load(result.outputs.t1w)
    assert aligned.shape == shape and np.allclose(aligned.affine, affine)
    data = aligned.get_fdata()
    # The nucleus of the aligned T1w sits where the magnitude's is.
    inside = data[nucleus].mean() - data[brain & ~nucleus & ~ventricle].mean()
    before = t1w[nucleus].mean() - t1w[brain & ~nucleus & ~ventricle].mean()
    assert inside > 0.25 and inside > before + 0.05, (inside, before)
    assert result.outputs.transform.endswith(".h5")
