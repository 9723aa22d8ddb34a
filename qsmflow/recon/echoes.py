"""Multi-echo combination: the field map (Hz) from unwrapped phase, and R2* from magnitude.

Arrays are 4-D with echoes on the last axis; echo times are in seconds.

Registry: :data:`FIELD_FITS` maps a config name to a function with the signature
``(unwrapped_phase, magnitude, echo_times, *, mask=None, **params) -> dict`` whose values are
``field_hz`` (Hz), ``phase_offset`` (rad, the phase at TE = 0), ``residual`` (weighted RMS
phase misfit, rad) and ``field_weight`` (inverse standard deviation of ``field_hz`` up to the
noise level, the data weight of weighted inversions), all float32 3-D arrays and zero outside
the mask.
"""
from __future__ import annotations

import numpy as np

TWO_PI = np.float32(2.0 * np.pi)

#: Echo times above this many seconds are taken for milliseconds passed by mistake.
_MAX_ECHO_TIME_S = 1.0


def validate_echo_times(echo_times, n_echoes: int) -> np.ndarray:
    """Check that ``echo_times`` (s) has one entry per echo, positive and strictly increasing."""
    times = np.asarray(echo_times, dtype=np.float64)
    if times.ndim != 1 or times.size != n_echoes:
        raise ValueError(
            f"echo_times must list one time per echo ({n_echoes}), got {np.shape(echo_times)}"
        )
    if not np.all(np.isfinite(times)) or np.any(times <= 0):
        raise ValueError(f"echo times must be positive and finite, got {times.tolist()}")
    if np.any(np.diff(times) <= 0):
        raise ValueError(f"echo times must be strictly increasing, got {times.tolist()}")
    if times[-1] > _MAX_ECHO_TIME_S:
        raise ValueError(
            f"echo times must be in seconds; {times[-1]} s is implausible (milliseconds given?)"
        )
    return times


def validate_multi_echo(phase, magnitude, echo_times, mask=None, *, phase_name="phase"):
    """Validate a 4-D (x, y, z, echo) phase/magnitude pair, their echo times and a mask.

    Returns
    -------
    phase (float32), magnitude (float32), echo times (float64, s), mask (bool or None).
    """
    phase = np.asarray(phase)
    magnitude = np.asarray(magnitude)
    if phase.ndim != 4:
        raise ValueError(
            f"{phase_name} must be 4-D (x, y, z, echo), got {phase.ndim}-D; "
            "a single echo is shape (x, y, z, 1)"
        )
    if magnitude.shape != phase.shape:
        raise ValueError(
            f"{phase_name} and magnitude must have the same shape, got {phase.shape} and "
            f"{magnitude.shape}"
        )
    if np.iscomplexobj(phase) or np.iscomplexobj(magnitude):
        raise ValueError(f"{phase_name} and magnitude must be real arrays")
    times = validate_echo_times(echo_times, phase.shape[-1])
    phase = phase.astype(np.float32, copy=False)
    magnitude = magnitude.astype(np.float32, copy=False)
    if not np.all(np.isfinite(phase)):
        raise ValueError(f"{phase_name} contains NaN or infinite values")
    if not np.all(np.isfinite(magnitude)):
        raise ValueError("magnitude contains NaN or infinite values")
    if np.any(magnitude < 0):
        raise ValueError("magnitude must be non-negative")
    mask = validate_mask(mask, phase.shape[:3])
    return phase, magnitude, times, mask


def validate_mask(mask, shape):
    """Return ``mask`` as a bool array of ``shape`` (or None), or raise ValueError."""
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.shape != tuple(shape):
        raise ValueError(f"mask shape {mask.shape} does not match the image shape {tuple(shape)}")
    if mask.dtype != bool:
        if not np.all(np.isin(np.unique(mask), (0, 1))):
            raise ValueError("mask must be boolean (or contain only 0 and 1)")
        mask = mask.astype(bool)
    if not mask.any():
        raise ValueError("mask is empty")
    return mask


