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

import numpy as np
import pytest
import scipy.ndimage as ndi

from qsmflow.recon.background import BACKGROUND_METHODS, default_vsharp_radii, lbv, pdf, sharp, vsharp
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


# NRMSE bounds (%) on the axial 1 mm head; measured SHARP 9.2, V-SHARP 26.0, PDF 31.5, LBV 13.9,
# keeping 41 %, 79 %, 100 % and 89 % of the mask.
NRMSE_BOUNDS = {"sharp": 13.0, "vsharp": 30.0, "pdf": 36.0, "lbv": 18.0}
# With 1 x 1 x 2 mm voxels and B0 tilted by 20 degrees; measured V-SHARP 25.3 (59 % kept: the
# default radii stop at 4 mm), PDF 37.1, LBV 14.8. (PDF hardly depends on the B0 direction:
# exterior dipoles of any orientation span the harmonic fields in the mask; 33 % with (0, 0, 1).)
TILTED_BOUNDS = {"vsharp": 30.0, "pdf": 42.0, "lbv": 18.0}


@pytest.mark.parametrize("name", sorted(BACKGROUND_METHODS))
def test_local_field_accuracy(head, name):
    local, reduced = BACKGROUND_METHODS[name](head["total"], head["mask"], head["voxel_size"],
                                              b0_direction=head["b0_direction"])
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
                                              b0_direction=tilted["b0_direction"])
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
