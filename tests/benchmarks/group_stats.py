"""Simulation benchmark of the group statistics (qsmflow.stats): coverage, size, selection, z-scores.

Cohorts of n = 100 scans, ages uniform on 1-80 years, Gaussian noise; trajectories resembling
qsmflow.simulate.TRUE_TRAJECTORIES. Prints one table. Targets (issue 11): 95 % profile
intervals of b and B cover the truth in 93.6-96.4 % of >= 1,000 cohorts; the age test rejects
3-7 % of null cohorts at 5 %; held-out z mean 0 +- 0.1, SD 1 +- 0.1, 2.5 +- 1 % per tail.

    nice -n 10 python tests/benchmarks/group_stats.py --cohorts 1000 --workers 2

``--workers 2`` runs half of the cohorts in one extra process.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import multiprocessing  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from qsmflow.stats.inference import age_effect_test  # noqa: E402
from qsmflow.stats.normative import fit_normative, held_out_zscores  # noqa: E402
from qsmflow.stats.profile import VarianceModel, fit_trajectory  # noqa: E402
from qsmflow.stats.simulation import simulate_cohort  # noqa: E402

MODELS = ("exponential", "poisson", "linear", "quadratic", "cubic")
SLOW = {"model": "exponential", "a": 0.12, "b": 0.025, "c": -0.01}  # PU-like
FAST = {"model": "exponential", "a": 0.19, "b": 0.12, "c": 0.0}  # GP-like
POISSON = {"model": "poisson", "A": -0.0023, "B": 30.0, "C": -0.02}  # SCC-like
NULL = {"model": "constant", "c": 0.05}

#: name -> (truth, simulate_cohort keywords, fit variance, parameter whose coverage is counted)
SCENARIOS = {
    "exponential slow (b=0.025)": (SLOW, {"sigma": 0.015}, VarianceModel(), "b"),
    "exponential fast (b=0.12)": (FAST, {"sigma": 0.02}, VarianceModel(), "b"),
    "poisson (B=30)": (POISSON, {"sigma": 0.006}, VarianceModel(), "B"),
    "exponential fast, heteroscedastic": (FAST, {"sigma": 0.015, "gamma": 0.02},
                                          VarianceModel(heteroscedastic=True), "b"),
    "poisson, heteroscedastic": (POISSON, {"sigma": 0.005, "gamma": 0.02}, VarianceModel(heteroscedastic=True), "B"),
    "exponential fast, longitudinal": (FAST, {"sigma": 0.01, "n_subjects": 70, "random_intercept_sd": 0.015},
                                       VarianceModel(random_intercept=True), "b"),
    "poisson, longitudinal": (POISSON, {"sigma": 0.004, "n_subjects": 70, "random_intercept_sd": 0.004},
                              VarianceModel(random_intercept=True), "B"),
}
SELECTION = {"exponential": (FAST, {"sigma": 0.02}), "poisson": (POISSON, {"sigma": 0.006})}


def run_cohort(index: int, seed: int, n_boot: int) -> dict:
    rng = np.random.default_rng([seed, index])
    out = {}
    for name, (truth, keywords, variance, parameter) in SCENARIOS.items():
        data = simulate_cohort(truth, rng=rng, **keywords)
        fit = fit_trajectory(data, truth["model"], variance=variance)
        interval = fit.intervals[parameter]
        out[f"cover:{name}"] = interval.covers(truth[parameter])
        out[f"open:{name}"] = interval.open != ""
    for model in ("exponential", "poisson"):
        data = simulate_cohort(NULL, sigma=0.02, rng=rng)
        out[f"null:{model}"] = age_effect_test(data, model, n_boot=n_boot, seed=index).p_value <= 0.05
    for generating, (truth, keywords) in SELECTION.items():
        data = simulate_cohort(truth, rng=rng, **keywords)
        fits = {m: fit_trajectory(data, m, intervals=False) for m in MODELS}
        out[f"aicc:{generating}"] = min(fits, key=lambda m: fits[m].aicc)
        out[f"bic:{generating}"] = min(fits, key=lambda m: fits[m].bic)
    data = simulate_cohort(FAST, sigma=0.015, gamma=0.02, rng=rng)
    normative = fit_normative(data, "exponential")
    out["z"] = held_out_zscores(data, "exponential", full=normative)
    return out


def _run_many(indices, seed, n_boot):
    return [run_cohort(i, seed, n_boot) for i in indices]


def binomial_interval(k: int, n: int) -> str:
    p = k / n
    return f"{100 * p:5.1f} % (MC SE {100 * np.sqrt(p * (1 - p) / n):.1f})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohorts", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2, choices=(1, 2))
    parser.add_argument("--boot", type=int, default=499, help="bootstrap replicates of the age test")
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args(argv)
    indices = np.arange(args.cohorts)
    start = time.perf_counter()
    if args.workers == 2:
        halves = np.array_split(indices, 2)
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            pending = pool.apply_async(_run_many, (halves[1], args.seed, args.boot))
            results = _run_many(halves[0], args.seed, args.boot) + pending.get()
    else:
        results = _run_many(indices, args.seed, args.boot)
    elapsed = time.perf_counter() - start
    n = len(results)

    print(f"group statistics benchmark: {n} cohorts of 100 scans, ages U(1, 80), {elapsed:.0f} s "
          f"({args.workers} process{'es' if args.workers > 1 else ''})")
    print()
    print(f"{'95 % profile interval coverage':<44} {'coverage':>24}  {'open-ended':>10}")
    for name, (_, _, _, parameter) in SCENARIOS.items():
        covered = sum(r[f"cover:{name}"] for r in results)
        opened = sum(r[f"open:{name}"] for r in results)
        print(f"{name + ' [' + parameter + ']':<44} {binomial_interval(covered, n):>24}  {100 * opened / n:9.1f} %")
    print()
    print(f"{'age test on null cohorts (5 % level)':<44} {'rejection rate':>24}")
    for model in ("exponential", "poisson"):
        rejected = sum(r[f"null:{model}"] for r in results)
        print(f"{model + ' vs constant':<44} {binomial_interval(rejected, n):>24}")
    print()
    print(f"{'model selection (5 candidates)':<44} {'AICc picks truth':>18} {'BIC picks truth':>16}  most frequent other")
    for generating in SELECTION:
        aicc = [r[f"aicc:{generating}"] for r in results]
        bic = [r[f"bic:{generating}"] for r in results]
        others = [m for m in aicc if m != generating]
        other = max(set(others), key=others.count) if others else "-"
        print(f"{'generated by ' + generating:<44} {100 * aicc.count(generating) / n:17.1f} % "
              f"{100 * bic.count(generating) / n:15.1f} %  {other}")
    z = np.concatenate([r["z"] for r in results])
    z = z[np.isfinite(z)]
    print()
    print("held-out (leave-one-subject-out) z, heteroscedastic exponential cohorts")
    print(f"  scans {z.size}: mean {z.mean():+.3f}  SD {z.std(ddof=1):.3f}  "
          f"below -1.96 {100 * np.mean(z < -1.959964):.2f} %  above +1.96 {100 * np.mean(z > 1.959964):.2f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
