"""Dipole inversion: susceptibility (ppm) from the local field (ppm of B0).

Registry: :data:`INVERSION_METHODS` maps a config name to a function with the signature
``(local_field, mask, voxel_size, *, b0_direction=(0, 0, 1), **params) -> chi``; ``chi`` is
float32 in ppm, zero outside the mask and not referenced (see :func:`reference_susceptibility`).

All methods solve the model ``local_field = F^-1 D F chi`` with the dipole kernel ``D`` of
:func:`qsmflow.recon.dipole.dipole_kernel` on the mask's bounding box plus ``padding`` zero voxels
per side, at FFT-friendly sizes (:class:`qsmflow.recon.dipole.MaskGrid`), since the field is only
known inside the mask. On the simulated brain of ``tests/test_inversion.py`` an 8-voxel margin
gave the iterative methods the accuracy of the whole field of view; the closed-form methods cost
one FFT pair and default to 24 voxels (Tikhonov NRMSE 30 % there, 33-35 % with 8 to 16).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from qsmflow.recon.dipole import (MaskGrid, dipole_kernel, fft_workers, irfftn, laplacian_kernel, rfftn,
                                  validated_field_inputs)

#: Planes along the first axis processed together by the iterative solvers' image-space step,
#: small enough for the working set of one slab to stay in a core's cache.
_SLAB_PLANES = 4
_CHUNKS = 8


def _require_positive(name, value):
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def _require_iterations(iterations, tolerance):
    if int(iterations) != iterations or iterations < 1:
        raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
    if not np.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"tolerance must be a non-negative number, got {tolerance!r}")


def _require_padding(padding):
    values = np.broadcast_to(np.asarray(padding), (3,))
    if not np.all(values == np.round(values)) or np.any(values < 0):
        raise ValueError(f"padding must be a non-negative integer (or three), got {padding!r}")


def _half_spectrum_mean(values: np.ndarray, last_axis_length: int) -> float:
    """Mean over the full spectrum of a Hermitian-symmetric quantity given on the rfftn half."""
    weighted = 2.0 * values.sum(dtype=np.float64) - values[..., 0].sum(dtype=np.float64)
    count = 2 * values.size - values[..., 0].size
    if last_axis_length % 2 == 0:
        weighted -= values[..., -1].sum(dtype=np.float64)
        count -= values[..., -1].size
    return weighted / count


def tkd(local_field, mask, voxel_size, *, b0_direction=(0.0, 0.0, 1.0), threshold=0.19,
        correct_underestimation=True, padding=24):
    """Truncated k-space division (TKD).

    Divides the field spectrum by the dipole kernel ``D``, replacing ``D`` by
    ``threshold * sign(D)`` where ``|D| < threshold`` (Shmueli et al., MRM 2009;62:1510-1522;
    Wharton et al., MRM 2010;63:1292-1304). The truncation shrinks susceptibility values by the
    k-space average of ``D / D_truncated``; with ``correct_underestimation`` the map is divided
    by that average (Schweser et al., MRM 2013;69:1582-1594, superfast dipole inversion).

    Parameters
    ----------
    local_field : 3-D array
        Local field in ppm of B0.
    mask : 3-D bool array
    voxel_size : sequence of 3 floats (mm)
    b0_direction : sequence of 3 floats
        Main-field direction in voxel axes.
    threshold : float
        Truncation level of ``|D|``, in (0, 2/3).
    correct_underestimation : bool
        Divide by the mean k-space attenuation of the truncation.
    padding : int or 3 ints
        Zero voxels added on each side of the mask's bounding box.

    Returns
    -------
    float32 array, ppm, zero outside ``mask``.

    References
    ----------
    .. [1] Shmueli K, de Zwart JA, van Gelderen P, Li TQ, Dodd SJ, Duyn JH. Magnetic
           susceptibility mapping of brain tissue in vivo using MRI phase data. Magn Reson Med
           2009;62:1510-1522.
    .. [2] Wharton S, Schäfer A, Bowtell R. Susceptibility mapping in the human brain using
           threshold-based k-space division. Magn Reson Med 2010;63:1292-1304.
    .. [3] Schweser F, Deistung A, Sommer K, Reichenbach JR. Toward online reconstruction of
           quantitative susceptibility maps: superfast dipole inversion. Magn Reson Med
           2013;69:1582-1594.
    """
    field, mask, voxel_size, b0_direction = validated_field_inputs(local_field, mask, voxel_size, b0_direction,
                                                                   "local_field")
    if not 0 < threshold < 2.0 / 3.0:
        raise ValueError(f"threshold must lie in (0, 2/3), got {threshold!r}")
    _require_padding(padding)
    grid = MaskGrid(mask, padding)
    padded = grid.extract(field)
    kernel = dipole_kernel(padded.shape, voxel_size, b0_direction)
    truncated = np.where(np.abs(kernel) < threshold, np.float32(threshold) * np.sign(kernel), kernel)
    with np.errstate(divide="ignore", invalid="ignore"):
        inverse = np.where(truncated != 0, 1.0 / truncated, 0.0).astype(np.float32)
    if correct_underestimation:
        attenuation = _half_spectrum_mean(kernel * inverse, padded.shape[-1])
        inverse *= np.float32(1.0 / attenuation)
    chi = irfftn(rfftn(padded) * inverse, padded.shape)
    chi *= grid.inside
    return grid.restore(chi)


def tikhonov(local_field, mask, voxel_size, *, b0_direction=(0.0, 0.0, 1.0), regularization=3e-3, padding=24):
    """Closed-form L2 inversion with a gradient regulariser.

    ``chi = F^-1[ D F(field) / (D^2 + regularization |E|^2) ]`` with ``|E|^2`` the spectrum of the
    finite-difference gradient's normal operator (Bilgic et al., "Fast image reconstruction with
    L2-regularization", J Magn Reson Imaging 2014;40:181-191).

    Parameters
    ----------
    local_field, mask, voxel_size, b0_direction
        As in :func:`tkd`.
    regularization : float
        Weight of ``||grad chi||^2`` (gradient in 1/mm, so it scales with voxel area).
    padding : int or 3 ints
        Zero voxels added on each side of the mask's bounding box.

    Returns
    -------
    float32 array, ppm, zero outside ``mask``.

    References
    ----------
    .. [1] Bilgic B, Chatnuntawech I, Fan AP, et al. Fast image reconstruction with
           L2-regularization. J Magn Reson Imaging 2014;40:181-191.
    """
    field, mask, voxel_size, b0_direction = validated_field_inputs(local_field, mask, voxel_size, b0_direction,
                                                                   "local_field")
    _require_positive("regularization", regularization)
    _require_padding(padding)
    grid = MaskGrid(mask, padding)
    padded = grid.extract(field)
    kernel = dipole_kernel(padded.shape, voxel_size, b0_direction)
    denominator = kernel**2 - np.float32(regularization) * laplacian_kernel(padded.shape, voxel_size)
    with np.errstate(divide="ignore", invalid="ignore"):
        filter_ = np.where(denominator > 0, kernel / denominator, 0.0).astype(np.float32)
    chi = irfftn(rfftn(padded) * filter_, padded.shape)
    chi *= grid.inside
    return grid.restore(chi)


class _AnisotropicTVStep:
    """Image-space half of an ADMM iteration for anisotropic total variation.

    With ``z_i = G_i chi`` (``G_i`` the periodic forward difference along axis ``i``, unscaled) and
    scaled duals ``u_i``, one step is, for every axis::

        y_i = G_i chi + u_i
        u_i <- clip(y_i, -t_i, t_i)                  # u + G chi - shrink(y)
        divergence += w_i G_i^T (y_i - 2 u_i)        # G^T (z - u) for the next chi-update

    where ``t_i`` are per-axis shrinkage thresholds and ``w_i`` per-axis weights. The volume is
    processed in slabs of planes along the first axis, split between threads, so that each slab's
    working set stays in cache: the step costs a few passes over memory instead of ~20.
    ``thresholds`` entries may also be arrays of the volume's shape (voxel-wise weights).
    """

    def __init__(self, shape, thresholds, weights, threads):
        self.shape = shape
        self.duals = [np.zeros(shape, np.float32) for _ in range(3)]
        self.divergence = np.empty(shape, np.float32)
        self.thresholds = thresholds
        self.weights = [None if w == 1 else np.float32(w) for w in weights]
        planes = shape[0]
        # The split into chunks is fixed, whatever the thread count, so that the sums behind the
        # stopping rule, and hence the result, are bit-identical on any machine.
        chunks = max(1, min(_CHUNKS, planes // (2 * _SLAB_PLANES)))
        bounds = np.linspace(0, planes, chunks + 1).astype(int)
        self.chunks = [(int(start), int(stop)) for start, stop in zip(bounds[:-1], bounds[1:])]
        self.buffers = [(np.empty((_SLAB_PLANES + 1,) + shape[1:], np.float32),
                         np.empty((_SLAB_PLANES,) + shape[1:], np.float32)) for _ in self.chunks]
        threads = max(1, min(threads, len(self.chunks)))
        self.pool = ThreadPoolExecutor(threads) if threads > 1 else None

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()

    def multiply(self, spectrum, factor):
        """In place ``spectrum *= factor``, split between the step's threads."""
        if self.pool is None:
            spectrum *= factor
            return spectrum
        bounds = np.linspace(0, spectrum.shape[0], len(self.chunks) + 1).astype(int)
        parts = [slice(int(start), int(stop)) for start, stop in zip(bounds[:-1], bounds[1:])]
        list(self.pool.map(lambda part: np.multiply(spectrum[part], factor[part], out=spectrum[part]), parts))
        return spectrum

    def _threshold(self, axis, planes):
        value = self.thresholds[axis]
        return value[planes] if isinstance(value, np.ndarray) else value

    def _first_axis_difference(self, chi, plane):
        """``w_0 = y_0 - 2 clip(y_0)`` at one plane, without updating the dual there."""
        following = chi[(plane + 1) % self.shape[0]]
        y = following - chi[plane] + self.duals[0][plane]
        clipped = np.clip(y, -self._threshold(0, plane), self._threshold(0, plane))
        w = y - 2 * clipped
        return w * self.weights[0] if self.weights[0] is not None else w

    def __call__(self, chi, previous_chi=None, offset=None, measure_change=True):
        """Update the duals and the divergence (plus ``offset``, if given).

        Returns ``(||chi - previous_chi||^2, ||chi||^2)``, both 0 unless ``measure_change``.
        """
        if not measure_change:
            previous_chi = None
        carries = [self._first_axis_difference(chi, start - 1) for start, _ in self.chunks]
        jobs = [(start, stop, carry, buffers, chi, previous_chi, offset, measure_change)
                for (start, stop), carry, buffers in zip(self.chunks, carries, self.buffers)]
        if self.pool is None:
            results = [self._run(*job) for job in jobs]
        else:
            results = list(self.pool.map(lambda job: self._run(*job), jobs))
        return tuple(float(sum(values)) for values in zip(*results))

    def _run(self, start, stop, carry, buffers, chi, previous_chi, offset, measure_change):
        n0 = self.shape[0]
        first_axis, other_axes = buffers
        change = norm = 0.0
        for begin in range(start, stop, _SLAB_PLANES):
            end = min(begin + _SLAB_PLANES, stop)
            count = end - begin
            slab = chi[begin:end]
            divergence = self.divergence[begin:end]
            planes = slice(begin, end)
            # Axis 0: w[j] for j in the slab; divergence[j] = w[j-1] - w[j] uses the carried plane.
            w = first_axis[1:count + 1]
            if end < n0:
                np.subtract(chi[begin + 1:end + 1], slab, out=w)
            else:
                np.subtract(chi[begin + 1:end], chi[begin:end - 1], out=w[:-1])
                np.subtract(chi[0], chi[end - 1], out=w[-1])
            self._shrink(w, 0, planes)
            first_axis[0] = carry
            np.subtract(first_axis[:count], w, out=divergence)
            carry = w[-1].copy()
            # Axis 1 lies inside the slab.
            w = other_axes[:count]
            np.subtract(slab[:, 1:], slab[:, :-1], out=w[:, :-1])
            np.subtract(slab[:, 0], slab[:, -1], out=w[:, -1])
            self._shrink(w, 1, planes)
            divergence[:, 1:] += w[:, :-1]
            divergence[:, 0] += w[:, -1]
            divergence -= w
            # Axis 2 is the contiguous one: difference the flattened slab, then fix the row ends.
            rows = slab.reshape(-1, slab.shape[2])
            flat = slab.reshape(-1)
            w_rows = w.reshape(rows.shape)
            w_flat = w.reshape(-1)
            divergence_rows = divergence.reshape(rows.shape)
            divergence_flat = divergence.reshape(-1)
            np.subtract(flat[1:], flat[:-1], out=w_flat[:-1])
            np.subtract(rows[:, 0], rows[:, -1], out=w_rows[:, -1])
            self._shrink(w, 2, planes)
            divergence_flat[1:] += w_flat[:-1]
            divergence_rows[1:, 0] -= w_rows[:-1, -1]
            divergence_rows[:, 0] += w_rows[:, -1]
            divergence -= w
            if offset is not None:
                divergence += offset[begin:end]
            if previous_chi is not None:
                difference = other_axes[:count]
                np.subtract(slab, previous_chi[begin:end], out=difference)
                flat = difference.reshape(-1)
                change += float(np.dot(flat, flat))
            if measure_change:
                flat = slab.reshape(-1)
                norm += float(np.dot(flat, flat))
        return change, norm

    def _shrink(self, y, axis, planes):
        """In place: y <- y + u - 2 clip(y + u) and u <- clip(y + u) (weighted by the axis weight)."""
        dual = self.duals[axis][planes]
        y += dual
        threshold = self._threshold(axis, planes)
        np.clip(y, -threshold, threshold, out=dual)
        y -= dual
        y -= dual
        if self.weights[axis] is not None:
            y *= self.weights[axis]


