"""Background field removal on a simulated head: harmonic background + local field of a brain phantom.

The local field is the field of susceptibility sources inside the mask; the background is the
analytic field of two air-filled spheres outside the mask plus harmonic polynomials, so it is
exactly harmonic inside the mask. The error bounds are the values measured with this phantom
plus a margin (noted at each bound); removing nothing gives NRMSE > 500 %.

A remark on what the NRMSE can reach: the part of the local field that is itself harmonic inside
the mask cannot be told from background by any method. Here, projecting the local field off the
9 harmonic polynomials of degree <= 2 costs 15.5 % NRMSE, off the 16 of degree <= 3 18.3 %; PDF,
which fits every exterior-dipole field, removes more (31 % with the local field alone), while
SHARP-type methods and LBV, which only remove what the mask boundary fixes, do better on this
phantom (its structures lie away from the edge). The leakage tests check the background removal
itself, independent of that ambiguity.
"""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import scipy.ndimage as ndi

from qsmflow.recon.background import (BACKGROUND_METHODS, HARMONIC_ORDER, _harmonic_polynomial_basis, default_vsharp_radii,
                                      lbv, pdf, remove_harmonic_polynomials, sharp, vsharp)
from qsmflow.recon.dipole import forward_field

TILT = np.deg2rad(20.0)


def ellipsoid(shape, voxel_size, centre_mm, semi_axes_mm):
    grid = np.meshgrid(*[np.arange(n) * d for n, d in zip(shape, voxel_size)], indexing="ij", sparse=True)
    return sum(((g - c) / a) ** 2 for g, c, a in zip(grid, centre_mm, semi_axes_mm)) <= 1


def sphere_field(shape, voxel_size, centre_mm, radius_mm, chi, b0_direction):
    """Analytic field (ppm) of a uniformly magnetised sphere, outside the sphere."""
    grid = np.meshgrid(*[np.arange(n) * d for n, d in zip(shape, voxel_size)], indexing="ij")
    offset = [g - c for g, c in zip(grid, centre_mm)]
    b = np.asarray(b0_direction, float) / np.linalg.norm(b0_direction)
    r_squared = sum(o**2 for o in offset)
    cos_squared = sum(o * bi for o, bi in zip(offset, b)) ** 2 / np.maximum(r_squared, 1e-12)
    return chi / 3 * radius_mm**3 * (3 * cos_squared - 1) / np.maximum(r_squared, 1e-12) ** 1.5


def nrmse(estimate, truth, mask):
    a = estimate[mask] - estimate[mask].mean()
    b = truth[mask] - truth[mask].mean()
    return 100 * np.linalg.norm(a - b) / np.linalg.norm(b)


def make_head(shape=(64, 64, 64), voxel_size=(1.0, 1.0, 1.0), b0_direction=(0.0, 0.0, 1.0), noise=5e-4):
    extent = np.array(shape) * np.array(voxel_size)
    centre = extent / 2
    brain = ellipsoid(shape, voxel_size, centre, (26, 22, 22))
    chi = np.zeros(shape, np.float32)
    for offset, axes, value in [((-9, 3, 0), (4, 6, 5), 0.08), ((9, 3, 0), (3, 4, 4), 0.18),
                                ((-5, -9, 6), (3, 4, 4), 0.06), ((5, -8, -7), (3, 3, 3), 0.12),
                                ((-14, -6, 8), (5, 5, 6), -0.05), ((14, -6, 8), (5, 5, 6), -0.05),
                                ((0, 12, 4), (8, 3, 3), -0.05)]:
        chi[ellipsoid(shape, voxel_size, centre + offset, axes)] = value
    local = forward_field(chi, voxel_size, b0_direction, padding=32) * brain
    grid = [(np.arange(n) * d - c) for n, d, c in zip(shape, voxel_size, centre)]
    x, y, z = np.meshgrid(*grid, indexing="ij", sparse=True)
    background = 0.05 * (x**2 - y**2) / 25**2 + 0.03 * z / 25 + 0.04 * x * z / 25**2
    positions = np.argwhere(brain) * np.array(voxel_size)
    for offset, radius in [((0, 6, -32), 6.0), ((30, -20, 5), 5.0)]:  # air, chi(air) - chi(tissue) = -9.4 ppm
        source = centre + offset
        assert np.sqrt(((positions - source) ** 2).sum(axis=1)).min() > radius + 3  # well outside the mask
        background = background + sphere_field(shape, voxel_size, source, radius, -9.4, b0_direction)
    rng = np.random.default_rng(0)
    noisy = rng.normal(0, noise, shape) if noise else 0
    total = ((local + background + noisy) * brain).astype(np.float32)
    return {"total": total, "local": local.astype(np.float32), "background": (background * brain).astype(np.float32),
            "mask": brain, "voxel_size": voxel_size, "b0_direction": b0_direction}