class _LineFit:
    """Weighted least-squares fit of y_n = a + b·t_n for every voxel at once.

    Times are centred on their mean and expressed in milliseconds so that float32 sums stay
    accurate; the normal matrix depends only on the weights and is reused for the
    Gauss-Newton updates of :func:`fit_field_complex`.
    """

    def __init__(self, weights, times):
        self.centre_s = float(np.mean(times))
        self.t = [np.float32((t - self.centre_s) * 1e3) for t in times]
        self.weights = weights
        self.s0 = np.zeros(weights[0].shape, np.float32)
        self.s1 = np.zeros_like(self.s0)
        self.s2 = np.zeros_like(self.s0)
        for w, t in zip(weights, self.t):
            self.s0 += w
            self.s1 += w * t
            self.s2 += w * (t * t)
        self.det = self.s0 * self.s2 - self.s1 * self.s1
        # det / (s0 * s2) is 1 - (weighted correlation of 1 and t)^2: ~0 when one echo dominates.
        self.valid = self.det > np.float32(1e-4) * self.s0 * self.s2
        self.det[~self.valid] = 1.0

    def solve(self, values):
        """Return centred intercept and slope (per ms) fitting ``values`` (one array per echo)."""
        y0 = np.zeros_like(self.s0)
        y1 = np.zeros_like(self.s0)
        for w, t, v in zip(self.weights, self.t, values):
            wv = w * v
            y0 += wv
            y1 += wv * t
        intercept = (self.s2 * y0 - self.s1 * y1) / self.det
        slope = (self.s0 * y1 - self.s1 * y0) / self.det
        intercept[~self.valid] = 0.0
        slope[~self.valid] = 0.0
        return intercept, slope

    def at_zero(self, intercept, slope_per_ms):
        """Intercept at t = 0 and slope per second from the centred parameters."""
        return (
            intercept - slope_per_ms * np.float32(self.centre_s * 1e3),
            slope_per_ms * np.float32(1e3),
        )

    def residual(self, values, intercept, slope, wrapped=False):
        """Weighted RMS of ``values - (intercept + slope·t)`` (centred parameters)."""
        total = np.zeros_like(self.s0)
        for w, t, v in zip(self.weights, self.t, values):
            misfit = v - intercept - slope * t
            if wrapped:
                misfit = _wrap(misfit)
            total += w * misfit * misfit
        with np.errstate(invalid="ignore", divide="ignore"):
            rms = np.sqrt(total / np.where(self.s0 > 0, self.s0, 1.0))
        rms[~self.valid] = 0.0
        return rms


def _wrap(angle):
    return angle - TWO_PI * np.round(angle / TWO_PI)


def weighted_line_fit(values, weights, echo_times):
    """Per-voxel weighted least-squares line through ``values`` over ``echo_times``.

    Parameters
    ----------
    values, weights : sequences of equally shaped float32 arrays, one per echo
    echo_times : sequence of floats (s)

    Returns
    -------
    intercept at t = 0, slope per second, and a bool array marking voxels where the fit is
    determined (at least two echoes with weight); both parameters are 0 elsewhere.
    """
    fit = _LineFit(list(weights), list(echo_times))
    intercept, slope = fit.solve(list(values))
    intercept, slope = fit.at_zero(intercept, slope)
    return intercept, slope, fit.valid


def _finish(field_hz, offset, residual, valid, mask, field_weight):
    keep = valid if mask is None else valid & mask
    result = {"field_hz": field_hz, "phase_offset": offset, "residual": residual, "field_weight": field_weight}
    for key, value in result.items():
        value = np.asarray(value, dtype=np.float32)
        result[key] = np.where(keep, value, np.float32(0.0)).astype(np.float32)
    return result


def _single_echo_field(phase, magnitude, echo_time, mask):
    field = phase[..., 0] / np.float32(2.0 * np.pi * echo_time)
    zeros = np.zeros(field.shape, np.float32)
    # The field's noise is that of the phase, sigma / |S|, divided by 2 pi TE.
    weight = magnitude[..., 0] * np.float32(echo_time * 1e3)
    return _finish(field, zeros, zeros, np.ones(field.shape, bool), mask, weight)


