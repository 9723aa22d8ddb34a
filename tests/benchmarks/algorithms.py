"""Accuracy and speed of every reconstruction method of every stage, against ground truth.

Run by hand (not part of the test-suite):

    python tests/benchmarks/algorithms.py [--skip-timing] [--skip-accuracy] [--repeats 3]
    python tests/benchmarks/algorithms.py --cosmos     # multi-orientation block only
    python tests/benchmarks/algorithms.py --audit      # checks of the simulation and the metric

Accuracy block: datasets from the independent ``qsm-forward`` simulator (``simple`` phantom,
3 T and 7 T, four echoes 4/12/20/28 ms, peak SNR 100, phase offset and second-order shim
field) and qsmflow's own brain phantom (3 T, 2 mm, air/bone background). Each method is fed
either the true input of its stage ("isolated") or the output of the stage before as the
``default`` preset computes it ("chained"), with the parameters ``configs/default.yaml`` sets
for that method. Whole presets are scored chained from raw phase.
Metrics follow QSM-CI: NRMSE and HFEN in %, XSIM, Pearson correlation, in the evaluated
mask (method's output mask ∩ true mask); seconds; peak memory of numpy allocations
(tracemalloc) in GB.

Timing block: a 164×205×205 grid with four echoes (the size of the QSM-CI head phantom):
median seconds of each method and its ratio to its FFT floor, the time the same method would
need if it did nothing but its FFTs (counted per call, each timed on its own shape).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np

from qsmflow import metrics, segmentation, simulate
from qsmflow.config import load_config, method_parameters
from qsmflow.recon import background, cosmos, dipole, echoes, inversion, masking, unwrap

ECHO_TIMES = (0.004, 0.012, 0.020, 0.028)
FFT_MODULES = (background, inversion, unwrap)


# ----------------------------------------------------------------------------------- data sets
def qsm_forward_dataset(field_strength: float, workdir: Path) -> dict:
    root = workdir / f"qsm-forward-{field_strength:g}T"
    if not root.exists():
        subprocess.run(
            ["qsm-forward", "simple", str(root), "--TEs", *map(str, ECHO_TIMES), "--B0", str(field_strength),
             "--peak-snr", "100", "--generate-phase-offset", "--generate-shim-field", "--random-seed", "3",
             "--save-field", "--save-shimmed-field"],
            check=True, capture_output=True,
        )
    anat, truth = root / "sub-1" / "anat", root / "derivatives" / "qsm-forward" / "sub-1" / "anat"
    load = lambda path: np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)  # noqa: E731
    affine = nib.load(str(anat / "sub-1_echo-1_part-phase_MEGRE.nii")).affine
    return {
        "name": f"qsm-forward simple {field_strength:g}T",
        "simulation": "qsm-forward",
        "magnitude": np.stack([load(anat / f"sub-1_echo-{n}_part-mag_MEGRE.nii") for n in range(1, 5)], -1),
        "phase": np.stack([load(anat / f"sub-1_echo-{n}_part-phase_MEGRE.nii") for n in range(1, 5)], -1),
        "field_strength": field_strength,
        "voxel_size": dipole.voxel_sizes_from_affine(affine),
        "b0_direction": dipole.b0_direction_from_affine(affine),
        "mask": load(truth / "sub-1_mask.nii") > 0,
        "chi": load(truth / "sub-1_Chimap.nii"),
        "total_ppm": load(truth / "sub-1_desc-shimmed_fieldmap.nii"),
        "local_ppm": load(truth / "sub-1_fieldmap-local.nii"),
    }


def brain_phantom_dataset(shape=(90, 108, 90), voxel_size=(2.0, 2.0, 2.0)) -> dict:
    phantom = simulate.brain_phantom(shape, voxel_size, age_years=50, seed=5)
    fields = simulate.simulate_field(phantom)
    magnitude, phase = simulate.simulate_multi_echo(phantom, echo_times=ECHO_TIMES, field_strength=3.0, seed=5,
                                                    field_ppm=fields.total)
    return {
        "name": f"qsmflow brain phantom 3T {shape[0]}x{shape[1]}x{shape[2]}",
        "simulation": "single grid, air/bone x0.25",
        "magnitude": magnitude, "phase": phase, "field_strength": 3.0,
        "voxel_size": np.asarray(voxel_size, float), "b0_direction": np.array([0.0, 0.0, 1.0]),
        "mask": phantom.brain_mask, "chi": phantom.chi * phantom.brain_mask, "labels": phantom.labels,
        "tissues": phantom.tissues, "label_names": phantom.label_names,
        "total_ppm": fields.total, "local_ppm": fields.local,
    }


def honest_dataset(seed=5, tilt_degrees=0.0, azimuth_degrees=90.0, shape=(90, 108, 90), voxel_size=(2.0, 2.0, 2.0)) -> dict:
    """The brain phantom simulated at 2x resolution with full-strength air and bone, averaged down
    (:func:`qsmflow.simulate.simulate_acquisition`); the head tilted by ``tilt_degrees``."""
    tilt, azimuth = np.deg2rad(tilt_degrees), np.deg2rad(azimuth_degrees)
    b0 = (np.sin(tilt) * np.cos(azimuth), np.sin(tilt) * np.sin(azimuth), np.cos(tilt))
    acquisition = simulate.simulate_acquisition(shape, voxel_size, age_years=50, seed=seed, echo_times=ECHO_TIMES,
                                                b0_direction=b0)
    truth = acquisition.truth
    return {
        "name": f"honest seed {seed} tilt {tilt_degrees:g}",
        "simulation": "2x supersampled, full air/bone",
        "magnitude": acquisition.magnitude, "phase": acquisition.phase, "field_strength": 3.0,
        "voxel_size": np.asarray(voxel_size, float), "b0_direction": np.asarray(acquisition.b0_direction),
        "mask": truth.brain_mask, "chi": truth.chi * truth.brain_mask, "labels": truth.labels, "tissues": truth.tissues,
        "label_names": truth.label_names, "total_ppm": acquisition.fields.total, "local_ppm": acquisition.fields.local,
    }


#: ROIs of the ROI-accuracy columns: deep grey nuclei and white matter.
ROI_COLUMNS = ("CN", "PU", "GP", "TH", "IC", "SCC", "OR")
DEEP_NUCLEI = ("CN", "PU", "GP", "TH")
CSF_TISSUE = next(t.index for t in simulate.TISSUES if t.name == "csf")


def ventricles(data, mask):
    """The project's default reference region (``reference.method: csf``) on the phantom.

    The phantom's CSF deeper than 12 mm inside the brain (its ventricles; sulci are shallower)
    stands for the atlas' lateral-ventricle label; :func:`qsmflow.segmentation.reference_region`
    then erodes it by its default 2 mm and keeps it inside ``mask``, as the workflow does with
    a perfect segmentation.
    """
    import scipy.ndimage as ndi

    depth = ndi.distance_transform_edt(data["mask"], sampling=data["voxel_size"])
    labels = ((data["tissues"] == CSF_TISSUE) & (depth > 12.0)).astype(np.int16)
    table = (segmentation.AtlasLabel(1, "LV", "lateral ventricle", "bilateral", "phantom", "csf"),)
    return segmentation.reference_region("csf", qsm_mask=mask, labels=labels, table=table,
                                         voxel_size=data["voxel_size"])


def roi_accuracy(chi, data, mask, reference="mean"):
    """ROI means vs truth, both relative to a reference region.

    ``reference``: ``"mean"``, the mean over ``mask`` (what ``reference.method: mean`` does);
    ``"csf"``, the project's default (:func:`ventricles`: the phantom's ventricles eroded by 2 mm,
    truth labels: the best a ventricle reference can do). Returns (slope, offset) of the estimated means regressed on the true ones
    across :data:`ROI_COLUMNS`, each ROI's relative error (estimate / truth - 1) and each ROI's
    (true mean, estimate - truth) in ppm, or None when the data set has no labels.
    """
    if "labels" not in data:
        return None
    index = {name: value for value, name in data["label_names"].items()}
    region = mask if reference == "mean" else ventricles(data, mask)
    truth_ref, estimate_ref = data["chi"][region].mean(), chi[region].mean()
    true_means, estimated_means, errors, absolute = [], [], {}, {}
    for name in ROI_COLUMNS:
        region = (data["labels"] == index[name]) & mask
        if not region.any():
            continue
        true_mean = data["chi"][region].mean() - truth_ref
        estimated_mean = chi[region].mean() - estimate_ref
        true_means.append(true_mean)
        estimated_means.append(estimated_mean)
        errors[name] = estimated_mean / true_mean - 1.0
        absolute[name] = (float(true_mean), float(estimated_mean - true_mean))
    slope, offset = np.polyfit(true_means, estimated_means, 1)
    return slope, offset, errors, absolute


def roi_cells(accuracy, label="mean"):
    """The ROI columns: slope, offset, each deep nucleus's relative error, and the thalamus's true
    mean and error in ppb (its relative error is large whenever its true value is near the reference)."""
    if accuracy is None:
        return ""
    slope, offset, errors, absolute = accuracy
    nuclei = " ".join(f"{name} {100 * errors[name]:+5.1f}" for name in DEEP_NUCLEI if name in errors)
    thalamus = (f" (TH true {1000 * absolute['TH'][0]:+5.1f}, error {1000 * absolute['TH'][1]:+5.1f} ppb)"
                if "TH" in absolute else "")
    return f" | ref {label}: slope {slope:4.2f} offset {1000 * offset:+5.1f} ppb, {nuclei} %{thalamus}"


# ----------------------------------------------------------------------------------- measuring
def measured(function, *args, **kwargs):
    """Call ``function``; return (result, seconds, peak GB of traced allocations)."""
    tracemalloc.start()
    start = time.perf_counter()
    result = function(*args, **kwargs)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] / 1024**3
    tracemalloc.stop()
    return result, seconds, peak


def field_stage(data, unwrapper, fit, mask):
    unwrapped = unwrap.unwrap_echoes(data["phase"], data["magnitude"], ECHO_TIMES, mask=mask,
                                     voxel_size=data["voxel_size"], method=unwrapper)
    result = echoes.FIELD_FITS[fit](unwrapped, data["magnitude"], ECHO_TIMES, mask=mask)
    reliable = masking.reliable_field_mask(mask, result["residual"])
    return dipole.hz_to_ppm(result["field_hz"], data["field_strength"]).astype(np.float32), reliable


def chain(data, config):
    """Raw phase to Chimap with a configuration's methods; returns (chi, mask)."""
    local, mask, fit = local_field_chain(data, config)
    return dipole_inversion(data, config, local, mask, fit)


