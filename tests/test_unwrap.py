"""Tests for qsmflow.recon.unwrap: spatial unwrappers and multi-echo unwrapping."""
import json
import shutil
import subprocess

import numpy as np
import pytest

from qsmflow.recon.echoes import fit_field_linear
from qsmflow.recon.unwrap import (
    SPATIAL_UNWRAPPERS,
    unwrap_echoes,
    unwrap_laplacian,
    unwrap_quality_guided,
)

TWO_PI = 2.0 * np.pi
GAMMA_MHZ_PER_T = 42.58  # the constant qsm-forward uses


def _wrap(a):
    return np.angle(np.exp(1j * a)).astype(np.float32)


def _grid(shape, voxel):
    axes = [(np.arange(n) - n / 2.0) * d for n, d in zip(shape, voxel)]
    return np.meshgrid(*axes, indexing="ij")


def _assert_sign_and_correlation(result, truth, mask, *, correlation=0.999, slope=(0.98, 1.02)):
    """The unwrapped phase follows the truth with the right sign and scale (not only modulo 2 pi)."""
    estimate, reference = result[mask].astype(np.float64), truth[mask].astype(np.float64)
    assert np.corrcoef(estimate, reference)[0, 1] > correlation
    estimate, reference = estimate - estimate.mean(), reference - reference.mean()
    fitted = np.dot(estimate, reference) / np.dot(reference, reference)
    assert slope[0] < fitted < slope[1], fitted


def _error_modulo_constant(unwrapped, truth, mask):
    """Error after removing the best global 2 pi k; returns (errors in mask, k)."""
    error = (unwrapped - truth)[mask]
    k = np.round(np.median(error) / TWO_PI)
    return error - TWO_PI * k, k


@pytest.fixture(scope="module")
def smooth_phase():
    """Gaussian + quadratic phase spanning about +-15 rad in a sphere, noise outside."""
    voxel = (1.0, 1.0, 1.5)
    x, y, z = _grid((64, 64, 44), voxel)
    mask = x**2 + y**2 + z**2 < 28.0**2
    truth = 30.0 * np.exp(-((x - 5) ** 2 + y**2 + (z + 3) ** 2) / (2 * 15.0**2)) - 15.0
    truth = (truth + 0.004 * x * y).astype(np.float32)
    rng = np.random.default_rng(0)
    truth_noisy = truth + np.float32(0.05) * rng.standard_normal(truth.shape, dtype=np.float32)
    wrapped = _wrap(truth_noisy)
    wrapped[~mask] = rng.uniform(-np.pi, np.pi, np.count_nonzero(~mask))
    return {"voxel": voxel, "mask": mask, "truth": truth_noisy, "wrapped": wrapped}


def test_fixture_really_wraps(smooth_phase):
    truth, mask = smooth_phase["truth"], smooth_phase["mask"]
    assert np.ptp(truth[mask]) > 28.0
    assert np.mean(np.abs(smooth_phase["wrapped"] - truth)[mask] > 1.0) > 0.5


@pytest.mark.parametrize("name", ["laplacian", "quality"])
def test_spatial_unwrappers_recover_smooth_phase(smooth_phase, name):
    unwrap = SPATIAL_UNWRAPPERS[name]
    mask = smooth_phase["mask"]
    result = unwrap(smooth_phase["wrapped"], mask=mask, voxel_size=smooth_phase["voxel"])
    assert result.dtype == np.float32 and result.shape == mask.shape
    assert np.all(result[~mask] == 0)
    _assert_sign_and_correlation(result, smooth_phase["truth"], mask)
    error, _ = _error_modulo_constant(result, smooth_phase["truth"], mask)
    assert np.sqrt(np.mean(error**2)) < 0.05
    # both return input + 2 pi k, so on this wrap-consistent phase the recovery is exact
    assert np.max(np.abs(error)) < 1e-3
    steps = (result - smooth_phase["wrapped"])[mask] / TWO_PI
    assert np.max(np.abs(steps - np.round(steps))) < 1e-4
    # the constant is chosen so the mask mean lies in (-pi, pi]
    assert abs(float(np.mean(result[mask]))) <= np.pi + 1e-4


