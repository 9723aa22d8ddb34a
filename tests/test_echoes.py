"""Tests for qsmflow.recon.echoes: field fits and R2* maps on simulated multi-echo signals."""
import numpy as np
import pytest

from qsmflow.recon.echoes import (
    FIELD_FITS,
    fit_field_complex,
    fit_field_linear,
    r2star_map,
)
from qsmflow.recon.unwrap import unwrap_echoes

TWO_PI = 2.0 * np.pi
TIMES = np.array([4e-3, 12e-3, 20e-3, 28e-3])
SHAPE = (32, 32, 32)


def _signal(times, field, offset, r2star, amplitude=1.0):
    return np.stack(
        [amplitude * np.exp(-r2star * t) * np.exp(1j * (offset + TWO_PI * field * t)) for t in times], -1
    )


def _add_noise(signal, sigma, seed):
    rng = np.random.default_rng(seed)
    return signal + sigma * (rng.standard_normal(signal.shape) + 1j * rng.standard_normal(signal.shape))


@pytest.fixture(scope="module")
def voxels():
    """Independent random parameters per voxel (no spatial structure needed for fits)."""
    rng = np.random.default_rng(42)
    return {
        "field": rng.uniform(-60, 60, SHAPE).astype(np.float32),
        "offset": rng.uniform(-1.5, 1.5, SHAPE).astype(np.float32),
        "r2star": rng.uniform(10, 60, SHAPE).astype(np.float32),
    }


def _exact_unwrapped(noisy, clean, times, field, offset):
    """Noise-free phase plus the angle of the noise: the ideal temporally unwrapped phase."""
    model = np.stack([offset + TWO_PI * field * t for t in times], -1)
    return (model + np.angle(noisy * np.conj(clean))).astype(np.float32)


@pytest.mark.parametrize("name", ["linear", "complex"])
def test_noise_free_fit_is_exact(voxels, name):
    clean = _signal(TIMES, voxels["field"], voxels["offset"], voxels["r2star"])
    phase = _exact_unwrapped(clean, clean, TIMES, voxels["field"], voxels["offset"])
    result = FIELD_FITS[name](phase, np.abs(clean), TIMES)
    assert set(result) == {"field_hz", "phase_offset", "residual", "field_weight"}
    for value in result.values():
        assert value.dtype == np.float32 and value.shape == SHAPE
    np.testing.assert_allclose(result["field_hz"], voxels["field"], atol=2e-3)
    np.testing.assert_allclose(result["phase_offset"], voxels["offset"], atol=1e-4)
    assert np.max(result["residual"]) < 1e-4


def test_linear_fit_reaches_the_weighted_least_squares_precision(voxels):
    """Field and offset errors match the theoretical standard deviation of the WLS fit."""
    sigma = 0.02
    clean = _signal(TIMES, voxels["field"], voxels["offset"], voxels["r2star"])
    noisy = _add_noise(clean, sigma, seed=1)
    phase = _exact_unwrapped(noisy, clean, TIMES, voxels["field"], voxels["offset"])
    result = fit_field_linear(phase, np.abs(noisy), TIMES)

    # phase noise variance of echo n is sigma^2 / A_n^2; weights A_n^2 are the inverse variances
    weights = np.abs(clean) ** 2 / sigma**2
    mean_time = np.sum(weights * TIMES, -1) / np.sum(weights, -1)
    slope_variance = 1.0 / np.sum(weights * (TIMES - mean_time[..., None]) ** 2, -1)
    expected_field_sd = np.sqrt(np.mean(slope_variance)) / TWO_PI
    field_error = result["field_hz"] - voxels["field"]
    measured_field_sd = np.sqrt(np.mean(field_error**2))
    assert 0.85 * expected_field_sd < measured_field_sd < 1.15 * expected_field_sd
    assert abs(np.mean(field_error)) < 0.1 * expected_field_sd + 0.01

    offset_variance = slope_variance * np.sum(weights * TIMES**2, -1) / np.sum(weights, -1)
    offset_error = result["phase_offset"] - voxels["offset"]
    expected_offset_sd = np.sqrt(np.mean(offset_variance))
    assert 0.85 * expected_offset_sd < np.sqrt(np.mean(offset_error**2)) < 1.15 * expected_offset_sd
    # the residual estimates the phase noise (about sigma / A_n)
    assert 0.5 * sigma < np.median(result["residual"]) < 3.0 * sigma / np.exp(-60 * TIMES[-1])