def local_field_chain(data, config):
    """Raw phase to local field (ppm) with a configuration's methods; returns (local, mask, echo fit)."""
    rss = np.sqrt((data["magnitude"] ** 2).sum(-1))
    mask = masking.MASKING_METHODS[config["mask"]["method"]](rss, data["voxel_size"], **method_parameters(config, "mask"))
    unwrapped = unwrap.unwrap_echoes(data["phase"], data["magnitude"], ECHO_TIMES, mask=mask, voxel_size=data["voxel_size"],
                                     method=config["unwrap"]["method"], **method_parameters(config, "unwrap"))
    fit = echoes.FIELD_FITS[config["echoes"]["method"]](unwrapped, data["magnitude"], ECHO_TIMES, mask=mask,
                                                        **method_parameters(config, "echoes"))
    if config["echoes"]["outlier_factor"] is not None:
        mask = masking.reliable_field_mask(mask, fit["residual"], outlier_factor=config["echoes"]["outlier_factor"],
                                           edge_outlier_factor=config["echoes"].get("edge_outlier_factor"),
                                           edge_mm=config["echoes"].get("edge_mm", 6.0), voxel_size=data["voxel_size"],
                                           min_cluster=config["echoes"]["outlier_min_cluster"])
    total = dipole.hz_to_ppm(fit["field_hz"], data["field_strength"]).astype(np.float32)
    weights = {"weight": fit["field_weight"]} if config["background"].get("noise_weight") else {}
    if config["inversion"]["method"] in inversion.TOTAL_FIELD_INVERSIONS:
        local = total
    else:
        local, mask = background.BACKGROUND_METHODS[config["background"]["method"]](
            total, mask, data["voxel_size"], b0_direction=data["b0_direction"], **weights,
            **method_parameters(config, "background"))
    return local, mask, fit


