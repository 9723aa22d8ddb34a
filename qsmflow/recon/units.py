"""Phase conventions: how a phase image stores one turn (2 pi), detected and converted to radians.

Scanners and converters store phase in different units: radians in [-pi, pi] or [0, 2 pi],
signed 13-bit integers -4096..4095 (Siemens via dcm2niix), unsigned 12-bit integers 0..4095
(2048 meaning 0 rad), radians x 1000 as integers -3142..3142 (GE) or radians x 10000
(-31416..31416). A wrong guess scales the whole field by a constant factor (e.g. GE data read
as -4096..4095 shrinks it by 0.77) and gives a map that looks plausible and is wrong, so
detection refuses any range that does not clearly match one convention and asks for
``input.phase_units`` instead.

Detection (:func:`detect_phase_convention`) uses the range of all echoes of a scan together:
- values that are not whole numbers are radians: [-pi, pi] when some are negative, [0, 2 pi]
  when some exceed pi; all within [0, pi] fits both, and is refused;
- whole numbers beyond pi must lie within one integer convention's range and span at least
  80 % of its turn (noise outside the head covers all phases; GE's -3142..3142 spans 77 % of
  Siemens' 8192, so it cannot be taken for it); no such convention, or several, is refused.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Tolerance on the bounds of radians conventions (float rounding of converters).
_RADIAN_TOLERANCE = 0.01

#: Fraction of a turn the values of an integer convention must span for it to be detected.
_MINIMUM_SPAN = 0.8


@dataclass(frozen=True)
class PhaseConvention:
    """One way of storing phase: ``radians = wrap((value - zero) * 2 pi / turn)``."""

    name: str
    low: float
    high: float
    turn: float
    zero: float
    integer: bool
    description: str

    def rescaling(self) -> str:
        if self.name == "radians":
            return "none (radians)"
        shift = f"(value - {self.zero:g})" if self.zero else "value"
        return f"radians = {shift} * 2 pi / {self.turn:.6g}, wrapped to [-pi, pi]"


PHASE_CONVENTIONS = {c.name: c for c in (
    PhaseConvention("radians", -np.pi, np.pi, 2 * np.pi, 0.0, False, "radians in [-pi, pi]"),
    PhaseConvention("radians_0_2pi", 0.0, 2 * np.pi, 2 * np.pi, 0.0, False, "radians in [0, 2 pi]"),
    PhaseConvention("integer_4096", -4096, 4095, 8192, 0.0, True, "integers -4096..4095 (Siemens, dcm2niix)"),
    PhaseConvention("integer_0_4095", 0, 4095, 4096, 2048.0, True, "integers 0..4095, 2048 = 0 rad (Siemens raw)"),
    PhaseConvention("milliradians", -3142, 3142, 2000 * np.pi, 0.0, True, "integers -3142..3142, radians x 1000 (GE)"),
    PhaseConvention("radians_x10000", -31416, 31416, 20000 * np.pi, 0.0, True, "integers -31416..31416, radians x 10000"),
)}

#: Values of ``input.phase_units``.
PHASE_UNITS = ("auto",) + tuple(PHASE_CONVENTIONS)


def _choices() -> str:
    return ", ".join(f"{c.name} ({c.description})" for c in PHASE_CONVENTIONS.values())


def _tolerance(convention: PhaseConvention) -> float:
    return 1.0 if convention.integer else _RADIAN_TOLERANCE


def _contains(convention: PhaseConvention, low: float, high: float) -> bool:
    tolerance = _tolerance(convention)
    return low >= convention.low - tolerance and high <= convention.high + tolerance


def phase_summary(phase: np.ndarray) -> dict:
    """Minimum, maximum and whether every value is a whole number (a sample of 100,000 values)."""
    phase = np.asarray(phase)
    sample = phase.ravel()[:: max(1, phase.size // 100000)]
    return {"minimum": float(np.min(phase)), "maximum": float(np.max(phase)),
            "integer": bool(np.issubdtype(phase.dtype, np.integer) or np.all(sample == np.round(sample)))}


def detect_phase_convention(minimum: float, maximum: float, integer: bool) -> PhaseConvention:
    """The convention of phase values spanning ``minimum..maximum`` (see the module docstring).

    Raises
    ------
    ValueError
        When no convention or more than one fits; the message names ``input.phase_units``.
    """
    span = f"phase values span {minimum:.6g}..{maximum:.6g}"
    advice = f"set input.phase_units to one of: {_choices()}"
    if not integer or (minimum >= -np.pi - _RADIAN_TOLERANCE and maximum <= np.pi + _RADIAN_TOLERANCE):
        fits = [c for c in PHASE_CONVENTIONS.values() if not c.integer and _contains(c, minimum, maximum)]
        if not fits:
            raise ValueError(f"{span}: neither radians (-pi..pi or 0..2 pi) nor scanner integers; {advice}")
        if len(fits) > 1:
            raise ValueError(f"{span}: ambiguous, radians in -pi..pi or in 0..2 pi; {advice}")
        return fits[0]
    fits = [c for c in PHASE_CONVENTIONS.values()
            if c.integer and _contains(c, minimum, maximum) and (maximum - minimum) >= _MINIMUM_SPAN * c.turn]
    if len(fits) != 1:
        reason = "ambiguous" if fits else "integers of no known range"
        raise ValueError(f"{span}: {reason}; {advice}")
    return fits[0]


def check_phase_convention(convention: PhaseConvention, minimum: float, maximum: float) -> None:
    """Raise ValueError when values spanning ``minimum..maximum`` cannot be in ``convention``."""
    if not _contains(convention, minimum, maximum):
        raise ValueError(
            f"phase values span {minimum:.6g}..{maximum:.6g}, outside {convention.description} "
            f"(input.phase_units: {convention.name}); set input.phase_units to auto or one of: {_choices()}")


def phase_to_radians(phase: np.ndarray, convention: PhaseConvention, *, sign: int = 1) -> np.ndarray:
    """Phase in ``convention`` as float32 radians in [-pi, pi], multiplied by ``sign`` (+1 or -1).

    ``sign=-1`` is for scanners whose phase runs opposite to the convention that a positive
    field (Hz) increases the phase with echo time.
    """
    if sign not in (1, -1):
        raise ValueError(f"sign must be 1 or -1, got {sign!r}")
    radians = np.asarray(phase, dtype=np.float32) - np.float32(convention.zero)
    radians *= np.float32(2.0 * np.pi / convention.turn)
    radians -= np.float32(2.0 * np.pi) * np.round(radians / np.float32(2.0 * np.pi))
    if sign == -1:
        np.negative(radians, out=radians)
    return radians
