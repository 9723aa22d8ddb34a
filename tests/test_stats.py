"""Group statistics (qsmflow.stats): analytic cases, library cross-checks and small simulations."""
import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
import statsmodels.formula.api as smf
from scipy import optimize, stats

from qsmflow.stats.inference import (age_effect_test, benjamini_hochberg, bootstrap_curves, curve_band,
                                     resample_subjects)
from qsmflow.stats.models import LN10, MODELS, get_model
from qsmflow.stats.normative import fit_normative, held_out_zscores, zscore_centile
from qsmflow.stats.profile import (Interval, VarianceModel, fit_trajectory, prepare_data, small_sample_cut)
from qsmflow.stats.simulation import simulate_cohort

FAST = {"model": "exponential", "a": 0.19, "b": 0.12, "c": 0.0}
POISSON = {"model": "poisson", "A": -0.0023, "B": 30.0, "C": -0.02}


def binomial_band(p: float, n: int, k: float = 3.0):
    sd = np.sqrt(p * (1 - p) / n)
    return p - k * sd, p + k * sd


@pytest.mark.parametrize("name", sorted(MODELS))
def test_noiseless_data_are_fitted_exactly(name):
    age = np.linspace(1, 80, 60)
    truth = {"exponential": FAST, "poisson": POISSON,
             "linear": {"model": "linear", "b0": 0.01, "b1": 0.001},
             "quadratic": {"model": "quadratic", "b0": 0.01, "b1": 0.002, "b2": -2e-5},
             "cubic": {"model": "cubic", "b0": 0.01, "b1": 0.002, "b2": -4e-5, "b3": 2e-7}}[name]
    model = get_model(name)
    y = model.curve(age, truth) + np.random.default_rng(0).normal(0, 1e-9, age.size)
    fit = fit_trajectory(prepare_data(y, age), name)
    for key in (model.intercept_name, *model.coefficient_names) + ((model.nonlinear_name,) if model.is_nonlinear else ()):
        assert fit.parameters[key] == pytest.approx(truth[key], rel=1e-4, abs=1e-7)
    assert fit.r2 > 0.999999


def test_linear_interval_is_the_exact_t_interval():
    rng = np.random.default_rng(1)
    age = rng.uniform(1, 80, 40)
    sex = rng.choice(["F", "M"], 40)
    y = 0.01 + 0.002 * age + 0.01 * (sex == "M") + rng.normal(0, 0.02, 40)
    fit = fit_trajectory(prepare_data(y, age, covariates={"sex": sex}), "linear")
    ols = sm.OLS(y, sm.add_constant(np.column_stack([age, sex == "M"]).astype(float))).fit()
    low, high = ols.conf_int(0.05)[1]
    assert fit.intervals["b1"].low == pytest.approx(low, rel=1e-6)
    assert fit.intervals["b1"].high == pytest.approx(high, rel=1e-6)
    assert fit.parameters["sex[M]"] == pytest.approx(ols.params[2], rel=1e-8)
    assert fit.deviance == pytest.approx(-2 * ols.llf, rel=1e-10)
    k = 4  # b0, b1, sex, sigma
    assert fit.aicc == pytest.approx(-2 * ols.llf + 2 * k + 2 * k * (k + 1) / (40 - k - 1))
    assert fit.bic == pytest.approx(-2 * ols.llf + k * np.log(40))


def test_exponential_profile_interval_end_points_sit_on_the_small_sample_cut():
    data = simulate_cohort(FAST, sigma=0.02, rng=3)
    fit = fit_trajectory(data, "exponential")
    design = lambda b: np.column_stack([np.ones(data.n_scans), -np.expm1(-b * data.age)])  # noqa: E731
    rss = lambda b: float(np.sum((data.y - design(b) @ np.linalg.lstsq(design(b), data.y, rcond=None)[0]) ** 2))  # noqa: E731
    direct = optimize.minimize_scalar(lambda lb: rss(np.exp(lb)), bounds=(np.log(0.01), np.log(2)), method="bounded",
                                      options={"xatol": 1e-10})
    assert fit.parameters["b"] == pytest.approx(np.exp(direct.x), rel=1e-3)
    ratio = 1 + stats.f.ppf(0.95, 1, data.n_scans - 3) / (data.n_scans - 3)
    interval = fit.intervals["b"]
    for end in (interval.low, interval.high):
        assert rss(end) / direct.fun == pytest.approx(ratio, rel=1e-6)
    assert fit.derived["age90"] == pytest.approx(LN10 / fit.parameters["b"])
    assert fit.derived_intervals["age90"].low == pytest.approx(LN10 / interval.high)
    assert fit.cut == pytest.approx(data.n_scans * np.log(ratio))


