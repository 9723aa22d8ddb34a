"""Group statistics: trajectory models, profile likelihood, bootstrap and normative centiles.

Pure functions on arrays and tables; no nipype and no file I/O.

* :mod:`.models` — exponential, Poisson, linear, quadratic, cubic curves (registry ``MODELS``).
* :mod:`.profile` — ML fits profiling the nonlinear parameter on a grid, variance structures
  (subject random intercept, log-linear sigma), profile-likelihood intervals, R², AICc, BIC.
* :mod:`.inference` — age-effect test (parametric-bootstrap LRT), subject bootstrap bands,
  Benjamini-Hochberg.
* :mod:`.normative` — centiles and (held-out) z-scores.
* :mod:`.simulation` — synthetic cohorts with known trajectories.
"""
from .inference import age_effect_test, benjamini_hochberg, bootstrap_curves, curve_band
from .models import MODELS, get_model
from .normative import CENTILES, fit_normative, held_out_zscores, zscore_centile
from .profile import Interval, TrajectoryData, TrajectoryFit, VarianceModel, fit_trajectory, prepare_data

__all__ = ["MODELS", "CENTILES", "Interval", "TrajectoryData", "TrajectoryFit", "VarianceModel", "age_effect_test",
           "benjamini_hochberg", "bootstrap_curves", "curve_band", "fit_normative", "fit_trajectory", "get_model",
           "held_out_zscores", "prepare_data", "zscore_centile"]
