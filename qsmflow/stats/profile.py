"""Maximum-likelihood trajectory fits by profiling the one nonlinear parameter on a grid.

For a fixed nonlinear parameter (``b`` of the exponential, ``B`` of the Poisson curve) and fixed
variance parameters, the mean is linear in the remaining parameters, so the Gaussian likelihood
is maximised exactly by (generalised) least squares. :func:`fit_trajectory` evaluates that
profile on a grid of the nonlinear parameter x a grid of the variance parameters at once
(vectorised), refines the optimum continuously, and reads profile-likelihood confidence
intervals from the same profile.

Variance structures (:class:`VarianceModel`), all fitted by maximum likelihood (not REML) so that
likelihoods are comparable across mean models with different fixed effects:

* independent, constant sigma;
* ``random_intercept``: a subject random intercept, var(u) = lambda sigma^2 (longitudinal data);
* ``heteroscedastic``: sigma(age) = sigma0 exp(gamma (age - mean age)), log sigma linear in age.

Both together mean V = sigma0^2 D (I + lambda J) D with D = diag(exp(gamma (age - mean age))): the
random intercept scales with the residual spread at the scan's age.

Confidence intervals use the small-sample cut of the profile deviance

    deviance(psi) - deviance_min <= n log(1 + F(level; 1, n - p) / (n - p)),

which, for independent homoscedastic errors, is RSS(psi) / RSS_min <= 1 + F / (n - p) and gives
exact t intervals for a linear coefficient; it covered closer to 95 % than the asymptotic
chi^2(1) cut in simulations (see ``tests/benchmarks/group_stats.py``). An interval that reaches
the end of the nonlinear parameter's grid is reported as open-ended on that side: the data do
not bound the parameter there.

References
----------
Venzon DJ, Moolgavkar SH. A method for computing profile-likelihood-based confidence intervals.
J R Stat Soc C 1988;37:87-94.
Bates DM, Watts DG. Nonlinear Regression Analysis and Its Applications. Wiley 1988, ch. 6
(partially linear models, profile t).
Laird NM, Ware JH. Random-effects models for longitudinal data. Biometrics 1982;38:963-974.
Hurvich CM, Tsai CL. Regression and time series model selection in small samples. Biometrika
1989;76:297-307 (AICc).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import optimize, stats

from .models import CONSTANT, TrajectoryModel, get_model

_DEGENERATE = 1e-12  # relative squared norm below which a column is collinear with the others


# ---------------------------------------------------------------------------------------------
# data


@dataclass(frozen=True)
class TrajectoryData:
    """Scans of one ROI: values, ages, coded covariates and subject membership.

    Build with :func:`prepare_data`. Covariate columns are centred, so the fitted curve (at
    covariates = 0) is the curve of the cohort's average covariate mix.
    """

    y: np.ndarray
    age: np.ndarray
    covariates: np.ndarray
    covariate_names: tuple
    subjects: np.ndarray
    subject_labels: tuple

    @property
    def n_scans(self) -> int:
        return int(self.y.shape[0])

    @property
    def n_subjects(self) -> int:
        return len(self.subject_labels)

    @property
    def scans_per_subject(self) -> np.ndarray:
        return np.bincount(self.subjects, minlength=self.n_subjects)

    @property
    def longitudinal(self) -> bool:
        return bool(np.any(self.scans_per_subject > 1))

    def subset(self, keep) -> "TrajectoryData":
        """The scans where boolean ``keep`` is true (subject codes renumbered)."""
        keep = np.asarray(keep, dtype=bool)
        codes, new = np.unique(self.subjects[keep], return_inverse=True)
        return TrajectoryData(self.y[keep], self.age[keep], self.covariates[keep], self.covariate_names,
                              new.astype(np.intp), tuple(self.subject_labels[c] for c in codes))

    def with_values(self, y) -> "TrajectoryData":
        return TrajectoryData(np.asarray(y, dtype=np.float64), self.age, self.covariates, self.covariate_names,
                              self.subjects, self.subject_labels)


def code_covariates(covariates: dict | None, n: int) -> tuple[np.ndarray, tuple]:
    """Numeric design columns for covariates (additive effects).

    Numeric columns are centred; text columns become indicator columns for every level but the
    first in sorted order (``sex[M]``), centred. A column with one level adds nothing.

    Parameters
    ----------
    covariates : dict name -> sequence of length n, or None

    Returns
    -------
    (n, k) float64 array and the k column names.
    """
    columns, names = [], []
    for name, values in (covariates or {}).items():
        values = list(values)
        if len(values) != n:
            raise ValueError(f"covariate {name!r} has {len(values)} values for {n} scans")
        if any(v is None or (isinstance(v, float) and np.isnan(v)) or str(v).strip() in ("", "n/a") for v in values):
            raise ValueError(f"covariate {name!r} has missing values; exclude those scans first")
        try:
            numeric = np.array([float(v) for v in values])
        except (TypeError, ValueError):
            numeric = None
        if numeric is not None and not all(isinstance(v, str) for v in values):
            if np.ptp(numeric) > 0:
                columns.append(numeric - numeric.mean())
                names.append(str(name))
            continue
        text = np.array([str(v) for v in values])
        for level in sorted(set(text))[1:]:
            indicator = (text == level).astype(np.float64)
            columns.append(indicator - indicator.mean())
            names.append(f"{name}[{level}]")
    matrix = np.column_stack(columns) if columns else np.zeros((n, 0))
    return matrix, tuple(names)


def prepare_data(values, ages, *, subjects=None, covariates: dict | None = None) -> TrajectoryData:
    """Check and code one ROI's scans for fitting.

    Parameters
    ----------
    values, ages : sequences of length n (finite; ages >= 0)
    subjects : sequence of subject labels, optional (default: every scan its own subject)
    covariates : dict name -> sequence, optional (see :func:`code_covariates`)
    """
    y = np.asarray(values, dtype=np.float64).ravel()
    age = np.asarray(ages, dtype=np.float64).ravel()
    if y.shape != age.shape:
        raise ValueError(f"{y.size} values but {age.size} ages")
    if not (np.all(np.isfinite(y)) and np.all(np.isfinite(age))):
        raise ValueError("values and ages must be finite; exclude missing scans first")
    if np.any(age < 0):
        raise ValueError("ages must be non-negative")
    labels = [str(s) for s in subjects] if subjects is not None else [str(i) for i in range(y.size)]
    if len(labels) != y.size:
        raise ValueError(f"{len(labels)} subject labels for {y.size} scans")
    unique, codes = np.unique(np.array(labels), return_inverse=True)
    matrix, names = code_covariates(covariates, y.size)
    return TrajectoryData(y, age, matrix, names, codes.astype(np.intp), tuple(unique))


# ---------------------------------------------------------------------------------------------
# variance structure


@dataclass(frozen=True)
class VarianceModel:
    """Residual covariance: optional subject random intercept and log-linear age trend of sigma.

    Attributes
    ----------
    random_intercept : bool
        Subject random intercept with variance ratio lambda = var(u) / sigma^2.
    heteroscedastic : bool
        sigma(age) = sigma0 exp(gamma (age - mean age)).
    lambda_grid : tuple of float
        Grid of lambda (0 included: no between-subject variance).
    gamma_grid : tuple of float
        Grid of gamma (1/year); +-0.05/year spans a factor e^4 over 80 years.
    """

    random_intercept: bool = False
    heteroscedastic: bool = False
    lambda_grid: tuple = tuple(np.concatenate([[0.0], np.geomspace(0.01, 100.0, 17)]))
    gamma_grid: tuple = tuple(np.linspace(-0.05, 0.05, 21))

    @property
    def n_parameters(self) -> int:
        """Variance parameters counted in AICc/BIC: sigma, plus lambda and gamma when used."""
        return 1 + int(self.random_intercept) + int(self.heteroscedastic)

    def axes(self) -> tuple[np.ndarray, np.ndarray]:
        lam = np.asarray(self.lambda_grid, dtype=np.float64) if self.random_intercept else np.zeros(1)
        gam = np.asarray(self.gamma_grid, dtype=np.float64) if self.heteroscedastic else np.zeros(1)
        if np.any(lam < 0):
            raise ValueError("lambda_grid must be non-negative")
        return lam, gam

    def combinations(self) -> np.ndarray:
        """(L, 2) array of (lambda, gamma) pairs, lambda-major."""
        lam, gam = self.axes()
        return np.stack(np.meshgrid(lam, gam, indexing="ij"), axis=-1).reshape(-1, 2)

    def describe(self) -> str:
        parts = ["ML", "Gaussian"]
        parts.append("subject random intercept" if self.random_intercept else "independent scans")
        parts.append("log sigma linear in age" if self.heteroscedastic else "constant sigma")
        return ", ".join(parts)


INDEPENDENT = VarianceModel()


def _whiten(x: np.ndarray, data: TrajectoryData, combos: np.ndarray) -> np.ndarray:
    """V^(-1/2) x for every (lambda, gamma) pair; x has shape (..., n), result (L, ..., n)."""
    lam, gam = combos[:, 0], combos[:, 1]
    extra = x.ndim - 1
    d = np.exp(gam[:, None] * (data.age - data.age.mean())[None, :])  # (L, n)
    d = d.reshape((d.shape[0],) + (1,) * extra + (d.shape[1],))
    scaled = x[None, ...] / d
    if not np.any(lam > 0):
        return scaled
    m = data.scans_per_subject.astype(np.float64)
    indicator = np.zeros((data.n_scans, data.n_subjects))
    indicator[np.arange(data.n_scans), data.subjects] = 1.0
    means = (scaled @ indicator) / m  # (L, ..., S)
    shrink = 1.0 - 1.0 / np.sqrt(1.0 + m[None, :] * lam[:, None])  # (L, S)
    shrink = shrink.reshape((shrink.shape[0],) + (1,) * extra + (shrink.shape[1],))
    return scaled - (shrink * means)[..., data.subjects]


def _log_determinant(data: TrajectoryData, combos: np.ndarray) -> np.ndarray:
    """log |V / sigma0^2| per pair; the gamma term vanishes because ages are centred."""
    m = data.scans_per_subject.astype(np.float64)
    return np.log1p(m[None, :] * combos[:, :1]).sum(axis=1)


# ---------------------------------------------------------------------------------------------
# grid evaluation


@dataclass
class _Grid:
    """Profile quantities at every (variance pair l, nonlinear value g)."""

    thetas: np.ndarray  # (G,)
    combos: np.ndarray  # (L, 2)
    rss: np.ndarray  # (L, G) whitened residual sum of squares
    deviance: np.ndarray  # (L, G) -2 log-likelihood, sigma profiled out
    offset: np.ndarray  # (L,) deviance = n log(rss) + offset
    coefficients: np.ndarray | None = None  # (L, G, p) in parameter order
    scale: np.ndarray | None = None  # (L, G, p) diagonal of (X_w' X_w)^-1


def _fixed_design(data: TrajectoryData, model: TrajectoryModel) -> np.ndarray:
    """Columns not depending on the nonlinear parameter: 1, polynomial age terms, covariates."""
    parts = [np.ones((data.n_scans, 1))]
    if not model.is_nonlinear:
        parts.append(model.columns(data.age, np.nan))
    parts.append(data.covariates)
    return np.concatenate(parts, axis=1)


def _evaluate(data: TrajectoryData, model: TrajectoryModel, thetas, combos, *, coefficients: bool = False) -> _Grid:
    n = data.n_scans
    thetas = np.atleast_1d(np.asarray(thetas, dtype=np.float64))
    combos = np.atleast_2d(np.asarray(combos, dtype=np.float64))
    x0 = _whiten(_fixed_design(data, model).T, data, combos).swapaxes(-1, -2)  # (L, n, k)
    yw = _whiten(data.y, data, combos)  # (L, n)
    q, r = np.linalg.qr(x0)  # (L, n, k), (L, k, k)
    qty = np.einsum("lnk,ln->lk", q, yw)
    y_perp = yw - np.einsum("lnk,lk->ln", q, qty)
    rss0 = np.einsum("ln,ln->l", y_perp, y_perp)
    offset = n * (np.log(2.0 * np.pi / n) + 1.0) + _log_determinant(data, combos)
    if model.is_nonlinear:
        f = _whiten(model.columns(data.age, thetas)[..., 0], data, combos)  # (L, G, n)
        qtf = np.einsum("lgn,lnk->lgk", f, q)
        f_perp = f - np.einsum("lgk,lnk->lgn", qtf, q)
        norm = np.einsum("lgn,lgn->lg", f_perp, f_perp)
        total = np.einsum("lgn,lgn->lg", f, f)
        usable = norm > _DEGENERATE * np.maximum(total, 1e-300)
        safe = np.where(usable, norm, 1.0)
        cross = np.einsum("lgn,ln->lg", f_perp, y_perp)
        rss = rss0[:, None] - np.where(usable, cross ** 2 / safe, 0.0)
    else:
        rss = rss0[:, None] * np.ones((1, thetas.size))
    rss = np.maximum(rss, 1e-300)
    grid = _Grid(thetas, combos, rss, n * np.log(rss) + offset[:, None], offset)
    if coefficients:
        r_inv = np.linalg.inv(r)  # (L, k, k)
        fixed_scale = np.einsum("lij,lij->li", r_inv, r_inv)  # diag of R^-1 R^-T
        if model.is_nonlinear:
            beta_f = np.where(usable, cross / safe, np.nan)
            beta0 = np.einsum("lij,lgj->lgi", r_inv, qty[:, None, :] - beta_f[..., None] * qtf)
            h = np.einsum("lij,lgj->lgi", r_inv, qtf)
            scale0 = fixed_scale[:, None, :] + np.where(usable[..., None], h ** 2 / safe[..., None], np.inf)
            scale_f = np.where(usable, 1.0 / safe, np.inf)
            # parameter order: intercept, model coefficient, covariates
            grid.coefficients = np.concatenate([beta0[..., :1], beta_f[..., None], beta0[..., 1:]], axis=-1)
            grid.scale = np.concatenate([scale0[..., :1], scale_f[..., None], scale0[..., 1:]], axis=-1)
        else:
            beta = np.einsum("lij,lj->li", r_inv, qty)
            grid.coefficients = np.broadcast_to(beta[:, None, :], (combos.shape[0], thetas.size, beta.shape[-1])).copy()
            grid.scale = np.broadcast_to(fixed_scale[:, None, :], grid.coefficients.shape).copy()
    return grid


# ---------------------------------------------------------------------------------------------
# fit


@dataclass
class Interval:
    """A confidence interval; ``open`` is "", "low", "high" or "both" (reached a grid bound)."""

    low: float
    high: float
    open: str = ""

    def covers(self, value: float) -> bool:
        low_ok = self.open in ("low", "both") or value >= self.low
        high_ok = self.open in ("high", "both") or value <= self.high
        return bool(low_ok and high_ok)


@dataclass
class TrajectoryFit:
    """Result of :func:`fit_trajectory` (all ages in years, values in the data's units)."""

    model: TrajectoryModel
    variance: VarianceModel
    parameters: dict
    intervals: dict
    derived: dict
    derived_intervals: dict
    sigma: float
    random_intercept_sd: float
    gamma: float
    deviance: float
    n_scans: int
    n_subjects: int
    n_parameters: int
    r2: float
    aicc: float
    bic: float
    age_reference: float
    age_range: tuple
    theta_grid: np.ndarray
    profile: np.ndarray  # profile deviance over theta_grid (nonlinear models)
    cut: float
    covariate_names: tuple = ()
    at_bound: list = field(default_factory=list)
    warnings: list = field(default_factory=list)

    @property
    def loglik(self) -> float:
        return -0.5 * self.deviance

    def curve(self, age) -> np.ndarray:
        """Mean curve at ``age`` for the cohort's average covariates."""
        return self.model.curve(age, self.parameters)

    def mean(self, age, covariates: np.ndarray) -> np.ndarray:
        """Mean for scans with given (coded, centred) covariate rows."""
        effects = np.array([self.parameters[n] for n in self.covariate_names]) if self.covariate_names else np.zeros(0)
        return self.curve(age) + np.asarray(covariates).reshape(len(np.atleast_1d(age)), -1) @ effects

    def sd(self, age) -> np.ndarray:
        """Residual SD (within-subject, ML) at ``age``."""
        return self.sigma * np.exp(self.gamma * (np.asarray(age, dtype=np.float64) - self.age_reference))


def small_sample_cut(n: int, p: int, level: float = 0.95) -> float:
    """Deviance cut n log(1 + F(level; 1, n-p)/(n-p)) (RSS ratio cut for Gaussian models)."""
    dof = n - p
    if dof < 1:
        raise ValueError(f"{n} observations cannot fit {p} mean parameters")
    return float(n * np.log1p(stats.f.ppf(level, 1, dof) / dof))


def _parameter_names(data: TrajectoryData, model: TrajectoryModel) -> list:
    return [model.intercept_name, *model.coefficient_names, *data.covariate_names]


def minimum_scans(model: TrajectoryModel, data: TrajectoryData, variance: VarianceModel) -> int:
    """Fewest scans that leave at least 3 residual degrees of freedom."""
    return model.n_mean_parameters + data.covariates.shape[1] + variance.n_parameters + 3


def _variance_bounds(variance: VarianceModel, l_index: int):
    lam, gam = variance.axes()
    i, j = divmod(l_index, gam.size)
    bounds, start = [], []
    if variance.random_intercept:
        bounds.append((lam[max(i - 1, 0)], lam[min(i + 1, lam.size - 1)]))
        start.append(lam[i])
    if variance.heteroscedastic:
        bounds.append((gam[max(j - 1, 0)], gam[min(j + 1, gam.size - 1)]))
        start.append(gam[j])
    return bounds, start


def _zoom(data, model, variance, theta_bounds, variance_bounds, rounds: int = 7, points: int = 7):
    """Refine the optimum by repeated local grids (vectorised; no iterative optimiser).

    ``theta_bounds`` is (low, high) in log theta or None (theta fixed / absent);
    ``variance_bounds`` lists (low, high) of lambda and/or gamma. Each round evaluates a
    ``points``-per-axis grid and shrinks every axis to the neighbours of the best point.
    Returns (theta, combo (1, 2), deviance).
    """
    bounds = ([theta_bounds] if theta_bounds is not None else []) + list(variance_bounds)
    best = None
    for _ in range(rounds):
        axes = [np.linspace(low, high, points) if high > low else np.array([low]) for low, high in bounds]
        pos = 0
        if theta_bounds is not None:
            thetas, pos = np.exp(axes[0]), 1
        else:
            thetas = np.array([np.nan])
        lam = axes[pos] if variance.random_intercept else np.zeros(1)
        gam = axes[pos + int(variance.random_intercept)] if variance.heteroscedastic else np.zeros(1)
        combos = np.stack(np.meshgrid(lam, gam, indexing="ij"), axis=-1).reshape(-1, 2)
        deviance = _evaluate(data, model, thetas, combos).deviance  # (L, G)
        l_best, g_best = np.unravel_index(np.argmin(deviance), deviance.shape)
        i_lam, i_gam = divmod(int(l_best), gam.size)
        best = (float(thetas[g_best]), combos[l_best:l_best + 1].copy(), float(deviance[l_best, g_best]))
        chosen = ([g_best] if theta_bounds is not None else []) + (
            [i_lam] if variance.random_intercept else []) + ([i_gam] if variance.heteroscedastic else [])
        bounds = [(ax[max(i - 1, 0)], ax[min(i + 1, ax.size - 1)]) for ax, i in zip(axes, chosen)]
    return best


def fit_trajectory(data: TrajectoryData, model, *, variance: VarianceModel = INDEPENDENT, grid=None,
                   level: float = 0.95, intervals: bool = True, refine: bool = True) -> TrajectoryFit:
    """Maximum-likelihood fit of a trajectory model with profile-likelihood intervals.

    Parameters
    ----------
    data : TrajectoryData
        From :func:`prepare_data`.
    model : str or TrajectoryModel
        ``exponential``, ``poisson``, ``linear``, ``quadratic``, ``cubic`` (or ``constant``).
    variance : VarianceModel
        Residual structure (random intercept and/or log-linear sigma), ML.
    grid : array, optional
        Grid of the nonlinear parameter (default: the model's log-spaced grid). Intervals that
        reach its ends are open-ended; an estimate at its end is listed in ``at_bound``.
    level : float
        Confidence level of the intervals.
    intervals : bool
        Compute profile intervals (skip for bootstrap replicates).
    refine : bool
        Refine the grid optimum continuously (skip for fast bootstrap replicates).

    Returns
    -------
    TrajectoryFit

    Notes
    -----
    Parameters counted in AICc/BIC: intercept, age coefficients, the nonlinear parameter,
    covariate effects and the variance parameters (sigma, lambda, gamma as used). n in AICc/BIC
    is the number of scans.

    References
    ----------
    Venzon & Moolgavkar 1988; Bates & Watts 1988; Hurvich & Tsai 1989 (see module docstring).
    """
    model = model if isinstance(model, TrajectoryModel) else (CONSTANT if model == "constant" else get_model(model))
    n = data.n_scans
    needed = minimum_scans(model, data, variance)
    if n < needed:
        raise ValueError(f"{model.name} needs at least {needed} scans, got {n}")
    thetas = model.grid() if grid is None else np.asarray(grid, dtype=np.float64)
    if model.is_nonlinear and (thetas.ndim != 1 or thetas.size < 3 or np.any(np.diff(thetas) <= 0) or thetas[0] <= 0):
        raise ValueError("grid must be increasing, positive, with at least 3 values")
    if not model.is_nonlinear:
        thetas = np.array([np.nan])
    combos = variance.combinations()
    grid_eval = _evaluate(data, model, thetas, combos, coefficients=intervals)
    l_best, g_best = np.unravel_index(np.argmin(grid_eval.deviance), grid_eval.deviance.shape)
    warnings_, at_bound = [], []

    # continuous refinement of (log theta, lambda, gamma) around the grid optimum
    bounds, start = _variance_bounds(variance, int(l_best))
    theta_hat = thetas[g_best]
    if model.is_nonlinear:
        bounds = [(np.log(thetas[max(g_best - 1, 0)]), np.log(thetas[min(g_best + 1, thetas.size - 1)]))] + bounds
        start = [np.log(theta_hat)] + start
    combo_hat = combos[l_best:l_best + 1]
    deviance_hat = float(grid_eval.deviance[l_best, g_best])
    if refine and len(bounds) == 1 and model.is_nonlinear:
        result = optimize.minimize_scalar(
            lambda x: float(_evaluate(data, model, [np.exp(x)], combo_hat).deviance[0, 0]),
            bounds=bounds[0], method="bounded", options={"xatol": 1e-9})
        if result.fun <= deviance_hat:
            theta_hat, deviance_hat = float(np.exp(result.x)), float(result.fun)
    elif refine and bounds:
        theta_bounds = bounds[0] if model.is_nonlinear else None
        theta_new, combo_new, value = _zoom(data, model, variance, theta_bounds,
                                            bounds[1:] if model.is_nonlinear else bounds)
        if value <= deviance_hat:
            deviance_hat, combo_hat = value, combo_new
            if model.is_nonlinear:
                theta_hat = theta_new

    if model.is_nonlinear and g_best in (0, thetas.size - 1):
        side = "lower" if g_best == 0 else "upper"
        at_bound.append(f"{model.nonlinear_name} at the {side} grid bound ({thetas[g_best]:g} {model.nonlinear_units})")
    lam_axis, gam_axis = variance.axes()
    if variance.random_intercept and lam_axis.size > 1 and combo_hat[0, 0] >= lam_axis[-1]:
        at_bound.append(f"random-intercept variance ratio at the grid bound ({lam_axis[-1]:g})")
    if variance.heteroscedastic and gam_axis.size > 1 and abs(combo_hat[0, 1]) >= max(abs(gam_axis[0]), abs(gam_axis[-1])):
        at_bound.append(f"log-sigma slope at the grid bound ({combo_hat[0, 1]:g}/year)")

    final = _evaluate(data, model, [theta_hat], combo_hat, coefficients=True)
    names = _parameter_names(data, model)
    beta = final.coefficients[0, 0]
    parameters = dict(zip(names, map(float, beta)))
    if model.is_nonlinear:
        parameters[model.nonlinear_name] = float(theta_hat)
    rss_w = float(final.rss[0, 0])
    sigma2 = rss_w / n
    p_mean = model.n_mean_parameters + data.covariates.shape[1]
    k = p_mean + variance.n_parameters
    design = _fixed_design(data, model)
    if model.is_nonlinear:
        design = np.concatenate([design[:, :1], model.columns(data.age, theta_hat), design[:, 1:]], axis=1)
    fitted = design @ beta
    residual = data.y - fitted
    total = float(np.sum((data.y - data.y.mean()) ** 2))
    r2 = 1.0 - float(residual @ residual) / total if total > 0 else np.nan
    aicc = deviance_hat + 2 * k + (2 * k * (k + 1) / (n - k - 1) if n - k - 1 > 0 else np.inf)
    bic = deviance_hat + k * np.log(n)
    if not np.all(np.isfinite(beta)):
        warnings_.append("coefficients not identified at the estimate (collinear columns)")

    fit = TrajectoryFit(
        model=model, variance=variance, parameters=parameters, intervals={}, derived={}, derived_intervals={},
        sigma=float(np.sqrt(sigma2)), random_intercept_sd=float(np.sqrt(combo_hat[0, 0] * sigma2)),
        gamma=float(combo_hat[0, 1]), deviance=deviance_hat, n_scans=n, n_subjects=data.n_subjects,
        n_parameters=k, r2=r2, aicc=float(aicc), bic=float(bic), age_reference=float(data.age.mean()),
        age_range=(float(data.age.min()), float(data.age.max())), theta_grid=thetas,
        profile=grid_eval.deviance.min(axis=0), cut=small_sample_cut(n, p_mean, level),
        covariate_names=data.covariate_names, at_bound=at_bound, warnings=warnings_)
    fit.derived = model.derived(parameters, fit.age_range)
    if intervals:
        _add_intervals(fit, data, grid_eval, variance)
    return fit


def _profile_at(data, model, variance, theta, combos) -> float:
    """Profile deviance at one value of the nonlinear parameter (variance parameters maximised)."""
    values = _evaluate(data, model, [theta], combos).deviance[:, 0]
    l_best = int(np.argmin(values))
    bounds, _ = _variance_bounds(variance, l_best)
    if not bounds:
        return float(values[l_best])
    _, _, value = _zoom(data, model, variance, (np.log(theta), np.log(theta)), bounds)
    return min(value, float(values[l_best]))


def _add_intervals(fit: TrajectoryFit, data, grid_eval: _Grid, variance: VarianceModel) -> None:
    threshold = fit.deviance + fit.cut
    model = fit.model
    names = _parameter_names(data, model)
    # linear parameters: union over the grid of {beta: deviance(beta | theta, v) <= threshold}
    rss_limit = np.exp((threshold - grid_eval.offset) / data.n_scans)[:, None]  # (L, 1)
    slack = rss_limit - grid_eval.rss
    inside = slack >= 0
    for j, name in enumerate(names):
        centre = grid_eval.coefficients[..., j]
        with np.errstate(invalid="ignore"):
            half = np.sqrt(np.where(inside, slack, 0.0) * grid_eval.scale[..., j])
        ok = inside & np.isfinite(centre) & np.isfinite(half)
        if not np.any(ok):
            fit.intervals[name] = Interval(np.nan, np.nan, "both")
            continue
        low, high = float(np.min((centre - half)[ok])), float(np.max((centre + half)[ok]))
        fit.intervals[name] = Interval(min(low, fit.parameters[name]), max(high, fit.parameters[name]))
    if not model.is_nonlinear:
        return
    thetas = grid_eval.thetas
    profile = grid_eval.deviance.min(axis=0)
    below = np.flatnonzero(profile <= threshold)
    if below.size == 0:  # the refined optimum lies between grid points: the interval is within one step
        below = np.array([int(np.argmin(np.abs(np.log(thetas / fit.parameters[model.nonlinear_name]))))])
    combos = grid_eval.combos

    def excess(log_theta):
        return _profile_at(data, model, variance, float(np.exp(log_theta)), combos) - threshold

    theta_hat = fit.parameters[model.nonlinear_name]
    limits, open_sides = [], []
    for side, index, neighbour in (("low", below[0], below[0] - 1), ("high", below[-1], below[-1] + 1)):
        if neighbour < 0 or neighbour >= thetas.size:
            open_sides.append(side)
            limits.append(np.nan)
            continue
        inner = np.log(theta_hat) if (side == "low" and thetas[index] > theta_hat) or (
            side == "high" and thetas[index] < theta_hat) else np.log(thetas[index])
        outer = np.log(thetas[neighbour])
        if excess(inner) > 0:
            inner = np.log(theta_hat)
        if excess(outer) <= 0:  # discretisation of the variance grid: step outward once more
            limits.append(float(thetas[neighbour]))
            continue
        limits.append(float(np.exp(optimize.brentq(excess, inner, outer, xtol=1e-8))))
    open_flag = "both" if len(open_sides) == 2 else (open_sides[0] if open_sides else "")
    theta_interval = Interval(limits[0], limits[1], open_flag)
    fit.intervals[model.nonlinear_name] = theta_interval
    if model.name == "exponential":  # age90 = ln 10 / b is decreasing in b
        from .models import LN10

        flip = {"": "", "low": "high", "high": "low", "both": "both"}[open_flag]
        fit.derived_intervals["age90"] = Interval(LN10 / theta_interval.high if np.isfinite(theta_interval.high) else np.nan,
                                                  LN10 / theta_interval.low if np.isfinite(theta_interval.low) else np.nan,
                                                  flip)
    elif model.name == "poisson":
        fit.derived_intervals["extremum_age"] = Interval(theta_interval.low, theta_interval.high, open_flag)