def dipole_inversion(data, config, local, mask, fit):
    """A configuration's dipole inversion and referencing of a local field; returns (chi, mask)."""
    weights = {}
    if config["inversion"].get("noise_weight"):
        weights["data_weight"] = fit["field_weight"]
    if config["inversion"].get("edge_weight"):
        weights["gradient_weight"] = masking.edge_weight(data["magnitude"], mask, data["voxel_size"])
    chi = inversion.INVERSION_METHODS[config["inversion"]["method"]](
        local, mask, data["voxel_size"], b0_direction=data["b0_direction"], **weights,
        **method_parameters(config, "inversion"))
    return inversion.reference_susceptibility(chi, mask), mask


def row(dataset, stage, method, mode, estimate, truth, mask, seconds, peak, full=True):
    if full:
        s = metrics.score(estimate, truth, mask)
        cells = f"{s['nrmse']:7.1f} {s['hfen']:7.1f} {s['xsim']:6.3f} {s['correlation']:6.3f}"
    else:
        cells = f"{metrics.nrmse(estimate, truth, mask):7.1f} {'':>7} {'':>6} {metrics.correlation(estimate, truth, mask):6.3f}"
    return f"{dataset:34s} {stage:11s} {method:22s} {mode:9s} {cells} {seconds:8.2f} {peak:6.2f}"


def accuracy_block(workdir: Path) -> None:
    default = load_config("default")
    datasets = [qsm_forward_dataset(3.0, workdir), qsm_forward_dataset(7.0, workdir), brain_phantom_dataset(),
                honest_dataset(5, 0.0), honest_dataset(6, 21.0)]
    print(f"{'dataset':34s} {'stage':11s} {'method':22s} {'input':9s} {'NRMSE%':>7} {'HFEN%':>7} {'XSIM':>6} {'corr':>6} {'seconds':>8} {'peakGB':>6}")
    for data in datasets:
        name, true_mask, vs, b0 = data["name"], data["mask"], data["voxel_size"], data["b0_direction"]
        rss = np.sqrt((data["magnitude"] ** 2).sum(-1))
        brain, seconds, peak = measured(masking.brain_mask_from_magnitude, rss, vs)
        dice = 2 * (brain & true_mask).sum() / (brain.sum() + true_mask.sum())
        print(f"{name:34s} {'mask':11s} {'threshold':22s} {'raw':9s} Dice {dice:.3f}, covers {(brain & true_mask).sum() / true_mask.sum():.3f} of the truth {seconds:8.2f} {peak:6.2f}")
        for unwrapper in unwrap.SPATIAL_UNWRAPPERS:
            for fit in echoes.FIELD_FITS:
                (total, _), seconds, peak = measured(field_stage, data, unwrapper, fit, brain)
                print(row(name, "field", f"{unwrapper}+{fit}", "raw", total, data["total_ppm"], brain & true_mask, seconds, peak, full=False))
        chained_total, chained_mask = field_stage(data, default["unwrap"]["method"], default["echoes"]["method"], brain)
        for method, function in background.BACKGROUND_METHODS.items():
            for mode, (field, mask) in {"isolated": (data["total_ppm"], true_mask), "chained": (chained_total, chained_mask)}.items():
                (local, kept), seconds, peak = measured(function, field, mask, vs, b0_direction=b0,
                                                        **(default["background"].get(method) or {}))
                print(row(name, "background", method, mode, local, data["local_ppm"], kept & true_mask, seconds, peak, full=False))
        chained_local, chained_local_mask = background.BACKGROUND_METHODS[default["background"]["method"]](
            chained_total, chained_mask, vs, b0_direction=b0, **method_parameters(default, "background"))
        for method, function in inversion.INVERSION_METHODS.items():
            for mode, (field, mask) in {"isolated": (data["local_ppm"], true_mask), "chained": (chained_local, chained_local_mask)}.items():
                chi, seconds, peak = measured(function, field, mask, vs, b0_direction=b0,
                                              **(default["inversion"].get(method) or {}))
                print(row(name, "inversion", method, mode, chi, data["chi"], mask & true_mask, seconds, peak))
        print(f"{name:34s} simulation: {data['simulation']}")
        for preset in ("fast", "default", "accurate"):
            (chi, mask), seconds, peak = measured(chain, data, load_config(preset))
            evaluated = mask & true_mask
            print(row(name, "preset", preset, "raw", chi, data["chi"], evaluated, seconds, peak)
                  + roi_cells(roi_accuracy(chi, data, evaluated)) + roi_cells(roi_accuracy(chi, data, evaluated, "csf"), "CSF"))
        sys.stdout.flush()