def test_unidentified_rate_gives_an_open_ended_interval():
    rng = np.random.default_rng(4)
    age = rng.uniform(1, 80, 60)
    y = 0.001 * age + rng.normal(0, 0.02, 60)  # straight line: b -> 0 fits as well as any small b
    fit = fit_trajectory(prepare_data(y, age), "exponential")
    assert fit.intervals["b"].open in ("low", "both")
    assert fit.intervals["b"].covers(1e-6)
    assert Interval(1.0, 2.0, "").covers(1.5) and not Interval(1.0, 2.0, "").covers(2.5)


@pytest.mark.filterwarnings("ignore::statsmodels.tools.sm_exceptions.ConvergenceWarning")
def test_random_intercept_likelihood_matches_statsmodels_mixedlm_ml():
    rng = np.random.default_rng(5)
    subjects = np.repeat(np.arange(30), [1, 2, 3] * 10)
    age = rng.uniform(5, 80, 30)[subjects] + rng.uniform(0, 3, subjects.size)
    y = 0.001 * age + rng.normal(0, 0.02, 30)[subjects] + rng.normal(0, 0.01, subjects.size)
    fit = fit_trajectory(prepare_data(y, age, subjects=subjects), "linear", variance=VarianceModel(random_intercept=True))
    mixed = smf.mixedlm("y ~ age", pd.DataFrame({"y": y, "age": age, "s": subjects}), groups="s").fit(reml=False)
    assert fit.loglik == pytest.approx(mixed.llf, abs=1e-4)
    assert fit.parameters["b1"] == pytest.approx(mixed.params["age"], rel=1e-3)
    assert fit.random_intercept_sd == pytest.approx(np.sqrt(mixed.cov_re.values[0, 0]), rel=1e-2)
    assert fit.n_parameters == 4  # b0, b1, sigma, random-intercept variance


def test_heteroscedastic_likelihood_matches_direct_maximisation():
    rng = np.random.default_rng(6)
    age = rng.uniform(1, 80, 80)
    y = 0.01 + 0.001 * age + rng.normal(0, 1, 80) * 0.01 * np.exp(0.02 * (age - age.mean()))
    fit = fit_trajectory(prepare_data(y, age), "linear", variance=VarianceModel(heteroscedastic=True))

    def negative_loglik(x):
        sd = np.exp(x[2] + x[3] * (age - age.mean()))
        return -np.sum(stats.norm.logpdf(y, x[0] + x[1] * age, sd))

    direct = optimize.minimize(negative_loglik, [0.0, 0.0, np.log(0.01), 0.0], method="Nelder-Mead",
                               options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000})
    assert fit.loglik == pytest.approx(-direct.fun, abs=1e-4)
    assert fit.gamma == pytest.approx(direct.x[3], abs=2e-4)


def test_profile_intervals_cover_at_the_nominal_rate():
    n_cohorts = 150
    rng = np.random.default_rng(7)
    covered = {"b": 0, "B": 0}
    for _ in range(n_cohorts):
        covered["b"] += fit_trajectory(simulate_cohort(FAST, sigma=0.02, rng=rng), "exponential").intervals["b"].covers(0.12)
        covered["B"] += fit_trajectory(simulate_cohort(POISSON, sigma=0.006, rng=rng), "poisson").intervals["B"].covers(30.0)
    low, high = binomial_band(0.95, n_cohorts)
    for name, count in covered.items():
        assert low <= count / n_cohorts <= high, (name, count)


def test_age_test_has_its_size_on_null_data_and_power_on_real_trends():
    n_cohorts = 150
    rng = np.random.default_rng(8)
    null = {"model": "constant", "c": 0.05}
    rejected = sum(age_effect_test(simulate_cohort(null, sigma=0.02, rng=rng), "exponential", n_boot=199,
                                   seed=i).p_value <= 0.05 for i in range(n_cohorts))
    low, high = binomial_band(0.05, n_cohorts)
    assert low <= rejected / n_cohorts <= high
    assert age_effect_test(simulate_cohort(FAST, sigma=0.02, rng=rng), "exponential", n_boot=199).p_value < 0.01
    linear = age_effect_test(simulate_cohort(FAST, sigma=0.02, rng=rng), "linear")
    assert linear.method == "exact F test" and linear.p_value < 0.01


