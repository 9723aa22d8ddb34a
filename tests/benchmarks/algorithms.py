"""Accuracy and speed of every reconstruction method of every stage, against ground truth.

Run by hand (not part of the test-suite):

    python tests/benchmarks/algorithms.py [--skip-timing] [--skip-accuracy] [--repeats 3]

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

from qsmflow import metrics, simulate
from qsmflow.config import load_config, method_parameters
from qsmflow.recon import background, dipole, echoes, inversion, masking, unwrap

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
        "magnitude": magnitude, "phase": phase, "field_strength": 3.0,
        "voxel_size": np.asarray(voxel_size, float), "b0_direction": np.array([0.0, 0.0, 1.0]),
        "mask": phantom.brain_mask, "chi": phantom.chi * phantom.brain_mask,
        "total_ppm": fields.total, "local_ppm": fields.local,
    }


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
    rss = np.sqrt((data["magnitude"] ** 2).sum(-1))
    mask = masking.MASKING_METHODS[config["mask"]["method"]](rss, data["voxel_size"], **method_parameters(config, "mask"))
    unwrapped = unwrap.unwrap_echoes(data["phase"], data["magnitude"], ECHO_TIMES, mask=mask, voxel_size=data["voxel_size"],
                                     method=config["unwrap"]["method"], **method_parameters(config, "unwrap"))
    fit = echoes.FIELD_FITS[config["echoes"]["method"]](unwrapped, data["magnitude"], ECHO_TIMES, mask=mask,
                                                        **method_parameters(config, "echoes"))
    if config["echoes"]["outlier_factor"] is not None:
        mask = masking.reliable_field_mask(mask, fit["residual"], outlier_factor=config["echoes"]["outlier_factor"])
    total = dipole.hz_to_ppm(fit["field_hz"], data["field_strength"]).astype(np.float32)
    local, mask = background.BACKGROUND_METHODS[config["background"]["method"]](
        total, mask, data["voxel_size"], b0_direction=data["b0_direction"], **method_parameters(config, "background"))
    chi = inversion.INVERSION_METHODS[config["inversion"]["method"]](
        local, mask, data["voxel_size"], b0_direction=data["b0_direction"], **method_parameters(config, "inversion"))
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
    datasets = [qsm_forward_dataset(3.0, workdir), qsm_forward_dataset(7.0, workdir), brain_phantom_dataset()]
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
        for preset in ("fast", "default", "accurate"):
            (chi, mask), seconds, peak = measured(chain, data, load_config(preset))
            print(row(name, "preset", preset, "raw", chi, data["chi"], mask & true_mask, seconds, peak))
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


def timing_block(repeats: int) -> None:
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
    for preset in ("fast", "default", "accurate"):
        report("chain", preset, chain, data, load_config(preset))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, help="where qsm-forward datasets are written (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        workdir = args.workdir or Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        if not args.skip_accuracy:
            accuracy_block(workdir)
        if not args.skip_timing:
            timing_block(args.repeats)


if __name__ == "__main__":
    main()