def test_laplacian_without_mask_on_smooth_box():
    voxel = (1.2, 1.0, 1.0)
    x, y, z = _grid((48, 56, 40), voxel)
    truth = (0.012 * (x**2 + 0.5 * y**2 - z**2) + 0.2 * y).astype(np.float32)
    assert np.ptp(truth) > 20.0
    result = unwrap_laplacian(_wrap(truth), voxel_size=voxel)
    _assert_sign_and_correlation(result, truth, np.ones(truth.shape, bool))
    error, _ = _error_modulo_constant(result, truth, np.ones(truth.shape, bool))
    assert np.max(np.abs(error)) < 1e-3


def test_classical_single_fft_laplacian_is_not_enough(smooth_phase):
    """The masked least-squares iterations are what make the Laplacian method exact here.

    The single-FFT solution (``max_iterations=0``) has the right sign and follows the truth
    (correlation 0.97, slope 0.88 measured; it used to be the negated phase, correlation
    -0.97), but is 1.5 rad RMS off; the iterations bring it to 0.001 rad.
    """
    mask, truth = smooth_phase["mask"], smooth_phase["truth"]
    for iterations, rms_bounds in ((0, (0.5, 3.0)), (50, (0.0, 0.01))):
        result = unwrap_laplacian(smooth_phase["wrapped"], smooth_phase["voxel"], mask,
                                  max_iterations=iterations, congruent=False)
        if iterations == 0:
            _assert_sign_and_correlation(result, truth, mask, correlation=0.95, slope=(0.8, 1.0))
        else:
            _assert_sign_and_correlation(result, truth, mask)
        error, _ = _error_modulo_constant(result, truth, mask)
        rms = np.sqrt(np.mean((error - error.mean()) ** 2))
        assert rms_bounds[0] < rms < rms_bounds[1], (iterations, rms)


def test_quality_guided_without_mask():
    x, y, z = _grid((40, 40, 40), (1, 1, 1))
    truth = (12.0 * np.exp(-(x**2 + y**2 + z**2) / (2 * 10.0**2))).astype(np.float32)
    result = unwrap_quality_guided(_wrap(truth))
    _assert_sign_and_correlation(result, truth, np.ones(truth.shape, bool))
    error, _ = _error_modulo_constant(result, truth, np.ones(truth.shape, bool))
    assert np.max(np.abs(error)) < 1e-4


@pytest.mark.parametrize("unwrap", [unwrap_laplacian, unwrap_quality_guided])
def test_spatial_bad_input(unwrap):
    with pytest.raises(ValueError, match="3-D"):
        unwrap(np.zeros((4, 4)), voxel_size=(1, 1, 1))
    with pytest.raises(ValueError, match="wrapped"):
        unwrap(np.full((4, 4, 4), 100.0), voxel_size=(1, 1, 1))
    with pytest.raises(ValueError, match="NaN"):
        unwrap(np.full((4, 4, 4), np.nan), voxel_size=(1, 1, 1))
    with pytest.raises(ValueError, match="mask"):
        unwrap(np.zeros((4, 4, 4)), mask=np.ones((3, 3, 3), bool), voxel_size=(1, 1, 1))
    with pytest.raises(ValueError, match="voxel_size"):
        unwrap(np.zeros((4, 4, 4)), voxel_size=(1, 1))


# --------------------------------------------------------------------------- multi-echo