#: Candidate configurations of the evidence block: preset name plus ``--set``-style overrides.
CANDIDATES = {
    "fast": ("fast", {}),
    "default": ("default", {}),
    "accurate": ("accurate", {}),
    "total-field": ("total-field", {}),
    "default, no edge factor": ("default", {"echoes.edge_outlier_factor": None}),
    "accurate, no edge factor": ("accurate", {"echoes.edge_outlier_factor": None}),
    "default, factor 3": ("default", {"echoes.outlier_factor": 3.0}),
    "accurate, factor 3": ("accurate", {"echoes.outlier_factor": 3.0}),
    "accurate, pdf pad 8": ("accurate", {"background.pdf.padding": 8}),
    "accurate + noise w.": ("accurate", {"background.noise_weight": True, "inversion.noise_weight": True}),
    "accurate + edge w.": ("accurate", {"inversion.edge_weight": True}),
    "accurate, vsharp": ("accurate", {"background.method": "vsharp"}),
    "accurate, tfi": ("accurate", {"inversion.method": "tfi"}),
    "accurate wTV 1e-4": ("accurate", {"inversion.weighted_tv.regularization": 1e-4}),
    "accurate wTV 1.5e-4": ("accurate", {"inversion.weighted_tv.regularization": 1.5e-4}),
}


def _yaml_value(value) -> str:
    """``value`` as a ``--set`` string: YAML spells None, True and False null, true and false."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return str(value)


def evidence_poses(poses: int) -> list:
    """Makers of the evidence block's random poses of the honest phantom (seed 20 + k, tilt 5-25 degrees)."""
    rng = np.random.default_rng(11)
    makers = []
    for seed in range(poses):
        tilt, azimuth = float(rng.uniform(5, 25)), float(rng.uniform(0, 360))
        makers.append(lambda seed=seed, tilt=tilt, azimuth=azimuth: honest_dataset(20 + seed, round(tilt, 1), azimuth))
    return makers


def evidence_datasets(workdir: Path, poses: int) -> dict:
    """Makers of the evidence block's data sets by key: ``h5`` the supersampled phantom straight,
    ``h6`` tilted 21 degrees, ``r0``, ``r1``, ... its random poses, ``qf3``/``qf7`` qsm-forward
    3/7 T, ``sg`` the single-grid phantom."""
    makers = {"h5": lambda: honest_dataset(5, 0.0), "h6": lambda: honest_dataset(6, 21.0)}
    makers.update({f"r{index}": pose for index, pose in enumerate(evidence_poses(poses))})
    makers.update({"qf3": lambda: qsm_forward_dataset(3.0, workdir), "qf7": lambda: qsm_forward_dataset(7.0, workdir),
                   "sg": brain_phantom_dataset})
    return makers


def evidence_block(workdir: Path, poses: int, datasets=None, candidates=None) -> None:
    """Whole chains from raw phase on every data set the defaults are decided on.

    ``datasets``: keys of :func:`evidence_datasets` (all by default); ``candidates``: keys of
    :data:`CANDIDATES` (all by default).
    """
    makers = evidence_datasets(workdir, poses)
    chosen = {label: CANDIDATES[label] for label in (candidates or CANDIDATES)}
    print(f"{'dataset':30s} {'simulation':31s} {'chain':26s} {'NRMSE%':>7} {'cover':>6} {'seconds':>8}")
    for key in datasets or makers:
        data = makers[key]()
        for label, (preset, overrides) in chosen.items():
            config = load_config(preset, overrides=[f"{key}={_yaml_value(value)}" for key, value in overrides.items()])
            try:
                (chi, mask), seconds, _ = measured(chain, data, config)
            except ValueError as error:
                print(f"{data['name']:30s} {data['simulation']:31s} {label:26s} failed: {error}")
                continue
            evaluated = mask & data["mask"]
            print(f"{data['name']:30s} {data['simulation']:31s} {label:26s} {metrics.nrmse(chi, data['chi'], evaluated):7.1f} "
                  f"{evaluated.sum() / data['mask'].sum():6.3f} {seconds:8.2f}{roi_cells(roi_accuracy(chi, data, evaluated))}"
                  f"{roi_cells(roi_accuracy(chi, data, evaluated, 'csf'), 'CSF')}", flush=True)


