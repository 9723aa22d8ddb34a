"""Summaries of what a run produced."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from . import metrics


def demo_accuracy_table(bids_dir, derivatives_dir) -> str:
    """Score each reconstructed Chimap of a simulated dataset against its ground truth.

    The truth is read from ``bids_dir/derivatives/simulation`` (written by
    :func:`qsmflow.simulate.write_bids_dataset`). Returns a TSV table: subject, NRMSE (%),
    HFEN (%), XSIM, correlation, and the fraction of the true brain mask the QSM mask covers.
    """
    truth_root = Path(bids_dir) / "derivatives" / "simulation"
    header = "scan\tnrmse_percent\thfen_percent\txsim\tcorrelation\tmask_coverage\n"
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
        rows.append(f"{prefix}\t{scores['nrmse']:.1f}\t{scores['hfen']:.1f}\t{scores['xsim']:.3f}\t{scores['correlation']:.3f}\t{coverage:.3f}\n")
    return header + "".join(rows)
