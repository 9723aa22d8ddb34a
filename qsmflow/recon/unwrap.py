"""Phase unwrapping: spatial (Laplacian, quality-guided) and multi-echo (temporal).

Registry: :data:`SPATIAL_UNWRAPPERS` maps a config name to a function called as
``(phase, mask=None, voxel_size=None, **params) -> float32 3-D`` (pass ``mask`` and
``voxel_size`` by keyword). Every spatial unwrapper returns a phase congruent with its input
(input + 2 pi k per voxel, unless told otherwise), zero outside the mask, with the 2 pi
multiple of each connected region chosen so that the region's mean lies in (-pi, pi].
"""
from __future__ import annotations

import numpy as np
import scipy.fft
import scipy.ndimage as ndi
from skimage.restoration import unwrap_phase

from qsmflow.recon.dipole import irfftn, laplacian_kernel, rfftn
from qsmflow.recon.echoes import validate_mask, validate_multi_echo, weighted_line_fit

TWO_PI = np.float32(2.0 * np.pi)

#: Tolerance on |phase| (rad) beyond which the input is not taken for wrapped radians.
_WRAPPED_LIMIT = 2.0 * np.pi + 1e-3


def _wrap(angle):
    """Wrap to [-pi, pi] (float32 in, float32 out)."""
    return angle - TWO_PI * np.round(angle / TWO_PI)


def _validate_phase(phase) -> np.ndarray:
    phase = np.asarray(phase)
    if phase.ndim != 3:
        raise ValueError(f"phase must be 3-D (x, y, z), got {phase.ndim}-D")
    if np.iscomplexobj(phase) or not np.issubdtype(phase.dtype, np.number):
        raise ValueError(f"phase must be a real array in radians, got dtype {phase.dtype}")
    phase = phase.astype(np.float32, copy=False)
    if not np.all(np.isfinite(phase)):
        raise ValueError("phase contains NaN or infinite values")
    largest = float(np.max(np.abs(phase))) if phase.size else 0.0
    if largest > _WRAPPED_LIMIT:
        raise ValueError(
            f"phase must be wrapped radians (|phase| <= 2 pi), found {largest:.4g}: "
            "convert scanner units to radians first"
        )
    return phase


def _validate_voxel_size(voxel_size) -> np.ndarray:
    if voxel_size is None:
        return np.ones(3)
    sizes = np.asarray(voxel_size, dtype=np.float64)
    if sizes.shape != (3,) or not np.all(np.isfinite(sizes)) or np.any(sizes <= 0):
        raise ValueError(f"voxel_size must be three positive numbers in mm, got {voxel_size!r}")
    return sizes


def _bounding_box(mask, margin: int = 0):
    """Slices of the smallest box holding ``mask`` grown by ``margin`` voxels (clipped)."""
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        start = max(int(present[0]) - margin, 0)
        stop = min(int(present[-1]) + 1 + margin, mask.shape[axis])
        box.append(slice(start, stop))
    return tuple(box)


def _centre_regions(unwrapped, mask):
    """Subtract the 2 pi multiple that brings each connected region's mean into (-pi, pi]."""
    if mask is None:
        return unwrapped - TWO_PI * np.round(np.mean(unwrapped, dtype=np.float64) / TWO_PI)
    labels, count = ndi.label(mask)
    sums = np.bincount(labels.ravel(), weights=unwrapped.ravel(), minlength=count + 1)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    shift = np.zeros(count + 1, np.float32)
    shift[1:] = TWO_PI * np.round(sums[1:] / np.maximum(sizes[1:], 1) / (2.0 * np.pi))
    return unwrapped - shift[labels]


def _region_circular_offset(difference, mask):
    """Circular mean of ``difference`` in each connected region of ``mask``, per voxel."""
    if mask is None:
        return np.float32(np.angle(np.exp(1j * difference.astype(np.complex64)).sum()))
    labels, count = ndi.label(mask)
    flat = labels.ravel()
    cos_sum = np.bincount(flat, weights=np.cos(difference).ravel(), minlength=count + 1)
    sin_sum = np.bincount(flat, weights=np.sin(difference).ravel(), minlength=count + 1)
    offsets = np.arctan2(sin_sum, cos_sum).astype(np.float32)
    offsets[0] = 0.0
    return offsets[labels]