def _tv_step(shape, voxel_size, regularization, penalty, gradient_weight=None):
    """Build the image-space TV step with the per-axis thresholds and weights of the ADMM.

    The TV term ``lambda sum_i ||grad_i chi||_1`` with ``grad_i = G_i / d_i`` is split as
    ``z_i = G_i chi`` with penalty ``penalty / d_i^2``: the shrinkage threshold is
    ``lambda d_i / penalty`` and the divergence weights are ``d_ref^2 / d_i^2`` (``d_ref`` the
    smallest voxel size, folded into the k-space update).
    """
    reference = min(voxel_size)
    thresholds = []
    for d in voxel_size:
        threshold = np.float32(regularization * d / penalty)
        thresholds.append(threshold * gradient_weight if gradient_weight is not None else threshold)
    weights = [reference**2 / d**2 for d in voxel_size]
    return _AnisotropicTVStep(shape, thresholds, weights, fft_workers()), np.float32(1.0 / reference**2)


def _padded_gradient_weight(gradient_weight, mask, grid):
    if gradient_weight is None:
        return None
    weight = np.asarray(gradient_weight, dtype=np.float32)
    if weight.shape != mask.shape:
        raise ValueError(f"gradient_weight shape {weight.shape} does not match the mask {mask.shape}")
    if not np.all(np.isfinite(weight)) or np.any(weight < 0):
        raise ValueError("gradient_weight must be finite and non-negative")
    padded = np.ones(grid.shape, np.float32)
    padded[grid.crop] = weight[grid.box]
    return padded


