"""Synthetic ROI tables with known trajectories, for validating the group statistics."""
from __future__ import annotations

import numpy as np

from .models import get_model
from .profile import TrajectoryData, prepare_data


def simulate_cohort(truth: dict, *, n_scans: int = 100, age_range=(1.0, 80.0), sigma: float = 0.01,
                    gamma: float = 0.0, n_subjects: int | None = None, random_intercept_sd: float = 0.0,
                    follow_up=(1.0, 5.0), sex_effect: float = 0.0, rng=None) -> TrajectoryData:
    """Draw one cohort from a trajectory with Gaussian noise.

    Parameters
    ----------
    truth : dict
        ``{"model": name, <parameters>}`` as :data:`qsmflow.simulate.TRUE_TRAJECTORIES`, or
        ``{"model": "constant", "c": value}`` for no age effect.
    n_scans : int
        Total scans.
    age_range : (low, high)
        Baseline ages are uniform on this range.
    sigma : float
        Residual SD at the mean age of the range.
    gamma : float
        Log-SD slope (1/year): SD(age) = sigma exp(gamma (age - mid-range)).
    n_subjects : int, optional
        Fewer subjects than scans makes the cohort longitudinal: the first
        ``n_scans - n_subjects`` subjects get a second scan ``follow_up`` years later (uniform).
    random_intercept_sd : float
        SD of a subject random intercept (scaled like the residual at each age).
    sex_effect : float
        Additive effect of sex "M" (sex is drawn at random).
    rng : numpy Generator or int seed
    """
    rng = np.random.default_rng(rng)
    n_subjects = n_scans if n_subjects is None else int(n_subjects)
    if not 0 < n_subjects <= n_scans <= 2 * n_subjects:
        raise ValueError("need n_subjects <= n_scans <= 2 n_subjects")
    baseline = rng.uniform(age_range[0], age_range[1], n_subjects)
    repeats = np.ones(n_subjects, dtype=int)
    repeats[: n_scans - n_subjects] = 2
    subjects = np.repeat(np.arange(n_subjects), repeats)
    age = baseline[subjects].copy()
    second = np.concatenate([[False], subjects[1:] == subjects[:-1]])
    age[second] += rng.uniform(follow_up[0], follow_up[1], int(second.sum()))
    sex = rng.choice(np.array(["F", "M"]), n_subjects)[subjects]
    if truth["model"] == "constant":
        mean = np.full(n_scans, float(truth["c"]))
    else:
        mean = get_model(truth["model"]).curve(age, truth)
    scale = sigma * np.exp(gamma * (age - 0.5 * (age_range[0] + age_range[1])))
    u = rng.standard_normal(n_subjects)[subjects] * random_intercept_sd / max(sigma, 1e-300)
    y = mean + sex_effect * (sex == "M") + scale * (rng.standard_normal(n_scans) + u)
    covariates = {"sex": sex} if sex_effect else None
    return prepare_data(y, age, subjects=[f"s{s}" for s in subjects], covariates=covariates)