class _MaskedPoisson:
    """Normal equations of weighted least-squares unwrapping, D^T W D u = D^T W g.

    D holds forward differences divided by the voxel size; W keeps only the differences
    between two voxels inside the mask (Neumann condition on the mask boundary); g holds the
    wrapped differences of the phase. D^T W D is positive semi-definite (minus the masked
    Laplacian). The preconditioner is the periodic FFT inverse of the unweighted D^T D
    (minus the inverse of the Laplacian's spectrum), i.e. the classical Laplacian unwrapping
    solve, so that ``precondition(right_hand_side(phase))`` is that solution, not its negative.
    """

    def __init__(self, mask, voxel_size):
        self.shape = mask.shape
        self.edge_weights = []
        for axis, size in enumerate(voxel_size):
            lower = [slice(None)] * 3
            upper = [slice(None)] * 3
            lower[axis] = slice(None, -1)
            upper[axis] = slice(1, None)
            both = mask[tuple(lower)] & mask[tuple(upper)]
            weight = both.astype(np.float32) / np.float32(size**2)
            self.edge_weights.append((tuple(lower), tuple(upper), weight))
        kernel = laplacian_kernel(self.shape, voxel_size)
        kernel[0, 0, 0] = 1.0
        self.inverse_kernel = np.float32(-1.0) / kernel
        self.inverse_kernel[0, 0, 0] = 0.0

    def _adjoint_difference(self, differences):
        """D^T of per-axis differences (minus their divergence)."""
        out = np.zeros(self.shape, np.float32)
        for (lower, upper, _), flux in zip(self.edge_weights, differences):
            out[lower] -= flux
            out[upper] += flux
        return out

    def apply(self, u):
        return self._adjoint_difference([(u[upper] - u[lower]) * w for lower, upper, w in self.edge_weights])

    def right_hand_side(self, wrapped_phase):
        return self._adjoint_difference(
            [
                _wrap(wrapped_phase[upper] - wrapped_phase[lower]) * w
                for lower, upper, w in self.edge_weights
            ]
        )

    def precondition(self, residual):
        return irfftn(rfftn(residual) * self.inverse_kernel, self.shape).astype(np.float32, copy=False)