def tv_admm(local_field, mask, voxel_size, *, b0_direction=(0.0, 0.0, 1.0), regularization=3e-4, penalty=None,
            iterations=100, tolerance=1e-3, padding=8):
    """Total-variation regularised dipole inversion by ADMM ("fast TV").

    Minimises ``1/2 ||F^-1 D F chi - field||^2 + regularization sum_i ||grad_i chi||_1``
    (anisotropic TV, data fidelity on the whole padded grid) with the alternating direction
    method of multipliers of Bilgic et al. ("Fast quantitative susceptibility mapping with
    L1-regularization and automatic parameter selection", MRM 2014;72:1444-1459) as in the linear FANSI
    solver (Milovic et al., MRM 2018;80:814-821): the chi-update is closed form in k-space
    (one rfftn and one irfftn per iteration), the gradient split is solved by soft thresholding
    in image space with periodic finite differences matching the k-space operator exactly.

    Parameters
    ----------
    local_field, mask, voxel_size, b0_direction
        As in :func:`tkd`.
    regularization : float
        TV weight ``lambda`` (field in ppm, gradient in ppm/mm).
    penalty : float or None
        ADMM penalty ``rho`` of the gradient split; ``None`` uses ``100 * regularization``.
    iterations : int
        Maximum number of iterations.
    tolerance : float
        Stop when ``||chi_k - chi_{k-1}|| / ||chi_k||`` falls below it.
    padding : int or 3 ints
        Zero voxels added on each side of the mask's bounding box.

    Returns
    -------
    float32 array, ppm, zero outside ``mask``.

    Notes
    -----
    The defaults were chosen on a simulated brain (``tests/test_inversion.py``, 0.001 ppm noise):
    NRMSE 8.0-8.7 % for lambda 2e-4 to 3e-4 (11.5 % at 5e-4, 19 % at 1e-3); rho between 30 and
    300 lambda converges to the same map, 100 lambda fastest; tolerance 1e-3 stops after about 30
    iterations within 0.2 % NRMSE of the converged map.

    References
    ----------
    .. [1] Bilgic B, Fan AP, Polimeni JR, et al. Fast quantitative susceptibility mapping with
           L1-regularization and automatic parameter selection. Magn Reson Med
           2014;72:1444-1459.
    .. [2] Milovic C, Bilgic B, Zhao B, Acosta-Cabronero J, Tejos C. Fast nonlinear
           susceptibility inversion with variational regularization. Magn Reson Med
           2018;80:814-821.
    """
    field, mask, voxel_size, b0_direction = validated_field_inputs(local_field, mask, voxel_size, b0_direction,
                                                                   "local_field")
    penalty = 100.0 * regularization if penalty is None else penalty
    _require_positive("regularization", regularization)
    _require_positive("penalty", penalty)
    _require_iterations(iterations, tolerance)
    _require_padding(padding)
    grid = MaskGrid(mask, padding)
    padded = grid.extract(field)
    shape = padded.shape
    kernel = dipole_kernel(shape, voxel_size, b0_direction)
    step, divergence_scale = _tv_step(shape, voxel_size, regularization, penalty)
    rho = np.float32(penalty * divergence_scale)
    # chi-update: F chi = (D F field + rho F div) / (D^2 + penalty |E|^2) = update_filter F(div + data_term)
    # with rho = penalty / d_ref^2 and data_term = F^-1(D F field) / rho, added to div in image space.
    update_filter = laplacian_kernel(shape, voxel_size)
    update_filter *= np.float32(-penalty)
    update_filter += kernel**2
    with np.errstate(divide="ignore"):
        np.divide(rho, update_filter, out=update_filter, where=update_filter > 0)
    update_filter[0, 0, 0] = 0.0
    kernel *= np.float32(1.0 / rho)
    spectrum = rfftn(padded)
    spectrum *= kernel
    del kernel
    data_term = irfftn(spectrum, shape)
    spectrum *= update_filter
    chi = irfftn(spectrum, shape)
    del spectrum
    previous = None
    try:
        for _ in range(int(iterations)):
            change, norm = step(chi, previous, data_term, measure_change=tolerance > 0)
            if tolerance > 0 and previous is not None and change <= tolerance**2 * norm:
                break
            previous = None  # free it before the FFTs allocate their outputs
            spectrum = step.multiply(rfftn(step.divergence), update_filter)
            previous, chi = chi, irfftn(spectrum, shape)
            del spectrum
    finally:
        step.close()
    chi *= grid.inside
    return grid.restore(chi)


