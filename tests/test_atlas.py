"""Atlas steps on analytic cases: bands, hybrid, averaging, transform chains, shape update, nuclei."""
from __future__ import annotations

import numpy as np
import pytest

ants = pytest.importorskip("ants")

from qsmflow import atlas  # noqa: E402
from qsmflow.registration import to_ants  # noqa: E402


def _image(array, voxel=2.0):
    affine = np.diag([voxel, voxel, voxel, 1.0])
    affine[:3, 3] = -voxel * (np.asarray(array.shape[:3]) - 1) / 2
    return to_ants(np.asarray(array, dtype=np.float32), affine)


def _sphere(shape, radius, centre=None):
    centre = (np.asarray(shape) - 1) / 2 if centre is None else np.asarray(centre)
    grid = np.indices(shape).astype(np.float32)
    return (np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(axis=0)) <= radius).astype(np.float32)


def test_age_bands_by_edges_and_quantiles():
    ages = {"a": 2.0, "b": 5.0, "c": 30.0, "d": 40.0, "e": 70.0, "f": 80.0}
    bands = atlas.age_bands(ages, edges=[0, 12, 60, 120], min_scans=2)
    assert [b.scans for b in bands] == [["a", "b"], ["c", "d"], ["e", "f"]]
    assert [b.label for b in bands] == ["1", "2", "3"]
    assert bands[0].mean_age == pytest.approx(3.5)
    by_quantile = atlas.age_bands(ages, quantiles=3, min_scans=2)
    assert sorted(len(b.scans) for b in by_quantile) == [2, 2, 2]
    # the last band includes its upper edge
    assert atlas.age_bands({"x": 1.0, "y": 120.0}, edges=[0, 60, 120], min_scans=1)[1].scans == ["y"]


def test_age_bands_refuse_small_bands_and_ages_outside():
    with pytest.raises(ValueError, match="age band 2 .* has 1 scan"):
        atlas.age_bands({"a": 1.0, "b": 2.0, "c": 30.0}, edges=[0, 12, 120], min_scans=2)
    with pytest.raises(ValueError, match="outside the band edges"):
        atlas.age_bands({"a": 1.0, "b": 130.0}, edges=[0, 120], min_scans=1)
    with pytest.raises(ValueError, match="either edges"):
        atlas.age_bands({"a": 1.0}, edges=[0, 1], quantiles=2)


def test_nearest_band():
    bands = [{"label": "1", "age_min": 0, "age_max": 12, "mean_age": 5}, {"label": "2", "age_min": 60, "age_max": 90, "mean_age": 75}]
    assert atlas.nearest_band(3.0, bands) == "1"
    assert atlas.nearest_band(70.0, bands) == "2"
    assert atlas.nearest_band(50.0, bands) == "2"  # between bands: nearest mean age


def test_hybrid_is_normalised_intensity_minus_weighted_chi():
    shape = (10, 10, 10)
    mask = np.zeros(shape, np.float32)
    mask[2:8, 2:8, 2:8] = 1
    intensity = np.where(mask > 0, 300.0, 7.0).astype(np.float32)
    chi = np.zeros(shape, np.float32)
    chi[4, 4, 4] = 0.2
    hybrid = atlas.hybrid_image(_image(intensity), _image(chi), _image(mask), chi_weight=2.0).numpy()
    assert hybrid[3, 3, 3] == pytest.approx(1.0)
    assert hybrid[4, 4, 4] == pytest.approx(1.0 - 0.4)
    assert hybrid[0, 0, 0] == 0.0
    with pytest.raises(ValueError, match="mask is empty"):
        atlas.normalise_intensity(_image(intensity), _image(np.zeros(shape)))


def test_average_images_masked_and_normalised():
    shape = (6, 6, 6)
    ones = np.ones(shape, np.float32)
    half = ones.copy()
    half[:3] = 0
    a, b = _image(2 * ones), _image(4 * ones)
    mean, coverage = atlas.average_images([a, b], masks=[_image(ones), _image(half)])
    assert mean.numpy()[0, 0, 0] == pytest.approx(2.0)  # only the first covers it; no dilution by zeros
    assert mean.numpy()[5, 5, 5] == pytest.approx(3.0)
    assert coverage.numpy()[0, 0, 0] == pytest.approx(0.5)
    normalised, _ = atlas.average_images([a, b], masks=[_image(ones), _image(ones)], normalise=True)
    assert np.allclose(normalised.numpy(), 1.0)
    # chi is averaged as is: ppm keep their values
    chi, _ = atlas.average_images([_image(0.1 * ones), _image(0.2 * ones)], masks=[_image(ones), _image(ones)])
    assert np.allclose(chi.numpy(), 0.15, atol=1e-6)


