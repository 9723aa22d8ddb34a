"""Detection and conversion of the units of phase images."""
from __future__ import annotations

import numpy as np

#: Tolerance on |phase| <= pi for data already in radians (float rounding of converters).
_RADIAN_TOLERANCE = 0.01


def detect_phase_units(phase: np.ndarray) -> dict:
    """Tell whether a phase image holds radians or scanner integers, and how to rescale it.

    Scanner phase is stored as integers spanning 2π, typically -4096..4095 (Siemens) or
    0..4095; its range is inferred as the smallest power of two covering the data, symmetric
    when negative values are present.

    Returns
    -------
    dict
        ``units`` ('radians' or 'integer'), ``minimum`` and ``maximum`` of the data, and for
        integers ``integer_range`` (low, high) mapped onto [-π, π).

    Raises
    ------
    ValueError
        When the values are neither radians nor integers (e.g. degrees or a scaled float).
    """
    low, high = float(np.min(phase)), float(np.max(phase))
    result = {"minimum": low, "maximum": high}
    if low >= -np.pi - _RADIAN_TOLERANCE and high <= np.pi + _RADIAN_TOLERANCE:
        result["units"] = "radians"
        return result
    sample = phase.ravel()[:: max(1, phase.size // 100000)]
    if not np.allclose(sample, np.round(sample), atol=1e-3):
        raise ValueError(f"values span {low:.4g}..{high:.4g}: neither radians (±π) nor scanner integers")
    span = 2.0 ** np.ceil(np.log2(max(abs(low), abs(high) + 1.0)))
    integer_range = (-span, span - 1.0) if low < 0 else (0.0, span - 1.0)
    result.update(units="integer", integer_range=integer_range)
    return result


def phase_to_radians(phase: np.ndarray, units: dict) -> np.ndarray:
    """Rescale phase described by :func:`detect_phase_units` to radians in [-π, π)."""
    phase = np.asarray(phase, dtype=np.float32)
    if units["units"] == "radians":
        return np.angle(np.exp(1j * phase)).astype(np.float32) if np.abs(phase).max() > np.pi else phase
    low, high = units["integer_range"]
    scaled = (phase - low) / (high - low + 1.0) * np.float32(2.0 * np.pi) - np.float32(np.pi)
    return scaled.astype(np.float32)