def weighted_tv(local_field, mask, voxel_size, *, b0_direction=(0.0, 0.0, 1.0), regularization=2e-4,
                gradient_penalty=None, data_penalty=0.3, iterations=100, tolerance=3e-3, padding=8,
                data_weight=None, gradient_weight=None):
    """TV inversion with a weighted data term restricted to the mask (weighted-linear FANSI).

    Minimises ``1/2 ||W (F^-1 D F chi - field)||^2 + regularization sum_i ||M_g grad_i chi||_1``
    where ``W`` is zero outside the mask (the field there is unknown, not zero) and may carry
    voxel-wise reliability (e.g. normalised magnitude or inverse noise), and ``M_g`` optionally
    down-weights the TV at edges of an anatomical prior, as in MEDI (Liu J et al., NeuroImage
    2012;59:2560-2568). Solved by ADMM with a second split ``v = F^-1 D F chi`` (Milovic et al.,
    MRM 2018;80:814-821), costing two rfftn and two irfftn per iteration.

    Parameters
    ----------
    local_field, mask, voxel_size, b0_direction
        As in :func:`tkd`.
    regularization : float
        TV weight ``lambda``.
    gradient_penalty : float or None
        ADMM penalty of the gradient split; ``None`` uses ``100 * regularization``.
    data_penalty : float
        ADMM penalty of the data split (the field is in ppm, the weights have mean 1).
    iterations, tolerance, padding
        As in :func:`tv_admm`.
    data_weight : 3-D array or None
        Voxel-wise data weight inside the mask (default 1); scaled to a mean of 1 in the mask.
    gradient_weight : 3-D array or None
        Voxel-wise TV weight ``M_g`` (default 1), e.g. 0 on magnitude edges and 1 elsewhere.

    Returns
    -------
    float32 array, ppm, zero outside ``mask``.

    Notes
    -----
    Restricting the data term to the mask removes the main error of :func:`tv_admm` near the
    brain edge: NRMSE 4.7 % instead of 8.7 % on the simulated brain of ``tests/test_inversion.py``
    (lambda 1e-4 to 2e-4 best; the ADMM penalties change the speed, not the result); it converges
    more slowly (tolerance 3e-3 after about 50 iterations) at twice the FFT cost per iteration.

    References
    ----------
    .. [1] Milovic C, Bilgic B, Zhao B, Acosta-Cabronero J, Tejos C. Fast nonlinear
           susceptibility inversion with variational regularization. Magn Reson Med
           2018;80:814-821.
    .. [2] Liu J, Liu T, de Rochefort L, et al. Morphology enabled dipole inversion for
           quantitative susceptibility mapping using structural consistency between the
           magnitude image and the susceptibility map. NeuroImage 2012;59:2560-2568.
    """
    field, mask, voxel_size, b0_direction = validated_field_inputs(local_field, mask, voxel_size, b0_direction,
                                                                   "local_field")
    gradient_penalty = 100.0 * regularization if gradient_penalty is None else gradient_penalty
    _require_positive("regularization", regularization)
    _require_positive("gradient_penalty", gradient_penalty)
    _require_positive("data_penalty", data_penalty)
    _require_iterations(iterations, tolerance)
    _require_padding(padding)
    weight = _normalised_data_weight(data_weight, mask)
    grid = MaskGrid(mask, padding)
    padded, weight = grid.extract(field), grid.extract(weight)
    shape = padded.shape
    kernel = dipole_kernel(shape, voxel_size, b0_direction)
    gradient_weight = _padded_gradient_weight(gradient_weight, mask, grid)
    step, divergence_scale = _tv_step(shape, voxel_size, regularization, gradient_penalty, gradient_weight)
    denominator = (np.float32(data_penalty) * kernel**2
                   - np.float32(gradient_penalty) * laplacian_kernel(shape, voxel_size))
    with np.errstate(divide="ignore"):
        inverse = np.where(denominator > 0, 1.0 / denominator, 0.0).astype(np.float32)
    data_filter = kernel * inverse * np.float32(data_penalty)
    divergence_filter = inverse * np.float32(gradient_penalty * divergence_scale)
    weighted_field = weight**2 * padded
    data_denominator = (weight**2 + np.float32(data_penalty)).astype(np.float32)
    # v = D chi split and its scaled dual s; start from the weighted Tikhonov-like solution v = field.
    split = padded.copy()
    dual = np.zeros(shape, np.float32)
    spectrum = rfftn(split)
    spectrum *= data_filter
    chi = irfftn(spectrum, shape)
    previous = None
    try:
        for _ in range(int(iterations)):
            change, norm = step(chi, previous, measure_change=tolerance > 0)
            if tolerance > 0 and previous is not None and change <= tolerance**2 * norm:
                break
            previous = None
            np.subtract(split, dual, out=split)
            spectrum = step.multiply(rfftn(split), data_filter)
            spectrum += step.multiply(rfftn(step.divergence), divergence_filter)
            previous, chi = chi, irfftn(spectrum, shape)
            forward = irfftn(step.multiply(spectrum, kernel), shape)
            # v-update: argmin_v 1/2 ||W (v - f)||^2 + mu/2 ||v - D chi - s||^2; then s += D chi - v.
            forward += dual
            np.multiply(forward, np.float32(data_penalty), out=split)
            split += weighted_field
            split /= data_denominator
            np.subtract(forward, split, out=dual)
    finally:
        step.close()
    chi *= grid.inside
    return grid.restore(chi)