def _translation(path, shift_mm):
    transform = ants.create_ants_transform(transform_type="AffineTransform", dimension=3)
    transform.set_parameters([1, 0, 0, 0, 1, 0, 0, 0, 1, *shift_mm])
    ants.write_transform(transform, str(path))
    return str(path)


def test_concatenated_transforms_resample_once_and_compose_to_one_field(tmp_path):
    shape = (24, 24, 24)
    ramp = np.broadcast_to(np.arange(24, dtype=np.float32)[:, None, None], shape).copy()
    image = _image(ramp, voxel=1.0)
    # ITK physical x is -RAS x; a +2 mm then +3 mm point shift samples 5 voxels along ITK x.
    outer = [_translation(tmp_path / "outer.mat", (2.0, 0.0, 0.0))]
    inner = [_translation(tmp_path / "inner.mat", (3.0, 0.0, 0.0))]
    chain = atlas.concatenate_transforms(outer, inner)
    once = atlas.apply_transforms(image, image, chain).numpy()
    twice = atlas.apply_transforms(image, atlas.apply_transforms(image, image, inner), outer).numpy()
    inside = (slice(8, 16),) * 3
    assert np.allclose(once[inside], twice[inside], atol=1e-4)
    assert abs(once[12, 12, 12] - ramp[12, 12, 12]) == pytest.approx(5.0, abs=1e-3)
    field = atlas.displacement_field(image, chain, tmp_path / "field.nii.gz")
    via_field = atlas.apply_transforms(image, image, [field]).numpy()
    assert np.allclose(via_field[inside], once[inside], atol=1e-3)


def test_shape_update_moves_the_template_to_the_mean_shape(tmp_path):
    """Spheres of radius 6, 8 and 10 voxels: the template of all three has radius ~8."""
    from scipy import ndimage

    shape = (32, 32, 32)
    spheres = [_image(ndimage.gaussian_filter(_sphere(shape, r), 1.0)) for r in (6.0, 8.0, 10.0)]
    masks = [_image((_sphere(shape, r + 2) > 0).astype(np.float32)) for r in (6.0, 8.0, 10.0)]
    intensities = [_image(_sphere(shape, r) + 1.0) for r in (6.0, 8.0, 10.0)]
    # Start from the smallest sphere: a biased initial template.
    template = atlas.build_template(spheres, spheres, intensities, masks, tmp_path, iterations=2, initial=spheres[0],
                                    initial_transform="affine", transform="affine", blending_weight=1.0, threads=1,
                                    stages={stage: {"metric": "meansquares", "iterations": (100, 50, 0),
                                                    "shrink_factors": (4, 2, 1), "smoothing_sigmas": (2, 1, 0)}
                                            for stage in ("rigid", "affine")})
    volume = float((template.chi.numpy() > 0.5).sum())
    radius = (3 * volume / (4 * np.pi)) ** (1 / 3)
    assert radius == pytest.approx(8.0, abs=0.5)
    # every input reaches the final template through its transforms
    for sphere, transforms in zip(spheres, template.transforms):
        warped = atlas.apply_transforms(template.hybrid, sphere, transforms).numpy() > 0.5
        final = template.chi.numpy() > 0.5
        dice = 2 * (warped & final).sum() / (warped.sum() + final.sum())
        assert dice > 0.9


def test_sharpen_blends_and_refuses_bad_weights():
    from scipy import ndimage

    shape = (16, 16, 16)
    blob = _image(ndimage.gaussian_filter(_sphere(shape, 5.0), 1.5))
    assert np.allclose(atlas.sharpen(blob, blending_weight=1.0).numpy(), blob.numpy())
    sharp = atlas.sharpen(blob, blending_weight=0.5).numpy()

    def steepest_edge(volume):
        return float(np.abs(np.diff(volume[:, 8, 8])).max())

    assert steepest_edge(sharp) > 1.2 * steepest_edge(blob.numpy())
    with pytest.raises(ValueError):
        atlas.sharpen(blob, blending_weight=1.5)


def test_delineate_nuclei_follows_the_contrast_within_the_prior():
    shape = (30, 30, 30)
    chi = np.full(shape, -0.02, np.float32)
    truth = _sphere(shape, 4.0, centre=(15, 15, 15)) > 0
    chi[truth] = 0.15
    prior = _sphere(shape, 4.0, centre=(16.5, 15, 15)) > 0  # shifted by 1.5 voxels
    labels = np.where(prior, 102, 0).astype(np.int32)
    labels[(labels == 0) & (_sphere(shape, 12.0) > 0)] = 50  # surrounding white matter label
    redrawn, report = atlas.delineate_nuclei(chi, labels, {"GP": [102]})
    drawn = redrawn == 102
    dice_before = 2 * (prior & truth).sum() / (prior.sum() + truth.sum())
    dice_after = 2 * (drawn & truth).sum() / (drawn.sum() + truth.sum())
    assert report[102]["method"] == "contrast"
    assert dice_after > 0.95 > dice_before
    assert not ((redrawn == 0) & (labels != 0)).any()  # voxels given up go to the neighbouring label
    # no contrast: the prior is kept and the report says so
    flat, report = atlas.delineate_nuclei(np.full(shape, -0.02, np.float32), labels, {"GP": [102]})
    assert report[102]["method"] == "prior"
    assert np.array_equal(flat, labels)