@pytest.fixture(scope="module")
def head():
    return make_head()


# NRMSE bounds (%) of each method's own result (harmonic_order=None) on the axial 1 mm head; measured SHARP 11.1
# (threshold 0.02; 9.2 with 0.05), V-SHARP 26.0, PDF 31.5, LBV 13.9,
# keeping 41 %, 79 %, 100 % and 89 % of the mask.
NRMSE_BOUNDS = {"sharp": 13.0, "vsharp": 30.0, "pdf": 36.0, "lbv": 18.0}
# With 1 x 1 x 2 mm voxels and B0 tilted by 20 degrees; measured V-SHARP 25.3 (59 % kept: the
# default radii stop at 4 mm), PDF 37.1, LBV 14.8. (PDF hardly depends on the B0 direction:
# exterior dipoles of any orientation span the harmonic fields in the mask; 33 % with (0, 0, 1).)
TILTED_BOUNDS = {"vsharp": 30.0, "pdf": 42.0, "lbv": 18.0}


@pytest.mark.parametrize("name", sorted(BACKGROUND_METHODS))
def test_local_field_accuracy(head, name):
    local, reduced = BACKGROUND_METHODS[name](head["total"], head["mask"], head["voxel_size"],
                                              b0_direction=head["b0_direction"], harmonic_order=None)
    assert local.dtype == np.float32 and reduced.dtype == bool and local.shape == head["mask"].shape
    assert not (reduced & ~head["mask"]).any()
    assert not local[~reduced].any()
    error = nrmse(local, head["local"], reduced)
    assert error < NRMSE_BOUNDS[name], f"{name}: NRMSE {error:.1f} %"
    assert nrmse(head["total"], head["local"], reduced) > 500  # what removing nothing scores


@pytest.mark.parametrize("name", sorted(BACKGROUND_METHODS))
def test_background_does_not_leak(head, name):
    """The method maps local + background to what it maps the local field alone to."""
    run = BACKGROUND_METHODS[name]
    with_background, reduced = run(head["total"], head["mask"], head["voxel_size"])
    without, _ = run((head["total"] - head["background"]) * head["mask"], head["mask"], head["voxel_size"])
    leak = (with_background - without)[reduced]
    background = head["background"][reduced]
    # Measured, in % of the background: SHARP 0.24, V-SHARP 0.09, LBV 0.19, PDF 1.0 (CG tolerance 1e-3).
    limit = 2.0 if name == "pdf" else 0.5
    assert 100 * np.std(leak) / np.std(background) < limit


@pytest.mark.parametrize("name", sorted(TILTED_BOUNDS))
def test_anisotropic_voxels_and_oblique_b0(name):
    """1 x 1 x 2 mm voxels with B0 tilted by 20 degrees."""
    tilted = make_head(shape=(64, 64, 32), voxel_size=(1.0, 1.0, 2.0), b0_direction=(0.0, np.sin(TILT), np.cos(TILT)))
    local, reduced = BACKGROUND_METHODS[name](tilted["total"], tilted["mask"], tilted["voxel_size"],
                                              b0_direction=tilted["b0_direction"], harmonic_order=None)
    error = nrmse(local, tilted["local"], reduced)
    assert error < TILTED_BOUNDS[name], f"{name}: NRMSE {error:.1f} %"


def test_vsharp_keeps_most_of_a_sphere():
    shape = (64, 64, 64)
    sphere = ellipsoid(shape, (1, 1, 1), (31.5, 31.5, 31.5), (30, 30, 30))  # 60 voxels across
    assert default_vsharp_radii((1, 1, 1)) == [float(r) for r in range(12, 1, -1)]
    _, reduced = vsharp(np.zeros(shape, np.float32), sphere, (1, 1, 1))
    kept = reduced.sum() / sphere.sum()
    assert 0.80 <= kept < 0.90  # the 2 mm final radius erodes 2 mm: (28/30)^3 = 0.81, measured 0.835


