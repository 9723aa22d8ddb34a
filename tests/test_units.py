import numpy as np
import pytest

from qsmflow.recon.units import detect_phase_units, phase_to_radians


def test_radians_pass_through():
    phase = np.linspace(-np.pi, np.pi - 0.01, 1000).astype(np.float32)
    units = detect_phase_units(phase)
    assert units["units"] == "radians"
    np.testing.assert_array_equal(phase_to_radians(phase, units), phase)


@pytest.mark.parametrize("low, high", [(-4096, 4095), (0, 4095), (-2048, 2047)])
def test_scanner_integers_are_rescaled(low, high):
    truth = np.linspace(-np.pi, np.pi, 5000, endpoint=False)
    integers = np.round((truth + np.pi) / (2 * np.pi) * (high - low + 1) + low).astype(np.float32)
    units = detect_phase_units(integers)
    assert units["units"] == "integer"
    assert units["integer_range"] == (low, high)
    radians = phase_to_radians(integers, units)
    error = np.angle(np.exp(1j * (radians - truth)))
    assert np.abs(error).max() < 2 * np.pi / (high - low + 1)


def test_scaled_floats_are_rejected():
    with pytest.raises(ValueError, match="neither radians"):
        detect_phase_units(np.linspace(-180.5, 179.3, 1001))
