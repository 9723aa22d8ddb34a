"""The dipole kernel, the forward model and the affine helpers against analytic results."""
from __future__ import annotations

import numpy as np
import pytest

from qsmflow.recon.dipole import (MaskGrid, b0_direction_from_affine, dipole_kernel, forward_field,
                                  mask_bounding_box, pad_to_fast_shape, validated_field_inputs, voxel_sizes_from_affine)


def rotation_about_x(degrees):
    angle = np.deg2rad(degrees)
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def continuous_kernel(shape, voxel_size, b0_direction):
    """D(k) = 1/3 - (k.b)^2/|k|^2 on the full FFT grid, written independently of the library."""
    b = np.asarray(b0_direction, float) / np.linalg.norm(b0_direction)
    k = np.meshgrid(*[np.fft.fftfreq(n, d) for n, d in zip(shape, voxel_size)], indexing="ij")
    k_squared = sum(component**2 for component in k)
    k_dot_b = sum(component * bi for component, bi in zip(k, b))
    with np.errstate(invalid="ignore", divide="ignore"):
        kernel = 1.0 / 3.0 - k_dot_b**2 / k_squared
    kernel[0, 0, 0] = 0.0
    return kernel


def test_kernel_on_the_axes_and_at_the_magic_angle():
    kernel = dipole_kernel((16, 16, 16), (1.0, 1.0, 1.0), (0.0, 0.0, 1.0), real=False)
    assert kernel.dtype == np.float32
    assert kernel[0, 0, 0] == 0.0
    np.testing.assert_allclose(kernel[0, 0, 1:], -2.0 / 3.0, atol=1e-6)  # k parallel to B0
    np.testing.assert_allclose(kernel[1:, 0, 0], 1.0 / 3.0, atol=1e-6)  # k perpendicular to B0
    np.testing.assert_allclose(kernel[0, 1:, 0], 1.0 / 3.0, atol=1e-6)
    np.testing.assert_allclose(kernel[1:, 1:, 0], 1.0 / 3.0, atol=1e-6)
    # k along (1, 1, 1) makes cos^2 = 1/3 with B0: the magic angle, where D vanishes.
    for index in (1, 2, 5, -3):
        assert abs(kernel[index, index, index]) < 1e-6
    # B0 along x swaps the roles of the axes.
    along_x = dipole_kernel((16, 16, 16), (1.0, 1.0, 1.0), (1.0, 0.0, 0.0), real=False)
    np.testing.assert_allclose(along_x[1:, 0, 0], -2.0 / 3.0, atol=1e-6)
    np.testing.assert_allclose(along_x[0, 0, 1:], 1.0 / 3.0, atol=1e-6)


def test_kernel_is_the_continuous_kernel_for_anisotropic_voxels_and_oblique_b0():
    b0 = rotation_about_x(20.0).T @ np.array([0.0, 0.0, 1.0])
    shape, voxel_size = (20, 24, 12), (1.0, 1.0, 2.0)
    full = dipole_kernel(shape, voxel_size, b0, real=False)
    np.testing.assert_allclose(full, continuous_kernel(shape, voxel_size, b0), atol=2e-6)
    half = dipole_kernel(shape, voxel_size, b0)
    assert half.shape == (20, 24, 7)
    # (the last plane is the Nyquist frequency, +1/(2 dz) in the half spectrum, -1/(2 dz) in the full one)
    np.testing.assert_allclose(half[:, :, :6], full[:, :, :6], atol=1e-7)
    # The same physical spatial frequencies on a finer grid give the same values: kz = l / 24 mm^-1
    # for l = 0..6 on both grids.
    fine = dipole_kernel((20, 24, 24), (1.0, 1.0, 1.0), b0)
    np.testing.assert_allclose(half, fine[:, :, :7], atol=1e-6)
    # A kernel is not symmetric under swapping axes with different voxel sizes.
    assert not np.allclose(dipole_kernel((16, 16, 16), (1, 1, 2)), dipole_kernel((16, 16, 16), (1, 1, 1)))


def test_b0_direction_from_axial_oblique_and_flipped_affines():
    axial = np.diag([0.9, 0.9, 2.0, 1.0])
    np.testing.assert_allclose(b0_direction_from_affine(axial), [0, 0, 1], atol=1e-12)
    np.testing.assert_allclose(voxel_sizes_from_affine(axial), [0.9, 0.9, 2.0])

    rotation = rotation_about_x(20.0)
    oblique = np.eye(4)
    oblique[:3, :3] = rotation @ np.diag([1.0, 1.0, 2.0])
    oblique[:3, 3] = [-90.0, -120.0, -60.0]
    direction = b0_direction_from_affine(oblique)
    np.testing.assert_allclose(direction, rotation[2, :], atol=1e-12)  # world z in voxel axes
    np.testing.assert_allclose(direction, [0.0, np.sin(np.deg2rad(20)), np.cos(np.deg2rad(20))], atol=1e-12)
    np.testing.assert_allclose(voxel_sizes_from_affine(oblique), [1.0, 1.0, 2.0])

    flipped = np.diag([-1.0, 1.0, -1.5, 1.0])
    np.testing.assert_allclose(b0_direction_from_affine(flipped), [0, 0, -1], atol=1e-12)
    # The kernel depends on B0 only up to sign.
    np.testing.assert_array_equal(dipole_kernel((8, 8, 8), (1, 1, 1.5), (0, 0, -1)),
                                  dipole_kernel((8, 8, 8), (1, 1, 1.5), (0, 0, 1)))

    sagittal = np.zeros((4, 4))  # voxel x -> world y, voxel y -> world z, voxel z -> world x
    sagittal[1, 0], sagittal[2, 1], sagittal[0, 2], sagittal[3, 3] = 1.0, 1.0, 1.2, 1.0
    np.testing.assert_allclose(b0_direction_from_affine(sagittal), [0, 1, 0], atol=1e-12)