def _forward_differences(values, voxel_size):
    """Periodic forward differences along each axis (ppm/mm), matching :func:`_divergence`."""
    return [(np.roll(values, -1, axis=axis) - values) * np.float32(1.0 / d) for axis, d in enumerate(voxel_size)]


def _divergence_adjoint(components, voxel_size):
    """Adjoint of :func:`_forward_differences` (minus the divergence)."""
    result = np.zeros(components[0].shape, np.float32)
    for axis, (component, d) in enumerate(zip(components, voxel_size)):
        result += (np.roll(component, 1, axis=axis) - component) * np.float32(1.0 / d)
    return result


def total_field_inversion(total_field, mask, voxel_size, *, b0_direction=(0.0, 0.0, 1.0), regularization=2e-4,
                          preconditioner=10.0, padding=12, iterations=45, cg_iterations=30, epsilon=1e-6,
                          data_weight=None, gradient_weight=None, data_mask=None):
    """Preconditioned total field inversion (TFI): susceptibility straight from the total field.

    Background and tissue sources are estimated together, so no background removal (and none of
    its erosion or leakage) comes first: ``chi = P y`` over the mask's bounding box plus
    ``padding`` voxels, where ``y`` minimises
    ``1/2 ||W (F^-1 D F P y - field)||^2 + regularization ||M_g grad(P y)||_1`` with ``W`` the
    data weight inside the mask (zero outside it, where the field is unknown), ``M_g`` zero
    outside the mask (the strong, unknown sources there are not regularised) and the
    preconditioner ``P`` equal to 1 inside the mask and ``preconditioner`` outside, so that the
    strong sources outside the brain converge as fast as the weak ones inside (Liu Z, Kee Y,
    Zhou D, Wang Y, Spincemaille P, "Preconditioned total field inversion (TFI) method for
    quantitative susceptibility mapping", MRM 2017;78:303-315; Liu Z et al. MRM 2018;79:2795).
    The L1 term is handled by lagged diffusivity (iteratively reweighted least squares, as in
    MEDI's Gauss-Newton solver), each reweighted problem solved by a few conjugate-gradient
    steps warm-started from the last.

    Parameters
    ----------
    total_field : 3-D array
        Total field in ppm of B0 (background not removed).
    mask, voxel_size, b0_direction
        As in :func:`tkd`.
    regularization : float
        TV weight ``lambda`` (field in ppm, weights of mean 1).
    preconditioner : float
        ``P`` outside the mask. Liu Z et al. used 30; on the head of ``tests/test_tfi.py`` 10 gave
        NRMSE 34 % against 52 % with 30 and 330 % with 1 (a large ``P`` hands tissue field to
        sources outside the mask, a small one leaves the background to the tissue).
    padding : int or 3 ints
        Voxels around the mask's bounding box where sources outside the brain may lie.
    iterations : int
        Reweighting (outer) iterations.
    cg_iterations : int
        Conjugate-gradient steps per reweighted problem.
    epsilon : float
        Smoothing of ``|grad chi|`` ((ppm/mm)^2) in the reweighting.
    data_weight : 3-D array or None
        Voxel-wise data weight inside the mask (e.g. ``field_weight`` of the echo fit); scaled
        to a mean of 1 in the mask.
    gradient_weight : 3-D array or None
        MEDI edge weight ``M_g`` (:func:`qsmflow.recon.masking.edge_weight`), 1 where not given.
    data_mask : 3-D bool array or None
        Where the field is known and fitted, if larger than ``mask`` (Liu et al. fit the field
        wherever the head has signal; ``mask``, the brain, then sets only where ``P`` is 1, where
        the TV acts and where chi is returned). None fits the field in ``mask`` only. The box of
        the solve covers ``data_mask`` plus ``padding``; ``data_weight`` must then be valid in it.

    Returns
    -------
    float32 array, ppm, zero outside ``mask``.

    References
    ----------
    .. [1] Liu Z, Kee Y, Zhou D, Wang Y, Spincemaille P. Preconditioned total field inversion
           (TFI) method for quantitative susceptibility mapping. Magn Reson Med 2017;78:303-315.
    .. [2] Liu Z, et al. Magn Reson Med 2018;79:2795.

    Notes
    -----
    The iteration counts were chosen by a sweep from raw phase (the ``accurate`` preset's chain with
    ``inversion.method=tfi``; supersampled phantom of ``tests/benchmarks/algorithms.py --audit``,
    seed 5 straight / seed 6 tilted 21 degrees, and qsm-forward 3 T): 8 x 20 iterations gave
    59.7 / 79.8 / 33.6 % NRMSE, 20 x 30 45.3 / 62.4 / 23.1 %, 30 x 30 44.1 / 58.6 / 18.0 %,
    45 x 30 44.3 / 55.9 / 12.4 %; the two-step ``accurate`` chain scores 67.4 / 73.4 / 11.1 %.
    Preconditioner 10 beat 3, 6, 15 and 30 (the paper's; it hands tissue field to the outside
    sources), regularisation 2e-4 beat 1e-4, 5e-4 and 1e-3, and the echo-fit noise weight did
    not help. With the field known only inside the brain, a smooth tissue field (a large uniform
    white-matter block) can still be explained by sources outside the mask: from the true total
    field the phantom stops at about 40 %.
    It beats the two-step chains on the phantom's poses but not on qsm-forward, so it is not a preset.

    ``data_mask`` helps where the field outside the brain obeys the same forward model: on the head
    of ``tests/test_tfi.py`` (the field of the same kernel) NRMSE 17.5 % with the brain alone,
    9.4 / 8.5 % with the 2 / 4 voxels around it. On the supersampled phantom (the field computed
    on a grid twice as fine, so that next to bone and air it departs from the coarse model), from
    the true total field, straight head at 2 mm: 39.6 % with the brain alone, 37.8 % with the
    brain dilated by 4 mm within the voxels that have signal and a data weight of 0.1 there; with
    weight 1, or the whole head with signal, it is worse (at 3 mm: 77.5 % brain alone, 107 %
    dilated by 4 mm, 116 % whole head, 78 % dilated with weight 0.1).
    """
    mask = np.asarray(mask)
    if data_mask is None:
        fitted = mask
    else:
        fitted = np.asarray(data_mask)
        if fitted.shape != mask.shape or fitted.dtype != bool or mask.dtype != bool:
            raise ValueError(f"data_mask must be a bool array of the mask's shape {mask.shape}, got "
                             f"{fitted.dtype} {fitted.shape}")
        fitted = fitted | mask
    field, fitted, voxel_size, b0_direction = validated_field_inputs(total_field, fitted, voxel_size, b0_direction,
                                                                     "total_field")
    if not mask.any():
        raise ValueError("mask is empty")
    mask = mask.astype(bool)
    _require_positive("regularization", regularization)
    _require_positive("preconditioner", preconditioner)
    _require_positive("epsilon", epsilon)
    _require_iterations(iterations, 0.0)
    _require_iterations(cg_iterations, 0.0)
    _require_padding(padding)
    weight = _normalised_data_weight(data_weight, fitted)
    grid = MaskGrid(fitted, padding)
    brain = grid.extract(mask) > 0.5
    padded, weight_squared = grid.extract(field), grid.extract(weight) ** 2
    shape = padded.shape
    kernel = dipole_kernel(shape, voxel_size, b0_direction)
    scaling = np.where(brain, np.float32(1.0), np.float32(preconditioner)).astype(np.float32)
    edges = _padded_gradient_weight(gradient_weight, mask, grid)
    edges = np.ones(shape, np.float32) if edges is None else edges
    edges *= brain  # no TV outside the mask: the sources there are only held by the preconditioner

    def dipole_field(values):
        return irfftn(rfftn(values) * kernel, shape)

    rhs = scaling * dipole_field(weight_squared * padded)
    y = np.zeros(shape, np.float32)
    for _ in range(int(iterations)):
        gradients = _forward_differences(scaling * y, voxel_size)
        magnitude = np.sqrt(sum(g * g for g in gradients) + np.float32(epsilon))
        diffusivity = np.float32(regularization) * edges / magnitude
        del gradients, magnitude

        def normal_operator(values, diffusivity=diffusivity):
            chi = scaling * values
            data = dipole_field(weight_squared * dipole_field(chi))
            smooth = _divergence_adjoint([diffusivity * g for g in _forward_differences(chi, voxel_size)], voxel_size)
            return scaling * (data + smooth)

        y = _warm_conjugate_gradient(normal_operator, rhs, y, int(cg_iterations))
    chi = scaling * y
    chi *= brain
    return grid.restore(chi)