def _multi_echo(echo_times, snr=40.0, seed=1, shape=(56, 56, 48)):
    """Field (Hz) with echo-to-echo wraps, smooth phase offset, R2* decay, complex noise."""
    x, y, z = _grid(shape, (1, 1, 1))
    mask = x**2 + y**2 + (1.1 * z) ** 2 < 25.0**2
    field = 150 * np.exp(-((x - 8) ** 2 + (y + 4) ** 2 + z**2) / (2 * 10.0**2))
    field = field - 40 + 1.5 * z + 0.05 * (x**2 - y**2)
    field = (field - field[mask].mean()).astype(np.float32)
    offset = (1.5 * np.cos(x / 20.0) + 0.02 * y).astype(np.float32)
    rng = np.random.default_rng(seed)
    clean, noisy = [], []
    for te in echo_times:
        signal = mask * np.exp(-25.0 * te) * np.exp(1j * (offset + TWO_PI * field * te))
        noise = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) / snr
        clean.append(signal)
        noisy.append(signal + noise)
    # exact unwrapped phase of the noisy data: the noise-free phase plus the noise's angle
    truth = np.stack(
        [
            offset + TWO_PI * field * te + np.angle(n * np.conj(c) + (c == 0))
            for te, n, c in zip(echo_times, noisy, clean)
        ],
        axis=-1,
    ).astype(np.float32)
    return {
        "mask": mask, "field": field, "offset": offset, "truth": truth,
        "phase": np.stack([np.angle(s) for s in noisy], -1).astype(np.float32),
        "magnitude": np.stack([np.abs(s) for s in noisy], -1).astype(np.float32),
        "echo_times": np.asarray(echo_times),
    }


@pytest.mark.parametrize(
    "echo_times", [(4e-3, 12e-3, 20e-3, 28e-3), (3e-3, 5.5e-3, 11e-3, 20e-3, 31e-3)],
    ids=["uniform", "nonuniform"],
)
@pytest.mark.parametrize("method", ["quality", "laplacian"])
def test_unwrap_echoes_recovers_phase_and_field(method, echo_times):
    data = _multi_echo(echo_times)
    mask = data["mask"]
    largest_spacing = np.max(np.diff(echo_times))
    assert np.ptp(TWO_PI * data["field"][mask] * largest_spacing) > TWO_PI  # echo-to-echo wraps
    unwrapped = unwrap_echoes(
        data["phase"], data["magnitude"], echo_times, mask=mask, voxel_size=(1, 1, 1), method=method
    )
    assert unwrapped.dtype == np.float32 and unwrapped.shape == data["phase"].shape
    assert np.all(unwrapped[~mask] == 0)
    for n in range(len(echo_times)):
        _assert_sign_and_correlation(unwrapped[..., n], data["truth"][..., n], mask)
        error, _ = _error_modulo_constant(unwrapped[..., n], data["truth"][..., n], mask)
        assert np.mean(np.abs(error) < 1e-3) > 0.999, f"echo {n + 1}"
    fit = fit_field_linear(unwrapped, data["magnitude"], echo_times, mask=mask)
    field_error = (fit["field_hz"] - data["field"])[mask]
    assert np.sqrt(np.mean(field_error**2)) < 0.6
    assert np.percentile(np.abs(field_error), 99.9) < 3.0
    offset_error = (fit["phase_offset"] - data["offset"])[mask]
    offset_error -= TWO_PI * np.round(np.median(offset_error) / TWO_PI)
    assert np.sqrt(np.mean(offset_error**2)) < 0.08


def test_unwrap_echoes_long_echo_train_after_short_first_spacing():
    """Late echoes are predicted from a line refitted on all earlier echoes.

    Extrapolating the first-difference frequency alone to TE = 31 ms after a 2.5 ms first
    spacing multiplies its noise by 12 and mis-unwraps about 7 % of the last echo here.
    """
    times = (3e-3, 5.5e-3, 11e-3, 20e-3, 31e-3)
    data = _multi_echo(times, snr=10.0)
    mask = data["mask"]
    unwrapped = unwrap_echoes(data["phase"], data["magnitude"], times, mask=mask, voxel_size=(1, 1, 1))
    for n in range(len(times)):
        error, _ = _error_modulo_constant(unwrapped[..., n], data["truth"][..., n], mask)
        assert np.mean(np.abs(error) > 1e-3) < 1e-3, f"echo {n + 1}"
    fit = fit_field_linear(unwrapped, data["magnitude"], times, mask=mask)
    assert np.sqrt(np.mean((fit["field_hz"] - data["field"])[mask] ** 2)) < 1.5