def unwrap_laplacian(
    phase,
    voxel_size=None,
    mask=None,
    *,
    max_iterations: int = 50,
    tolerance: float = 1e-3,
    congruent: bool = True,
) -> np.ndarray:
    """Laplacian (least-squares) phase unwrapping, FFT-based.

    The Laplacian of the unwrapped phase is computed from the wrapped phase alone, because
    neighbouring differences are unaffected by 2 pi wraps when wrapped back into (-pi, pi];
    inverting the Laplacian by FFT gives the unwrapped phase (Schofield & Zhu, Opt Lett
    2003;28:1194-1196; Bagher-Ebadian et al., MRI 2008;26:1197-1203). The discrete form used
    here, div(wrap(grad phase)), is exact whenever neighbours differ by less than pi
    (unlike the continuous cos·lap(sin) - sin·lap(cos) identity, which underestimates steep
    gradients), and it is the unweighted least-squares solution of Ghiglia & Romero (JOSA A
    1994;11:107-117).

    With a mask only differences between two voxels inside it are used, so the noise
    outside cannot leak in; the resulting masked Poisson equation is solved by conjugate
    gradients preconditioned with the FFT Laplacian inverse (the weighted least-squares
    scheme of Ghiglia & Romero 1994), which converges in a handful of iterations; the first
    iterate is the classical single-FFT solution (``max_iterations=0``). The volume is
    cropped to the mask's bounding box and zero-padded to an FFT-friendly size, which also
    removes the periodic wrap-around. Finally, unless ``congruent=False``, the result is made
    congruent with the input: phase + 2 pi round((laplacian - phase) / 2 pi), after
    aligning each region's constant to the input by a circular mean.

    Parameters
    ----------
    phase : 3-D array
        Wrapped phase in radians.
    voxel_size : sequence of 3 floats, optional
        Voxel size in mm; only the aspect ratio matters. None means isotropic voxels.
    mask : bool array, optional
        Region to unwrap; output is 0 outside it.
    max_iterations : int
        Maximum number of preconditioned conjugate-gradient iterations.
    tolerance : float
        Relative residual norm at which to stop.
    congruent : bool
        Return input + 2 pi k (exact where the least-squares solution is within pi of the
        truth) rather than the smooth least-squares solution.

    Returns
    -------
    float32 array of ``phase.shape``.

    References
    ----------
    .. [1] Schofield MA, Zhu Y. Fast phase unwrapping algorithm for interferometric
           applications. Opt Lett 2003;28:1194-1196.
    .. [2] Bagher-Ebadian H, et al. Magn Reson Imaging 2008;26:1197-1203.
    .. [3] Ghiglia DC, Romero LA. Robust two-dimensional weighted and unweighted phase
           unwrapping that uses fast transforms and iterative methods. J Opt Soc Am A
           1994;11:107-117.
    """
    phase = _validate_phase(phase)
    sizes = _validate_voxel_size(voxel_size)
    mask = validate_mask(mask, phase.shape)
    if int(max_iterations) != max_iterations or max_iterations < 0:
        raise ValueError(f"max_iterations must be a non-negative integer, got {max_iterations!r}")
    if not tolerance > 0:
        raise ValueError(f"tolerance must be positive, got {tolerance!r}")

    box = _bounding_box(mask) if mask is not None else tuple(slice(None) for _ in range(3))
    region = np.ones(phase.shape, bool)[box] if mask is None else mask[box]
    padded_shape = tuple(scipy.fft.next_fast_len(n + 1, real=True) for n in region.shape)
    padding = [(0, p - n) for p, n in zip(padded_shape, region.shape)]
    region_padded = np.pad(region, padding)
    wrapped = np.pad(phase[box], padding)

    system = _MaskedPoisson(region_padded, sizes)
    rhs = system.right_hand_side(wrapped)
    solution = system.precondition(rhs)
    rhs_norm = float(np.linalg.norm(rhs))
    if max_iterations and rhs_norm > 0:
        residual = rhs - system.apply(solution)
        direction = system.precondition(residual)
        rho = float(np.vdot(residual, direction))
        for _ in range(int(max_iterations)):
            if np.linalg.norm(residual) <= tolerance * rhs_norm or rho <= 0:
                break
            product = system.apply(direction)
            step = np.float32(rho / float(np.vdot(direction, product)))
            solution += step * direction
            residual -= step * product
            preconditioned = system.precondition(residual)
            rho_next = float(np.vdot(residual, preconditioned))
            direction = preconditioned + np.float32(rho_next / rho) * direction
            rho = rho_next

    crop = tuple(slice(0, n) for n in region.shape)
    solution = solution[crop]
    wrapped = wrapped[crop]
    region_mask = None if mask is None else region
    solution = solution - _region_circular_offset(solution - wrapped, region_mask)
    if congruent:
        solution = wrapped + TWO_PI * np.round((solution - wrapped) / TWO_PI)
    solution = _centre_regions(solution, region_mask)
    result = np.zeros(phase.shape, np.float32)
    result[box] = np.where(region, solution, np.float32(0.0))
    return result


