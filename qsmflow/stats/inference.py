"""Age-effect tests valid when the nonlinear parameter is unidentified under the null,
subject-bootstrap curve bands, and Benjamini-Hochberg across ROIs.

Under "no age effect" (a = 0 or A = 0) the rate b (or B) of the exponential (Poisson) curve
does not enter the likelihood, so the likelihood-ratio statistic is a supremum over b and its
null distribution is not chi^2 (Davies 1977, 1987). :func:`age_effect_test` calibrates the
statistic by a parametric bootstrap from the fitted null model. With independent Gaussian
errors the statistic is exactly pivotal (it does not depend on the null's intercept, covariate
effects or sigma), so the bootstrap reduces to simulating standard normal noise, vectorised over
replicates; polynomial models use the exact F test.

References
----------
Davies RB. Hypothesis testing when a nuisance parameter is present only under the alternative.
Biometrika 1977;64:247-254; and Biometrika 1987;74:33-43.
Efron B, Tibshirani RJ. An Introduction to the Bootstrap. Chapman & Hall 1993 (ch. 16, tests;
resampling clusters for dependent data: Davison & Hinkley 1997, sec. 3.8).
Benjamini Y, Hochberg Y. Controlling the false discovery rate: a practical and powerful approach
to multiple testing. J R Stat Soc B 1995;57:289-300.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from .models import CONSTANT, TrajectoryModel, get_model
from .profile import INDEPENDENT, TrajectoryData, VarianceModel, _fixed_design, fit_trajectory


@dataclass
class AgeTest:
    """Result of :func:`age_effect_test`."""

    statistic: float  # likelihood-ratio statistic, deviance(null) - deviance(model)
    p_value: float
    method: str
    n_boot: int


def _model(model) -> TrajectoryModel:
    return model if isinstance(model, TrajectoryModel) else get_model(model)


def _pivotal_statistics(data: TrajectoryData, model: TrajectoryModel, grid, y: np.ndarray) -> np.ndarray:
    """LR statistics for value vectors y (B, n) under independent homoscedastic errors."""
    n = data.n_scans
    x0 = _fixed_design(data, model)
    q, _ = np.linalg.qr(x0)
    y_perp = y - (y @ q) @ q.T
    rss0 = np.einsum("bn,bn->b", y_perp, y_perp)
    f = model.columns(data.age, np.asarray(grid, dtype=np.float64))[..., 0]  # (G, n)
    f_perp = f - (f @ q) @ q.T
    norm = np.einsum("gn,gn->g", f_perp, f_perp)
    usable = norm > 1e-12 * np.maximum(np.einsum("gn,gn->g", f, f), 1e-300)
    unit = f_perp[usable] / np.sqrt(norm[usable])[:, None]
    explained = np.max((y_perp @ unit.T) ** 2, axis=1)
    return n * np.log(rss0 / np.maximum(rss0 - explained, 1e-300))


def age_effect_test(data: TrajectoryData, model, *, variance: VarianceModel = INDEPENDENT, grid=None,
                    n_boot: int = 999, seed: int = 0, batch: int = 500) -> AgeTest:
    """Test "no age effect" (only intercept and covariates) against a trajectory model.

    Parameters
    ----------
    data : TrajectoryData
    model : str or TrajectoryModel
    variance : VarianceModel
        Under a random intercept or a heteroscedastic sigma, replicates are simulated from the
        fitted null model (with its variance parameters) and both models are refitted on the
        grid.
    grid : array, optional
        Nonlinear parameter grid (the model's default).
    n_boot : int
        Bootstrap replicates; p = (1 + #{T* >= T}) / (1 + n_boot).
    seed : int

    Returns
    -------
    AgeTest

    References
    ----------
    Davies 1977, 1987 (see module docstring).
    """
    model = _model(model)
    grid = model.grid() if grid is None else np.asarray(grid, dtype=np.float64)
    structured = variance.random_intercept or variance.heteroscedastic
    if not model.is_nonlinear and not structured:
        full = fit_trajectory(data, model, intervals=False)
        null = fit_trajectory(data, CONSTANT, intervals=False)
        df1 = len(model.coefficient_names)
        df2 = data.n_scans - (model.n_mean_parameters + data.covariates.shape[1])
        rss_full, rss_null = full.sigma ** 2 * data.n_scans, null.sigma ** 2 * data.n_scans
        f_stat = ((rss_null - rss_full) / df1) / (rss_full / df2)
        return AgeTest(float(null.deviance - full.deviance), float(stats.f.sf(f_stat, df1, df2)), "exact F test", 0)
    rng = np.random.default_rng(seed)
    if not structured:
        observed = float(_pivotal_statistics(data, model, grid, data.y[None, :])[0])
        exceed = 0
        for start in range(0, n_boot, batch):
            noise = rng.standard_normal((min(batch, n_boot - start), data.n_scans))
            exceed += int(np.sum(_pivotal_statistics(data, model, grid, noise) >= observed - 1e-9))
        return AgeTest(observed, (1 + exceed) / (1 + n_boot), "parametric bootstrap LRT (exact pivot)", n_boot)

    def statistic(d):
        null = fit_trajectory(d, CONSTANT, variance=variance, intervals=False, refine=False)
        full = fit_trajectory(d, model, variance=variance, grid=grid, intervals=False, refine=False)
        return max(null.deviance - full.deviance, 0.0), null

    observed, null_fit = statistic(data)
    mean0 = null_fit.mean(data.age, data.covariates)
    sd = null_fit.sd(data.age)
    ratio = (null_fit.random_intercept_sd / null_fit.sigma) if null_fit.sigma > 0 else 0.0
    exceed = 0
    for _ in range(n_boot):
        u = rng.standard_normal(data.n_subjects)[data.subjects] * ratio
        y = mean0 + sd * (rng.standard_normal(data.n_scans) + u)
        exceed += statistic(data.with_values(y))[0] >= observed - 1e-9
    return AgeTest(float(observed), (1 + exceed) / (1 + n_boot), "parametric bootstrap LRT", n_boot)


def resample_subjects(data: TrajectoryData, rng) -> TrajectoryData:
    """One bootstrap sample of whole subjects (all their scans), drawn with replacement."""
    chosen = rng.integers(0, data.n_subjects, data.n_subjects)
    order = np.argsort(data.subjects, kind="stable")
    counts = data.scans_per_subject
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rows = np.concatenate([order[starts[s]:starts[s] + counts[s]] for s in chosen])
    codes = np.repeat(np.arange(chosen.size), counts[chosen])
    return TrajectoryData(data.y[rows], data.age[rows], data.covariates[rows], data.covariate_names,
                          codes.astype(np.intp), tuple(str(i) for i in range(chosen.size)))


def bootstrap_curves(data: TrajectoryData, model, ages, *, variance: VarianceModel = INDEPENDENT, grid=None,
                     n_boot: int = 200, seed: int = 0) -> np.ndarray:
    """Mean curves refitted on bootstrap samples of subjects.

    Resampling subjects (not scans) keeps each subject's sessions together, so the bands are
    valid for longitudinal data.

    Returns
    -------
    (n_boot, len(ages)) array; replicates that cannot be fitted (too few distinct subjects) are NaN.
    """
    model = _model(model)
    rng = np.random.default_rng(seed)
    ages = np.asarray(ages, dtype=np.float64)
    curves = np.full((n_boot, ages.size), np.nan)
    for i in range(n_boot):
        sample = resample_subjects(data, rng)
        try:
            fit = fit_trajectory(sample, model, variance=variance, grid=grid, intervals=False, refine=False)
        except (ValueError, np.linalg.LinAlgError):
            continue
        curves[i] = fit.curve(ages)
    return curves


def curve_band(curves: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise percentile band of bootstrap curves."""
    tail = 50.0 * (1.0 - level)
    return np.nanpercentile(curves, tail, axis=0), np.nanpercentile(curves, 100.0 - tail, axis=0)


def benjamini_hochberg(p_values) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values); NaN entries stay NaN.

    References
    ----------
    Benjamini & Hochberg 1995 (see module docstring).
    """
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(p_values, dtype=np.float64)
    adjusted = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if np.any(ok):
        adjusted[ok] = multipletests(p[ok], method="fdr_bh")[1]
    return adjusted