def test_delineate_nuclei_places_the_edge_half_way_to_each_neighbour():
    """A blurred caudate-like nucleus (0.06 ppm) beside a ventricle (0 ppm) in white matter
    (-0.03 ppm): one threshold from the surroundings' median lies below the ventricle's
    half-way value, so the nucleus grows into the ventricle; the local threshold does not."""
    from scipy import ndimage

    shape = (32, 32, 32)
    g = np.indices(shape)
    ventricle = (g[0] >= 8) & (g[0] < 16) & (abs(g[1] - 16) < 8) & (abs(g[2] - 16) < 8)
    nucleus = (g[0] >= 16) & (g[0] < 20) & (abs(g[1] - 16) < 5) & (abs(g[2] - 16) < 5)
    chi = np.full(shape, -0.03, np.float32)
    chi[ventricle] = 0.0
    chi[nucleus] = 0.06
    chi = ndimage.gaussian_filter(chi, 1.0)
    labels = np.where(ventricle, 30, 50).astype(np.int32)
    labels[ndimage.binary_dilation(nucleus)] = 103  # prior one voxel too large all round
    scores = {}
    for surroundings in ("median", "local"):
        redrawn, report = atlas.delineate_nuclei(chi, labels, {"CN": [103]}, voxel_size=(2.0,) * 3,
                                                 surroundings=surroundings)
        drawn = redrawn == 103
        assert report[103]["method"] == "contrast"
        scores[surroundings] = (2 * (drawn & nucleus).sum() / (drawn.sum() + nucleus.sum()), (drawn & ventricle).sum())
    assert scores["local"][0] > 0.9 and scores["local"][0] > scores["median"][0] + 0.05
    assert scores["local"][1] < 0.5 * scores["median"][1]
    with pytest.raises(ValueError):
        atlas.delineate_nuclei(chi, labels, {"CN": [103]}, surroundings="mean")


def test_roi_susceptibility_and_masked_correlation():
    chi = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    labels = np.array([[[1, 1], [2, 2]], [[0, 0], [0, 3]]])
    rows = atlas.roi_susceptibility(chi, labels, {1: "A", 2: "B", 4: "missing"})
    assert rows[0]["mean"] == pytest.approx(0.5) and rows[1]["mean"] == pytest.approx(2.5)
    assert rows[2]["voxels"] == 0 and np.isnan(rows[2]["mean"])
    assert atlas.masked_correlation(chi, 2 * chi + 1, np.ones(chi.shape)) == pytest.approx(1.0)


def _fake_built_atlas(root):
    import json

    folder = root / "tpl-Test"
    description = {"res": {"2": {"zooms": [2, 2, 2]}}, "cohort": {
        "1": {"age": [0, 12], "mean_age": 5.0, "scans": ["sub-01"]},
        "2": {"age": [60, 100], "mean_age": 75.0, "scans": ["sub-02"]}}}
    for cohort in ("1", "2"):
        (folder / f"cohort-{cohort}").mkdir(parents=True)
        for suffix in ("T2starw.nii.gz", "desc-brain_mask.nii.gz", "dseg.nii.gz", "dseg.tsv"):
            (folder / f"cohort-{cohort}" / f"tpl-Test_cohort-{cohort}_res-2_{suffix}").write_bytes(b"")
    (folder / "template_description.json").write_text(json.dumps(description))
    return folder


def test_band_template_for_age_picks_the_cohort_of_the_age(tmp_path):
    folder = _fake_built_atlas(tmp_path)
    child = atlas.band_template_for_age(folder, 4.0)
    assert child["cohort"] == "1" and child["template"].endswith("cohort-1/tpl-Test_cohort-1_res-2_T2starw.nii.gz")
    assert child["name"] == "Testcohort1"
    assert atlas.band_template_for_age(folder, 50.0)["cohort"] == "2"  # between bands: nearest mean age
    with pytest.raises(FileNotFoundError, match="not a built qsmflow atlas"):
        atlas.band_template_for_age(tmp_path, 4.0)


