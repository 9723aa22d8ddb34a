"""One ROI's complete analysis: every candidate model, its test and bands, the normative model.

:func:`analyse_roi` is what the group level runs per ROI; its result is plain data (dicts,
lists, floats) ready for JSON and tables. Model choice follows Burnham & Anderson (2002): AICc
and BIC computed with every parameter counted, the preferred model is the one with the lowest
value, and the differences are reported.

References
----------
Burnham KP, Anderson DR. Model Selection and Multimodel Inference. Springer 2002.
Li W, et al. Hum Brain Mapp 2014;35:2698-2713 (exponential and Poisson lifespan trajectories).
Bethlehem RAI, et al. Nature 2022;604:525-533 (normative centiles).
"""
from __future__ import annotations

import math

import numpy as np

from .inference import age_effect_test, bootstrap_curves, curve_band
from .models import get_model
from .normative import CENTILES, fit_normative, held_out_zscores, zscore_centile
from .profile import VarianceModel, fit_trajectory, minimum_scans, prepare_data


def _clean(value):
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _interval(interval) -> dict:
    return {"low": _clean(interval.low), "high": _clean(interval.high), "open": interval.open}


def analyse_roi(values, ages, subjects, *, covariates: dict | None = None, models=("exponential", "linear"),
                random_intercept: bool = True, heteroscedastic: bool = False, normative_model: str = "aicc",
                grid_points: int = 161, level: float = 0.95, n_bands: int = 200, n_test: int = 999,
                n_test_structured: int = 199, seed: int = 0, age_points: int = 100, held_out: bool = True) -> dict:
    """Fit every candidate model to one ROI, test the age effect, draw bands, fit centiles.

    Parameters
    ----------
    values, ages, subjects : sequences (one entry per scan)
    covariates : dict name -> sequence, optional
    models : sequence of str
        Candidates (:data:`qsmflow.stats.models.MODELS`); the first is the primary model.
    random_intercept : bool
        Use a subject random intercept when some subject has several scans.
    heteroscedastic : bool
        Trajectory fits with log sigma linear in age.
    normative_model : {"aicc", "bic", "primary"}
        Which fitted model gives the centiles' mean curve.
    grid_points : int
        Points of the nonlinear parameter's grid.
    level : float
        Confidence level.
    n_bands, n_test, n_test_structured : int
        Subject-bootstrap replicates of the bands; parametric-bootstrap replicates of the age
        test with independent errors, and with a random intercept or heteroscedastic sigma.
    seed : int
    age_points : int
        Ages (evenly spaced over the observed range) at which curves, bands and centiles are given.
    held_out : bool
        Compute leave-one-subject-out z-scores.

    Returns
    -------
    dict with ``n_scans``, ``n_subjects``, ``variance``, ``ages``, ``models`` (name -> results),
    ``skipped`` (name -> reason), ``preferred_aicc``, ``preferred_bic``, ``normative``.
    """
    data = prepare_data(values, ages, subjects=subjects, covariates=covariates)
    variance = VarianceModel(random_intercept=bool(random_intercept and data.longitudinal),
                             heteroscedastic=bool(heteroscedastic))
    structured = variance.random_intercept or variance.heteroscedastic
    grid_ages = np.linspace(data.age.min(), data.age.max(), age_points)
    result = {"n_scans": data.n_scans, "n_subjects": data.n_subjects, "longitudinal": data.longitudinal,
              "variance": variance.describe(), "covariates": list(data.covariate_names),
              "ages": grid_ages.tolist(), "models": {}, "skipped": {}, "order": list(models)}
    fits = {}
    for index, name in enumerate(models):
        model = get_model(name)
        needed = minimum_scans(model, data, variance)
        if data.n_scans < needed:
            result["skipped"][name] = f"{data.n_scans} scans; {name} needs at least {needed}"
            continue
        if data.n_subjects < 4:
            result["skipped"][name] = f"{data.n_subjects} subjects; at least 4 are needed"
            continue
        grid = model.grid(points=grid_points) if model.is_nonlinear else None
        try:
            fit = fit_trajectory(data, model, variance=variance, grid=grid, level=level)
        except (ValueError, np.linalg.LinAlgError) as error:
            result["skipped"][name] = f"fit failed: {error}"
            continue
        try:
            test = age_effect_test(data, model, variance=variance, grid=grid,
                                   n_boot=n_test_structured if structured else n_test, seed=seed + index)
        except (ValueError, np.linalg.LinAlgError) as error:
            result["skipped"][name] = f"age test failed: {error}"
            continue
        fits[name] = fit
        curves = bootstrap_curves(data, model, grid_ages, variance=variance, grid=grid, n_boot=n_bands,
                                  seed=seed + 1000 + index)
        band_low, band_high = curve_band(curves, level) if n_bands else (np.full(age_points, np.nan),) * 2
        failed = int(np.sum(~np.isfinite(curves).all(axis=1))) if n_bands else 0
        parameters = {k: _clean(v) for k, v in fit.parameters.items()}
        result["models"][name] = {
            "formula": model.formula, "nonlinear": model.nonlinear_name,
            "parameters": parameters,
            "intervals": {k: _interval(v) for k, v in fit.intervals.items()},
            "derived": {k: _clean(v) for k, v in fit.derived.items()},
            "derived_intervals": {k: _interval(v) for k, v in fit.derived_intervals.items()},
            "sigma": fit.sigma, "random_intercept_sd": fit.random_intercept_sd, "gamma": fit.gamma,
            "loglik": fit.loglik, "n_parameters": fit.n_parameters, "r2": _clean(fit.r2),
            "aicc": _clean(fit.aicc), "bic": _clean(fit.bic),
            "p_age": float(test.p_value), "p_method": test.method, "lr_statistic": float(test.statistic),
            "test_replicates": test.n_boot,
            "at_bound": list(fit.at_bound), "warnings": list(fit.warnings) + (
                [f"{failed} of {n_bands} bootstrap replicates could not be fitted"] if failed else []),
            "curve": fit.curve(grid_ages).tolist(),
            "band_low": [_clean(v) for v in band_low], "band_high": [_clean(v) for v in band_high],
        }
    if fits:
        aicc = {k: f.aicc for k, f in fits.items()}
        bic = {k: f.bic for k, f in fits.items()}
        result["preferred_aicc"] = min(aicc, key=aicc.get)
        result["preferred_bic"] = min(bic, key=bic.get)
        for name in fits:
            result["models"][name]["delta_aicc"] = aicc[name] - aicc[result["preferred_aicc"]]
            result["models"][name]["delta_bic"] = bic[name] - bic[result["preferred_bic"]]
    else:
        result["preferred_aicc"] = result["preferred_bic"] = None
    result["normative"] = _normative(data, fits, models, normative_model, grid_points, grid_ages, held_out)
    return result