def test_unwrap_echoes_single_echo_is_spatial():
    data = _multi_echo((10e-3,), snr=100.0)
    result = unwrap_echoes(
        data["phase"], data["magnitude"], (10e-3,), mask=data["mask"], voxel_size=(1, 1, 1)
    )
    expected = unwrap_quality_guided(data["phase"][..., 0], mask=data["mask"])
    assert result.shape == data["phase"].shape
    np.testing.assert_array_equal(result[..., 0], expected)


def test_unwrap_echoes_without_offset_unwrapping_gives_same_field():
    times = (4e-3, 12e-3, 20e-3, 28e-3)
    data = _multi_echo(times, shape=(40, 40, 40))
    mask = data["mask"]
    kwargs = dict(mask=mask, voxel_size=(1, 1, 1))
    with_offset = unwrap_echoes(data["phase"], data["magnitude"], times, **kwargs)
    without = unwrap_echoes(data["phase"], data["magnitude"], times, unwrap_offset=False, **kwargs)
    field_a = fit_field_linear(with_offset, data["magnitude"], times, mask=mask)["field_hz"]
    field_b = fit_field_linear(without, data["magnitude"], times, mask=mask)["field_hz"]
    np.testing.assert_allclose(field_a[mask], field_b[mask], atol=1e-2)


def test_unwrap_echoes_passes_parameters_to_the_spatial_unwrapper(monkeypatch):
    times = (4e-3, 12e-3, 20e-3, 28e-3)
    data = _multi_echo(times, shape=(40, 40, 40))
    kwargs = dict(mask=data["mask"], voxel_size=(1, 1, 1), method="laplacian")
    calls = []

    def recording(phase, **arguments):
        calls.append(arguments)
        return unwrap_laplacian(phase, **arguments)

    monkeypatch.setitem(SPATIAL_UNWRAPPERS, "laplacian", recording)
    crude = unwrap_echoes(data["phase"], data["magnitude"], times, max_iterations=0, congruent=False, **kwargs)
    assert calls and all(c["max_iterations"] == 0 and c["congruent"] is False for c in calls)
    # the crude single-FFT unwrapping still gives a field of the right sign
    field = fit_field_linear(crude, data["magnitude"], times, mask=data["mask"])["field_hz"]
    _assert_sign_and_correlation(field, data["field"], data["mask"], correlation=0.9, slope=(0.5, 1.5))
    with pytest.raises(TypeError):
        unwrap_echoes(data["phase"], data["magnitude"], times, no_such_parameter=1, **kwargs)


def test_unwrap_echoes_validation():
    phase = np.zeros((4, 4, 4, 3), np.float32)
    magnitude = np.ones_like(phase)
    good = (1e-3, 2e-3, 3e-3)
    kw = dict(voxel_size=(1, 1, 1))
    with pytest.raises(ValueError, match="same shape"):
        unwrap_echoes(phase, magnitude[..., :2], good, **kw)
    with pytest.raises(ValueError, match="one time per echo"):
        unwrap_echoes(phase, magnitude, good[:2], **kw)
    with pytest.raises(ValueError, match="strictly increasing"):
        unwrap_echoes(phase, magnitude, (1e-3, 3e-3, 2e-3), **kw)
    with pytest.raises(ValueError, match="positive"):
        unwrap_echoes(phase, magnitude, (-1e-3, 2e-3, 3e-3), **kw)
    with pytest.raises(ValueError, match="seconds"):
        unwrap_echoes(phase, magnitude, (4, 12, 20), **kw)
    with pytest.raises(ValueError, match="4-D"):
        unwrap_echoes(phase[..., 0], magnitude[..., 0], (1e-3,), **kw)
    with pytest.raises(ValueError, match="unknown unwrapping method"):
        unwrap_echoes(phase, magnitude, good, method="magic", **kw)
    with pytest.raises(ValueError, match="wrapped"):
        unwrap_echoes(phase + 50.0, magnitude, good, **kw)