def _warm_conjugate_gradient(apply, rhs, start, iterations):
    """``iterations`` conjugate-gradient steps on ``apply(x) = rhs`` from ``start``."""
    solution = start.copy()
    residual = rhs - apply(solution)
    direction = residual.copy()
    residual_dot = float(np.vdot(residual, residual))
    for _ in range(iterations):
        if residual_dot == 0:
            break
        image = apply(direction)
        curvature = float(np.vdot(direction, image))
        if curvature <= 0:
            break
        step = np.float32(residual_dot / curvature)
        solution += step * direction
        residual -= step * image
        new_dot = float(np.vdot(residual, residual))
        direction *= np.float32(new_dot / residual_dot)
        direction += residual
        residual_dot = new_dot
    return solution


def _normalised_data_weight(data_weight, mask):
    """The data weight scaled to a mean of 1 in the mask and zero outside it (the mask if None)."""
    if data_weight is None:
        return mask.astype(np.float32)
    weight = np.asarray(data_weight, dtype=np.float32)
    if weight.shape != mask.shape:
        raise ValueError(f"data_weight shape {weight.shape} does not match the mask {mask.shape}")
    if not np.all(np.isfinite(weight[mask])) or np.any(weight[mask] < 0) or not weight[mask].any():
        raise ValueError("data_weight must be finite, non-negative and not all zero in the mask")
    return np.where(mask, weight / weight[mask].mean(), 0).astype(np.float32)


