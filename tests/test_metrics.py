import numpy as np

from qsmflow import metrics


def _phantom():
    truth = np.zeros((40, 40, 40))
    truth[10:30, 10:30, 10:30] = 0.1
    truth[15:20, 15:20, 15:20] = 0.3
    mask = np.zeros(truth.shape, bool)
    mask[5:35, 5:35, 5:35] = True
    return truth, mask


def test_perfect_and_empty_estimates():
    truth, mask = _phantom()
    for shifted in (truth, truth + 0.05):  # a constant offset is not an error (reference is arbitrary)
        assert metrics.nrmse(shifted, truth, mask) < 1e-9
        assert metrics.hfen(truth, truth, mask) < 1e-9
        assert abs(metrics.xsim(shifted, truth, mask) - 1) < 1e-9
        assert abs(metrics.correlation(shifted, truth, mask) - 1) < 1e-9
    assert abs(metrics.nrmse(np.zeros_like(truth), truth, mask) - 100) < 1e-9
    assert abs(metrics.nrmse(0.5 * truth, truth, mask) - 50) < 1e-9
    assert metrics.xsim(np.zeros_like(truth), truth, mask) < 0.01


def test_noise_degrades_every_metric_monotonically():
    truth, mask = _phantom()
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(truth.shape)
    low, high = (metrics.score(truth + sigma * noise, truth, mask) for sigma in (0.01, 0.05))
    assert low["nrmse"] < high["nrmse"] and low["hfen"] < high["hfen"]
    assert low["xsim"] > high["xsim"] and low["correlation"] > high["correlation"]