def unwrap_quality_guided(phase, mask=None, voxel_size=None, *, seed: int = 0) -> np.ndarray:
    """Quality-guided (reliability-sorted) 3-D phase unwrapping.

    Unwraps along a non-continuous path that joins voxels in order of decreasing
    reliability (a second-difference measure of local smoothness), so that noisy or steep
    regions are reached last (Abdul-Rahman et al., "Fast and robust three-dimensional
    best path phase unwrapping algorithm", Appl Opt 2007;46:6623-6635), using the
    implementation in :func:`skimage.restoration.unwrap_phase`. Masked voxels neither
    guide nor receive the unwrapping. The result is exactly the input plus 2 pi k per voxel.

    Parameters
    ----------
    phase : 3-D array
        Wrapped phase in radians.
    mask : bool array, optional
        Region to unwrap; output is 0 outside it.
    voxel_size : ignored
        Accepted for a uniform registry signature (the reliability measure is unitless).
    seed : int
        Seed of the unwrapper's random initialisation, for reproducible results.

    Returns
    -------
    float32 array of ``phase.shape``.

    References
    ----------
    .. [1] Abdul-Rahman HS, Gdeisat MA, Burton DR, Lalor MJ, Lilley F, Moore CJ. Fast and robust
           three-dimensional best path phase unwrapping algorithm. Appl Opt 2007;46:6623-6635.
    """
    phase = _validate_phase(phase)
    _validate_voxel_size(voxel_size)
    mask = validate_mask(mask, phase.shape)
    box = _bounding_box(mask) if mask is not None else tuple(slice(None) for _ in range(3))
    wrapped = phase[box]
    wrapped = wrapped - TWO_PI * np.floor((wrapped + np.float32(np.pi)) / TWO_PI)
    if mask is None:
        unwrapped = unwrap_phase(wrapped, rng=seed).astype(np.float32)
        return _centre_regions(unwrapped, None).astype(np.float32)
    region = mask[box]
    unwrapped = unwrap_phase(np.ma.array(wrapped, mask=~region), rng=seed)
    unwrapped = np.ma.getdata(unwrapped).astype(np.float32)
    unwrapped = np.where(region, unwrapped, np.float32(0.0))
    result = np.zeros(phase.shape, np.float32)
    result[box] = np.where(region, _centre_regions(unwrapped, region), np.float32(0.0))
    return result


#: Spatial unwrappers by config name; call as ``f(phase, mask=..., voxel_size=..., **params)``.
SPATIAL_UNWRAPPERS = {"laplacian": unwrap_laplacian, "quality": unwrap_quality_guided}


