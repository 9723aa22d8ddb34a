"""Tests for qsmflow.recon.masking on a simulated head: brain, dark skull, bright scalp."""
import numpy as np
import pytest
import scipy.ndimage as ndi

from qsmflow.recon.masking import MASKING_METHODS, brain_mask_from_magnitude

SHAPE = (64, 64, 56)
VOXEL = (1.0, 1.0, 1.2)


def _radius_mm(shape=SHAPE, voxel=VOXEL, centre_shift=(0.0, 0.0, 0.0)):
    axes = [
        (np.arange(n) - (n - 1) / 2.0 - s) * d for n, d, s in zip(shape, voxel, centre_shift)
    ]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    return np.sqrt(x**2 + y**2 + z**2), (x, y, z)


def _dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _noisy(image, sigma, seed):
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, sigma, image.shape) + 1j * rng.normal(0, sigma, image.shape)
    return np.abs(image + noise).astype(np.float32)


@pytest.fixture(scope="module")
def head():
    """Brain (r < 18 mm) with a ventricle, dark skull (18-22 mm), bright scalp (22-26 mm).

    A 2 mm wide bright rod bridges the skull, as the optic nerves or vessels do, so that
    thresholding alone joins brain and scalp into one component.
    """
    radius, (x, y, z) = _radius_mm()
    brain = radius < 18.0
    ventricle = (x / 5.0) ** 2 + (y / 3.0) ** 2 + (z / 4.0) ** 2 < 1.0
    scalp = (radius >= 22.0) & (radius < 26.0)
    bridge = (np.abs(y) < 1.0) & (np.abs(z) < 1.2) & (x > 0) & (radius < 26.0)
    image = np.zeros(SHAPE, dtype=np.float32)
    image[brain] = 0.8 + 0.1 * np.sin(x[brain] / 3.0)
    image[ventricle] = 0.08
    image[(radius >= 18.0) & (radius < 22.0)] = 0.05
    image[scalp] = 1.2
    image[bridge & ~brain] = 0.9
    return {"image": image, "brain": brain, "scalp": scalp, "ventricle": ventricle}


def test_separates_brain_from_scalp(head):
    magnitude = _noisy(head["image"], 0.05, seed=1)
    mask = brain_mask_from_magnitude(magnitude, VOXEL)
    assert mask.dtype == bool and mask.shape == SHAPE
    assert _dice(mask, head["brain"]) >= 0.95
    assert np.count_nonzero(mask & head["scalp"]) == 0


def test_thresholding_alone_would_keep_the_scalp(head):
    """Guards the test above: without erosion, the bridge joins scalp and brain."""
    magnitude = _noisy(head["image"], 0.05, seed=1)
    mask = brain_mask_from_magnitude(magnitude, VOXEL, erosion_mm=0.0)
    assert np.count_nonzero(mask & head["scalp"]) > 0.5 * head["scalp"].sum()


def test_fills_dark_ventricle(head):
    magnitude = _noisy(head["image"], 0.03, seed=2)
    mask = brain_mask_from_magnitude(magnitude, VOXEL)
    assert mask[head["ventricle"]].all()
    unfilled = brain_mask_from_magnitude(magnitude, VOXEL, fill_holes=False, closing_mm=0.0)
    assert unfilled[head["ventricle"]].mean() < 0.5


def test_multi_echo_input_and_fractional_threshold(head):
    decay = np.exp(-np.array([4, 12, 20, 28], dtype=np.float32) * 0.02)
    echoes = np.stack([_noisy(head["image"] * d, 0.03, seed=10 + i) for i, d in enumerate(decay)], -1)
    mask = brain_mask_from_magnitude(echoes, VOXEL, threshold=0.3)
    assert _dice(mask, head["brain"]) >= 0.95
    assert np.count_nonzero(mask & head["scalp"]) == 0


def test_registry():
    assert MASKING_METHODS["threshold"] is brain_mask_from_magnitude


@pytest.mark.parametrize(
    "magnitude, message",
    [
        (np.ones((8, 8)), "3-D or 4-D"),
        (np.zeros((8, 8, 8)), "no positive"),
        (np.full((8, 8, 8), np.nan), "NaN"),
    ],
)
def test_bad_input(magnitude, message):
    with pytest.raises(ValueError, match=message):
        brain_mask_from_magnitude(magnitude, (1, 1, 1))