# ----------------------------------------------------------------------------------- audit
def _subvoxel_shift(array, shift):
    """``array`` shifted by ``shift`` voxels (Fourier shift theorem, periodic)."""
    frequencies = [np.fft.fftfreq(n) for n in array.shape]
    phase = sum(s * f.reshape([-1 if a == axis else 1 for a in range(3)])
                for axis, (s, f) in enumerate(zip(shift, frequencies)))
    return np.real(np.fft.ifftn(np.fft.fftn(array) * np.exp(-2j * np.pi * phase))).astype(np.float32)


def audit_block() -> None:
    """Checks of the simulation and the metric before any algorithm is blamed (honest phantom).

    Per pose: the local field of the coarse forward model of the block-mean truth against the
    block mean of the fine-grid local field, unshifted and shifted by half a voxel (a misaligned
    truth would score best shifted); the accurate inversion from the true local field with the
    true B0 direction and with the axial one; every background method fed the true total field
    and, separately, the true local field alone (no background at all: what a method removes
    there is local field it mistakes for background); and where the accurate chain's squared
    error lies by depth from the mask edge.
    """
    import scipy.ndimage as ndi

    config = load_config("accurate")
    for seed, tilt in ((5, 0.0), (6, 21.0)):
        data = honest_dataset(seed, tilt)
        name, mask, vs, b0, truth = data["name"], data["mask"], data["voxel_size"], data["b0_direction"], data["chi"]
        coarse = dipole.forward_field(truth, vs, b0, padding=20)
        shifts = "  ".join(f"shift {s:g}: {metrics.nrmse(_subvoxel_shift(coarse, (s, s, s)), data['local_ppm'], mask):5.1f}"
                           for s in (0.0, 0.5, -0.5))
        print(f"{name:24s} local field, coarse forward model vs fine-grid block mean, NRMSE %: {shifts}")
        for label, direction in (("true B0", b0), ("axial B0", np.array([0.0, 0.0, 1.0]))):
            chi = inversion.weighted_tv(data["local_ppm"], mask, vs, b0_direction=direction)
            print(f"{name:24s} weighted_tv from the true local field, {label}: chi NRMSE {metrics.nrmse(chi, truth, mask):5.1f} %")
        for method, function in background.BACKGROUND_METHODS.items():
            cells = []
            for label, field in (("total", data["total_ppm"]), ("local only", data["local_ppm"])):
                local, kept = function(field, mask, vs, b0_direction=b0, **(config["background"].get(method) or {}))
                chi = inversion.weighted_tv(local, kept, vs, b0_direction=b0)
                cells.append(f"{label}: local {metrics.nrmse(local, data['local_ppm'], kept):5.1f} chi "
                             f"{metrics.nrmse(chi, truth, kept):5.1f} cover {kept.sum() / mask.sum():.2f}")
            print(f"{name:24s} {method:7s} from the true " + " | ".join(cells), flush=True)
        chi, kept = chain(data, config)
        evaluated = kept & mask
        x, y = (np.where(evaluated, a - a[evaluated].mean(), 0.0) for a in (chi, truth))
        squared = (x - y) ** 2
        depth = ndi.distance_transform_edt(mask, sampling=vs)
        bands = ((0, 2), (2, 4), (4, 8), (8, 16), (16, np.inf))
        shares = "  ".join(f"{lo:g}-{hi:g} mm {squared[evaluated & (depth > lo) & (depth <= hi)].sum() / squared.sum():4.2f}"
                           for lo, hi in bands)
        print(f"{name:24s} accurate chain NRMSE {metrics.nrmse(chi, truth, evaluated):5.1f} %; share of squared error by depth: {shares}",
              flush=True)


#: Depth bands (mm from the brain's edge) of :func:`stages_block`.
DEPTH_BANDS = ((0.0, 2.0), (2.0, 4.0), (4.0, 8.0), (8.0, 16.0), (16.0, np.inf))


def _shell_cells(chi, truth, evaluated, depth):
    """Whole-mask NRMSE, then per depth band the band's NRMSE (error norm / truth norm in the band,
    both demeaned over ``evaluated``) and its share of the squared error."""
    x, y = (np.where(evaluated, a - a[evaluated].mean(), 0.0) for a in (chi, truth))
    squared = (x - y) ** 2
    cells = []
    for lo, hi in DEPTH_BANDS:
        band = evaluated & (depth > lo) & (depth <= hi)
        cells.append(f"{100 * np.sqrt(squared[band].sum() / (y[band] ** 2).sum()):4.0f}/{squared[band].sum() / squared.sum():4.2f}")
    return f"{metrics.nrmse(chi, truth, evaluated):6.1f} | " + "  ".join(cells)


def _shell_rms(field, region, depth):
    """RMS (ppb) of ``field`` demeaned over ``region``, per depth band."""
    values = np.where(region, field - field[region].mean(), 0.0)
    return "  ".join(f"{1000 * np.sqrt((values[region & (depth > lo) & (depth <= hi)] ** 2).mean()):5.1f}"
                     for lo, hi in DEPTH_BANDS)