def _field_weight(fit: "_LineFit") -> np.ndarray:
    """Inverse standard deviation of the fitted slope, up to the noise level (magnitude x ms).

    With weights ``|S_n|^2`` (inverse phase variances up to sigma^2) the slope's variance is
    ``sigma^2 s0 / det`` (``det = s0 s2 - s1^2``); its inverse square root is the voxel's
    reliability as a data weight (MEDI's noise weighting, Liu T et al., MRM 2013;69:467-476).
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        weight = np.sqrt(np.maximum(fit.det, 0) / np.where(fit.s0 > 0, fit.s0, 1.0))
    weight[~fit.valid] = 0.0
    return weight.astype(np.float32)


def fit_field_linear(unwrapped_phase, magnitude, echo_times, *, mask=None) -> dict:
    """Field map from the weighted linear fit of unwrapped phase against echo time.

    Fits phi_n = phi_0 + 2 pi f TE_n in every voxel by weighted least squares in closed form,
    with weights |S_n|^2 (the inverse variance of the phase noise, which scales as
    1/|S_n|^2), as in the magnitude-weighted echo combination of multi-echo QSM (e.g.
    Wu et al., NeuroImage 2012;59:297-305; Robinson et al., NMR Biomed 2017;30:e3601).
    With a single echo the field is phi / (2 pi TE), the phase offset is taken as 0 and the
    residual is 0: a single echo cannot separate offset and field.

    Parameters
    ----------
    unwrapped_phase : (x, y, z, echo) array
        Temporally and spatially unwrapped phase in radians (see
        :func:`qsmflow.recon.unwrap.unwrap_echoes`).
    magnitude : (x, y, z, echo) array
        Magnitude of the same echoes.
    echo_times : sequence of floats
        Echo times in seconds, positive and strictly increasing.
    mask : bool array, optional
        Voxels to fit; all outputs are 0 outside it.

    Returns
    -------
    dict with float32 3-D arrays ``field_hz`` (Hz), ``phase_offset`` (rad at TE = 0),
    ``residual`` (magnitude²-weighted RMS misfit, rad) and ``field_weight`` (the inverse
    standard deviation of ``field_hz`` up to the noise level, magnitude x ms). Voxels with fewer
    than two echoes of non-zero magnitude are 0.

    References
    ----------
    .. [1] Wu B, Li W, Avram AV, Gho SM, Liu C. Fast and tissue-optimized mapping of magnetic
           susceptibility and T2* with multi-echo and multi-shot spirals. NeuroImage
           2012;59:297-305.
    .. [2] Robinson SD, Bredies K, Khabipova D, Dymerska B, Marques JP, Schweser F. An
           illustrated comparison of processing methods for MR phase imaging and QSM: combining
           array coil signals and phase unwrapping. NMR Biomed 2017;30:e3601.
    """
    phase, magnitude, times, mask = validate_multi_echo(
        unwrapped_phase, magnitude, echo_times, mask, phase_name="unwrapped_phase"
    )
    if phase.shape[-1] == 1:
        return _single_echo_field(phase, magnitude, times[0], mask)
    weights = [magnitude[..., n] ** 2 for n in range(phase.shape[-1])]
    values = [phase[..., n] for n in range(phase.shape[-1])]
    fit = _LineFit(weights, times)
    intercept, slope = fit.solve(values)
    residual = fit.residual(values, intercept, slope)
    offset, slope_per_s = fit.at_zero(intercept, slope)
    return _finish(slope_per_s / TWO_PI, offset, residual, fit.valid, mask, _field_weight(fit))


def fit_field_complex(
    unwrapped_phase,
    magnitude,
    echo_times,
    *,
    mask=None,
    iterations: int = 20,
    tolerance_hz: float = 1e-3,
) -> dict:
    """Field map from a nonlinear fit of the complex multi-echo signal.

    Minimises sum_n |S_n - |S_n| exp(i (phi_0 + 2 pi f TE_n))|^2 over (phi_0, f) in every
    voxel, the complex-domain formulation that is robust to noise-induced phase errors and
    wraps (Liu et al., "Nonlinear formulation of the magnetic field to source relationship
    for robust quantitative susceptibility mapping", MRM 2013;69:467-476; the per-voxel
    Gauss-Newton fit of MEDI's complex echo fit). The cost equals
    2 sum_n |S_n|^2 (1 - cos(phi_n - phi_0 - 2 pi f TE_n)); its Gauss-Newton step is the
    |S_n|^2-weighted line fit of sin(residual_n), so every iteration reuses the normal
    matrix of the linear fit. Initialised by :func:`fit_field_linear`; the Gauss-Newton
    curvature bounds the true one, so the steps are naturally damped.

    Parameters
    ----------
    unwrapped_phase, magnitude, echo_times, mask
        As in :func:`fit_field_linear`. Only exp(i·phase) enters the cost, so residual
        2 pi errors in the unwrapped phase do not bias the result once the initial guess is
        within the basin of the true solution.
    iterations : int
        Maximum number of Gauss-Newton iterations.
    tolerance_hz : float
        Stop when no voxel's field changes by more than this (Hz) in an iteration.

    Returns
    -------
    dict as :func:`fit_field_linear`; ``residual`` is the weighted RMS of the wrapped phase
    misfit. A single echo is handled as in :func:`fit_field_linear`.

    References
    ----------
    .. [1] Liu T, Wisnieff C, Lou M, Chen W, Spincemaille P, Wang Y. Nonlinear formulation of
           the magnetic field to source relationship for robust quantitative susceptibility
           mapping. Magn Reson Med 2013;69:467-476.
    """
    if int(iterations) != iterations or iterations < 0:
        raise ValueError(f"iterations must be a non-negative integer, got {iterations!r}")
    if not tolerance_hz > 0:
        raise ValueError(f"tolerance_hz must be positive, got {tolerance_hz!r}")
    phase, magnitude, times, mask = validate_multi_echo(
        unwrapped_phase, magnitude, echo_times, mask, phase_name="unwrapped_phase"
    )
    if phase.shape[-1] == 1:
        return _single_echo_field(phase, magnitude, times[0], mask)
    weights = [magnitude[..., n] ** 2 for n in range(phase.shape[-1])]
    values = [phase[..., n] for n in range(phase.shape[-1])]
    fit = _LineFit(weights, times)
    intercept, slope = fit.solve(values)
    active = fit.valid if mask is None else fit.valid & mask
    tolerance_per_ms = np.float32(tolerance_hz * 2.0 * np.pi * 1e-3)
    for _ in range(int(iterations)):
        sines = [np.sin(v - intercept - slope * t) for v, t in zip(values, fit.t)]
        step_intercept, step_slope = fit.solve(sines)
        intercept += step_intercept
        slope += step_slope
        if not np.any(np.abs(step_slope[active]) > tolerance_per_ms):
            break
    residual = fit.residual(values, intercept, slope, wrapped=True)
    offset, slope_per_s = fit.at_zero(intercept, slope)
    return _finish(slope_per_s / TWO_PI, offset, residual, fit.valid, mask, _field_weight(fit))


#: Field fits by config name; signature ``(unwrapped_phase, magnitude, echo_times, *, mask, **params)``.
FIELD_FITS = {"linear": fit_field_linear, "complex": fit_field_complex}


def r2star_map(
    magnitude,
    echo_times,
    *,
    mask=None,
    method: str = "loglinear",
    max_r2star: float = 500.0,
) -> np.ndarray:
    """Effective transverse relaxation rate R2* (1/s) from multi-echo magnitude.

    ``"loglinear"``: weighted least-squares line through log|S_n| against TE_n with weights
    |S_n|^2 (the inverse variance of log|S_n| under Gaussian noise), R2* = -slope.

    ``"arlo"``: auto-regression on linear operations (Pei et al., "Algorithm for fast
    monoexponential fitting based on Auto-Regression on Linear Operations (ARLO) of data",
    MRM 2015;73:843-850). For S(t) = S_0 exp(-R2* t), the integral of S over
    [TE_n, TE_n+2] equals (S_n - S_n+2) / R2*; the integral is evaluated by Simpson's rule,
    s_n = dTE/3 (S_n + 4 S_n+1 + S_n+2), and R2* is the least-squares solution of
    S_n - S_n+2 = R2* s_n. Needs at least three equally spaced echoes.

    Parameters
    ----------
    magnitude : (x, y, z, echo) array
        Magnitude images, at least two echoes (three for ARLO).
    echo_times : sequence of floats
        Echo times in seconds, positive and strictly increasing.
    mask : bool array, optional
        Output is 0 outside it.
    method : {"loglinear", "arlo"}
    max_r2star : float
        Upper clip (1/s); the result is also clipped below at 0.

    Returns
    -------
    float32 3-D array in 1/s.

    References
    ----------
    .. [1] Pei M, Nguyen TD, Thimmappa ND, et al. Algorithm for fast monoexponential fitting
           based on Auto-Regression on Linear Operations (ARLO) of data. Magn Reson Med
           2015;73:843-850.
    """
    magnitude = np.asarray(magnitude)
    if magnitude.ndim != 4:
        raise ValueError(f"magnitude must be 4-D (x, y, z, echo), got {magnitude.ndim}-D")
    if magnitude.shape[-1] < 2:
        raise ValueError("R2* needs at least two echoes; got a single echo")
    if np.iscomplexobj(magnitude):
        raise ValueError("magnitude must be real")
    times = validate_echo_times(echo_times, magnitude.shape[-1])
    magnitude = magnitude.astype(np.float32, copy=False)
    if not np.all(np.isfinite(magnitude)):
        raise ValueError("magnitude contains NaN or infinite values")
    if np.any(magnitude < 0):
        raise ValueError("magnitude must be non-negative")
    mask = validate_mask(mask, magnitude.shape[:3])
    if not max_r2star > 0:
        raise ValueError(f"max_r2star must be positive, got {max_r2star!r}")
    echoes = [magnitude[..., n] for n in range(magnitude.shape[-1])]

    if method == "loglinear":
        weights = [m * m for m in echoes]
        with np.errstate(divide="ignore"):
            logs = [np.where(m > 0, np.log(np.maximum(m, np.float32(1e-30))), 0.0) for m in echoes]
        fit = _LineFit(weights, times)
        _, slope_per_ms = fit.solve([v.astype(np.float32) for v in logs])
        r2star = -slope_per_ms * np.float32(1e3)
        valid = fit.valid
    elif method == "arlo":
        if len(echoes) < 3:
            raise ValueError("ARLO needs at least three echoes")
        spacing = np.diff(times)
        if np.ptp(spacing) > 1e-3 * spacing.mean():
            raise ValueError(f"ARLO needs equally spaced echoes, got spacings {spacing.tolist()} s")
        third = np.float32(spacing.mean() / 3.0)
        numerator = np.zeros(echoes[0].shape, np.float32)
        denominator = np.zeros_like(numerator)
        for first, middle, last in zip(echoes[:-2], echoes[1:-1], echoes[2:]):
            integral = third * (first + 4.0 * middle + last)
            numerator += integral * (first - last)
            denominator += integral * integral
        valid = denominator > 0
        r2star = numerator / np.where(valid, denominator, 1.0)
    else:
        raise ValueError(f"unknown R2* method {method!r}; choose 'loglinear' or 'arlo'")

    keep = valid if mask is None else valid & mask
    r2star = np.clip(r2star, 0.0, np.float32(max_r2star))
    return np.where(keep, r2star, np.float32(0.0)).astype(np.float32)
