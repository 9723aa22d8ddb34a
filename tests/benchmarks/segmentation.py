"""Template registration and ROI segmentation: time, Dice and ROI-mean error per preset.

Subjects are made from the MNI template and the default atlas (``qsmflow.simulate.template_subject``:
random affine + smooth nonlinear warp of 3.5 mm RMS, receive bias, Rician noise, GRE-like
contrast), so the labels carried by the known warp are the truth. For each resolution, preset
and subject seed it registers the template (``qsmflow.segmentation.template_to_subject``) and
prints the wall time, the Dice of every ROI (left and right averaged) and the largest error of an
ROI mean of the *true* susceptibility map with the estimated instead of the true labels, and
per subject the floor of that error (:func:`truth_sampling_floor`: the true labels carried by the
true warp in two equally valid ways).

Usage::

    python tests/benchmarks/segmentation.py [--resolutions 2 1] [--presets default fast]
                                            [--seeds 3 4 5] [--threads 2]
    python tests/benchmarks/segmentation.py reference [--ages 20 70] [--seeds 11 12] [--harmonic-orders none default]
                                                          # reference regions vs background methods

Times are wall-clock on this machine; when it is shared, they include other jobs' load
(the script prints the load average before and after).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from qsmflow import segmentation, simulate

ROIS = ("CN", "PU", "GP", "TH", "RN", "SN", "DN", "IC", "SCC", "OR", "LV")


def dice(a, b) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


def evaluate(atlas, subject, labels) -> tuple[dict, dict]:
    """Dice per ROI (mean of both sides) and |mean error| per ROI (max of both sides, ppm)."""
    dices, errors = {}, {}
    for row in atlas.table:
        estimated, true = labels == row.index, subject.labels == row.index
        dices.setdefault(row.abbreviation, []).append(dice(estimated, true))
        if estimated.any() and true.any():
            errors.setdefault(row.abbreviation, []).append(abs(float(subject.chi[estimated].mean() - subject.chi[true].mean())))
    return ({k: float(np.mean(v)) for k, v in dices.items()}, {k: float(np.max(v)) for k, v in errors.items()})


def truth_sampling_floor(atlas, subject) -> dict:
    """|ROI mean of the true map|, labels carried by the *true* warp with a linear interpolation of
    each label's indicator (> 0.5) minus with the truth's nearest neighbour, per ROI (larger side),
    ppm: how far two equally valid samplings of the true labels disagree, the resolution's floor
    for the segmentation error."""
    from scipy import ndimage

    coordinates = simulate.atlas_coordinates(subject.deformation, subject.affine, atlas.affine)
    floor = {}
    for row in atlas.table:
        true = subject.labels == row.index
        if not true.any():
            continue
        linear = ndimage.map_coordinates((atlas.labels == row.index).astype(np.float32), coordinates, order=1) > 0.5
        value = abs(float(subject.chi[linear].mean() - subject.chi[true].mean())) if linear.any() else np.nan
        floor[row.abbreviation] = max(floor.get(row.abbreviation, 0.0), value)
    return floor


def reconstructed_chi(subject, *, field_noise_ppm: float = 0.002, seed: int = 0) -> np.ndarray:
    """A reconstructed Chimap of the subject (not referenced): the dipole field of the subject's
    brain (no background field: the background-removal methods are compared by
    :func:`reference_spread`) plus Gaussian noise, inverted with the default method (TV-ADMM)."""
    from qsmflow.config import load_config, method_parameters, registry
    from qsmflow.recon.dipole import forward_field

    config = load_config("default")
    voxel = tuple(np.sqrt((subject.affine[:3, :3] ** 2).sum(axis=0)))
    mask = subject.brain_mask
    local = forward_field(np.where(mask, subject.chi, 0).astype(np.float32), voxel, (0.0, 0.0, 1.0))
    local = np.where(mask, local + np.random.default_rng(seed).normal(0, field_noise_ppm, local.shape), 0).astype(np.float32)
    return registry("inversion")[config["inversion"]["method"]](local, mask, voxel, **method_parameters(config, "inversion"))


def side_dice(atlas, subject, labels) -> dict:
    """Dice per ROI abbreviation: (left, right)."""
    out = {}
    for row in atlas.table:
        out.setdefault(row.abbreviation, {})[row.hemisphere] = dice(labels == row.index, subject.labels == row.index)
    return {k: (v.get("left", np.nan), v.get("right", np.nan)) for k, v in out.items()}


def side_errors(atlas, subject, labels) -> dict:
    """|ROI mean of the true map, estimated minus true labels| per ROI: (left, right), ppm."""
    out = {}
    for row in atlas.table:
        estimated, true = labels == row.index, subject.labels == row.index
        value = abs(float(subject.chi[estimated].mean() - subject.chi[true].mean())) if estimated.any() and true.any() else np.nan
        out.setdefault(row.abbreviation, {})[row.hemisphere] = value
    return {k: (v.get("left", np.nan), v.get("right", np.nan)) for k, v in out.items()}


def end_to_end_errors(atlas, subject, labels, chi) -> dict:
    """ROI means of a reconstructed Chimap (:func:`reconstructed_chi`; estimated labels, CSF
    reference) minus the true ROI means (true map, true labels), ppm."""
    from qsmflow.recon.inversion import reference_susceptibility

    voxel = tuple(np.sqrt((subject.affine[:3, :3] ** 2).sum(axis=0)))
    mask = subject.brain_mask
    region = segmentation.reference_region("csf", qsm_mask=mask, labels=labels, table=atlas.table, voxel_size=voxel)
    chi = reference_susceptibility(chi, mask, reference="mean", reference_mask=region)
    errors = {}
    for row in atlas.table:
        estimated, true = (labels == row.index) & mask, subject.labels == row.index
        if estimated.any() and true.any():
            errors.setdefault(row.abbreviation, []).append(float(chi[estimated].mean() - subject.chi[true].mean()))
    return {k: max(v, key=abs) for k, v in errors.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", type=float, nargs="+", default=[2.0, 1.0])
    parser.add_argument("--presets", nargs="+", default=["default", "fast"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[3, 4, 5])
    parser.add_argument("--seeds-1mm", type=int, nargs="+", default=[3], help="seeds at resolutions below 1.5 mm")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--end-to-end", action="store_true", help="also compare ROI means of the reconstructed Chimap")
    parser.add_argument("--susceptibility-weights", type=float, nargs="+", default=[None],
                        help="weights of the susceptibility channel (reconstructed Chimap against the atlas' "
                             "susceptibility prior) to compare; default: the configured default")
    parser.add_argument("--susceptibility-stages", nargs="+", default=None,
                        help="stages using the susceptibility channel (default: the configured default)")
    arguments = parser.parse_args(argv)

    from qsmflow.config import load_config

    defaults = load_config("default")["segmentation"]["registration"]
    weights = [defaults["susceptibility_weight"] if w is None else w for w in arguments.susceptibility_weights]
    chi_stages = tuple(arguments.susceptibility_stages or defaults["susceptibility_stages"])
    print(f"load average before: {os.getloadavg()}; susceptibility channel in stages {chi_stages}")
    atlas = segmentation.default_atlas()
    header = f"{'mm':>4} {'preset':8} {'chi w':>5} {'seed':>4} {'time s':>7} " + " ".join(f"{r:>5}" for r in ROIS) + "  max|dmean| ppm (ROI)"
    print(header)
    summary, floors = {}, {}
    for resolution in arguments.resolutions:
        seeds = arguments.seeds if resolution >= 1.5 else arguments.seeds_1mm
        for seed in seeds:
            subject = simulate.template_subject(atlas, voxel_size=(resolution,) * 3, seed=seed)
            chi = reconstructed_chi(subject, seed=seed) if (arguments.end_to_end or any(weights)) else None
            floor = truth_sampling_floor(atlas, subject)
            floors.setdefault(resolution, []).append(floor)
            print(f"{resolution:4g} truth sampling floor (linear vs nearest-neighbour labels, true warp), seed {seed}: "
                  + " ".join(f"{roi}={floor[roi]:.4f}" for roi in ROIS if roi in floor), flush=True)
            for preset in arguments.presets:
                for weight in weights:
                    with tempfile.TemporaryDirectory() as scratch:
                        start = time.perf_counter()
                        labels, _, _ = segmentation.template_to_subject(
                            subject.magnitude, subject.brain_mask, subject.affine, atlas, preset=preset,
                            threads=arguments.threads, output_dir=scratch, chi=chi, qsm_mask=subject.brain_mask,
                            susceptibility_weight=weight, susceptibility_stages=chi_stages)
                        elapsed = time.perf_counter() - start
                    dices, errors = evaluate(atlas, subject, labels)
                    worst = max(errors, key=errors.get)
                    summary.setdefault((resolution, preset, weight), []).append((elapsed, dices, errors))
                    print(f"{resolution:4g} {preset:8} {weight:5.2f} {seed:4d} {elapsed:7.1f} "
                          + " ".join(f"{dices[r]:5.2f}" for r in ROIS) + f"  {errors[worst]:.4f} ({worst})", flush=True)
                    print("     Dice L/R " + " ".join(f"{r}={sides[r][0]:.2f}/{sides[r][1]:.2f}" for r in ("CN", "PU", "GP", "TH")
                                                      for sides in [side_dice(atlas, subject, labels)])
                          + "; |dmean| L/R " + " ".join(f"{r}={e[0]:.4f}/{e[1]:.4f}" for r in ("CN", "PU", "GP", "TH")
                                                         for e in [side_errors(atlas, subject, labels)[r]]), flush=True)
                    if chi is not None:  # final labels: RN, SN, DN refined by contrast, then GP's boundary
                        refined = segmentation.refine_by_contrast(labels, chi, atlas.table, voxel_size=(resolution,) * 3,
                                                                  mask=subject.brain_mask)
                        before, after = side_errors(atlas, subject, labels), side_errors(atlas, subject, refined)
                        dice_before, dice_after = side_dice(atlas, subject, labels), side_dice(atlas, subject, refined)
                        print("     refined by contrast, |dmean| L/R and Dice L/R, atlas -> refined: " + " ".join(
                            f"{r}={before[r][0]:.4f}/{before[r][1]:.4f}->{after[r][0]:.4f}/{after[r][1]:.4f} "
                            f"({dice_before[r][0]:.2f}/{dice_before[r][1]:.2f}->{dice_after[r][0]:.2f}/{dice_after[r][1]:.2f})"
                            for r in ("RN", "SN", "DN")), flush=True)
                        bounded = segmentation.refine_boundaries(refined, chi, atlas.table, voxel_size=(resolution,) * 3,
                                                                 mask=subject.brain_mask)
                        after, dice_after = side_errors(atlas, subject, bounded), side_dice(atlas, subject, bounded)
                        print("     GP boundary refined, |dmean| L/R and Dice L/R, before -> after: " + " ".join(
                            f"{r}={before[r][0]:.4f}/{before[r][1]:.4f}->{after[r][0]:.4f}/{after[r][1]:.4f} "
                            f"({dice_before[r][0]:.2f}/{dice_before[r][1]:.2f}->{dice_after[r][0]:.2f}/{dice_after[r][1]:.2f})"
                            for r in ("CN", "PU", "GP", "TH", "IC")), flush=True)
                        labels = bounded
                    if arguments.end_to_end:
                        reconstructed = end_to_end_errors(atlas, subject, labels, chi)
                        print("     end to end (Chimap ROI mean - true ROI mean, ppm): "
                              + " ".join(f"{roi}={reconstructed[roi]:+.4f}" for roi in ROIS if roi in reconstructed), flush=True)
    print("\nmedians over seeds")
    print(header)
    for (resolution, preset, weight), runs in summary.items():
        times = [r[0] for r in runs]
        medians = {roi: float(np.median([r[1][roi] for r in runs])) for roi in ROIS}
        worst = {roi: float(np.max([r[2].get(roi, np.nan) for r in runs])) for roi in ROIS}
        deep = {roi: worst[roi] for roi in ("CN", "PU", "GP", "TH")}
        print(f"{resolution:4g} {preset:8} {weight:5.2f} {'all':>4} {np.median(times):7.1f} " + " ".join(f"{medians[r]:5.2f}" for r in ROIS)
              + f"  CN/PU/GP/TH worst {max(deep.values()):.4f}")
    for resolution, runs in floors.items():
        print(f"{resolution:4g} truth sampling floor, worst over seeds: "
              + " ".join(f"{roi}={max(r.get(roi, np.nan) for r in runs):.4f}" for roi in ROIS))
    print(f"load average after: {os.getloadavg()}")




# ---------------------------------------------------------------------------------------------
# reference regions across background-removal methods

def reference_spread(ages=(20.0, 70.0), seeds=(11,), methods=("sharp", "vsharp", "pdf", "lbv"), *,
                     harmonic_orders=("default",), overrides=None, field_noise_ppm: float = 0.002) -> None:
    """CN/PU/GP means of simulated subjects under every background method, per reference.

    The brain phantom's total field (air/bone background, shim) plus Gaussian noise goes through
    each background-removal method with the configured default parameters (plus ``overrides``,
    ``{method: {parameter: value}}``) and each of ``harmonic_orders`` (``"default"``: the
    method's default; ``None``: the method's own result, before
    :func:`qsmflow.recon.background.remove_harmonic_polynomials`), then the default inversion
    (TV-ADMM); the map is referenced to the mean over the QSM mask (``mean``, the former
    behaviour), over the 10 mm-eroded brain mask (``brain``) and over the lateral ventricles
    eroded by 2 mm (``csf``, here the phantom's true ventricles: this isolates the reference
    from segmentation error). Prints each method's ROI-mean error against the truth, the spread
    (max - min over the methods) per reference, and the worst spread over the subjects.
    """
    from qsmflow.config import load_config, method_parameters, registry
    from qsmflow.recon.inversion import reference_susceptibility
    from scipy import ndimage

    config = load_config("default")
    invert = registry("inversion")[config["inversion"]["method"]]
    print(f"\nreference spread: inversion {config['inversion']['method']}, background {', '.join(methods)}, "
          f"overrides {overrides or {}}; load average {os.getloadavg()}")
    print(f"{'age':>4} {'seed':>4} {'harmonic':>8} {'reference':9} "
          + " ".join(f"{m + ' err CN/PU/GP':>23}" for m in methods) + "  spread CN/PU/GP (ppm)   |error| max")
    worst = {}
    for age in ages:
        for seed in seeds:
            phantom = simulate.brain_phantom(age_years=age, seed=seed)
            fields = simulate.simulate_field(phantom)
            rng = np.random.default_rng(seed)
            total = fields.total + rng.normal(0.0, field_noise_ppm, fields.total.shape).astype(np.float32)
            voxel = phantom.voxel_size
            depth = ndimage.distance_transform_edt(phantom.brain_mask, sampling=voxel)
            ventricles = (phantom.tissues == simulate._TISSUE["csf"].index) & phantom.brain_mask & (depth > 12.0)
            for order in harmonic_orders:
                errors = {}
                for method in methods:
                    parameters = dict(config["background"].get(method) or {})
                    parameters.update((overrides or {}).get(method, {}))
                    if order != "default":
                        parameters["harmonic_order"] = order
                    local, mask = registry("background")[method](total, phantom.brain_mask, voxel, **parameters)
                    chi = invert(local, mask, voxel, **method_parameters(config, "inversion"))
                    regions = {
                        "mean": mask,
                        "brain": segmentation.reference_region("brain", brain_mask=phantom.brain_mask, qsm_mask=mask,
                                                               voxel_size=voxel),
                        "csf": segmentation.reference_region(
                            "csf", qsm_mask=mask, labels=ventricles.astype(np.int16), voxel_size=voxel,
                            table=(segmentation.AtlasLabel(1, "LV", "lateral ventricles", "bilateral", "truth", "csf"),)),
                    }
                    for name, region in regions.items():
                        referenced = reference_susceptibility(chi, mask, reference="mean", reference_mask=region)
                        for roi in ("CN", "PU", "GP"):
                            index = next(r.index for r in simulate.ROI_LABELS if r.abbreviation == roi)
                            inside = (phantom.labels == index) & mask
                            errors[(name, method, roi)] = float(referenced[inside].mean()) - phantom.roi_chi[roi]
                for name in ("mean", "brain", "csf"):
                    spreads = [max(errors[(name, m, r)] for m in methods) - min(errors[(name, m, r)] for m in methods)
                               for r in ("CN", "PU", "GP")]
                    largest = max(abs(errors[(name, m, r)]) for m in methods for r in ("CN", "PU", "GP"))
                    key = (str(order), name)
                    worst[key] = [max(a, b) for a, b in zip(worst.get(key, [0.0, 0.0, 0.0]), spreads)]
                    print(f"{age:4g} {seed:4d} {str(order):>8} {name:9} "
                          + " ".join(f"{'/'.join(f'{errors[(name, m, r)]:+.4f}' for r in ('CN', 'PU', 'GP')):>23}"
                                     for m in methods)
                          + "  " + "/".join(f"{v:.4f}" for v in spreads) + f"   {largest:.4f}", flush=True)
    print("worst spread over the subjects (CN/PU/GP, ppm):")
    for (order, name), spreads in worst.items():
        print(f"  harmonic_order {order:>7}, reference {name:5}: " + "/".join(f"{v:.4f}" for v in spreads)
              + f"  (max {max(spreads):.4f})")


def reference_main(argv) -> None:
    parser = argparse.ArgumentParser(prog="segmentation.py reference",
                                     description="reference regions vs background methods (reference_spread)")
    parser.add_argument("--ages", type=float, nargs="+", default=[20.0, 70.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[11, 12])
    parser.add_argument("--harmonic-orders", nargs="+", default=["none", "default"],
                        help="background harmonic_order values to compare: none (each method's own result), "
                             "default, or an integer")
    parser.add_argument("--set", nargs="*", default=[], metavar="METHOD.PARAMETER=VALUE",
                        help="background parameter overrides, e.g. sharp.threshold=0.02")
    arguments = parser.parse_args(argv)
    orders = [None if o == "none" else o if o == "default" else int(o) for o in arguments.harmonic_orders]
    overrides = {}
    for item in arguments.set:
        key, value = item.split("=", 1)
        method, parameter = key.split(".", 1)
        overrides.setdefault(method, {})[parameter] = float(value) if "." in value or "e" in value else int(value)
    reference_spread(tuple(arguments.ages), tuple(arguments.seeds), harmonic_orders=tuple(orders), overrides=overrides)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["reference"]:
        reference_main(sys.argv[2:])
    else:
        main()
