"""COSMOS: susceptibility from the local fields of several head orientations.

Calculation Of Susceptibility through Multiple Orientation Sampling (Liu T, Spincemaille P,
de Rochefort L, Kressler B, Wang Y. MRM 2009;61:196-204). Each orientation ``i`` sees the same
susceptibility through its own dipole kernel ``D_i`` (B0 along a different axis of the head), so
where one kernel vanishes on its magic-angle cone the others do not, and the inversion needs no
regulariser. The least-squares solution over orientations is closed form in k-space.

COSMOS is not in :data:`qsmflow.recon.inversion.INVERSION_METHODS`: those functions invert the
field of *one* scan, ``(local_field, mask, voxel_size, *, b0_direction, ...)``, and are chosen per
scan by ``inversion.method``; COSMOS consumes a *set* of co-registered fields with one B0
direction each, so it has its own entry point (:func:`cosmos`) and its own workflow
(``qsmflow.workflows.cosmos``), configured under ``cosmos:``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.ndimage

from qsmflow.recon.dipole import MaskGrid, dipole_kernel, irfftn, rfftn, validated_field_inputs

#: Lowest value of the weighted mean squared kernel kept as the COSMOS denominator.
DEFAULT_THRESHOLD = 1e-3


def cosmos(local_fields, mask, voxel_size, b0_directions, *, weights=None, threshold=DEFAULT_THRESHOLD,
           iterations=10, padding=8):
    """COSMOS inversion of co-registered local fields: closed form, then masked least squares.

    The closed form solves ``min_chi sum_i w_i ||D_i F chi - F f_i||^2`` frequency by frequency,
    ``chi(k) = sum_i w_i D_i(k) F_i(k) / max(sum_i w_i D_i(k)^2, threshold)`` with the weights
    normalised to mean 1 (Liu et al., MRM 2009;61:196-204). ``threshold`` only acts where every
    orientation's kernel is near zero at once (k = 0 and, for nearly parallel B0 directions, the
    cones' intersections): for an untilted scan plus tilts of 15, 20 or 25 degrees about two
    different axes the minimum of ``sum D_i^2 / n`` away from k = 0 is 0.0056, 0.0093 or 0.013
    (:func:`minimum_kernel_power`), so the default 1e-3 leaves such sets unregularised and only
    bounds the noise gain of nearly parallel orientations.

    The closed form treats the field outside ``mask`` as zero, which no susceptibility inside the
    mask produces; ``iterations`` steps of conjugate gradients on the same least squares restricted
    to the mask, ``min_chi sum_i w_i ||M (F^-1 D_i F M chi - f_i)||^2``, preconditioned by the
    closed form's k-space division and started from it, remove that error. On the brain phantom
    of ``tests/test_cosmos.py`` (tilts 20 degrees about x and y, noise-free) NRMSE falls from
    9.7 % (closed form) to 1.5 % after 6 iterations and stays there, the FFT model's own floor
    (the closed form with the field known everywhere gives 1.5 %); ``iterations=0`` returns the
    closed form.

    Parameters
    ----------
    local_fields : sequence of 3-D arrays, or 4-D array (orientation first)
        Local field of each orientation in ppm of B0, all on one grid (the first orientation's).
    mask : 3-D bool array
        Where every field is valid (the intersection of the orientations' masks).
    voxel_size : sequence of 3 floats (mm)
    b0_directions : sequence of 3-vectors
        Main-field direction of each orientation in the voxel axes of the common grid.
    weights : sequence of floats, optional
        Per-orientation weights, e.g. the inverse noise variance of each field
        (:func:`noise_weights`); equal when omitted.
    threshold : float
        Floor of the weighted mean squared kernel, in (0, 4/9).
    iterations : int
        Conjugate-gradient steps of the masked least squares after the closed form (0: none).
    padding : int or 3 ints
        Zero voxels added on each side of the mask's bounding box.

    Returns
    -------
    float32 array, ppm, zero outside ``mask`` (not referenced).

    Raises
    ------
    ValueError
        Fewer than two orientations, fields of different shapes, a B0 direction per field
        missing, non-positive weights, or a threshold outside (0, 4/9).
    """
    fields = [np.asarray(f) for f in local_fields]
    directions = np.asarray(b0_directions, dtype=np.float64)
    if len(fields) < 2:
        raise ValueError(f"COSMOS needs at least two orientations, got {len(fields)}")
    if directions.shape != (len(fields), 3):
        raise ValueError(f"b0_directions must hold one 3-vector per field ({len(fields)}), got shape {directions.shape}")
    if not 0 < threshold < 4.0 / 9.0:
        raise ValueError(f"threshold must lie in (0, 4/9), got {threshold!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or iterations < 0:
        raise ValueError(f"iterations must be a non-negative integer, got {iterations!r}")
    if weights is None:
        weights = np.ones(len(fields))
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (len(fields),) or not np.all(np.isfinite(weights)) or np.any(weights <= 0):
        raise ValueError(f"weights must be one positive number per orientation, got {np.ravel(weights).tolist()}")
    weights = (weights / weights.mean() / len(fields)).astype(np.float32)
    checked = []
    for index, (field, direction) in enumerate(zip(fields, directions)):
        field, mask_checked, sizes, unit = validated_field_inputs(field, mask, voxel_size, direction,
                                                                  f"local_fields[{index}]")
        checked.append((field, unit))
    grid = MaskGrid(mask_checked, padding)
    inside = grid.inside.astype(np.float32)
    kernels = [dipole_kernel(grid.shape, sizes, direction) for _, direction in checked]
    # the weights sum to 1, so the denominator is the weighted mean squared kernel
    denominator = np.maximum(sum(w * k**2 for w, k in zip(weights, kernels)), np.float32(threshold))
    data_spectrum = sum(w * k * rfftn(grid.extract(field)) for w, k, (field, _) in zip(weights, kernels, checked))
    chi = irfftn(data_spectrum / denominator, grid.shape).astype(np.float32) * inside

    def normal_operator(x):
        spectrum = rfftn(x)
        total = sum(w * k * rfftn(inside * irfftn(k * spectrum, grid.shape)) for w, k in zip(weights, kernels))
        return inside * irfftn(total, grid.shape)

    def precondition(residual):
        return inside * irfftn(rfftn(residual) / denominator, grid.shape)

    if iterations:
        right_side = inside * irfftn(data_spectrum, grid.shape)
        residual = right_side - normal_operator(chi)
        preconditioned = precondition(residual)
        direction = preconditioned
        product = float(np.vdot(residual, preconditioned))
        for _ in range(int(iterations)):
            if product <= 0:
                break
            applied = normal_operator(direction)
            step = product / float(np.vdot(direction, applied))
            chi = chi + np.float32(step) * direction
            residual = residual - np.float32(step) * applied
            preconditioned = precondition(residual)
            next_product = float(np.vdot(residual, preconditioned))
            direction = preconditioned + np.float32(next_product / product) * direction
            product = next_product
    return grid.restore(np.asarray(chi, dtype=np.float32))


def minimum_kernel_power(shape, voxel_size, b0_directions, *, weights=None) -> float:
    """Smallest ``sum_i w_i D_i(k)^2 / n`` over the grid's non-zero frequencies (weights of mean 1).

    A set whose value is near zero has orientations too close to each other for COSMOS to
    resolve every frequency (Liu et al. 2009 recommend three orientations well apart).
    """
    directions = np.asarray(b0_directions, dtype=np.float64)
    weights = np.ones(len(directions)) if weights is None else np.asarray(weights, dtype=np.float64)
    weights = weights / weights.mean()
    total = sum(np.float32(w) * dipole_kernel(shape, voxel_size, d) ** 2 for w, d in zip(weights, directions))
    total = total / np.float32(len(directions))
    total[0, 0, 0] = np.inf
    return float(total.min())


def field_noise_sd(local_field, mask) -> float:
    """Robust estimate of the voxel noise standard deviation of a field map inside ``mask``.

    The residual from a 3x3x3 local mean removes the smooth tissue field; the median absolute
    deviation of that residual over the eroded mask, scaled by 1.4826 (Gaussian consistency) and
    by sqrt(27/26) (the residual of the 27-voxel mean), estimates the noise SD.
    """
    field = np.asarray(local_field, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    if field.shape != mask.shape or field.ndim != 3:
        raise ValueError(f"field {field.shape} and mask {mask.shape} must be 3-D arrays of one shape")
    inner = scipy.ndimage.binary_erosion(mask, iterations=1)
    if inner.sum() < 27:
        raise ValueError("the mask is too small to estimate the field noise")
    residual = field - scipy.ndimage.uniform_filter(np.where(mask, field, 0), size=3, mode="nearest")
    values = residual[inner]
    mad = np.median(np.abs(values - np.median(values)))
    return float(1.4826 * mad * np.sqrt(27.0 / 26.0))


def noise_weights(noise_sds) -> np.ndarray:
    """Inverse-variance weights of the orientations from their noise SDs (mean 1)."""
    sds = np.asarray(noise_sds, dtype=np.float64)
    if sds.ndim != 1 or not np.all(np.isfinite(sds)) or np.any(sds <= 0):
        raise ValueError(f"noise SDs must be positive numbers, got {sds.tolist()}")
    weights = 1.0 / sds**2
    return weights / weights.mean()


def rotation_matrix(angles_degrees) -> np.ndarray:
    """Rotation by angles (degrees) about x, then y, then z of a fixed frame: ``Rz @ Ry @ Rx``.

    The convention of every head orientation in qsmflow (simulated tilts, recovered rotations in
    COSMOS sidecars); :func:`rotation_angles` is its inverse.
    """
    ax, ay, az = np.deg2rad(np.asarray(angles_degrees, dtype=np.float64))
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]])
    ry = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    rz = np.array([[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]])
    return rz @ ry @ rx


def rotation_angles(matrix) -> np.ndarray:
    """Angles (degrees) about x, y, z of a rotation ``Rz @ Ry @ Rx`` (:func:`rotation_matrix`).

    The 3x3 part is first made orthonormal (nearest rotation, by SVD), so the linear part of a
    rigid transform estimated in floating point is accepted.
    """
    m = np.asarray(matrix, dtype=np.float64)[:3, :3]
    u, _, vt = np.linalg.svd(m)
    m = u @ vt
    if np.linalg.det(m) < 0:
        raise ValueError("the matrix is a reflection, not a rotation")
    ay = np.arcsin(np.clip(-m[2, 0], -1.0, 1.0))
    ax = np.arctan2(m[2, 1], m[2, 2])
    az = np.arctan2(m[1, 0], m[0, 0])
    return np.rad2deg([ax, ay, az])


def b0_direction_in_reference(reference_affine, world_transform) -> np.ndarray:
    """An orientation's B0 direction in the voxel axes of the reference orientation's grid.

    ``world_transform`` (4x4, RAS mm) maps a point of the reference scan's world to the same
    point of the head in the other scan's world
    (:func:`qsmflow.registration.linear_transform_matrix` of the rigid registration); B0 is that
    scan's world z. Composed with the reference affine it is the affine of the reference grid
    placed in the other scan's world, whose B0 direction in voxel axes
    :func:`qsmflow.recon.dipole.b0_direction_from_affine` gives.
    """
    from qsmflow.recon.dipole import b0_direction_from_affine

    composed = np.asarray(world_transform, dtype=np.float64) @ np.asarray(reference_affine, dtype=np.float64)
    return b0_direction_from_affine(composed)


#: Rigid stage used to align the orientations' magnitudes (same contrast, same head, whole field of
#: view): mean squares on every voxel, three levels 4x/2x/1x with iterations at the finest level
#: too. On the simulated 20 and -18 degree tilts (64^3, 3 mm) it recovered the rotations within
#: 0.02 degrees; restricting the metric to the orientations' QSM masks (which differ between
#: orientations) stopped Mattes MI at 1.1 degrees and, on supersampled data, mean squares at 12.8.
ORIENTATION_RIGID_STAGE = {"metric": "meansquares", "sampling_rate": 1.0, "shrink_factors": (4, 2, 1), "smoothing_sigmas": (2, 1, 0),
                           "iterations": (500, 250, 100)}


@dataclass
class AlignedOrientation:
    """One orientation resampled onto the reference orientation's grid (:func:`align_orientation`)."""

    local_field: np.ndarray
    mask: np.ndarray
    b0_direction: np.ndarray
    rotation_degrees: np.ndarray
    world_transform: np.ndarray
    transform_file: str
    registration: dict


def align_orientation(reference_magnitude, reference_affine, magnitude, mask, affine, local_field, *,
                      threads=None, output_dir=None, interpolation="bSpline"):
    """Rigidly register an orientation's magnitude to the reference and resample its local field.

    The magnitude (3-D, e.g. the first echo) is registered to the reference magnitude with ANTs
    (:func:`qsmflow.registration.register`, rigid, :data:`ORIENTATION_RIGID_STAGE`, the metric over
    the whole field of view). The local field is resampled onto the
    reference grid with ``interpolation`` (cubic B-spline by default; ``linear`` also accepted),
    the mask with linear interpolation kept where at least 0.5, and the field set to zero outside
    that mask. The rotation (degrees about x, y, z of the world, :func:`rotation_angles`) takes
    the reference head to this orientation's head; the B0 direction is in the reference's voxel
    axes (:func:`b0_direction_in_reference`).

    Returns
    -------
    AlignedOrientation
    """
    from qsmflow import registration

    if interpolation not in ("linear", "bSpline", "lanczosWindowedSinc"):
        raise ValueError(f"interpolation must be linear, bSpline or lanczosWindowedSinc, got {interpolation!r}")
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise ValueError("the mask is empty")
    fixed = registration.to_ants(reference_magnitude, reference_affine)
    moving = registration.to_ants(magnitude, affine)
    result = registration.register(fixed, moving, transform="rigid", stages={"rigid": ORIENTATION_RIGID_STAGE},
                                   threads=threads, output_dir=output_dir, prefix="orientation_")
    world = registration.linear_transform_matrix(result.forward[0])
    field_image = registration.to_ants(np.where(mask, local_field, 0).astype(np.float32), affine)
    resampled_field = registration.apply_transform(fixed, field_image, result.forward, interpolation=interpolation).numpy()
    mask_image = registration.to_ants(mask.astype(np.float32), affine)
    resampled_mask = registration.apply_transform(fixed, mask_image, result.forward, interpolation="linear").numpy() >= 0.5
    # a B-spline overshoots next to the mask edge, where the field was set to zero outside
    inner = scipy.ndimage.binary_erosion(resampled_mask, iterations=1) if interpolation != "linear" else resampled_mask
    if not inner.any():
        raise ValueError("the registered mask does not overlap the reference grid")
    return AlignedOrientation(
        local_field=np.where(inner, resampled_field, 0).astype(np.float32),
        mask=inner,
        b0_direction=b0_direction_in_reference(reference_affine, world),
        rotation_degrees=rotation_angles(world),
        world_transform=world,
        transform_file=result.forward[0],
        registration=result.provenance(),
    )