def test_bad_parameters(head):
    with pytest.raises(ValueError, match="voxel_size"):
        brain_mask_from_magnitude(head["image"], (1, 1))
    with pytest.raises(ValueError, match="threshold"):
        brain_mask_from_magnitude(head["image"], VOXEL, threshold=1.5)
    with pytest.raises(ValueError, match="erosion"):
        brain_mask_from_magnitude(head["image"], VOXEL, erosion_mm=60.0)


# --------------------------------------------------------------------------- reliability mask
def _echo_fit_residual(seed=7, shape=(40, 40, 40)):
    """A box brain whose echo-fit residual is noise (Rayleigh, skewed like an RMS residual), plus
    a 2-voxel band of large residuals on one face (a genuine misfit next to air or bone)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, bool)
    mask[4:36, 4:36, 4:36] = True
    residual = (0.01 * np.hypot(rng.normal(size=shape), rng.normal(size=shape))).astype(np.float32)
    band = np.zeros(shape, bool)
    band[4:6, 8:30, 8:30] = True
    residual[band] += 0.1
    # a change far below the noise, as 1 mrad rounding of the phase gives (5 % of the residual's
    # robust spread, measured on qsm-forward's head)
    perturbed = residual + rng.normal(0, 3.5e-4, shape).astype(np.float32)
    return mask, band, residual, perturbed


@pytest.mark.parametrize("factor", [10.0, 3.0])  # fast's and default/accurate's echoes.outlier_factor
def test_reliability_mask_does_not_move_with_a_perturbation_far_below_the_noise(factor):
    """Issue 8: GE's 1 mrad rounding moved noise-level outliers in and out of the mask, and
    V-SHARP's erosion grew each hole into a sphere. Only clusters of outliers are dropped now."""
    from qsmflow.recon.masking import _erode_mm, reliable_field_mask

    mask, band, residual, perturbed = _echo_fit_residual()
    options = dict(outlier_factor=factor, edge_outlier_factor=3.0, edge_mm=6.0, voxel_size=(1.0, 1.0, 1.0))
    kept, kept_perturbed = (reliable_field_mask(mask, r, **options) for r in (residual, perturbed))
    assert not kept[band].any() and not kept_perturbed[band].any()  # the misfit band is dropped
    beside = ndi.binary_dilation(band, np.ones((3, 3, 3), bool))       # noise outliers touching the band join it
    assert (kept | beside == mask | beside).all()                   # nothing else: scattered outliers stay
    assert (kept ^ kept_perturbed).sum() <= 3
    eroded, eroded_perturbed = (_erode_mm(k, 4.0, np.ones(3)) for k in (kept, kept_perturbed))  # V-SHARP's erosion
    assert (eroded ^ eroded_perturbed).sum() <= 10
    # dropping every outlier (the old rule) punches noise holes that the perturbation moves
    single, single_perturbed = (reliable_field_mask(mask, r, min_cluster=1, **options) for r in (residual, perturbed))
    assert (mask & ~band & ~single).sum() > 50
    assert (single ^ single_perturbed).sum() >= 5
    assert (_erode_mm(single, 4.0, np.ones(3)) ^ _erode_mm(single_perturbed, 4.0, np.ones(3))).sum() > 100


def test_reliability_mask_drops_an_outlier_cluster_from_its_size():
    from qsmflow.recon.masking import reliable_field_mask

    mask, _, residual, _ = _echo_fit_residual(shape=(40, 40, 40))
    residual = np.full(mask.shape, 0.01, np.float32) + 0.001 * (np.indices(mask.shape).sum(0) % 3)
    residual[20, 20, 20:29] = 1.0  # 9 voxels deep inside: kept with min_cluster 10
    residual[10, 10, 10:20] = 1.0  # 10 voxels: dropped
    kept = reliable_field_mask(mask, residual, outlier_factor=10.0)
    assert kept[20, 20, 20:29].all() and not kept[10, 10, 10:20].any()
    assert kept.sum() == mask.sum() - 10
    assert not reliable_field_mask(mask, residual, outlier_factor=10.0, min_cluster=9)[20, 20, 20:29].any()
    with pytest.raises(ValueError, match="min_cluster"):
        reliable_field_mask(mask, residual, min_cluster=0)
    with pytest.raises(ValueError, match="min_cluster"):
        reliable_field_mask(mask, residual, min_cluster=2.5)