def stages_block(workdir: Path, poses: int, datasets=None) -> None:
    """Which stage of the ``accurate`` chain loses the accuracy on the supersampled phantom.

    Per data set (:func:`evidence_datasets`; default the straight and 21-degree heads and the random
    poses), the Chimap NRMSE over the brain and, per depth band from the brain's edge
    (:data:`DEPTH_BANDS`), the band's NRMSE / share of the squared error, for: weighted TV from the
    true local field (the inversion alone); PDF fed the true local field alone, no background at
    all (what PDF takes of the brain's own field); the true local field plus what PDF leaves of
    the true background field (the background PDF cannot remove); PDF from the true total field
    in the true brain mask (background removal with perfect input); and the whole chain from raw
    phase. Field rows (RMS per band, ppb): the true local field, the part of it PDF removes, what
    PDF leaves of the background, and the chain's echo-fit total field minus the true one.
    """
    import scipy.ndimage as ndi

    config = load_config("accurate")
    makers = evidence_datasets(workdir, poses)
    bands = "  ".join(f"{lo:g}-{hi:g}mm" for lo, hi in DEPTH_BANDS)
    print(f"{'dataset':24s} {'case':44s} {'NRMSE%':>6} | per band NRMSE%/share: {bands}")
    for key in datasets or ["h5", "h6"] + [f"r{index}" for index in range(poses)]:
        data = makers[key]()
        name, mask, vs, b0, truth = data["name"], data["mask"], data["voxel_size"], data["b0_direction"], data["chi"]
        depth = ndi.distance_transform_edt(mask, sampling=vs)
        parameters = method_parameters(config, "background")

        def pdf(field, region):
            return background.pdf(field, region, vs, b0_direction=b0, **parameters)

        def invert(field, region):
            return inversion.weighted_tv(field, region, vs, b0_direction=b0, **method_parameters(config, "inversion"))

        true_local, true_background = data["local_ppm"], (data["total_ppm"] - data["local_ppm"]).astype(np.float32)
        kept_local, _ = pdf(true_local, mask)
        left_background, _ = pdf(true_background, mask)
        from_total, _ = pdf(data["total_ppm"], mask)
        cases = {"weighted TV from the true local field": (true_local, mask),
                 "PDF of the true local field alone, + wTV": (kept_local, mask),
                 "true local + PDF's leftover background, + wTV": ((true_local + left_background).astype(np.float32), mask),
                 "PDF of the true total field, + wTV": (from_total, mask)}
        for case, (field, region) in cases.items():
            print(f"{name:24s} {case:44s} {_shell_cells(invert(field, region), truth, mask, depth)}", flush=True)
        chi, kept = chain(data, config)
        print(f"{name:24s} {'accurate chain from raw phase':44s} {_shell_cells(chi, truth, kept & mask, depth)}", flush=True)
        _, _, fit = local_field_chain(data, config)
        total = dipole.hz_to_ppm(fit["field_hz"], data["field_strength"])
        rows = {"true local field": (true_local, mask), "its part PDF removes": (true_local - kept_local, mask),
                "background PDF leaves": (left_background, mask),
                "chain's total field - true total": (total - data["total_ppm"], kept & mask)}
        for label, (field, region) in rows.items():
            print(f"{name:24s} {'RMS ppb: ' + label:44s} {'':6s} | {_shell_rms(field, region, depth)}")
        sys.stdout.flush()


# ----------------------------------------------------------------------------------- timing
class FFTCounter:
    """Replace the FFT functions the recon modules imported by counting wrappers."""

    def __init__(self):
        self.calls: list[tuple[str, tuple, str]] = []

    def __enter__(self):
        self.saved = []
        for module in FFT_MODULES:
            for name in ("rfftn", "irfftn"):
                if hasattr(module, name):
                    original = getattr(module, name)
                    self.saved.append((module, name, original))
                    setattr(module, name, self._wrap(name, original))
        return self

    def _wrap(self, name, original):
        def counted(array, *args, **kwargs):
            shape = tuple(args[0]) if name == "irfftn" else array.shape
            self.calls.append((name, shape, str(np.dtype(array.dtype))))
            return original(array, *args, **kwargs)
        return counted

    def __exit__(self, *exc):
        for module, name, original in self.saved:
            setattr(module, name, original)


def fft_seconds(name: str, shape: tuple, dtype: str, cache: dict) -> float:
    key = (name, shape, dtype)
    if key not in cache:
        real = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        spectrum = dipole.rfftn(real)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            if name == "rfftn":
                dipole.rfftn(real)
            else:
                dipole.irfftn(spectrum, shape)
            times.append(time.perf_counter() - start)
        cache[key] = statistics.median(times)
    return cache[key]


#: The shipped presets that choose the reconstruction (the others only choose where it runs).
RECONSTRUCTION_PRESETS = ("fast", "default", "accurate", "total-field")


