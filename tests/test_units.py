"""Phase conventions: every convention detected from its own range, ambiguous ranges refused."""
import numpy as np
import pytest

from qsmflow.recon.units import (PHASE_CONVENTIONS, check_phase_convention, detect_phase_convention, phase_summary,
                                 phase_to_radians)

TRUTH = np.linspace(-np.pi, np.pi, 20001, endpoint=False)


def _stored(name, radians=TRUTH):
    """Radians written as a scanner or converter of ``name`` writes them."""
    if name == "radians":
        return radians.astype(np.float32)
    if name == "radians_0_2pi":
        return np.mod(radians, 2 * np.pi).astype(np.float32)
    if name == "integer_4096":
        return np.clip(np.round(radians / np.pi * 4096), -4096, 4095).astype(np.int16)
    if name == "integer_0_4095":
        return np.clip(np.round(radians / np.pi * 2048 + 2048), 0, 4095).astype(np.int16)
    if name == "milliradians":
        return np.round(radians * 1000).astype(np.int16)
    if name == "radians_x10000":
        return np.round(radians * 10000).astype(np.int32)
    raise AssertionError(name)


def _detect(stored):
    summary = phase_summary(stored)
    return detect_phase_convention(summary["minimum"], summary["maximum"], summary["integer"])


@pytest.mark.parametrize("name", list(PHASE_CONVENTIONS))
def test_each_convention_is_detected_and_converted(name):
    stored = _stored(name)
    convention = _detect(stored)
    assert convention.name == name
    radians = phase_to_radians(stored, convention)
    assert radians.dtype == np.float32 and np.abs(radians).max() <= np.pi + 1e-6
    error = np.angle(np.exp(1j * (radians.astype(np.float64) - TRUTH)))
    step = 2 * np.pi / (convention.turn if convention.integer else 1e6)
    assert np.abs(error).max() <= step, name  # within one stored unit: no scaling error at all


def test_radians_pass_through_unchanged():
    phase = np.linspace(-np.pi, np.pi - 0.01, 1000).astype(np.float32)
    convention = _detect(phase)
    np.testing.assert_array_equal(phase_to_radians(phase, convention), phase)


def test_ge_milliradians_are_not_taken_for_4096_integers():
    """The defect of issue 8: -3142..3141 read as -4096..4095 scaled the phase by 0.77."""
    stored = _stored("milliradians")
    assert _detect(stored).name == "milliradians"
    radians = phase_to_radians(stored, PHASE_CONVENTIONS["milliradians"])
    slope = np.polyfit(TRUTH[np.abs(TRUTH) < 3], radians[np.abs(TRUTH) < 3], 1)[0]
    assert abs(slope - 1) < 1e-3


def test_sign_flips_the_phase():
    stored = _stored("integer_4096")
    convention = PHASE_CONVENTIONS["integer_4096"]
    np.testing.assert_allclose(phase_to_radians(stored, convention, sign=-1)[1000:-1000],
                               -phase_to_radians(stored, convention)[1000:-1000], atol=1e-6)
    with pytest.raises(ValueError, match="sign"):
        phase_to_radians(stored, convention, sign=2)


@pytest.mark.parametrize("minimum, maximum, integer, phrase", [
    (0.2, 3.0, False, "ambiguous, radians in -pi..pi or in 0..2 pi"),   # fits both radians conventions
    (-180.5, 179.3, False, "neither radians"),                            # degrees
    (-100, 100, True, "integers of no known range"),                      # spans too little of any turn
    (0, 3141, True, "integers of no known range"),                        # half of GE's turn, a third of 0..4095
    (-2048, 2047, True, "integers of no known range"),                    # 12-bit signed: not a known convention
    (-40000, 40000, True, "integers of no known range"),
])
def test_unclear_ranges_are_refused_naming_the_setting(minimum, maximum, integer, phrase):
    with pytest.raises(ValueError) as error:
        detect_phase_convention(minimum, maximum, integer)
    message = str(error.value)
    assert phrase in message and "input.phase_units" in message and "milliradians" in message, message


def test_configured_convention_must_fit_the_values():
    check_phase_convention(PHASE_CONVENTIONS["integer_4096"], -3142, 3141)  # a narrow span is allowed when told
    with pytest.raises(ValueError, match=r"outside integers -3142\.\.3142.*input\.phase_units: milliradians"):
        check_phase_convention(PHASE_CONVENTIONS["milliradians"], -4096, 4095)
