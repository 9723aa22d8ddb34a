"""Noise and edge weights: computed correctly, used by the algorithms, and carried by the interfaces.

Every weight test is built so that ignoring the weight changes the result in a known direction:
a corrupted region that the weight zeroes spoils the map when the weight is dropped.
"""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from qsmflow.metrics import nrmse
from qsmflow.recon import background, echoes, inversion, masking
from qsmflow.recon.dipole import forward_field

VOXEL = (2.0, 2.0, 2.0)
SHAPE = (40, 40, 40)


def ellipsoid(centre_mm, semi_axes_mm, shape=SHAPE, voxel_size=VOXEL):
    grid = np.meshgrid(*[np.arange(n) * d for n, d in zip(shape, voxel_size)], indexing="ij", sparse=True)
    return sum(((g - c) / a) ** 2 for g, c, a in zip(grid, centre_mm, semi_axes_mm)) <= 1


@pytest.fixture(scope="module")
def brain():
    centre = np.array(SHAPE) * np.array(VOXEL) / 2
    mask = ellipsoid(centre, (30, 26, 26))
    chi = np.zeros(SHAPE, np.float32)
    for offset, axes, value in [((-10, 4, 0), (6, 8, 6), 0.10), ((10, 4, 0), (5, 6, 6), 0.18),
                                ((0, -12, 6), (10, 5, 5), -0.05)]:
        chi[ellipsoid(centre + offset, axes) & mask] = value
    local = forward_field(chi, VOXEL, padding=24) * mask
    # A corrupted patch: a field error 20 times the local field's spread (e.g. an unwrapping error).
    patch = ellipsoid(centre + (0, 20, -10), (6, 5, 6)) & mask
    corrupted = (local + 20 * local[mask].std() * patch).astype(np.float32)
    trust = np.where(patch, 0.0, 1.0).astype(np.float32) * mask
    return {"chi": chi, "mask": mask, "local": local.astype(np.float32), "corrupted": corrupted, "patch": patch,
            "trust": trust}


def test_field_weight_is_the_inverse_standard_deviation_of_the_fit():
    rng = np.random.default_rng(1)
    times = np.array([0.004, 0.012, 0.020, 0.028])
    amplitude = np.where(np.arange(4000) < 2000, 1.0, 1.0 / 3.0).reshape(40, 10, 10).astype(np.float32)
    field = np.full(amplitude.shape, 12.0, np.float32)
    clean = amplitude[..., None] * np.exp(-20 * times) * np.exp(2j * np.pi * field[..., None] * times)
    noisy = clean + 0.01 * (rng.standard_normal(clean.shape) + 1j * rng.standard_normal(clean.shape))
    phase = (2 * np.pi * field[..., None] * times + np.angle(noisy * np.conj(clean))).astype(np.float32)
    result = echoes.fit_field_linear(phase, np.abs(noisy).astype(np.float32), times)
    strong, weak = amplitude == 1.0, amplitude < 1.0
    measured_ratio = result["field_hz"][weak].std() / result["field_hz"][strong].std()
    weight_ratio = result["field_weight"][strong].mean() / result["field_weight"][weak].mean()
    assert 2.7 < measured_ratio < 3.3  # the weak voxels are three times noisier
    assert weight_ratio == pytest.approx(measured_ratio, rel=0.1)
    single = echoes.fit_field_linear(phase[..., :1], np.abs(noisy[..., :1]).astype(np.float32), times[:1])
    assert single["field_weight"][strong].mean() == pytest.approx(3 * single["field_weight"][weak].mean(), rel=0.05)


def test_edge_weight_marks_the_strongest_magnitude_edges():
    mask = np.ones((20, 20, 20), bool)
    magnitude = np.ones(mask.shape, np.float32)
    magnitude[10:] = 0.3  # one step between planes 9 and 10
    weight = masking.edge_weight(magnitude, mask, VOXEL, edge_fraction=0.1)
    assert set(np.unique(weight)) == {0.0, 1.0}
    assert not weight[9:11].any() and weight[:8].all() and weight[12:].all()
    assert masking.edge_weight(magnitude, mask, VOXEL, edge_fraction=0.0).all()
    with pytest.raises(ValueError, match="edge_fraction"):
        masking.edge_weight(magnitude, mask, VOXEL, edge_fraction=1.0)
    with pytest.raises(ValueError, match="shape"):
        masking.edge_weight(magnitude[:5], mask, VOXEL)


def test_pdf_weight_that_zeroes_a_corrupted_region_restores_the_local_field(brain):
    outside_patch = brain["mask"] & ~brain["patch"]
    trusted, _ = background.pdf(brain["corrupted"], brain["mask"], VOXEL, weight=brain["trust"])
    ignored, _ = background.pdf(brain["corrupted"], brain["mask"], VOXEL)
    clean, _ = background.pdf(brain["local"], brain["mask"], VOXEL)
    # Without the weight the corruption leaks into the fitted background and from there everywhere.
    assert nrmse(trusted, clean, outside_patch) < 0.5 * nrmse(ignored, clean, outside_patch)