def test_mask_and_single_echo(voxels):
    clean = _signal(TIMES[:1], voxels["field"], voxels["offset"] * 0, voxels["r2star"])
    phase = np.angle(clean).astype(np.float32)
    mask = np.zeros(SHAPE, bool)
    mask[4:20, 5:25, 6:30] = True
    for fit in FIELD_FITS.values():
        result = fit(phase, np.abs(clean), TIMES[:1], mask=mask)
        expected = phase[..., 0] / (TWO_PI * TIMES[0])
        np.testing.assert_allclose(result["field_hz"][mask], expected[mask], rtol=1e-5, atol=1e-3)
        assert np.all(result["field_hz"][~mask] == 0)
        assert np.all(result["phase_offset"] == 0)
        assert np.all(result["residual"] == 0)


def test_zero_magnitude_voxels_give_zero():
    magnitude = np.ones((4, 4, 4, 3), np.float32)
    magnitude[0, 0, 0] = 0
    magnitude[1, 1, 1, 1:] = 0  # a single echo with weight: slope undetermined
    phase = np.ones_like(magnitude)
    result = fit_field_linear(phase, magnitude, (1e-3, 2e-3, 3e-3))
    assert result["field_hz"][0, 0, 0] == 0 and result["field_hz"][1, 1, 1] == 0
    assert np.all(np.isfinite(result["field_hz"]))


def _smooth_phantom(snr, seed):
    n = 40
    axes = [np.arange(n) - n / 2.0] * 3
    x, y, z = np.meshgrid(*axes, indexing="ij")
    mask = x**2 + y**2 + z**2 < 17.0**2
    field = (60 * np.exp(-((x - 4) ** 2 + y**2 + z**2) / (2 * 8.0**2)) - 20 + 0.8 * z).astype(np.float32)
    offset = (0.8 * np.cos(x / 15.0)).astype(np.float32)
    clean = _signal(TIMES, field, offset, 30.0) * mask[..., None]
    noisy = _add_noise(clean, 1.0 / snr, seed)
    return mask, field, noisy


def test_complex_fit_at_least_as_good_as_linear_at_low_snr():
    mask, field, noisy = _smooth_phantom(snr=4.0, seed=5)
    magnitude = np.abs(noisy).astype(np.float32)
    phase = np.angle(noisy).astype(np.float32)
    unwrapped = unwrap_echoes(phase, magnitude, TIMES, mask=mask, voxel_size=(1, 1, 1))
    linear = fit_field_linear(unwrapped, magnitude, TIMES, mask=mask)["field_hz"]
    complex_ = fit_field_complex(unwrapped, magnitude, TIMES, mask=mask)["field_hz"]
    rms_linear = np.sqrt(np.mean((linear - field)[mask] ** 2))
    rms_complex = np.sqrt(np.mean((complex_ - field)[mask] ** 2))
    assert rms_linear > 2.0  # low SNR indeed
    assert rms_complex <= 1.02 * rms_linear
    assert np.median(np.abs(complex_ - field)[mask]) <= 1.02 * np.median(np.abs(linear - field)[mask])


def test_complex_fit_ignores_a_2pi_error_in_a_late_echo(voxels):
    clean = _signal(TIMES, voxels["field"], voxels["offset"], 30.0)
    noisy = _add_noise(clean, 0.05, seed=3)
    phase = _exact_unwrapped(noisy, clean, TIMES, voxels["field"], voxels["offset"])
    corrupted = np.random.default_rng(9).random(SHAPE) < 0.2
    phase[..., 3] += TWO_PI * corrupted
    linear = fit_field_linear(phase, np.abs(noisy), TIMES)["field_hz"]
    complex_ = fit_field_complex(phase, np.abs(noisy), TIMES)["field_hz"]
    assert np.median(np.abs(linear - voxels["field"])[corrupted]) > 20.0
    assert np.mean(np.abs(complex_ - voxels["field"])[corrupted] < 3.0) > 0.9
    clean_voxels = ~corrupted
    np.testing.assert_allclose(complex_[clean_voxels], linear[clean_voxels], atol=0.5)


def test_fit_validation():
    phase = np.zeros((4, 4, 4, 3), np.float32)
    magnitude = np.ones_like(phase)
    times = (1e-3, 2e-3, 3e-3)
    for fit in FIELD_FITS.values():
        with pytest.raises(ValueError, match="same shape"):
            fit(phase, magnitude[..., :2], times)
        with pytest.raises(ValueError, match="one time per echo"):
            fit(phase, magnitude, times[:2])
        with pytest.raises(ValueError, match="strictly increasing"):
            fit(phase, magnitude, (3e-3, 2e-3, 1e-3))
        with pytest.raises(ValueError, match="seconds"):
            fit(phase, magnitude, (1.0, 2.0, 3.0))
        with pytest.raises(ValueError, match="non-negative"):
            fit(phase, -magnitude, times)
        with pytest.raises(ValueError, match="mask"):
            fit(phase, magnitude, times, mask=np.zeros((4, 4, 4), bool))
    with pytest.raises(ValueError, match="iterations"):
        fit_field_complex(phase, magnitude, times, iterations=-1)