def _normative(data, fits, models, choice, grid_points, grid_ages, held_out) -> dict | None:
    if not fits:
        return None
    if choice == "primary":
        name = models[0] if models[0] in fits else next(iter(fits))
    else:
        key = "aicc" if choice == "aicc" else "bic"
        name = min(fits, key=lambda m: getattr(fits[m], key))
    model = get_model(name)
    grid = model.grid(points=grid_points) if model.is_nonlinear else None
    needed = minimum_scans(model, data, VarianceModel(heteroscedastic=True))
    if data.n_scans < needed:
        return {"model": name, "skipped": f"{data.n_scans} scans; the normative {name} model needs {needed}"}
    normative = fit_normative(data, model, grid=grid)
    z = normative.zscores(data)
    z_out = held_out_zscores(data, model, grid=grid, full=normative) if held_out else np.full(data.n_scans, np.nan)
    return {
        "model": name, "sigma0": normative.sigma0, "gamma": normative.gamma, "age_reference": normative.age_reference,
        "warnings": normative.warnings, "centiles": list(CENTILES),
        "centile_curves": normative.centiles(grid_ages).tolist(),
        "z": [_clean(v) for v in z], "centile": [_clean(v) for v in zscore_centile(z)],
        "z_heldout": [_clean(v) for v in z_out], "centile_heldout": [_clean(v) for v in zscore_centile(z_out)],
    }