def test_age_test_with_random_intercept_runs_the_parametric_bootstrap():
    data = simulate_cohort({"model": "constant", "c": 0.0}, sigma=0.01, n_scans=40, n_subjects=25,
                           random_intercept_sd=0.01, rng=9)
    result = age_effect_test(data, "poisson", variance=VarianceModel(random_intercept=True), n_boot=19)
    assert result.method == "parametric bootstrap LRT" and 0.05 <= result.p_value <= 1.0


def test_benjamini_hochberg_matches_the_step_up_rule():
    p = np.array([0.01, 0.04, 0.03, np.nan, 0.20])
    q = benjamini_hochberg(p)
    ranked = np.array([0.01, 0.03, 0.04, 0.20])
    expected = np.minimum.accumulate((ranked * 4 / np.arange(1, 5))[::-1])[::-1]
    assert np.allclose(q[[0, 2, 1, 4]], expected) and np.isnan(q[3])


def test_subject_bootstrap_keeps_sessions_together_and_bands_cover_the_curve():
    data = simulate_cohort(FAST, sigma=0.02, n_subjects=70, random_intercept_sd=0.01, rng=10)
    sample = resample_subjects(data, np.random.default_rng(0))
    assert sample.n_scans >= sample.n_subjects == data.n_subjects
    for subject in range(sample.n_subjects):
        ages = np.sort(sample.age[sample.subjects == subject])
        assert any(np.array_equal(ages, np.sort(data.age[data.subjects == s])) for s in range(data.n_subjects))
    ages = np.array([40.0, 60.0])
    rng = np.random.default_rng(12)
    cohort = dict(sigma=0.02, n_subjects=70, random_intercept_sd=0.01)
    spread = lambda x: np.subtract(*np.nanpercentile(x, [75, 25], axis=0))  # noqa: E731
    truth_spread = spread([fit_trajectory(simulate_cohort(FAST, rng=rng, **cohort), "exponential",
                                          intervals=False).curve(ages) for _ in range(100)])
    ratios = []
    for _ in range(3):
        curves = bootstrap_curves(simulate_cohort(FAST, rng=rng, **cohort), "exponential", ages, n_boot=200, seed=1)
        ratios.append(spread(curves) / truth_spread)
        low, high = curve_band(curves)
        assert np.all(high - low > 0)
    assert np.all((0.75 < np.mean(ratios, axis=0)) & (np.mean(ratios, axis=0) < 1.33))


def test_held_out_zscores_are_standard_normal():
    rng = np.random.default_rng(11)
    z = np.concatenate([held_out_zscores(simulate_cohort(FAST, sigma=0.015, gamma=0.02, rng=rng), "exponential")
                        for _ in range(12)])
    assert abs(z.mean()) < 0.1 and abs(z.std() - 1) < 0.1
    for tail in (np.mean(z < -1.96), np.mean(z > 1.96)):
        assert 0.01 <= tail <= 0.045
    normative = fit_normative(simulate_cohort(FAST, sigma=0.015, gamma=0.02, n_scans=300, rng=rng), "exponential")
    assert normative.gamma == pytest.approx(0.02, abs=0.01)
    centiles = normative.centiles([10.0, 70.0])
    assert np.all(np.diff(centiles, axis=0) > 0)
    assert (centiles[-1, 1] - centiles[0, 1]) > (centiles[-1, 0] - centiles[0, 0])  # spread grows with age
    assert zscore_centile([0.0])[0] == pytest.approx(50.0)


def test_small_cohorts_and_bad_tables_are_refused_with_reasons():
    with pytest.raises(ValueError, match="needs at least"):
        fit_trajectory(prepare_data([0.1, 0.2, 0.3, 0.1], [10, 20, 30, 40]), "exponential")
    with pytest.raises(ValueError, match="missing"):
        prepare_data([0.1, 0.2], [10, 20], covariates={"sex": ["F", "n/a"]})
    with pytest.raises(ValueError, match="ages"):
        prepare_data([0.1, 0.2], [10])
    with pytest.raises(ValueError, match="unknown trajectory model"):
        get_model("sigmoid")
    assert small_sample_cut(100, 3) == pytest.approx(100 * np.log1p(stats.f.ppf(0.95, 1, 97) / 97))
