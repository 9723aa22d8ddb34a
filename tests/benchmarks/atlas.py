"""Atlas level on a simulated lifespan cohort: sharpness, contrast, parcellation, age-matched
segmentation, trajectories, runtime, and what a rerun after one more subject recomputes.

    python tests/benchmarks/atlas.py [--voxel 2] [--nprocs 2] [--work DIR] [--iterations 3]

Cohort: 12 subjects in 3 bands (0-12, 12-60, 60-100 years), each a phantom whose head grows
with age (smaller children), whose ventricles widen after 30, deformed by a known random
affine + smooth warp (3 mm RMS), with noise on chi (0.01 ppm) and on the magnitude (SNR 50).
Each subject has its own random sulci unless ``--shared-sulci`` gives the cohort one pattern in
the anatomical frame (the subjects then differ only by what a registration can align).
The labelled template (the stand-in for the MNI atlas, which does not match the phantom's
anatomy) is the nominal adult phantom at 40 years. Four held-out subjects (3, 5, 74, 82 years)
are segmented with the band template nearest their age and with the labelled template, with the
participant level's default registration (preset and susceptibility channel) and with the fast
preset on the magnitude alone.

Contrast of the nuclei (GP minus the white matter around it: WM within 6 mm of GP and at least
one voxel from GP, PU, TH, CN, other nuclei and CSF, medians): measured on the band template and
on the truth on the same grid -- the subjects' true chi (no noise, no point-spread) carried into
the template by the same composed transforms and averaged -- both with the same masks (the
majority of the subjects' true tissue classes carried into the template). Also printed: each
subject's own true chi, noise-free input and input measured in its own space with its own true
classes (the first is the generating values on the grid; the second what the acquisition's
point-spread leaves).

    python tests/benchmarks/atlas.py --voxel 3 --evaluate-only --work DIR   # re-evaluate a built run
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

COHORT = [("c01", 2.0), ("c02", 4.0), ("c03", 6.5), ("c04", 9.0),
          ("a01", 25.0), ("a02", 32.0), ("a03", 40.0), ("a04", 48.0),
          ("e01", 65.0), ("e02", 72.0), ("e03", 79.0), ("e04", 86.0)]
ADDED = ("a05", 36.0)
HELD_OUT = [("h01", 3.0), ("h02", 5.0), ("h03", 74.0), ("h04", 82.0)]
EDGES = [0.0, 12.0, 60.0, 100.0]
SHARED_SULCAL_SEED = 7  # --shared-sulci: the cohort's one sulcal pattern


def dice(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else float("nan")


def result_times(work: Path) -> dict:
    return {str(p.parent.relative_to(work)): p.stat().st_mtime_ns for p in work.rglob("result_*.pklz")}


def run(workflow, work: Path, nprocs: int) -> float:
    workflow.base_dir = str(work)
    workflow.config["execution"].update({"hash_method": "content", "remove_unnecessary_outputs": False,
                                         "crashdump_dir": str(work / "crashes")})
    start = time.perf_counter()
    workflow.run(plugin="MultiProc", plugin_args={"n_procs": nprocs})
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voxel", type=float, default=2.0)
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--step-two-iterations", type=int, default=2)
    parser.add_argument("--work", default=None)
    parser.add_argument("--no-rerun", action="store_true",
                        help="skip the rerun after adding one subject (runtime of the first build only)")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="evaluate the outputs already built in --work (no registration is rerun)")
    parser.add_argument("--shared-sulci", action="store_true",
                        help="one sulcal pattern for the whole cohort, in the anatomical frame (subjects then differ "
                             "only by age, head size, position and the known warps, as the issue's cohort)")
    parser.add_argument("--bound-decomposition", action="store_true",
                        help="only print what bounds the sharpness (sharpness_bound with and without shared sulci, "
                             "sub-voxel shifts, cubic resampling); no registration")
    parser.add_argument("--no-held-out", action="store_true",
                        help="skip the age-matched segmentation of the held-out subjects (16 registrations)")
    args = parser.parse_args(argv)
    os.environ.setdefault("QSMFLOW_FFT_WORKERS", "1")

    from qsmflow import segmentation
    from qsmflow.config import load_config
    from qsmflow.registration import to_ants
    from qsmflow.simulate import phantom_label_atlas, write_atlas_inputs
    from qsmflow.workflows.atlas import atlas_level

    voxel = float(args.voxel)
    if args.bound_decomposition:
        bound_decomposition(voxel)
        return 0
    options = {"sulcal_seed": SHARED_SULCAL_SEED} if args.shared_sulci else {}
    shape = tuple(int(round(n * 2.0 / voxel)) for n in (90, 108, 90))
    root = Path(args.work or tempfile.mkdtemp(prefix="qsmflow_atlas_bench_"))
    bids, out, work = root / "bids", root / "out", root / "work"
    subjects = write_atlas_inputs(bids, out, COHORT, shape=shape, voxel_size=(voxel,) * 3, **options)
    labelled = phantom_label_atlas(shape, (voxel,) * 3)
    (root / "labelled").mkdir(exist_ok=True)
    nib.save(nib.Nifti1Image(labelled.template, labelled.affine), str(root / "labelled/template.nii.gz"))
    nib.save(nib.Nifti1Image(labelled.labels, labelled.affine), str(root / "labelled/labels.nii.gz"))
    segmentation.write_table(root / "labelled/table.tsv", labelled.table)
    overrides = [f"atlas.bands.edges={json.dumps(EDGES)}", "atlas.min_scans=3",
                 f"atlas.iterations={args.iterations}", f"atlas.step_two_iterations={args.step_two_iterations}",
                 f"atlas.resolution_mm={voxel}",
                 f"atlas.parcellation.template={root}/labelled/template.nii.gz",
                 f"atlas.parcellation.labels={root}/labelled/labels.nii.gz",
                 f"atlas.parcellation.table={root}/labelled/table.tsv"]
    config = load_config(overrides=overrides)
    tpl = out / "atlas" / f"tpl-{config['atlas']['name']}"
    res = f"{voxel:g}".replace(".", "p")
    if args.evaluate_only:
        added = out / f"sub-{ADDED[0]}"
        if added.is_dir():
            subjects.update(write_atlas_inputs(bids, out, COHORT + [ADDED], shape=shape, voxel_size=(voxel,) * 3, **options))
        report = evaluate(tpl, res, subjects, labelled, config, root, held_out=not args.no_held_out,
                          subject_options=options)
        (root / "benchmark_evaluation.json").write_text(json.dumps(report, indent=2))
        print(f"\nnumbers in {root / 'benchmark_evaluation.json'}")
        return 0
    plan = atlas_level(bids, out, config)
    assert not plan.problems, plan.problems
    print(f"cohort: {len(COHORT)} subjects, bands {EDGES}, {voxel:g} mm grid {shape}, {args.nprocs} processes, "
          f"iterations {args.iterations} + {args.step_two_iterations}; work {root}")
    print(f"machine load (1-min average) at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (shared)")
    first = run(plan.workflow, work, args.nprocs)
    print(f"\nfirst run: {first:.0f} s")

    report = evaluate(tpl, res, subjects, labelled, config, root, held_out=not args.no_held_out,
                      subject_options=options)
    report["runtime_first_s"] = round(first)
    if args.no_rerun:
        (root / "benchmark.json").write_text(json.dumps(report, indent=2))
        print(f"\nnumbers in {root / 'benchmark.json'}")
        return 0

    before = result_times(work)
    subjects.update(write_atlas_inputs(bids, out, COHORT + [ADDED], shape=shape, voxel_size=(voxel,) * 3, **options))
    plan = atlas_level(bids, out, config)
    second = run(plan.workflow, work, args.nprocs)
    after = result_times(work)
    ran = sorted(name for name, stamp in after.items() if before.get(name) != stamp)
    print(f"\nrerun after adding sub-{ADDED[0]} ({ADDED[1]:g} y, cohort 2): {second:.0f} s; nodes that ran:")
    by_part = {}
    for name in ran:
        parts = name.split("/")
        part = parts[1] if len(parts) > 2 else "atlas_wf (atlas unit, top level)"
        by_part.setdefault(part, []).append(name.split("/")[-1])
    for part, names in sorted(by_part.items()):
        print(f"  {part}: {len(names)} node(s): {', '.join(sorted(names)[:12])}{' ...' if len(names) > 12 else ''}")
    untouched = [b for b in ("cohort_1_wf", "cohort_3_wf") if b in by_part and any(
        not n.startswith("write_outputs") for n in by_part[b])]
    print("  cohorts 1 and 3: " + ("only their (always-run) writers" if not untouched else f"RERAN {untouched}"))
    report["runtime_first_s"], report["runtime_rerun_s"] = round(first), round(second)
    (root / "benchmark.json").write_text(json.dumps(report, indent=2))
    print(f"\nnumbers in {root / 'benchmark.json'}")
    return 0


def _load(path):
    return np.asarray(nib.load(str(path)).dataobj)


# classes of the contrast measure (GP minus the white matter around it)
_GP, _PU, _TH, _CN, _CSF, _WM, _OTHER_DEEP = 1, 2, 3, 4, 5, 6, 7
RING_MM = 6.0


def subject_truth(subject, psf_voxels: float = 0.6) -> dict:
    """A simulated atlas subject's true susceptibility and tissue classes in its own (scan) space.

    ``classes``: GP, PU, TH, CN, CSF, WM (the white-matter tissue, IC/SCC/OR included), other
    deep grey, carried by the known deformation (nearest neighbour). ``true_chi``: the phantom's
    chi in the brain, carried by the known deformation, without noise or point-spread;
    ``acquired_chi``: the same with the acquisition's point-spread (the noise-free input).
    """
    from scipy import ndimage

    from qsmflow.simulate import ROI_LABELS, TISSUES

    phantom, warp = subject.phantom, subject.deformation
    tissue = {t.name: t.index for t in TISSUES}
    roi = {r.abbreviation: r.index for r in ROI_LABELS}
    classes = np.zeros(phantom.labels.shape, dtype=np.int16)
    classes[phantom.brain_mask & (phantom.tissues == tissue["white_matter"])] = _WM
    classes[phantom.brain_mask & (phantom.tissues == tissue["csf"])] = _CSF
    classes[np.isin(phantom.labels, [roi["RN"], roi["SN"], roi["DN"]])] = _OTHER_DEEP
    for code, name in ((_GP, "GP"), (_PU, "PU"), (_TH, "TH"), (_CN, "CN")):
        classes[phantom.labels == roi[name]] = code
    brain_chi = np.where(phantom.brain_mask, phantom.chi, np.float32(0.0)).astype(np.float32)
    return {"classes": warp.apply(classes, labels=True), "true_chi": warp.apply(brain_chi),
            "acquired_chi": warp.apply(ndimage.gaussian_filter(brain_chi, psf_voxels))}


def contrast_masks(classes, voxel_mm: float, ring_mm: float = RING_MM):
    """GP, and the white matter around it: WM voxels within ``ring_mm`` of GP, one voxel or more
    away (26-neighbourhood) from GP, PU, TH, CN, other deep grey and CSF."""
    from scipy import ndimage

    classes = np.asarray(classes)
    gp = classes == _GP
    near = ndimage.distance_transform_edt(~gp, sampling=voxel_mm) <= ring_mm
    avoid = ndimage.binary_dilation(np.isin(classes, [_GP, _PU, _TH, _CN, _CSF, _OTHER_DEEP]),
                                    ndimage.generate_binary_structure(3, 3))
    return gp, (classes == _WM) & near & ~avoid


def gp_contrast(chi, gp, ring) -> float:
    """Median chi in GP minus median chi in the white-matter ring (ppm)."""
    return float(np.median(chi[gp]) - np.median(chi[ring])) if gp.any() and ring.any() else float("nan")


def evaluate(tpl: Path, res: str, subjects: dict, labelled, config: dict, root: Path, *,
             held_out: bool = True, subject_options: dict | None = None) -> dict:
    from qsmflow import segmentation
    from qsmflow.atlas import apply_transforms
    from qsmflow.registration import to_ants, to_array
    from qsmflow.simulate import simulate_atlas_subject, split_hemispheres, true_susceptibility

    subject_options = subject_options or {}
    name = tpl.name.removeprefix("tpl-")
    report = {"bands": {}}
    index = {row.abbreviation + "_" + row.hemisphere[0].upper(): row.index for row in labelled.table}
    print("\nband  scans  corr(min/median)  Dice CN/PU/GP/TH (band dseg vs truth)")
    contrast_rows, bounds = [], []
    for band in sorted(tpl.glob("cohort-*")):
        cohort = band.name.removeprefix("cohort-")
        sharp = list(csv.DictReader(open(next(band.glob("*_desc-registration_sharpness.tsv"))), delimiter="\t"))
        correlations = [float(r["correlation"]) for r in sharp]
        chi = _load(band / f"tpl-{name}_cohort-{cohort}_res-{res}_Chimap.nii.gz")
        dseg = np.rint(_load(band / f"tpl-{name}_cohort-{cohort}_res-{res}_dseg.nii.gz")).astype(int)
        scans = [r["scan"].removeprefix("sub-") for r in sharp]
        # truth labels, tissue classes and true chi carried into the band template by each
        # subject's composed transform (the same transform as the subject's chi)
        band_affine = nib.load(str(band / f"tpl-{name}_cohort-{cohort}_res-{res}_Chimap.nii.gz")).affine
        reference = to_ants(chi.astype(np.float32), band_affine)
        voxel_mm = float(np.mean(reference.spacing))
        votes, class_votes, carried_true, own = [], [], [], {"true": [], "acquired": [], "input": []}
        for s in scans:
            truth_file = root / "out" / f"sub-{s}" / "anat" / f"sub-{s}_desc-truth_dseg.nii.gz"
            image = nib.load(str(truth_file))
            moving = to_ants(np.asarray(image.dataobj).astype(np.float32), image.affine)
            transform = [str(band / f"tpl-{name}_cohort-{cohort}_res-{res}_from-sub{s}_mode-image_xfm.nii.gz")]
            votes.append(np.rint(apply_transforms(reference, moving, transform, interpolator="genericLabel").numpy()))
            known = subject_truth(subjects[s])
            subject_affine = subjects[s].affine
            class_votes.append(np.rint(apply_transforms(
                reference, to_ants(known["classes"].astype(np.float32), subject_affine), transform,
                interpolator="genericLabel").numpy()))
            carried_true.append(apply_transforms(reference, to_ants(known["true_chi"], subject_affine), transform).numpy())
            own_gp, own_ring = contrast_masks(known["classes"], voxel_mm)
            own["true"].append(gp_contrast(known["true_chi"], own_gp, own_ring))
            own["acquired"].append(gp_contrast(known["acquired_chi"], own_gp, own_ring))
            own["input"].append(gp_contrast(subjects[s].chi, own_gp, own_ring))
        consensus = _majority(np.stack(votes))
        gp, ring = contrast_masks(_majority(np.stack(class_votes)), voxel_mm)
        measured = gp_contrast(chi, gp, ring)
        truth = gp_contrast(np.mean(carried_true, axis=0), gp, ring)
        contrast = {"template": measured, "truth_same_masks": truth, "ratio": measured / truth,
                    "gp_voxels": int(gp.sum()), "ring_voxels": int(ring.sum()),
                    "own_space_true": float(np.mean(own["true"])),
                    "own_space_noise_free_input": float(np.mean(own["acquired"])),
                    "own_space_input": float(np.mean(own["input"]))}
        contrast["ratio_to_own_space_true"] = measured / contrast["own_space_true"]
        contrast["ratio_to_own_space_noise_free_input"] = measured / contrast["own_space_noise_free_input"]
        contrast_rows.append((cohort, contrast))
        dices = {}
        for roi in ("CN", "PU", "GP", "TH"):
            values = [index[f"{roi}_L"], index[f"{roi}_R"]]
            dices[roi] = round(dice(np.isin(dseg, values), np.isin(consensus, values)), 3)
        bound = sharpness_bound(voxel_mm, [(s, subjects[s].age) for s in scans],
                                sulcal_seed=subject_options.get("sulcal_seed"))
        report["bands"][cohort] = {"correlations": correlations, "sharpness_bound": bound, "gp_contrast": contrast,
                                   "dice_band_dseg": dices}
        bounds.append((cohort, correlations, bound))
        print(f"{cohort:>4}  {len(scans):>5}  {min(correlations):.3f}/{np.median(correlations):.3f}        "
              + "/".join(f"{dices[r]:.2f}" for r in ("CN", "PU", "GP", "TH")))
    print("\nsharpness (each registered subject's hybrid vs the sharpened band hybrid, inside the template's mask)"
          "\nagainst what perfect registration reaches on these subjects (sharpness_bound: each subject's own sulci,"
          "\nventricles and chi deviations are all that differ) and what noise alone allows (sigma_clean/sigma_noisy)")
    print("band  measured min-max  perfect registration min-max  same, noise-free  noise alone")
    for cohort, measured, bound in bounds:
        span = lambda v: f"{min(v):.3f}-{max(v):.3f}"  # noqa: E731
        print(f"{cohort:>4}  {span(measured):>16}  {span(bound['perfect']):>28}  {span(bound['perfect_noise_free']):>16}"
              f"  {span(bound['noise']):>11}")
    print(f"\nGP minus surrounding white matter (median GP - median WM within {RING_MM:g} mm of GP and one voxel or more"
          "\nfrom GP/PU/TH/CN/CSF), ppm. Template and 'same masks' truth: the band template's chi and the mean of the"
          "\nsubjects' true chi (no noise, no point-spread) carried by the same transforms, both on the majority of the"
          "\nsubjects' true classes carried into the template. Own space: each subject's true chi / noise-free input /"
          "\ninput, measured with its own true classes, mean over the band.")
    print("band  GP vox  ring vox  template  truth(same masks)  ratio | own true  own noise-free input  own input"
          "  template/own true  template/own noise-free")
    for cohort, c in contrast_rows:
        print(f"{cohort:>4}  {c['gp_voxels']:>6}  {c['ring_voxels']:>8}  {c['template']:8.4f}  {c['truth_same_masks']:17.4f}"
              f"  {c['ratio']:5.2f} | {c['own_space_true']:8.4f}  {c['own_space_noise_free_input']:20.4f}"
              f"  {c['own_space_input']:9.4f}  {c['ratio_to_own_space_true']:17.2f}"
              f"  {c['ratio_to_own_space_noise_free_input']:23.2f}")

    # atlas parcellation vs the subjects' truth carried into the atlas by their composed transforms
    atlas_chi_path = tpl / f"tpl-{name}_res-{res}_Chimap.nii.gz"
    atlas_affine = nib.load(str(atlas_chi_path)).affine
    reference = to_ants(_load(atlas_chi_path).astype(np.float32), atlas_affine)
    dseg = np.rint(_load(tpl / f"tpl-{name}_res-{res}_dseg.nii.gz")).astype(int)
    votes, per_subject = [], {r: [] for r in ("CN", "PU", "GP", "TH")}
    for s in sorted(subjects):
        transform = tpl / f"tpl-{name}_res-{res}_from-sub{s}_mode-image_xfm.nii.gz"
        if not transform.is_file():
            continue
        image = nib.load(str(root / "out" / f"sub-{s}" / "anat" / f"sub-{s}_desc-truth_dseg.nii.gz"))
        moving = to_ants(np.asarray(image.dataobj).astype(np.float32), image.affine)
        carried = np.rint(apply_transforms(reference, moving, [str(transform)], interpolator="genericLabel").numpy())
        votes.append(carried)
        for roi in per_subject:
            values = [index[f"{roi}_L"], index[f"{roi}_R"]]
            per_subject[roi].append(dice(np.isin(dseg, values), np.isin(carried, values)))
    consensus = _majority(np.stack(votes))
    atlas_dice = {roi: round(dice(np.isin(dseg, [index[f"{roi}_L"], index[f"{roi}_R"]]),
                                  np.isin(consensus, [index[f"{roi}_L"], index[f"{roi}_R"]])), 3)
                  for roi in ("CN", "PU", "GP", "TH")}
    report["atlas_dice_vs_consensus"] = atlas_dice
    report["atlas_dice_vs_each_subject_median"] = {r: round(float(np.median(v)), 3) for r, v in per_subject.items()}
    print("\natlas parcellation Dice vs the truth carried by the subjects' transforms (majority vote): "
          + ", ".join(f"{r} {v:.2f}" for r, v in atlas_dice.items()))
    print("  median over subjects of Dice vs each subject's carried truth: "
          + ", ".join(f"{r} {v:.2f}" for r, v in report["atlas_dice_vs_each_subject_median"].items()))

    # per-band ROI susceptibility in atlas space vs the generating trajectories
    print("\nROI susceptibility in atlas space (ppm, voxel-weighted L+R) vs trajectory at the band's subjects' ages")
    print("cohort  mean age   GP meas  GP truth   PU meas  PU truth")
    report["trajectories"] = {}
    for band in sorted(tpl.glob("cohort-*")):
        cohort = band.name.removeprefix("cohort-")
        rows = list(csv.DictReader(open(next(band.glob("*_desc-atlas_roistats.tsv"))), delimiter="\t"))
        sharp = list(csv.DictReader(open(next(band.glob("*_desc-registration_sharpness.tsv"))), delimiter="\t"))
        ages = [subjects[r["scan"].removeprefix("sub-")].age for r in sharp]
        entry = {"mean_age": float(np.mean(ages))}
        for roi in ("GP", "PU"):
            chosen = [r for r in rows if r["name"].split("_")[0] == roi]
            voxels = np.array([float(r["voxels"]) for r in chosen])
            means = np.array([float(r["mean"]) for r in chosen])
            entry[roi] = float((voxels * means).sum() / voxels.sum())
            entry[roi + "_truth"] = float(np.mean([true_susceptibility(roi, a) for a in ages]))
        report["trajectories"][cohort] = entry
        print(f"{cohort:>6}  {entry['mean_age']:8.1f}  {entry['GP']:8.4f}  {entry['GP_truth']:8.4f}  "
              f"{entry['PU']:8.4f}  {entry['PU_truth']:8.4f}")

    # age-matched segmentation of held-out subjects
    if not held_out:
        return report
    from qsmflow.workflows.segmentation import susceptibility_weight

    # (setting, preset, chi weight through the band template, chi weight through the labelled template)
    settings = [("participant default", config["segmentation"]["registration"]["preset"],
                 susceptibility_weight(config["segmentation"], built=True),
                 susceptibility_weight(config["segmentation"], built=False)),
                ("fast, magnitude only", "fast", 0.0, 0.0)]
    print("\nheld-out subjects: Dice of the final labels (carried, then refined as segmentation.refine) with the band "
          "template nearest the age (atlas.band_template_for_age) | with the labelled adult template")
    report["held_out"] = {}
    voxel = float(abs(atlas_affine[0, 0]))
    shape = reference.shape
    from qsmflow.atlas import band_segmentation_atlas, band_template_for_age

    for label, age in HELD_OUT:
        subject = simulate_atlas_subject(label, age, shape=shape, voxel_size=(voxel,) * 3, **subject_options)
        truth = split_hemispheres(subject.labels, subject.affine)
        files = band_template_for_age(tpl, age)
        # the cohort's Chimap as the channel's template and the labelled template's labels carried
        # once (scan -> cohort -> labelled template), when the atlas has them
        band_atlas = band_segmentation_atlas(files)
        report["held_out"][label] = {"age": age, "cohort": files["cohort"]}
        for setting, preset, band_weight, default_weight in settings:
            results = {}
            for source, template, weight in (("band", band_atlas, band_weight), ("default", labelled, default_weight)):
                start = time.perf_counter()
                labels, _, _ = segmentation.template_to_subject(
                    subject.magnitude, subject.brain_mask, subject.affine, template, preset=preset, threads=1,
                    chi=subject.chi, qsm_mask=subject.brain_mask, susceptibility_weight=weight)
                elapsed = time.perf_counter() - start
                # what a participant run writes: the carried labels refined in the scan's Chimap
                final, _ = segmentation.refine_labels(labels, subject.chi, template.table,
                                                      rois=tuple(config["segmentation"]["refine"]),
                                                      voxel_size=(voxel,) * 3, mask=subject.brain_mask)
                for key, image in ((source, final), (f"{source} carried", labels)):
                    results[key] = {roi: round(dice(np.isin(image, [index[f"{roi}_L"], index[f"{roi}_R"]]),
                                                    np.isin(truth, [index[f"{roi}_L"], index[f"{roi}_R"]])), 3)
                                    for roi in ("CN", "PU", "GP", "TH")}
                results[source]["seconds"] = round(elapsed, 1)
            report["held_out"][label][setting] = results
            print(f"  {label} ({age:g} y, cohort {files['cohort']}), {setting} (preset {preset}, chi weight "
                  f"{band_weight:g} | {default_weight:g}): "
                  + " ".join(f"{r} {results['band'][r]:.2f}|{results['default'][r]:.2f}" for r in ("CN", "PU", "GP", "TH"))
                  + f"   ({results['band']['seconds']:.0f} s | {results['default']['seconds']:.0f} s); as carried, "
                  "before the refinement: "
                  + " ".join(f"{r} {results['band carried'][r]:.2f}|{results['default carried'][r]:.2f}"
                             for r in ("CN", "PU", "GP", "TH")), flush=True)
    return report


def sharpness_bound(voxel: float, members: list, *, chi_weight: float = 2.0, blending_weight: float = 0.75,
                    sulcal_seed: int | None = None, max_shift: float = 0.5, order: int = 1) -> dict:
    """What the band-template sharpness can reach when registration is perfect, from the simulation's truth.

    Each subject of ``members`` (label, age) is rebuilt as :func:`qsmflow.simulate.simulate_atlas_subject`
    builds it, but in the nominal frame (``anatomical_variation=False``, no warp): the subjects are
    then aligned exactly, apart from what no registration can align -- each subject's own random
    sulci (unless ``sulcal_seed`` gives them one pattern), its ventricles, its chi deviations. As
    in the pipeline: point-spread (0.6 voxel), one linear resampling (a random sub-voxel shift,
    standing for the deformation), noise (chi 0.01 ppm, magnitude SNR 50, Rician), the hybrid (magnitude / brain median - ``chi_weight`` chi), one
    linear resampling back (the registration), masked average, sharpening; then each subject's
    correlation with that template inside its mask (what ``TemplateSharpness`` reports).

    ``max_shift`` (voxels) bounds the sub-voxel shifts (0: no resampling blur) and ``order`` is the
    spline order of both resamplings (:func:`bound_decomposition` varies them).

    Returns ``noise`` (each subject's sigma_clean / sigma_noisy in its brain: the most a noisy
    subject can correlate with any noise-free image), ``perfect`` (noisy subjects vs the template
    of perfectly registered subjects) and ``perfect_noise_free`` (the same without noise).
    """
    import zlib

    from scipy import ndimage

    from qsmflow.atlas import average_images, masked_correlation, sharpen
    from qsmflow.registration import to_ants
    from qsmflow.simulate import DEFAULT_ECHO_TIMES, affine_for_b0_direction, brain_phantom

    shape = tuple(int(round(n * 2.0 / voxel)) for n in (90, 108, 90))
    affine = affine_for_b0_direction((0.0, 0.0, 1.0), (voxel,) * 3, shape)
    shifts = np.random.default_rng(0)
    images = {"clean": [], "noisy": []}
    masks, noise = [], []
    for label, age in members:
        seed = zlib.crc32(str(label).encode()) % (2**31)
        phantom = brain_phantom(shape, (voxel,) * 3, age_years=age, seed=seed, anatomical_variation=False,
                                sulcal_seed=sulcal_seed)
        rng = np.random.default_rng(seed + 1)
        shift = shifts.uniform(-max_shift, max_shift, 3)

        def moved(image, by):
            return ndimage.shift(np.asarray(image, np.float32), by, order=order, mode="constant")

        def acquired(image):
            return moved(ndimage.gaussian_filter(np.asarray(image, np.float32), 0.6), shift)

        chi = acquired(np.where(phantom.brain_mask, phantom.chi, 0.0))
        magnitude = acquired(phantom.m0 * np.exp(-phantom.r2star * np.float32(DEFAULT_ECHO_TIMES[0])))
        mask = moved(phantom.brain_mask, shift) >= 0.5
        sigma = float(magnitude[mask].mean()) / 50.0
        noisy_magnitude = np.abs(magnitude + rng.normal(0, sigma, magnitude.shape)
                                 + 1j * rng.normal(0, sigma, magnitude.shape)).astype(np.float32)
        noisy_chi = chi + rng.normal(0, 0.01, chi.shape).astype(np.float32)

        def hybrid(m, c):
            return np.where(mask, m / float(np.median(m[mask])) - chi_weight * c, 0.0).astype(np.float32)

        clean, noisy = hybrid(magnitude, chi), hybrid(noisy_magnitude, noisy_chi)
        noise.append(float(np.std(clean[mask]) / np.std(noisy[mask])))
        images["clean"].append(to_ants(moved(clean, -shift), affine))
        images["noisy"].append(to_ants(moved(noisy, -shift), affine))
        masks.append(to_ants(moved(mask.astype(np.float32), -shift), affine))
    result = {"noise": noise}
    for kind, key in (("noisy", "perfect"), ("clean", "perfect_noise_free")):
        average, coverage = average_images(images[kind], masks=masks)
        inside = coverage.numpy() >= 0.5
        template = sharpen(average, blending_weight=blending_weight, mask=to_ants(inside.astype(np.float32), affine))
        result[key] = [masked_correlation(i.numpy(), template.numpy(), inside) for i in images[kind]]
    return result


def bound_decomposition(voxel: float) -> None:
    """Print :func:`sharpness_bound` of every cohort of :data:`COHORT` (noise-free / noisy, min-max)
    with each subject's own sulci and with one shared pattern, without sub-voxel shifts, with
    linear and with cubic resampling: what keeps perfectly registered subjects from their template."""
    bands = [[(label, age) for label, age in COHORT if low <= age < high] for low, high in zip(EDGES[:-1], EDGES[1:])]
    span = lambda v: f"{min(v):.3f}-{max(v):.3f}"  # noqa: E731
    print(f"sharpness bound at {voxel:g} mm, noise-free / noisy (min-max over the cohort's subjects)")
    print(f"{'cohort':>6}  {'sulci':6s}  {'no shift':>23}  {'linear shift and back':>23}  {'cubic shift and back':>23}")
    for number, members in enumerate(bands, start=1):
        for sulci, seed in (("own", None), ("shared", SHARED_SULCAL_SEED)):
            cells = []
            for max_shift, order in ((0.0, 1), (0.5, 1), (0.5, 3)):
                bound = sharpness_bound(voxel, members, sulcal_seed=seed, max_shift=max_shift, order=order)
                cells.append(f"{span(bound['perfect_noise_free'])} / {span(bound['perfect'])}")
            print(f"{number:>6}  {sulci:6s}  " + "  ".join(f"{c:>23}" for c in cells), flush=True)


def _majority(stack: np.ndarray) -> np.ndarray:
    values = np.unique(stack)
    counts = np.stack([(stack == v).sum(axis=0) for v in values])
    return values[np.argmax(counts, axis=0)].astype(int)


if __name__ == "__main__":
    sys.exit(main())