# The phantom's field has no background: TFI's preconditioner is 1 (a large one hands the field to
# sources outside the mask, 61 % NRMSE with 30 here against 4 % with 1). TFI runs 10 x 10 iterations
# instead of its default 45 x 30 (14 times fewer CG steps): the weights' effect is as clear
# (data weight: 5.1 vs 190 % NRMSE, 4.8 vs 170 % at 45 x 30; edge weight: 1.2 vs 13.7 %, 0.0 vs 13.8 %).
TFI_ITERATIONS = {"iterations": 10, "cg_iterations": 10}
PARAMETERS = {"weighted_tv": {}, "tfi": {"preconditioner": 1.0, **TFI_ITERATIONS}}


@pytest.mark.parametrize("name", ["weighted_tv", "tfi"])
def test_data_weight_that_zeroes_a_corrupted_region_restores_the_map(brain, name):
    function = inversion.INVERSION_METHODS[name]
    mask = brain["mask"]
    trusted = function(brain["corrupted"], mask, VOXEL, data_weight=brain["trust"], **PARAMETERS[name])
    ignored = function(brain["corrupted"], mask, VOXEL, **PARAMETERS[name])
    assert nrmse(trusted, brain["chi"], mask) < 0.5 * nrmse(ignored, brain["chi"], mask)
    assert nrmse(trusted, brain["chi"], mask) < 40


@pytest.mark.parametrize("name", ["weighted_tv", "tfi"])
def test_edge_weight_at_true_boundaries_reduces_the_shrinkage(brain, name):
    function = inversion.INVERSION_METHODS[name]
    mask, chi = brain["mask"], brain["chi"]
    edges = masking.edge_weight(chi + 1.0, mask, VOXEL, edge_fraction=0.15)
    strong = {"weighted_tv": 1e-3, "tfi": 1e-3}[name]  # heavy regularisation makes the edges matter
    plain = function(brain["local"], mask, VOXEL, regularization=strong, **PARAMETERS[name])
    edged = function(brain["local"], mask, VOXEL, regularization=strong, gradient_weight=edges, **PARAMETERS[name])
    nucleus = chi > 0.15
    assert edged[nucleus].mean() > plain[nucleus].mean()
    assert nrmse(edged, chi, mask) < nrmse(plain, chi, mask)


# ------------------------------------------------------------------------ the interfaces carry them
def _save(array, path):
    nib.save(nib.Nifti1Image(np.asarray(array, np.float32), np.diag([*VOXEL, 1.0])), str(path))
    return str(path)


def _read(path):
    return np.array(nib.load(path).dataobj[...], dtype=np.float32)  # a copy, not a memory map of the file


def test_inversion_interface_passes_the_weights_to_the_function(brain, tmp_path, monkeypatch):
    from qsmflow.interfaces.recon import InvertDipole

    monkeypatch.chdir(tmp_path)
    files = {"local_field": _save(brain["corrupted"], tmp_path / "local.nii"),
             "mask": _save(brain["mask"], tmp_path / "mask.nii"),
             "data_weight": _save(brain["trust"], tmp_path / "weight.nii")}
    weighted = InvertDipole(method="weighted_tv", **files).run()
    chi_weighted = _read(weighted.outputs.chi)  # read before the next run's output replaces it
    unweighted = InvertDipole(method="weighted_tv", local_field=files["local_field"], mask=files["mask"]).run()
    chi_unweighted = _read(unweighted.outputs.chi)
    direct = inversion.weighted_tv(brain["corrupted"], brain["mask"], VOXEL, data_weight=brain["trust"])
    np.testing.assert_allclose(chi_weighted, direct, atol=1e-6)
    assert nrmse(chi_weighted, brain["chi"], brain["mask"]) < 0.5 * nrmse(chi_unweighted, brain["chi"], brain["mask"])
    assert weighted.outputs.provenance["Weights"] == ["data_weight"]
    # A method without weights is not given them.
    tkd = InvertDipole(method="tkd", **files).run()
    assert tkd.outputs.provenance["Weights"] == []