def test_field_of_a_uniformly_magnetised_sphere():
    """Lorentz-corrected field of a sphere: chi/3 R^3/r^3 (3 cos^2 - 1) outside, zero inside."""
    n, radius, chi_value = 48, 8.0, 1.0
    grid = np.meshgrid(*[np.arange(n) - (n - 1) / 2] * 3, indexing="ij")
    r = np.sqrt(sum(component**2 for component in grid))
    sphere = r <= radius
    field = forward_field(sphere.astype(np.float32) * chi_value, (1.0, 1.0, 1.0), padding=32)
    assert field.dtype == np.float32 and field.shape == sphere.shape
    effective_radius = (3 * sphere.sum() / (4 * np.pi)) ** (1 / 3)  # the rasterised sphere's volume
    outside = r >= radius + 2
    with np.errstate(invalid="ignore", divide="ignore"):
        analytic = chi_value / 3 * effective_radius**3 / r**3 * (3 * grid[2] ** 2 / r**2 - 1)
    surface_scale = 2 * chi_value / 3  # the largest field, on the B0 axis at the surface
    # Measured: 1.7 % of the surface field outside, 1.2 % of chi inside.
    assert np.abs(field - analytic)[outside].max() < 0.03 * surface_scale
    assert np.abs(field[r <= radius - 2]).max() < 0.02 * chi_value
    # The sign pattern: positive along B0, negative across it.
    centre = n // 2
    assert field[centre, centre, centre + 14] > 0.04 and field[centre + 14, centre, centre] < -0.02


def test_pad_to_fast_shape_round_trips():
    array = np.arange(7 * 11 * 13, dtype=np.float32).reshape(7, 11, 13)
    padded, crop = pad_to_fast_shape(array, (2, 0, 3))
    np.testing.assert_array_equal(padded[crop], array)
    assert all(p >= n + 2 * m for p, n, m in zip(padded.shape, array.shape, (2, 0, 3)))
    assert padded.sum() == array.sum()
    with pytest.raises(ValueError):
        pad_to_fast_shape(array, -1)


def test_mask_grid_crops_to_the_mask_and_restores():
    mask = np.zeros((20, 30, 25), bool)
    mask[3:9, 10:21, 5:6] = True
    mask[7, 12, 20] = True
    assert mask_bounding_box(mask) == (slice(3, 9), slice(10, 21), slice(5, 21))
    grid = MaskGrid(mask, margin=4)
    assert all(n >= size + 8 for n, size in zip(grid.shape, (6, 11, 16)))
    np.testing.assert_array_equal(grid.inside[grid.crop], mask[grid.box])
    assert grid.inside.sum() == mask.sum()
    values = np.arange(mask.size, dtype=np.float32).reshape(mask.shape)
    restored = grid.restore(grid.extract(values))
    np.testing.assert_array_equal(restored[grid.box], values[grid.box])
    assert not restored[:3].any() and not restored[9:].any()
    with pytest.raises(ValueError):
        mask_bounding_box(np.zeros((3, 3, 3), bool))


def test_validated_field_inputs_rejects_bad_arguments():
    field = np.ones((4, 4, 4))
    mask = np.ones((4, 4, 4), bool)
    out, out_mask, voxel_size, direction = validated_field_inputs(field, mask, (1, 1, 2), (0, 0, 2))
    assert out.dtype == np.float32 and voxel_size == (1.0, 1.0, 2.0) and direction == (0.0, 0.0, 1.0)
    bad = [
        (np.ones((4, 4)), mask, (1, 1, 1), (0, 0, 1)),
        (field, mask[:3], (1, 1, 1), (0, 0, 1)),
        (field, mask.astype(int), (1, 1, 1), (0, 0, 1)),
        (field, np.zeros_like(mask), (1, 1, 1), (0, 0, 1)),
        (field, mask, (1, 1), (0, 0, 1)),
        (field, mask, (1, 0, 1), (0, 0, 1)),
        (field, mask, (1, 1, 1), (0, 0, 0)),
        (np.full((4, 4, 4), np.nan), mask, (1, 1, 1), (0, 0, 1)),
    ]
    for arguments in bad:
        with pytest.raises(ValueError):
            validated_field_inputs(*arguments)
