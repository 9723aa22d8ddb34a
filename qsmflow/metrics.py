"""Accuracy metrics of a susceptibility map against a ground truth (QSM-CI definitions).

References: Marques et al., "QSM reconstruction challenge 2.0", MRM 2021;86:526-542, and
QSM-CI (Stewart et al.) for the demeaned NRMSE and XSIM settings.
"""
from __future__ import annotations

import numpy as np
import scipy.ndimage


def _demeaned(estimate, truth, mask):
    mask = np.asarray(mask, dtype=bool)
    x = np.asarray(estimate, dtype=np.float64)[mask]
    y = np.asarray(truth, dtype=np.float64)[mask]
    return x - x.mean(), y - y.mean()


def nrmse(estimate, truth, mask) -> float:
    """100·‖x−y‖/‖y‖ over the mask, after demeaning both inside it (percent)."""
    x, y = _demeaned(estimate, truth, mask)
    return float(100.0 * np.linalg.norm(x - y) / np.linalg.norm(y))


def correlation(estimate, truth, mask) -> float:
    """Pearson correlation over the mask."""
    x, y = _demeaned(estimate, truth, mask)
    return float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y)))


def hfen(estimate, truth, mask, sigma: float = 1.5) -> float:
    """High-frequency error norm: NRMSE of the Laplacian-of-Gaussian filtered maps (percent).

    Ravishankar & Bresler, IEEE TMI 2011; σ = 1.5 voxels as in the QSM challenges.
    """
    mask = np.asarray(mask, dtype=bool)
    x, y = (np.where(mask, np.asarray(a, dtype=np.float64), 0.0) for a in (estimate, truth))
    x, y = (scipy.ndimage.gaussian_laplace(a, sigma, truncate=4.0) for a in (x, y))
    return float(100.0 * np.linalg.norm((x - y)[mask]) / np.linalg.norm(y[mask]))


def xsim(estimate, truth, mask) -> float:
    """Structural similarity tuned for susceptibility maps (XSIM).

    SSIM (Wang et al., IEEE TIP 2004) with K1 = 0.01, K2 = 0.001 and data range 1 ppm, as
    proposed for QSM by Milovic et al., MRM 2024 ("XSIM: a structural similarity index measure
    optimized for MRI QSM"), averaged over the mask. Both maps are demeaned inside the mask first,
    as for :func:`nrmse`, since susceptibility is only defined up to a reference.
    """
    from skimage.metrics import structural_similarity

    mask = np.asarray(mask, dtype=bool)
    x, y = (np.where(mask, np.asarray(a, dtype=np.float64) - np.asarray(a, dtype=np.float64)[mask].mean(), 0.0)
            for a in (estimate, truth))
    _, ssim_map = structural_similarity(x, y, data_range=1.0, K1=0.01, K2=0.001, gaussian_weights=True,
                                        sigma=1.5, use_sample_covariance=False, full=True)
    return float(ssim_map[mask].mean())


def score(estimate, truth, mask) -> dict:
    """All metrics at once."""
    return {
        "nrmse": nrmse(estimate, truth, mask),
        "hfen": hfen(estimate, truth, mask),
        "xsim": xsim(estimate, truth, mask),
        "correlation": correlation(estimate, truth, mask),
    }