def timing_block(repeats: int, chains_only: bool = False, presets=RECONSTRUCTION_PRESETS) -> None:
    shape = (164, 205, 205)
    phantom = simulate.brain_phantom(shape, (1.0, 1.0, 1.0), age_years=50, seed=1)
    magnitude, phase = simulate.simulate_multi_echo(phantom, echo_times=ECHO_TIMES, field_strength=3.0, seed=1)
    vs, b0 = np.ones(3), np.array([0.0, 0.0, 1.0])
    data = {"magnitude": magnitude, "phase": phase, "voxel_size": vs, "b0_direction": b0, "field_strength": 3.0}
    pair = fft_seconds("rfftn", shape, "float32", {}) + fft_seconds("irfftn", shape, "complex64", {})
    print(f"\nTiming on {shape[0]}x{shape[1]}x{shape[2]}, four echoes, {dipole.fft_workers()} FFT workers; "
          f"one rfftn+irfftn pair: {pair:.3f} s; median of {repeats} runs")
    print(f"{'stage':11s} {'method':16s} {'seconds':>8} {'FFTs':>5} {'floor s':>8} {'ratio':>6} {'peakGB':>6}")
    rss = np.sqrt((magnitude ** 2).sum(-1))
    mask = masking.brain_mask_from_magnitude(rss, vs)
    total, field_mask = field_stage(data, "quality", "linear", mask)
    local, local_mask = background.vsharp(total, field_mask, vs)
    cache: dict = {}

    def report(stage, label, function, /, *args, **kwargs):
        seconds, peaks, floors, counts = [], [], [], []
        for _ in range(repeats):
            with FFTCounter() as counter:
                _, elapsed, peak = measured(function, *args, **kwargs)
            seconds.append(elapsed)
            peaks.append(peak)
            counts.append(len(counter.calls))
            floors.append(sum(fft_seconds(n, s, d, cache) for n, s, d in counter.calls))
        median, floor = statistics.median(seconds), statistics.median(floors)
        ratio = f"{median / floor:6.2f}" if floor else f"{'-':>6}"
        print(f"{stage:11s} {label:16s} {median:8.2f} {int(statistics.median(counts)):5d} {floor:8.2f} {ratio} {max(peaks):6.2f}", flush=True)

    if chains_only:
        for preset in presets:
            report("chain", preset, chain, data, load_config(preset))
        return
    report("mask", "threshold", masking.brain_mask_from_magnitude, rss, vs)
    for unwrapper in unwrap.SPATIAL_UNWRAPPERS:
        report("unwrap", unwrapper, unwrap.unwrap_echoes, phase, magnitude, ECHO_TIMES, mask=mask, voxel_size=vs, method=unwrapper)
    unwrapped = unwrap.unwrap_echoes(phase, magnitude, ECHO_TIMES, mask=mask, voxel_size=vs)
    for fit, function in echoes.FIELD_FITS.items():
        report("echo fit", fit, function, unwrapped, magnitude, ECHO_TIMES, mask=mask)
    report("R2*", "loglinear", echoes.r2star_map, magnitude, ECHO_TIMES, mask=mask)
    default = load_config("default")
    for method, function in background.BACKGROUND_METHODS.items():
        report("background", method, function, total, field_mask, vs, b0_direction=b0, **(default["background"].get(method) or {}))
    for method, function in inversion.INVERSION_METHODS.items():
        report("inversion", method, function, local, local_mask, vs, b0_direction=b0, **(default["inversion"].get(method) or {}))
    for preset in presets:
        report("chain", preset, chain, data, load_config(preset))


# --------------------------------------------------------------------------------- COSMOS block
def orientation_run(root: Path, run: int) -> dict:
    """One run of a :func:`qsmflow.simulate.write_multi_orientation_dataset` dataset, as arrays."""
    anat, truth = root / "sub-01" / "anat", root / "derivatives" / "simulation" / "sub-01" / "anat"
    load = lambda path: np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)  # noqa: E731
    stem = f"sub-01_run-{run}"
    affine = nib.load(str(anat / f"{stem}_echo-1_part-mag_MEGRE.nii.gz")).affine
    return {
        "magnitude": np.stack([load(anat / f"{stem}_echo-{n}_part-mag_MEGRE.nii.gz") for n in range(1, 5)], -1),
        "phase": np.stack([load(anat / f"{stem}_echo-{n}_part-phase_MEGRE.nii.gz") for n in range(1, 5)], -1),
        "affine": affine, "field_strength": 3.0,
        "voxel_size": tuple(dipole.voxel_sizes_from_affine(affine)),
        "b0_direction": tuple(dipole.b0_direction_from_affine(affine)),
        "chi": load(truth / f"{stem}_Chimap.nii.gz"), "mask": load(truth / f"{stem}_desc-brain_mask.nii.gz") > 0,
        "local_ppm": load(truth / f"{stem}_desc-local_fieldmap.nii.gz"),
    }


def cosmos_of(runs, fields, masks, config):
    """Align every run's field to the first run and solve COSMOS with ``config['cosmos']``."""
    reference = runs[0]
    aligned_fields, aligned_masks, directions, rotations = [fields[0]], [masks[0]], [reference["b0_direction"]], []
    for data, field, mask in zip(runs[1:], fields[1:], masks[1:]):
        aligned = cosmos.align_orientation(reference["magnitude"][..., 0], reference["affine"],
                                           data["magnitude"][..., 0], mask, data["affine"], field, threads=2,
                                           interpolation=config["cosmos"]["interpolation"])
        aligned_fields.append(aligned.local_field)
        aligned_masks.append(aligned.mask)
        directions.append(aligned.b0_direction)
        rotations.append(aligned.rotation_degrees)
    common = np.logical_and.reduce(aligned_masks)
    chi = cosmos.cosmos(aligned_fields, common, reference["voxel_size"], directions,
                        threshold=config["cosmos"]["threshold"], iterations=config["cosmos"]["iterations"])
    return inversion.reference_susceptibility(chi, common), common, rotations