def reference_susceptibility(chi, mask, *, reference="mean", reference_mask=None):
    """Reference a susceptibility map: subtract its mean over a region.

    Dipole inversion leaves the mean susceptibility undetermined; maps are reported relative to
    the whole-brain mean (``"mean"`` over ``mask``, or over ``reference_mask`` when given, e.g.
    CSF) or left as they are (``"none"``).

    Parameters
    ----------
    chi : 3-D array (ppm)
    mask : 3-D bool array
        Brain mask; the result is zero outside it.
    reference : {"mean", "none"}
    reference_mask : 3-D bool array or None
        Region whose mean becomes zero; must overlap ``mask``.

    Returns
    -------
    float32 array, zero outside ``mask``.
    """
    chi = np.asarray(chi)
    mask = np.asarray(mask)
    if chi.ndim != 3 or mask.shape != chi.shape or mask.dtype != bool:
        raise ValueError("chi must be 3-D and mask a bool array of the same shape")
    if reference not in ("mean", "none"):
        raise ValueError(f"reference must be 'mean' or 'none', got {reference!r}")
    result = np.where(mask, chi, 0).astype(np.float32)
    if reference == "none":
        if reference_mask is not None:
            raise ValueError("reference_mask was given but reference is 'none'")
        return result
    region = mask
    if reference_mask is not None:
        region = np.asarray(reference_mask)
        if region.shape != chi.shape or region.dtype != bool:
            raise ValueError("reference_mask must be a bool array of the shape of chi")
        region = region & mask
    if not region.any():
        raise ValueError("the reference region is empty inside the mask")
    offset = np.float32(chi[region].mean(dtype=np.float64))
    result[mask] -= offset
    return result


INVERSION_METHODS = {
    "tkd": tkd,
    "tikhonov": tikhonov,
    "tv": tv_admm,
    "weighted_tv": weighted_tv,
    "tfi": total_field_inversion,
}

#: Inversions that take the total field (background not removed): the workflow skips background removal.
TOTAL_FIELD_INVERSIONS = frozenset({"tfi"})
