"""Lifespan trajectory models of ROI susceptibility against age.

Every model is a mean curve that is linear in all its parameters but at most one (the
*nonlinear* parameter ``b`` or ``B``), so that, for a fixed nonlinear parameter, the fit is an
exact (generalised) least-squares problem. :mod:`qsmflow.stats.profile` profiles the nonlinear
parameter on a grid.

Models
------
``exponential``  chi = a (1 - exp(-b age)) + c   (deep grey matter iron; Li et al. 2014)
``poisson``      chi = A age exp(-age / B) + C   (white matter myelin; extremum at age B)
``linear``       chi = b0 + b1 age
``quadratic``    chi = b0 + b1 age + b2 age^2
``cubic``        chi = b0 + b1 age + b2 age^2 + b3 age^3

References
----------
Li W, Wu B, Batrachenko A, et al. Differential developmental trajectories of magnetic
susceptibility in human brain gray and white matter over the lifespan. Hum Brain Mapp
2014;35:2698-2713.
Treit S, Naji N, Seres P, et al. R2* and quantitative susceptibility mapping in deep gray matter
of 498 healthy controls from 5 to 90 years. Hum Brain Mapp 2021;42:4597-4610.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: ln(10): a (1 - exp(-b t)) reaches 90 % of its plateau a at t = ln(10) / b.
LN10 = float(np.log(10.0))


@dataclass(frozen=True)
class TrajectoryModel:
    """A mean curve ``intercept + sum_j coef_j * column_j(age; theta)``.

    Attributes
    ----------
    name : str
        Registry key.
    formula : str
        Human-readable formula (for tables and reports).
    intercept_name : str
        Name of the intercept.
    coefficient_names : tuple of str
        Names of the coefficients of the age columns, in column order.
    nonlinear_name : str or None
        Name of the profiled parameter (``b`` or ``B``); None for polynomials.
    nonlinear_units : str
        Units of the nonlinear parameter.
    default_grid : tuple (low, high, points) or None
        Log-spaced default grid of the nonlinear parameter.
    """

    name: str
    formula: str
    intercept_name: str
    coefficient_names: tuple
    nonlinear_name: str | None = None
    nonlinear_units: str = ""
    default_grid: tuple | None = None

    @property
    def is_nonlinear(self) -> bool:
        return self.nonlinear_name is not None

    @property
    def n_mean_parameters(self) -> int:
        """Intercept + coefficients + the nonlinear parameter (covariates not included)."""
        return 1 + len(self.coefficient_names) + int(self.is_nonlinear)

    def grid(self, low: float | None = None, high: float | None = None, points: int | None = None) -> np.ndarray:
        """Log-spaced grid of the nonlinear parameter (the defaults unless overridden)."""
        if not self.is_nonlinear:
            return np.array([np.nan])
        d_low, d_high, d_points = self.default_grid
        low = d_low if low is None else float(low)
        high = d_high if high is None else float(high)
        points = d_points if points is None else int(points)
        if not 0 < low < high or points < 3:
            raise ValueError(f"{self.name}: grid of {self.nonlinear_name} needs 0 < low < high and >= 3 points")
        return np.geomspace(low, high, points)

    def columns(self, age, theta) -> np.ndarray:
        """Age columns for nonlinear parameter value(s) ``theta``.

        Parameters
        ----------
        age : array (n,)
        theta : float or array (G,)
            Ignored by polynomials.

        Returns
        -------
        array (G, n, q) for an array ``theta``, (n, q) for a scalar.
        """
        age = np.asarray(age, dtype=np.float64)
        scalar = np.ndim(theta) == 0
        theta = np.atleast_1d(np.asarray(theta, dtype=np.float64))[:, None]
        if self.name == "exponential":
            cols = (-np.expm1(-theta * age))[..., None]
        elif self.name == "poisson":
            cols = (age * np.exp(-age / theta))[..., None]
        else:
            degree = len(self.coefficient_names)
            powers = np.stack([age ** k for k in range(1, degree + 1)], axis=-1) if degree else age[:, None][:, :0]
            cols = np.broadcast_to(powers, (theta.shape[0],) + powers.shape)
        return cols[0] if scalar else cols

    def curve(self, age, params: dict) -> np.ndarray:
        """Mean curve at ``age`` for a parameter dict (intercept, coefficients, nonlinear)."""
        theta = params[self.nonlinear_name] if self.is_nonlinear else np.nan
        cols = self.columns(age, float(theta))
        coefs = np.array([params[k] for k in self.coefficient_names])
        return params[self.intercept_name] + cols @ coefs

    def derived(self, params: dict, age_range=None) -> dict:
        """Derived quantities with a clear meaning for users.

        ``exponential``: ``age90`` = ln(10)/b, the age at 90 % of the plateau.
        ``poisson``: ``extremum_age`` = B, a minimum if A < 0 (myelination then demyelination).
        polynomials: the first extremum (zero of the derivative) inside ``age_range``.
        """
        if self.name == "exponential":
            return {"age90": LN10 / params["b"]}
        if self.name == "poisson":
            return {"extremum_age": params["B"], "extremum_kind": "minimum" if params["A"] < 0 else "maximum"}
        if self.name in ("linear", "constant"):
            return {}
        coefs = [params[k] for k in self.coefficient_names]
        derivative = np.polynomial.Polynomial([k * c for k, c in enumerate([0.0] + coefs)][1:])
        roots = [r.real for r in derivative.roots() if abs(r.imag) < 1e-12]
        if age_range is not None:
            roots = [r for r in roots if age_range[0] <= r <= age_range[1]]
        if not roots:
            return {"extremum_age": np.nan, "extremum_kind": "none in the age range"}
        root = float(sorted(roots)[0])
        second = derivative.deriv()(root)
        return {"extremum_age": root, "extremum_kind": "minimum" if second > 0 else "maximum"}


MODELS: dict[str, TrajectoryModel] = {
    "exponential": TrajectoryModel(
        "exponential", "a*(1-exp(-b*age))+c", "c", ("a",), "b", "1/year", (1e-3, 5.0, 161)),
    "poisson": TrajectoryModel(
        "poisson", "A*age*exp(-age/B)+C", "C", ("A",), "B", "year", (1.0, 2000.0, 161)),
    "linear": TrajectoryModel("linear", "b0+b1*age", "b0", ("b1",)),
    "quadratic": TrajectoryModel("quadratic", "b0+b1*age+b2*age^2", "b0", ("b1", "b2")),
    "cubic": TrajectoryModel("cubic", "b0+b1*age+b2*age^2+b3*age^3", "b0", ("b1", "b2", "b3")),
}


#: The no-age-effect model (intercept and covariates only): the null of the age test.
CONSTANT = TrajectoryModel("constant", "c", "c", ())


def get_model(name: str) -> TrajectoryModel:
    """The registered model ``name`` (see :data:`MODELS`)."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown trajectory model {name!r}; choose from {sorted(MODELS)}") from None