# ------------------------------------------------------------- end to end with qsm-forward


@pytest.fixture(scope="module")
def qsm_forward_dataset(tmp_path_factory):
    executable = shutil.which("qsm-forward")
    if executable is None:
        pytest.skip("qsm-forward is not installed")
    out = tmp_path_factory.mktemp("qsmforward")
    subprocess.run(
        [executable, "simple", str(out), "--TEs", "0.004", "0.012", "0.020", "0.028", "--B0", "3",
         "--generate-phase-offset", "--generate-shim-field", "--save-field", "--save-shimmed-field",
         "--peak-snr", "100"],
        check=True, capture_output=True,
    )
    return out


@pytest.mark.parametrize("method", ["quality", "laplacian"])
def test_qsm_forward_end_to_end(qsm_forward_dataset, method):
    """Unwrap + linear fit of qsm-forward's 3 T data reproduces its field map.

    qsm-forward's phase is 2 pi · field(ppm) · B0 · 42.58 · TE + offset, computed from the
    *shimmed* field (the total field minus a 2nd-order polynomial fit in the mask);
    `_fieldmap.nii` holds the total field before shimming, `_desc-shimmed_fieldmap.nii`
    the one in the phase. Both are in ppm.
    """
    nib = pytest.importorskip("nibabel")
    anat = qsm_forward_dataset / "sub-1" / "anat"
    truth = qsm_forward_dataset / "derivatives" / "qsm-forward" / "sub-1" / "anat"
    phase, magnitude, times = [], [], []
    for echo in range(1, 5):
        stem = anat / f"sub-1_echo-{echo}_part-phase_MEGRE"
        phase.append(np.asarray(nib.load(f"{stem}.nii").dataobj, dtype=np.float32))
        magnitude_file = anat / f"sub-1_echo-{echo}_part-mag_MEGRE.nii"
        magnitude.append(np.asarray(nib.load(magnitude_file).dataobj, dtype=np.float32))
        sidecar = json.loads(stem.with_suffix(".json").read_text())
        times.append(sidecar["EchoTime"])
        b0 = sidecar["MagneticFieldStrength"]
    phase, magnitude = np.stack(phase, -1), np.stack(magnitude, -1)
    mask = np.asarray(nib.load(truth / "sub-1_mask.nii").dataobj) > 0
    unwrapped = unwrap_echoes(phase, magnitude, times, mask=mask, voxel_size=(1, 1, 1), method=method)
    field_hz = fit_field_linear(unwrapped, magnitude, times, mask=mask)["field_hz"]
    field_ppm = field_hz / (b0 * GAMMA_MHZ_PER_T)

    shimmed = np.asarray(nib.load(truth / "sub-1_desc-shimmed_fieldmap.nii").dataobj)[mask]
    total = np.asarray(nib.load(truth / "sub-1_fieldmap.nii").dataobj)[mask]
    estimate = field_ppm[mask]
    assert np.corrcoef(estimate, shimmed)[0, 1] > 0.99
    assert np.corrcoef(estimate, total)[0, 1] > 0.95
    centred_estimate, centred_truth = estimate - estimate.mean(), shimmed - shimmed.mean()
    slope = np.dot(centred_estimate, centred_truth) / np.dot(centred_truth, centred_truth)
    assert abs(slope - 1.0) < 0.02