def test_segmentation_uses_the_built_atlas_cohort_nearest_the_age(tmp_path):
    from qsmflow.config import load_config
    from qsmflow.workflows.segmentation import init_segmentation_wf

    folder = _fake_built_atlas(tmp_path)
    config = load_config(overrides=[f"segmentation.atlas.built={folder}"])
    workflow = init_segmentation_wf(config, tmp_path / "out", entities={"subject": "01"}, source_file="x.nii.gz",
                                    age=80.0)
    assert workflow.get_node("atlas").inputs.template.endswith("tpl-Test_cohort-2_res-2_T2starw.nii.gz")
    # through a built atlas the magnitude alone by default, the configured share on request; the
    # MNI default keeps registration.susceptibility_weight
    assert workflow.get_node("register_template").inputs.susceptibility_weight == 0.0
    for overrides, expected in (([f"segmentation.atlas.built={folder}", "segmentation.atlas.built_susceptibility_weight=0.3"], 0.3),
                                ([f"segmentation.atlas.built={folder}", "segmentation.atlas.built_susceptibility_weight=null"], 0.5),
                                ([], 0.5)):
        chosen = init_segmentation_wf(load_config(overrides=overrides), tmp_path / "out", entities={"subject": "01"},
                                      source_file="x.nii.gz", age=80.0)
        assert chosen.get_node("register_template").inputs.susceptibility_weight == expected, overrides
    with pytest.raises(ValueError, match="has no age"):
        init_segmentation_wf(config, tmp_path / "out", entities={"subject": "01"}, source_file="x.nii.gz")


def test_band_labels_reach_a_scan_in_one_resampling_with_the_band_chimap(tmp_path):
    """A built cohort's files give an atlas whose labels come from the labelled template through the
    cohort's own field (one resampling), and whose susceptibility channel is the cohort's Chimap."""
    import nibabel as nib
    from scipy import ndimage

    from qsmflow import segmentation

    shape, voxel = (24, 24, 24), 2.0
    affine = np.diag([voxel, voxel, voxel, 1.0])
    affine[:3, 3] = -voxel * (np.asarray(shape) - 1) / 2
    blob = ndimage.gaussian_filter(_sphere(shape, 8.0) + 0.5 * _sphere(shape, 3.0, centre=(9, 11, 12)), 1.0)
    mask = _sphere(shape, 10.0)
    source = np.zeros(shape, np.int16)
    source[_sphere(shape, 3.0, centre=(11, 11, 11)) > 0] = 101  # labelled template: PU_L around voxel 11
    wrong = np.zeros(shape, np.int16)
    wrong[_sphere(shape, 3.0, centre=(14, 14, 14)) > 0] = 101  # the cohort's own dseg: elsewhere
    folder = _fake_built_atlas(tmp_path)
    stem = folder / "cohort-1" / "tpl-Test_cohort-1_res-2"
    for suffix, data in (("T2starw", blob), ("desc-brain_mask", mask), ("dseg", wrong), ("Chimap", 0.1 * blob)):
        nib.save(nib.Nifti1Image(np.asarray(data, np.float32), affine), f"{stem}_{suffix}.nii.gz")
    nib.save(nib.Nifti1Image(source.astype(np.float32), affine), str(folder / "tpl-Test_desc-labelled_dseg.nii.gz"))
    segmentation.write_table(f"{stem}_dseg.tsv", segmentation.default_table())
    # cohort points -> labelled-template points: +4 mm along ITK x (2 voxels)
    field = atlas.displacement_field(_image(blob), [_translation(tmp_path / "t.mat", (4.0, 0.0, 0.0))],
                                     f"{stem}_from-labelled_mode-image_xfm.nii.gz")
    files = atlas.band_template_for_age(folder, 4.0)
    assert {"chi", "source_labels", "label_transform"} <= set(files) and files["label_transform"] == field
    band = atlas.band_segmentation_atlas(files)
    assert np.allclose(band.chi, 0.1 * blob, atol=1e-6) and band.label_source is not None
    expected = atlas.apply_transforms(_image(blob), _image(source.astype(np.float32)), [field],
                                      interpolator="genericLabel").numpy() == 101
    quick = {s: {"iterations": (20, 10, 0), "shrink_factors": (4, 2, 1), "smoothing_sigmas": (2, 1, 0)}
             for s in ("rigid", "affine", "syn")}
    scores = {}
    for name, candidate in (("once", band), ("own dseg", atlas.band_segmentation_atlas(
            {k: v for k, v in files.items() if k not in ("source_labels", "label_transform")}))):
        # the scan is the cohort template itself: the registration is the identity
        labels, _, _ = segmentation.template_to_subject(blob, mask > 0, affine, candidate, stages=quick, threads=1,
                                                        chi=0.1 * blob, qsm_mask=mask > 0, susceptibility_weight=0.5)
        found = labels == 101
        scores[name] = 2 * (found & expected).sum() / (found.sum() + expected.sum())
    assert scores["once"] > 0.9, scores
    assert scores["own dseg"] < 0.5, scores  # without the label source the cohort's own dseg is carried