def test_total_field_inversion_interface_reads_the_total_field_in_hz(brain, tmp_path, monkeypatch):
    from qsmflow.interfaces.recon import InvertDipole
    from qsmflow.recon.dipole import ppm_to_hz

    monkeypatch.chdir(tmp_path)
    field_hz = _save(ppm_to_hz(brain["local"], 3.0), tmp_path / "field_hz.nii")
    mask = _save(brain["mask"], tmp_path / "mask.nii")
    result = InvertDipole(method="tfi", field_hz=field_hz, field_strength=3.0, mask=mask,
                          parameters=TFI_ITERATIONS).run()
    chi = _read(result.outputs.chi)
    direct = inversion.total_field_inversion(brain["local"], brain["mask"], VOXEL, **TFI_ITERATIONS)
    assert nrmse(direct, inversion.total_field_inversion(brain["local"], brain["mask"], VOXEL, iterations=1,
                                                         cg_iterations=1), brain["mask"]) > 10  # the solve matters
    assert nrmse(chi, direct, brain["mask"]) < 1.0  # the same solve, up to the float32 rounding of ppm -> Hz -> ppm
    with pytest.raises(ValueError, match="total field"):
        InvertDipole(method="tfi", local_field=field_hz, mask=mask).run()


def test_background_interface_passes_the_weight_to_pdf(brain, tmp_path, monkeypatch):
    from qsmflow.interfaces.recon import RemoveBackground
    from qsmflow.recon.dipole import ppm_to_hz

    monkeypatch.chdir(tmp_path)
    field_hz = _save(ppm_to_hz(brain["corrupted"], 3.0), tmp_path / "field_hz.nii")
    mask = _save(brain["mask"], tmp_path / "mask.nii")
    weight = _save(brain["trust"], tmp_path / "weight.nii")
    result = RemoveBackground(method="pdf", field_hz=field_hz, mask=mask, field_strength=3.0, weight=weight).run()
    local = _read(result.outputs.local_field)
    np.testing.assert_allclose(local, background.pdf(brain["corrupted"], brain["mask"], VOXEL, weight=brain["trust"])[0],
                               atol=1e-4)  # float32 rounding of the Hz round trip
    assert result.outputs.provenance["Weights"] == ["weight"]


# ------------------------------------------------------------------------ the workflow wires them
@pytest.fixture(scope="module")
def small_scan(tmp_path_factory):
    from qsmflow import simulate
    from qsmflow.bids import collect_scans

    root = tmp_path_factory.mktemp("weights") / "bids"
    simulate.write_bids_dataset(root, [("01", 40.0)], shape=(40, 48, 40), voxel_size=(4.0, 4.0, 4.0))
    scans, errors = collect_scans(root)
    assert not errors
    return scans[0]


def _edges(workflow):
    return {(u.name, v.name, source, target) for u, v, data in workflow._graph.edges(data=True)
            for source, target in data["connect"]}


def test_workflow_connects_the_configured_weights(small_scan, tmp_path):
    from qsmflow.config import load_config
    from qsmflow.workflows.recon import init_scan_qsm_wf

    weighted = load_config("accurate", overrides=["background.noise_weight=true", "inversion.noise_weight=true",
                                                   "inversion.edge_weight=true"])
    edges = _edges(init_scan_qsm_wf(small_scan, weighted, tmp_path / "out", shape=(40, 48, 40)))
    assert ("fit_field", "remove_background", "field_weight", "weight") in edges
    assert ("fit_field", "invert_dipole", "field_weight", "data_weight") in edges
    assert ("edge_weight", "invert_dipole", "gradient_weight", "gradient_weight") in edges
    plain = _edges(init_scan_qsm_wf(small_scan, load_config("accurate", overrides=[
        "background.noise_weight=false", "inversion.noise_weight=false", "inversion.edge_weight=false"]),
        tmp_path / "out", shape=(40, 48, 40)))
    assert not {edge for edge in plain if "weight" in edge[3]}


@pytest.mark.slow
def test_total_field_inversion_workflow_skips_background_removal(small_scan, tmp_path):
    from qsmflow.config import load_config
    from qsmflow.workflows.recon import init_scan_qsm_wf

    config = load_config("accurate", overrides=["inversion.method=tfi", "inversion.noise_weight=true",
                                                "inversion.tfi.iterations=10", "inversion.tfi.cg_iterations=10",
                                                "segmentation.enabled=false", "reference.method=mean"])
    workflow = init_scan_qsm_wf(small_scan, config, tmp_path / "out", shape=(40, 48, 40))
    assert "remove_background" not in {node.name for node in workflow._graph.nodes}
    assert ("fit_field", "invert_dipole", "field_hz", "field_hz") in _edges(workflow)
    workflow.base_dir = str(tmp_path / "work")
    workflow.run(plugin="Linear")
    from qsmflow.bids import derivative_path

    entities = {key: value for key, value in small_scan.entities.items() if value is not None}
    chimap = derivative_path(tmp_path / "out", entities, "Chimap")
    local = derivative_path(tmp_path / "out", {**entities, "desc": "local"}, "fieldmap", datatype="fmap")
    assert chimap.exists() and local.exists(), sorted(str(p) for p in (tmp_path / "out").rglob("*.nii.gz"))
    chi = _read(chimap)
    assert np.isfinite(chi).all() and chi.any()