def unwrap_echoes(
    phase,
    magnitude,
    echo_times,
    *,
    voxel_size,
    mask=None,
    method: str = "quality",
    unwrap_offset: bool = True,
    **unwrapper_parameters,
) -> np.ndarray:
    """Spatially and temporally unwrap multi-echo phase.

    Unwrapping every echo on its own and fitting a line fails once later echoes hold many
    wraps: spatial unwrappers underestimate steep phase. Instead the echoes are unwrapped
    against one another (temporal unwrapping guided by the first echo difference, in the
    spirit of the hierarchical/temporal schemes of Feng et al., MRM 2013;70:117-126 and
    Robinson et al., NMR Biomed 2017;30:e3601):

    1. The phase difference of echoes 1 and 2, angle(z2 · conj(z1)), is free of the phase
       offset and small, so it is unwrapped spatially; omega_0 = dphi / (TE2 - TE1).
    2. The phase offset phi_0 = angle(z1 · exp(-i omega_0 TE1)) is smooth; it is spatially
       unwrapped as well (``unwrap_offset``), so the result has no offset wraps.
    3. Echoes 1 and 2 are predicted by phi_0 + omega_0 TE_n. Each later echo n is
       predicted by the |S|^2-weighted line through the echoes already unwrapped, and
       unwrapped in time: phi_n = prediction + angle(z_n · exp(-i · prediction)).

    Non-uniform echo times are handled exactly, because every prediction uses the actual
    TE_n, not an echo index. Refitting the line on all earlier echoes (rather than
    extrapolating omega_0) matters when TE_n is much longer than TE2 - TE1: the noise of
    omega_0 is multiplied by TE_n / (TE2 - TE1) in the prediction, and a prediction error
    beyond pi would cause a wrong temporal unwrap. The 2 pi multiple of the echo difference
    is fixed so its mean in the mask lies in (-pi, pi]: the mean frequency offset is
    assumed below 1 / (2 (TE2 - TE1)) in magnitude, as it is on a scanner tuned to water.
    A single echo is unwrapped spatially.

    Parameters
    ----------
    phase : (x, y, z, echo) array
        Wrapped phase in radians.
    magnitude : (x, y, z, echo) array
        Magnitude of the same echoes (weights of the per-voxel line fits).
    echo_times : sequence of floats
        Echo times in seconds, positive and strictly increasing.
    voxel_size : sequence of 3 floats
        Voxel size in mm.
    mask : bool array, optional
        Region to unwrap; output is 0 outside it.
    method : str
        Spatial unwrapper, a key of :data:`SPATIAL_UNWRAPPERS`.
    unwrap_offset : bool
        Spatially unwrap the phase offset. Without it the unwrapped echoes share the offset's
        2 pi jumps (harmless to the field fit, which absorbs them in the intercept).
    **unwrapper_parameters
        Passed on to the spatial unwrapper (e.g. ``max_iterations`` of
        :func:`unwrap_laplacian`, ``seed`` of :func:`unwrap_quality_guided`).

    Returns
    -------
    float32 (x, y, z, echo) array of unwrapped phase.

    References
    ----------
    .. [1] Feng W, Neelavalli J, Haacke EM. Magn Reson Med 2013;70:117-126.
    .. [2] Robinson SD, Bredies K, Khabipova D, Dymerska B, Marques JP, Schweser F. An
           illustrated comparison of processing methods for MR phase imaging and QSM: combining
           array coil signals and phase unwrapping. NMR Biomed 2017;30:e3601.
    """
    phase, magnitude, times, mask = validate_multi_echo(phase, magnitude, echo_times, mask)
    if method not in SPATIAL_UNWRAPPERS:
        raise ValueError(
            f"unknown unwrapping method {method!r}; choose one of {sorted(SPATIAL_UNWRAPPERS)}"
        )
    sizes = _validate_voxel_size(voxel_size)
    if np.max(np.abs(phase)) > _WRAPPED_LIMIT:
        raise ValueError("phase must be wrapped radians (|phase| <= 2 pi)")
    base = SPATIAL_UNWRAPPERS[method]
    result = np.zeros(phase.shape, np.float32)
    if mask is not None:
        box = _bounding_box(mask)
        phase, magnitude, mask = phase[box], magnitude[box], mask[box]
    else:
        box = tuple(slice(None) for _ in range(3))

    def spatial(wrapped):
        return base(wrapped, mask=mask, voxel_size=sizes, **unwrapper_parameters)

    n_echoes = phase.shape[-1]
    if n_echoes == 1:
        result[box + (0,)] = spatial(phase[..., 0])
        return result

    first = phase[..., 0]
    difference = _wrap(phase[..., 1] - first)
    omega = spatial(difference) / np.float32(times[1] - times[0])
    offset = _wrap(first - omega * np.float32(times[0]))
    if unwrap_offset:
        offset = spatial(offset)
    inside = np.ones(first.shape, bool) if mask is None else mask
    unwrapped_echoes = []
    for n in range(n_echoes):
        if n < 2:
            prediction = offset + omega * np.float32(times[n])
        else:
            weights = [magnitude[..., k] ** 2 for k in range(n)]
            intercept, slope, valid = weighted_line_fit(unwrapped_echoes, weights, times[:n])
            fallback = offset + omega * np.float32(times[n])
            prediction = np.where(valid, intercept + slope * np.float32(times[n]), fallback)
        unwrapped = prediction + _wrap(phase[..., n] - prediction)
        unwrapped_echoes.append(np.where(inside, unwrapped, np.float32(0.0)))
        result[box + (n,)] = unwrapped_echoes[-1]
    return result