def test_smv_erosion_matches_a_distance_transform():
    """The mask SHARP returns is the mask eroded by the sphere, computed independently."""
    head = make_head(shape=(48, 48, 40), voxel_size=(1.0, 1.0, 1.25), noise=0)
    for radius in (3.0, 5.0):
        _, reduced = sharp(head["total"], head["mask"], head["voxel_size"], radius_mm=radius)
        distance = ndi.distance_transform_edt(np.pad(head["mask"], 1), sampling=head["voxel_size"])[1:-1, 1:-1, 1:-1]
        np.testing.assert_array_equal(reduced, distance > radius)


def test_harmonic_field_alone_is_removed():
    head = make_head(noise=0)
    # Measured residual, in % of the background: V-SHARP 0.09, LBV 0.19, SHARP 0.24, PDF 0.58.
    for run, limit in ((vsharp, 0.5), (lbv, 0.5), (sharp, 0.5), (pdf, 1.5)):
        local, reduced = run(head["background"], head["mask"], head["voxel_size"])
        assert 100 * np.std(local[reduced]) < limit * np.std(head["background"][reduced]), run.__name__


def test_pdf_weight_is_used_and_validated(head):
    """A zero weight on corrupted voxels keeps them out of the fit; ignoring it would not.

    88 voxels at the mask edge get +2 ppm (an unwrapping error, a vessel): unweighted, PDF's
    background fit spreads the error (NRMSE 265 % away from the blob, measured); weighted zero
    there, the local field elsewhere is that of the clean field (31.4 %, within 0.002 ppm).
    """
    mask = head["mask"]
    weight = np.ones(mask.shape, np.float32)
    unweighted, _ = pdf(head["total"], mask, head["voxel_size"])
    scaled, _ = pdf(head["total"], mask, head["voxel_size"], weight=3 * weight)  # normalised away
    np.testing.assert_allclose(scaled, unweighted, atol=1e-5)
    edge = np.argwhere(mask & ~ndi.binary_erosion(mask, iterations=3))
    centre = edge[len(edge) // 3]
    blob = np.zeros(mask.shape, bool)
    blob[tuple(slice(max(c - 2, 0), c + 3) for c in centre)] = True
    blob &= mask
    corrupted = head["total"].copy()
    corrupted[blob] += 2.0
    weight[blob] = 0.0
    ignored, _ = pdf(corrupted, mask, head["voxel_size"])
    weighted, _ = pdf(corrupted, mask, head["voxel_size"], weight=weight)
    away = mask & ~ndi.binary_dilation(blob, iterations=2)
    assert np.abs(weighted - unweighted)[away].max() < 0.01
    assert np.abs(ignored - unweighted)[away].max() > 0.1
    assert nrmse(weighted, head["local"], away) < nrmse(unweighted, head["local"], away) + 1.0
    assert nrmse(ignored, head["local"], away) > 100
    with pytest.raises(ValueError):
        pdf(head["total"], head["mask"], head["voxel_size"], weight=np.ones((4, 4, 4)))
    with pytest.raises(ValueError):
        pdf(head["total"], head["mask"], head["voxel_size"], weight=-weight)


@pytest.mark.parametrize("call", [
    lambda h: sharp(h["total"], h["mask"], h["voxel_size"], radius_mm=0.5),
    lambda h: sharp(h["total"], h["mask"], h["voxel_size"], threshold=1.5),
    lambda h: vsharp(h["total"], h["mask"], h["voxel_size"], radii_mm=[]),
    lambda h: vsharp(h["total"], h["mask"], h["voxel_size"], radii_mm=[30.0]),  # no voxel fits a 30 mm sphere
    lambda h: pdf(h["total"], h["mask"], h["voxel_size"], tolerance=0),
    lambda h: pdf(h["total"], h["mask"], h["voxel_size"], padding=-1),
    lambda h: lbv(h["total"], h["mask"], h["voxel_size"], iterations=0),
    lambda h: lbv(h["total"], h["mask"], h["voxel_size"], peel=-1),
    lambda h: lbv(h["total"], h["mask"].astype(np.uint8), h["voxel_size"]),
    lambda h: lbv(h["total"][:-1], h["mask"], h["voxel_size"]),
    lambda h: vsharp(h["total"], h["mask"], (1.0, 1.0)),
])
def test_bad_arguments_raise(head, call):
    with pytest.raises(ValueError):
        call(head)


def test_lbv_fails_the_scan_when_its_solve_does_not_converge(head):
    # On a mask riddled with holes one CG step leaves 55 % of the Poisson residual (measured):
    # LBV must refuse instead of returning a wrong map.
    holed = head["mask"] & (np.random.default_rng(0).random(head["mask"].shape) > 0.3)
    with pytest.raises(ValueError, match="LBV did not converge"):
        lbv(head["total"], holed, head["voxel_size"], iterations=1)
    local, _ = lbv(head["total"], head["mask"], head["voxel_size"])  # the default converges and passes the checks
    assert np.isfinite(local).all()


def test_lbv_divergence_check_rejects_a_local_field_larger_than_the_total(head):
    from qsmflow.recon.background import _check_lbv_solution

    interior = head["mask"]
    total = head["total"]
    exploded = 5 * (total - total[interior].mean()) * interior
    with pytest.raises(ValueError, match="LBV diverged"):
        _check_lbv_solution(exploded, np.zeros(1), np.ones(1), total, interior, 500)
    with pytest.raises(ValueError, match="non-finite"):
        _check_lbv_solution(np.full(total.shape, np.nan, np.float32), np.zeros(1), np.ones(1), total, interior, 500)


@pytest.mark.parametrize("name", sorted(BACKGROUND_METHODS))
def test_default_result_is_the_method_off_its_low_order_harmonics(head, name):
    """By default SHARP, V-SHARP and LBV lose their harmonic polynomials of degree <= HARMONIC_ORDER
    over the returned mask (PDF: none); against the truth with the same convention the result is
    as accurate as the method's own result against the truth (measured V-SHARP 26.0,
    LBV 14.0 %, SHARP 8.9)."""
    run = BACKGROUND_METHODS[name]
    order = inspect.signature(run).parameters["harmonic_order"].default
    assert order == (None if name == "pdf" else HARMONIC_ORDER)
    own, reduced = run(head["total"], head["mask"], head["voxel_size"], b0_direction=head["b0_direction"],
                       harmonic_order=None)
    local, same = run(head["total"], head["mask"], head["voxel_size"], b0_direction=head["b0_direction"])
    np.testing.assert_array_equal(same, reduced)
    assert local.dtype == np.float32 and not local[~reduced].any()
    if order is None:
        np.testing.assert_array_equal(local, own)
        return
    expected = remove_harmonic_polynomials(own, reduced, head["voxel_size"], order)
    np.testing.assert_allclose(local, expected, atol=1e-6 * float(np.abs(own).max()))
    convention = remove_harmonic_polynomials(head["local"], reduced, head["voxel_size"], order)
    assert nrmse(local, convention, reduced) < NRMSE_BOUNDS[name]


def solid_harmonics(shape, voxel_size, centre_mm):
    """A few solid harmonics (harmonic polynomials) of degree 0 to 3, in mm from ``centre_mm``."""
    grid = np.meshgrid(*[np.arange(n) * d - c for n, d, c in zip(shape, voxel_size, centre_mm)], indexing="ij")
    x, y, z = (g / 20.0 for g in grid)
    return {0: [np.ones_like(x)], 1: [x, y - z], 2: [x * y, x**2 - y**2, 2 * z**2 - x**2 - y**2 + x * z],
            3: [x * y * z, x**3 - 3 * x * y**2, z * (2 * z**2 - 3 * x**2 - 3 * y**2)]}


def test_harmonic_polynomial_basis_is_harmonic_and_complete():
    for order in range(4):
        exponents, basis = _harmonic_polynomial_basis(order)
        assert basis.shape == (len(exponents), (order + 1) ** 2)  # the (order + 1)^2 solid harmonics
        assert np.allclose(basis.T @ basis, np.eye(basis.shape[1]), atol=1e-10)
    # each basis polynomial has zero Laplacian: exact for the 7-point stencil on polynomials of degree <= 3
    exponents, basis = _harmonic_polynomial_basis(3)
    h = 0.1
    x, y, z = np.meshgrid(*[np.arange(-3, 4) * h] * 3, indexing="ij")
    monomials = np.stack([x**a * y**b * z**c for a, b, c in exponents], axis=-1) @ basis
    laplacian = sum(np.roll(monomials, s, a) for a in range(3) for s in (1, -1)) - 6 * monomials
    assert np.abs(laplacian[1:-1, 1:-1, 1:-1]).max() / h**2 < 1e-8


def test_remove_harmonic_polynomials_on_a_sphere_field_plus_harmonic_background():
    """Analytic case: the field of a magnetised sphere inside an ellipsoidal mask (a local field)
    plus harmonic polynomials of degree <= 2 (background). Removing degree <= 2 returns exactly
    what it returns for the sphere's field alone; a degree-3 harmonic survives order 2 and is
    removed by order 3; the result is orthogonal to every removed harmonic over the mask."""
    shape, voxel = (48, 44, 40), (1.0, 1.2, 1.5)
    centre = np.array(shape) * np.array(voxel) / 2
    mask = ellipsoid(shape, voxel, centre, (20, 22, 24))
    inside = ellipsoid(shape, voxel, centre + (4, -3, 2), (6, 6, 6))
    chi = np.where(inside, 0.1, 0.0).astype(np.float32)
    local = (forward_field(chi, voxel, (0.0, 0.0, 1.0), padding=24) * mask).astype(np.float32)
    harmonics = solid_harmonics(shape, voxel, centre + (1.0, 2.0, -1.0))
    background = sum(c * h for c, h in zip((0.3, -0.05, 0.08, 0.02, -0.04, 0.03), harmonics[0] + harmonics[1] + harmonics[2]))
    cleaned = remove_harmonic_polynomials(local + background, mask, voxel, 2)
    reference = remove_harmonic_polynomials(local, mask, voxel, 2)
    scale = float(np.abs(local[mask]).max())
    assert np.abs(cleaned - reference)[mask].max() < 1e-4 * scale
    assert not cleaned[~mask].any() and cleaned.dtype == np.float32
    # the sphere's own field is mostly not a low-order harmonic: most of it is kept
    assert np.linalg.norm(reference[mask]) > 0.8 * np.linalg.norm(local[mask] - local[mask].mean())
    for degree in range(3):
        for h in harmonics[degree]:
            assert abs(float(np.dot(cleaned[mask], h[mask]))) < 1e-4 * np.linalg.norm(cleaned[mask]) * np.linalg.norm(h[mask])
    cubic = 0.05 * harmonics[3][2]
    assert np.std(remove_harmonic_polynomials(cubic, mask, voxel, 2)[mask]) > 0.5 * np.std(cubic[mask])
    assert np.std(remove_harmonic_polynomials(cubic, mask, voxel, 3)[mask]) < 1e-4 * np.std(cubic[mask])


@pytest.mark.parametrize("order", [-1, 1.5, True])
def test_harmonic_order_is_validated(head, order):
    with pytest.raises(ValueError, match="harmonic_order"):
        sharp(head["total"], head["mask"], head["voxel_size"], harmonic_order=order)


def test_harmonic_fit_ignores_voxels_of_zero_weight():
    """PDF's weight also weighs its harmonic fit: a corrupted blob of weight 0 does not move the result elsewhere."""
    shape, voxel = (40, 40, 40), (1.0, 1.0, 1.0)
    mask = ellipsoid(shape, voxel, (20, 20, 20), (16, 15, 14))
    field = (0.02 * solid_harmonics(shape, voxel, (20, 20, 20))[2][2]
             + np.random.default_rng(1).normal(0, 1e-3, shape)).astype(np.float32) * mask
    blob = ellipsoid(shape, voxel, (12, 20, 20), (3, 3, 3))
    weight = np.where(blob, 0.0, 1.0).astype(np.float32)
    clean = remove_harmonic_polynomials(field, mask, voxel, 2, weight=weight)
    corrupted = remove_harmonic_polynomials(field + 2.0 * blob, mask, voxel, 2, weight=weight)
    np.testing.assert_allclose(corrupted[mask & ~blob], clean[mask & ~blob], atol=1e-5)
    unweighted = remove_harmonic_polynomials(field + 2.0 * blob, mask, voxel, 2)
    assert np.abs(unweighted - clean)[mask & ~blob].max() > 1e-2
