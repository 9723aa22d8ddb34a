"""Normative model: mean trajectory with an age-dependent spread, centiles and z-scores.

The mean is a trajectory model (:mod:`qsmflow.stats.models`), the spread is
sigma(age) = sigma0 exp(gamma (age - mean age)) (log sigma linear in age), both fitted jointly by
maximum likelihood with the nonlinear parameter and gamma profiled on a grid. Scans are treated
as independent (marginal centiles: where to expect a scan at a given age); held-out z-scores
leave out a whole subject, so a subject's repeated scans never inform their own score. sigma0
is rescaled by n / (n - p) (p mean parameters) so that held-out z-scores are close to unit SD.

References
----------
Bethlehem RAI, Seidlitz J, White SR, et al. Brain charts for the human lifespan. Nature
2022;604:525-533 (centile curves, out-of-sample centile scores).
Marquand AF, Rezek I, Buitelaar J, Beckmann CF. Understanding heterogeneity in clinical cohorts
using normative models. Biol Psychiatry 2016;80:552-561.
Treit S, et al. Hum Brain Mapp 2021;42:4597-4610 (spread of QSM values grows with age).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from .models import TrajectoryModel, get_model
from .profile import TrajectoryData, TrajectoryFit, VarianceModel, fit_trajectory

#: Centiles drawn and tabulated (percent).
CENTILES = (2.5, 25.0, 50.0, 75.0, 97.5)


@dataclass
class NormativeModel:
    """A fitted normative model (see :func:`fit_normative`)."""

    fit: TrajectoryFit
    sigma0: float
    gamma: float
    age_reference: float
    information_inverse: np.ndarray = None
    warnings: list = field(default_factory=list)

    def sd(self, age) -> np.ndarray:
        return self.sigma0 * np.exp(self.gamma * (np.asarray(age, dtype=np.float64) - self.age_reference))

    def centiles(self, ages, centiles=CENTILES) -> np.ndarray:
        """(len(centiles), len(ages)) centile curves at the cohort's average covariates."""
        ages = np.asarray(ages, dtype=np.float64)
        quantiles = stats.norm.ppf(np.asarray(centiles) / 100.0)[:, None]
        return self.fit.curve(ages)[None, :] + quantiles * self.sd(ages)[None, :]

    def zscores(self, data: TrajectoryData, *, new: bool = False) -> np.ndarray:
        """z = (value - mean(age, covariates)) / sd for every scan of ``data``.

        With ``new=True`` (scans not used in the fit) the SD is the predictive SD,
        sd(age) sqrt(1 + h), h the leverage of the new scan under the linearised mean model
        (uncertainty of the fitted curve), so that held-out z-scores have unit variance.
        """
        sd = self.sd(data.age)
        if new:
            sd = sd * np.sqrt(1.0 + self._leverage(data.age, data.covariates))
        return (data.y - self.fit.mean(data.age, data.covariates)) / sd

    def _jacobian(self, age, covariates) -> np.ndarray:
        """Derivative of the mean with respect to every mean parameter, rows divided by sd(age)."""
        model, params = self.fit.model, self.fit.parameters
        age = np.asarray(age, dtype=np.float64)
        columns = [np.ones_like(age)]
        theta = params[model.nonlinear_name] if model.is_nonlinear else np.nan
        columns += list(model.columns(age, float(theta)).T)
        if model.is_nonlinear:
            step = 1e-6 * theta
            slope = (model.columns(age, theta + step) - model.columns(age, theta - step))[:, 0] / (2 * step)
            columns.append(params[model.coefficient_names[0]] * slope)
        columns += list(np.asarray(covariates, dtype=np.float64).reshape(age.size, -1).T)
        return np.column_stack(columns) / self.sd(age)[:, None]

    def _leverage(self, age, covariates) -> np.ndarray:
        row = self._jacobian(age, covariates)
        return np.einsum("ij,jk,ik->i", row, self.information_inverse, row)


def fit_normative(data: TrajectoryData, model, *, grid=None, gamma_grid=None) -> NormativeModel:
    """Fit mean curve and log-linear spread jointly (ML), independent scans.

    Parameters
    ----------
    data : TrajectoryData
    model : str or TrajectoryModel
        Mean model (usually the one AICc prefers).
    grid : array, optional
        Nonlinear parameter grid.
    gamma_grid : sequence, optional
        Grid of the log-sigma slope (1/year); default :class:`VarianceModel`'s.
    """
    model = model if isinstance(model, TrajectoryModel) else get_model(model)
    variance = VarianceModel(heteroscedastic=True) if gamma_grid is None else VarianceModel(
        heteroscedastic=True, gamma_grid=tuple(gamma_grid))
    fit = fit_trajectory(data, model, variance=variance, grid=grid, intervals=False)
    p = model.n_mean_parameters + data.covariates.shape[1]
    sigma0 = fit.sigma * np.sqrt(data.n_scans / max(data.n_scans - p, 1))
    normative = NormativeModel(fit, float(sigma0), fit.gamma, fit.age_reference,
                               warnings=list(fit.at_bound) + list(fit.warnings))
    jacobian = normative._jacobian(data.age, data.covariates)
    normative.information_inverse = np.linalg.pinv(jacobian.T @ jacobian)
    return normative


def _window(values: np.ndarray, centre: float, half_width: int) -> np.ndarray:
    index = int(np.argmin(np.abs(values - centre)))
    return values[max(index - half_width, 0):index + half_width + 1]


def held_out_zscores(data: TrajectoryData, model, *, grid=None, gamma_grid=None, full: NormativeModel | None = None,
                     window: int = 12) -> np.ndarray:
    """Leave-one-subject-out z-score of every scan.

    Each subject's scans are scored by a normative model fitted without that subject. For
    speed, each refit searches a window of the grids around the full-data optimum (the grids'
    points are reused); when the optimum falls on the window's edge (and not on the grid's
    own end) the subject is refitted on the full grids.

    Returns
    -------
    (n_scans,) array of z-scores; NaN where the reduced cohort is too small to fit.
    """
    model = model if isinstance(model, TrajectoryModel) else get_model(model)
    thetas = model.grid() if grid is None else np.asarray(grid, dtype=np.float64)
    gammas = np.asarray(VarianceModel().gamma_grid if gamma_grid is None else gamma_grid, dtype=np.float64)
    full = full or fit_normative(data, model, grid=grid, gamma_grid=gammas)
    if model.is_nonlinear:
        local_thetas = _window(thetas, full.fit.parameters[model.nonlinear_name], window)
    local_gammas = _window(gammas, full.gamma, max(window // 2, 2))
    z = np.full(data.n_scans, np.nan)
    for subject in range(data.n_subjects):
        held = data.subjects == subject
        rest = data.subset(~held)
        try:
            fitted = fit_normative(rest, model, grid=local_thetas if model.is_nonlinear else None,
                                   gamma_grid=local_gammas)
            edge = any("grid bound" in w for w in fitted.warnings)
            if edge:
                fitted = fit_normative(rest, model, grid=thetas if model.is_nonlinear else None, gamma_grid=gammas)
        except (ValueError, np.linalg.LinAlgError):
            continue
        z[held] = fitted.zscores(data.subset(held), new=True)
    return z


def zscore_centile(z) -> np.ndarray:
    """Centile (0-100) of a standard normal z-score."""
    return 100.0 * stats.norm.cdf(np.asarray(z, dtype=np.float64))