# ----------------------------------------------------------------------------------- R2*


@pytest.mark.parametrize("method", ["loglinear", "arlo"])
def test_r2star_noise_free(voxels, method):
    magnitude = np.abs(_signal(TIMES, 0.0, 0.0, voxels["r2star"], amplitude=300.0)).astype(np.float32)
    r2star = r2star_map(magnitude, TIMES, method=method)
    assert r2star.dtype == np.float32 and r2star.shape == SHAPE
    assert np.max(np.abs(r2star / voxels["r2star"] - 1.0)) < 0.005


@pytest.mark.parametrize("method", ["loglinear", "arlo"])
def test_r2star_with_noise_within_two_percent(voxels, method):
    times = np.arange(1, 9) * 5e-3
    clean = _signal(times, voxels["field"], voxels["offset"], voxels["r2star"])
    magnitude = np.abs(_add_noise(clean, 0.002, seed=11)).astype(np.float32)
    r2star = r2star_map(magnitude, times, method=method)
    relative = np.abs(r2star / voxels["r2star"] - 1.0)
    assert np.median(relative) < 0.02
    assert np.percentile(relative, 95) < 0.05


def test_r2star_mask_and_clipping():
    times = TIMES
    magnitude = np.ones((3, 3, 3, 4), np.float32)
    magnitude[0] *= np.exp(+20.0 * times)  # growing signal: negative R2*, clipped to 0
    magnitude[1] *= np.exp(-200.0 * times)  # fast decay: clipped to max_r2star
    mask = np.ones((3, 3, 3), bool)
    mask[2, 2, 2] = False
    r2star = r2star_map(magnitude, times, mask=mask, max_r2star=100.0)
    assert np.all(r2star[0] == 0)
    assert np.allclose(r2star[1], 100.0)
    assert r2star[2, 2, 2] == 0


def test_r2star_validation():
    magnitude = np.ones((4, 4, 4, 3), np.float32)
    with pytest.raises(ValueError, match="single echo"):
        r2star_map(magnitude[..., :1], (1e-3,))
    with pytest.raises(ValueError, match="equally spaced"):
        r2star_map(magnitude, (1e-3, 2e-3, 4e-3), method="arlo")
    with pytest.raises(ValueError, match="three echoes"):
        r2star_map(magnitude[..., :2], (1e-3, 2e-3), method="arlo")
    with pytest.raises(ValueError, match="unknown R2"):
        r2star_map(magnitude, (1e-3, 2e-3, 3e-3), method="magic")
    with pytest.raises(ValueError, match="4-D"):
        r2star_map(magnitude[..., 0], (1e-3,))


def test_reliability_mask_is_stricter_in_the_outer_shell():
    from qsmflow.recon.masking import reliable_field_mask

    rng = np.random.default_rng(0)
    mask = np.zeros((30, 30, 30), bool)
    mask[3:27, 3:27, 3:27] = True
    residual = np.abs(rng.normal(0.05, 0.01, mask.shape)).astype(np.float32)
    spread = 1.4826 * np.median(np.abs(residual[mask] - np.median(residual[mask])))
    misfit = np.median(residual[mask]) + 5 * spread  # a robust z-score of 5: partial volume, not noise
    residual[3, 10:14, 10:14] = misfit   # on the mask's boundary
    residual[15, 10:14, 10:14] = misfit  # deep inside
    lenient = reliable_field_mask(mask, residual, outlier_factor=10.0)
    strict_edge = reliable_field_mask(mask, residual, outlier_factor=10.0, edge_outlier_factor=3.0, edge_mm=4.0,
                                      voxel_size=(2.0, 2.0, 2.0))
    assert lenient[3, 10:14, 10:14].all() and lenient[15, 10:14, 10:14].all()
    assert not strict_edge[3, 10:14, 10:14].any()  # dropped at the edge
    assert strict_edge[15, 10:14, 10:14].all()     # kept inside: 22 mm from the edge
    with pytest.raises(ValueError, match="edge_outlier_factor"):
        reliable_field_mask(mask, residual, edge_outlier_factor=0.0)
