"""Summaries of what a run produced."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from .. import metrics


def demo_accuracy_table(bids_dir, derivatives_dir) -> str:
    """Score each reconstructed Chimap of a simulated dataset against its ground truth.

    The truth is read from ``bids_dir/derivatives/simulation`` (written by
    :func:`qsmflow.simulate.write_bids_dataset`). Returns a TSV table: scan, NRMSE (%),
    HFEN (%), XSIM, correlation, the fraction of the true brain mask the QSM mask covers, and
    for the labelled ROIs the mean absolute error of their mean susceptibility (ppm, both maps
    referenced to their mean over the evaluated voxels) and the slope of estimated against true
    ROI means (1 is unbiased).
    """
    truth_root = Path(bids_dir) / "derivatives" / "simulation"
    header = "scan\tnrmse_percent\thfen_percent\txsim\tcorrelation\tmask_coverage\troi_mae_ppm\troi_slope\n"
    rows = []
    for chimap in sorted(Path(derivatives_dir).glob("sub-*/**/anat/*_Chimap.nii.gz")):
        prefix = chimap.name[: -len("_Chimap.nii.gz")]
        truth_dir = truth_root / chimap.parent.relative_to(derivatives_dir)
        truth_chi_path = truth_dir / f"{prefix}_Chimap.nii.gz"
        truth_mask_path = truth_dir / f"{prefix}_desc-brain_mask.nii.gz"
        if not truth_chi_path.exists():
            continue
        estimate = np.asarray(nib.load(chimap).dataobj, dtype=np.float32)
        qsm_mask = np.asarray(nib.load(chimap.with_name(f"{prefix}_desc-qsm_mask.nii.gz")).dataobj) > 0
        truth = np.asarray(nib.load(truth_chi_path).dataobj, dtype=np.float32)
        true_mask = np.asarray(nib.load(truth_mask_path).dataobj) > 0
        both = qsm_mask & true_mask
        scores = metrics.score(estimate, truth, both)
        coverage = both.sum() / true_mask.sum()
        labels = np.asarray(nib.load(truth_dir / f"{prefix}_dseg.nii.gz").dataobj).astype(int)
        true_means, estimated_means = roi_means(truth, labels, both), roi_means(estimate, labels, both)
        common = sorted(set(true_means) & set(estimated_means))
        truth_values = np.array([true_means[k] for k in common])
        estimated_values = np.array([estimated_means[k] for k in common])
        mae = np.abs(estimated_values - truth_values).mean()
        slope = np.polyfit(truth_values, estimated_values, 1)[0]
        rows.append(
            f"{prefix}\t{scores['nrmse']:.1f}\t{scores['hfen']:.1f}\t{scores['xsim']:.3f}\t{scores['correlation']:.3f}"
            f"\t{coverage:.3f}\t{mae:.4f}\t{slope:.2f}\n"
        )
    return header + "".join(rows)


def roi_means(chi: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> dict:
    """Mean of ``chi`` in each label (inside ``mask``), after referencing to the mask's mean."""
    referenced = chi - chi[mask].mean()
    return {int(k): float(referenced[(labels == k) & mask].mean()) for k in np.unique(labels[mask]) if k > 0}