def cosmos_block(workdir: Path) -> None:
    """COSMOS against the truth and against each single-orientation preset (tilted simulated head).

    Three runs of one head: untilted, 20 degrees about x, -18 degrees about y (the simulator's
    defaults), 64^3 at 3 mm, supersampled forward model; axial acquisitions, then oblique ones
    (10 degrees about x, -10 about y and 5 about z written in the affines). Rows: each
    single-orientation preset on run 1 against the truth; COSMOS from the default preset's local
    fields and from the true local fields; then every preset scored against the COSMOS map of the
    same set, as in-vivo studies without ground truth evaluate methods.
    """
    # without noise every echo-fit residual is an outlier of a zero spread: outlier exclusion is off there
    cases = {"axial, SNR 100": ({}, []), "axial, noise-free": ({"snr": float("inf")}, ["echoes.outlier_factor=null"]),
             "oblique, SNR 100": ({"acquisition_rotations": [(0, 0, 0), (10, 0, 0), (0, -10, 5)]}, [])}
    print(f"{'dataset':34s} {'stage':11s} {'method':22s} {'against':9s} {'NRMSE%':>7} {'HFEN%':>7} {'XSIM':>6} {'corr':>6} {'seconds':>8} {'peakGB':>6}")
    for case, (options, overrides) in cases.items():
        default = load_config("default", overrides=overrides)
        root = workdir / ("cosmos-" + "".join(c for c in case if c.isalnum()))
        if not root.exists():
            simulate.write_multi_orientation_dataset(root, shape=(64, 64, 64), voxel_size=(3.0, 3.0, 3.0), **options)
        runs = [orientation_run(root, run) for run in (1, 2, 3)]
        name, truth, true_mask = f"tilted head, {case}", runs[0]["chi"], runs[0]["mask"]
        presets = {}
        for preset in ("fast", "default", "accurate"):
            (chi, mask), seconds, peak = measured(chain, runs[0], load_config(preset, overrides=overrides))
            presets[preset] = (chi, mask)
            print(row(name, "preset", preset, "truth", chi, truth, mask & true_mask, seconds, peak))
        chained = [local_field_chain(data, default)[:2] for data in runs]
        for run, (data, (local, mask)) in enumerate(zip(runs, chained), start=1):
            print(row(name, "field", f"run-{run} default local", "truth", local, data["local_ppm"], mask & data["mask"],
                      0.0, 0.0, full=False))
        (chi, common, rotations), seconds, peak = measured(cosmos_of, runs, [c[0] for c in chained],
                                                            [c[1] for c in chained], default)
        print(row(name, "cosmos", "default fields", "truth", chi, truth, common & true_mask, seconds, peak))
        print(f"{name:34s} {'cosmos':11s} {'recovered rotations':22s} " + "  ".join(
            f"run-{i + 2}: " + " ".join(f"{v:+.2f}" for v in r) for i, r in enumerate(rotations)))
        (true_chi, true_common, _), seconds, peak = measured(cosmos_of, runs, [d["local_ppm"] for d in runs],
                                                             [d["mask"] for d in runs], default)
        print(row(name, "cosmos", "true local fields", "truth", true_chi, truth, true_common & true_mask, seconds, peak))
        for preset, (estimate, mask) in presets.items():
            print(row(name, "preset", preset, "COSMOS", estimate, chi, mask & common, 0.0, 0.0))
        sys.stdout.flush()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--evidence", action="store_true",
                        help="only the chains the preset defaults are decided on (honest phantom poses, qsm-forward)")
    parser.add_argument("--poses", type=int, default=2, help="random head poses of the evidence block")
    parser.add_argument("--datasets", help="evidence block: comma-separated data sets (h5, h6, r0, r1, ..., qf3, qf7, sg)")
    parser.add_argument("--candidates", help="evidence block: comma-separated chains of CANDIDATES (e.g. fast,default,accurate); "
                                             "separate them by semicolons when a label has a comma")
    parser.add_argument("--audit", action="store_true",
                        help="only the checks of the simulation and the metric (true local field, methods fed the local field alone)")
    parser.add_argument("--chains-only", action="store_true", help="timing block: only the presets' whole chains")
    parser.add_argument("--presets", default=",".join(RECONSTRUCTION_PRESETS),
                        help="timing block: comma-separated presets whose whole chains are timed")
    parser.add_argument("--stages", action="store_true",
                        help="only the stage block: which stage of the accurate chain loses the accuracy, by depth "
                             "from the brain's edge (supersampled phantom; --datasets, --poses)")
    parser.add_argument("--cosmos", action="store_true",
                        help="only the COSMOS block: a tilted head in three runs, COSMOS vs truth and vs each preset")
    parser.add_argument("--workdir", type=Path, help="where qsm-forward datasets are written (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        workdir = args.workdir or Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        if args.evidence:
            candidates = args.candidates and (
                [args.candidates] if args.candidates in CANDIDATES
                else [label.strip() for label in args.candidates.split(";" if ";" in args.candidates else ",")])
            unknown = [label for label in candidates or () if label not in CANDIDATES]
            if unknown:
                parser.error(f"unknown --candidates {unknown}; known: {'; '.join(CANDIDATES)}")
            evidence_block(workdir, args.poses, args.datasets and args.datasets.split(","), candidates)
            return
        if args.stages:
            stages_block(workdir, args.poses, args.datasets and args.datasets.split(","))
            return
        if args.audit:
            audit_block()
            return
        if args.cosmos:
            cosmos_block(workdir)
            return
        if not args.skip_accuracy:
            accuracy_block(workdir)
        if not args.skip_timing:
            timing_block(args.repeats, args.chains_only, args.presets.split(","))


if __name__ == "__main__":
    main()
